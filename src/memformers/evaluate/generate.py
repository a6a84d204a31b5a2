"""Stream a long prompt through a segment-recurrent model, then generate from it.

The model only ever sees segments aligned as in training: the prompt is cut into
``segment_len`` pieces and every full piece is committed (XL cache and memories
updated). The trailing partial piece is *not* committed: each decoding step re-runs
it together with the tokens generated so far with ``commit=False``, reads the logits
of the last position and picks the next token. When that pending piece reaches
``segment_len`` tokens it is run once with ``commit=True`` and a new piece starts, so
the stored state is always exactly "all full segments so far" -- the same state a
training stream would have at that point.

Cost: re-running the pending piece is at most ``segment_len`` tokens per step, the
price of keeping memories that are updated per segment (not per token) exact.
"""

from __future__ import annotations

import torch

from memformers.runner import Segment, SegmentRunner, segments_of


def sample_next(
    logits: torch.Tensor,  # (B, V) logits of the last position
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) int64
    """Greedy when ``temperature <= 0``, else sample from softmax(logits / T) (top-k if > 0)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def feed_and_generate(
    model,
    prompt_tokens: torch.Tensor,  # (B, T) int64
    n_new: int,
    segment_len: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    new_doc: bool = True,
) -> torch.Tensor:  # (B, n_new) int64
    """Feed ``prompt_tokens`` segment by segment, then decode ``n_new`` tokens.

    With ``new_doc`` (default) the model's state is freshly allocated for B streams and
    the first segment is flagged as a new document; with ``new_doc=False`` the prompt
    continues the streams already held by the model.
    """
    B, T = prompt_tokens.shape
    if T == 0:
        raise ValueError("feed_and_generate needs a non-empty prompt")
    device = prompt_tokens.device
    if new_doc:
        model.allocate_state(B, device)
    runner = SegmentRunner(model)
    n_full = T // segment_len
    last = None
    for _, logits, _ in runner.run(segments_of(prompt_tokens[:, :n_full * segment_len],
                                               segment_len, new_doc=new_doc)):
        last = logits[:, -1]  # (B, V)
    # the first segment run flags the new document (when no full segment did)
    first = torch.full((B,), new_doc and n_full == 0, dtype=torch.bool, device=device)

    def run(seg: torch.Tensor, commit: bool) -> torch.Tensor:  # last-position logits (B, V)
        nonlocal first
        logits, _ = runner.forward(Segment(seg, new_doc=first, commit=commit))
        first = torch.zeros_like(first)
        return logits[:, -1]

    pending = prompt_tokens[:, n_full * segment_len:]  # (B, r), r < segment_len

    generated = torch.empty(B, n_new, dtype=torch.long, device=device)
    for i in range(n_new):
        if pending.shape[1] == segment_len:  # a full segment: commit it, start a new one
            last = run(pending, commit=True)
            pending = pending[:, :0]
        elif pending.shape[1] > 0:
            last = run(pending, commit=False)
        nxt = sample_next(last, temperature=temperature, top_k=top_k, generator=generator)
        generated[:, i] = nxt
        pending = torch.cat([pending, nxt[:, None]], dim=1)
    return generated
