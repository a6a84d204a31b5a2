"""Why does an Infini-attention model (not) retrieve a passkey? Probes of its memory.

Infini-attention (memory/infini.py; Munkhdalai et al. 2024) reads its compressive
memory with linear attention, eq. (3), from the state of the EARLIER segments:

    A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1}),     sigma = ELU + 1 > 0,

with M_{s-1} = sum_j sigma(k_j)^T v_j (eq. 4, "linear"; eq. 5, "delta", writes
v_j minus what M already returns for k_j) and z_{s-1} = sum_j sigma(k_j) over every
stored token j (both rules). The normaliser weighs stored token j at query t by
w_tj = sigma(q_t) . sigma(k_j) > 0 -- no stored token gets zero weight -- so under
the linear rule A_mem is the w-weighted MEAN of all stored values, and a needle of
~10 tokens among thousands of filler tokens is read out only if the query gives it
a much larger share of the normaliser than the uniform n_needle / n_stored.

Two probes, each a piece of evidence for where retrieval breaks:

* ``diagnose_passkey`` runs a model over pairs of passkey prompts that are identical
  but for the key digits and, through forward hooks on every ``InfiniMemory`` (the
  model is not changed), records sigma(K) of every stored token, the final segment's
  Q, local attention output and gated output, and M, z before each update. From
  these it reports per layer and head: the gate sigmoid(beta) (eq. 6); the needle's
  share of the normaliser at the answer positions (``needle_share``) next to the
  uniform share; how much A_mem changes when only the key changes
  (``readout_sensitivity``; also with one query against both memories, so that only
  the memory content differs, and for local attention and the gated output, eq. 6);
  ||M||_F and sum(z) after every segment (eq. 4 grows without bound, eq. 5 need
  not); and the model's teacher-forced probability of the key digits.
* ``capacity_probe`` writes N random (key, value) bindings through the module's own
  update (eq. 4 or 5), segment by segment like the model, and reads the needle's
  value back with the needle's key: the memory's intrinsic capacity at
  d_k = head_dim, with no trained model involved.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from memformers.errors import MemformersError
from memformers.memory.configs import InfiniConfig
from memformers.memory.infini import InfiniMemory, read_memory, sigma
from memformers.runner import SegmentRunner, segments_of
from memformers.tasks.passkey import ANSWER, NEEDLE, Tokenizer, build_passkey_prompt

# ----------------------------------------------------------------------------- prompts


@dataclass
class PasskeyPair:
    """Two passkey sequences (prompt + answer minus its last token) differing only in the key.

    Position p of ``tokens`` predicts ``targets[:, p]``; the answer positions are the
    positions whose targets are the key's digit tokens (all in the last segment).
    """

    tokens: np.ndarray  # (2, T) int64: row 0 prompt A, row 1 prompt B
    targets: np.ndarray  # (2, T) int64: next-token labels, -100 outside the answer
    answer_positions: np.ndarray  # (n_ans,) positions whose next tokens are key digits
    needle_positions: np.ndarray  # (n_needle,) positions of the needle's digit tokens
    keys: tuple[str, str]


def _has_digit(tokenizer: Tokenizer, token: int) -> bool:
    return any(c.isdigit() for c in tokenizer.decode([int(token)]))


def _digit_derangement(rng: np.random.Generator, first: str) -> dict[str, str]:
    """A permutation of '0'..'9' moving every digit, that maps ``first`` to a nonzero digit."""
    while True:
        perm = rng.permutation(10)
        if (perm != np.arange(10)).all() and perm[int(first)] != 0:
            return {str(d): str(int(perm[d])) for d in range(10)}


def make_passkey_pair(tokenizer: Tokenizer, length: int, depth: float,
                      rng: np.random.Generator, *, digits: int = 5) -> PasskeyPair:
    """Prompts A and B of exactly ``length`` tokens: same filler and needle position,
    every key digit different (B's key is a digit derangement of A's).

    Both are built by the task's own ``build_passkey_prompt``; where the tokenizer
    makes them differ elsewhere (e.g. a BPE merging digits differently), B is instead
    A with the digit tokens of the needle and the answer swapped token by token.
    """
    key_a = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    perm = _digit_derangement(rng, key_a[0])
    key_b = "".join(perm[c] for c in key_a)
    n_answer = len(tokenizer.encode(ANSWER.format(key=key_a)))
    ex_a = build_passkey_prompt(tokenizer, length - n_answer + 1, depth, key_a)
    ex_b = build_passkey_prompt(tokenizer, length - n_answer + 1, depth, key_b)
    full_a = np.concatenate([ex_a.tokens, ex_a.answer])  # (T + 1,) prompt + whole answer
    full_b = np.concatenate([ex_b.tokens, ex_b.answer])
    n_needle = len(tokenizer.encode(NEEDLE.format(key=key_a)))
    needle_span = np.arange(ex_a.needle_start, ex_a.needle_start + n_needle)
    allowed = np.concatenate([needle_span, np.arange(len(ex_a.tokens), len(full_a))])
    aligned = (len(full_b) == len(full_a) and ex_b.needle_start == ex_a.needle_start
               and np.isin(np.flatnonzero(full_a != full_b), allowed).all())
    if not aligned:  # swap the digits inside the tokens of A's needle and answer
        full_b = full_a.copy()
        for p in allowed:
            text = tokenizer.decode([int(full_a[p])])
            if any(c.isdigit() for c in text):
                ids = tokenizer.encode("".join(perm.get(c, c) for c in text))
                if len(ids) != 1:
                    raise MemformersError(
                        f"cannot swap the key digits token by token: {text!r} re-encodes "
                        f"to {len(ids)} tokens with this tokenizer")
                full_b[p] = ids[0]

    full = np.stack([full_a, full_b])  # (2, T + 1)
    tokens = full[:, :-1].copy()  # (2, T): position p predicts full[:, p + 1]
    first = len(ex_a.tokens) - 1  # predicts the answer's first token
    targets = np.full_like(tokens, -100)
    targets[:, first:] = full[:, first + 1:]
    answer_positions = np.asarray(
        [first + i for i, t in enumerate(ex_a.answer) if _has_digit(tokenizer, t)])
    needle_positions = np.asarray(
        [p for p in needle_span if _has_digit(tokenizer, full_a[p])])
    return PasskeyPair(tokens=tokens, targets=targets, answer_positions=answer_positions,
                       needle_positions=needle_positions, keys=(key_a, key_b))


# ----------------------------------------------------------------------------- capture


@dataclass
class LayerRecord:
    """What one InfiniMemory saw while a batch of streams was fed segment by segment."""

    module: InfiniMemory
    sk: list[torch.Tensor] = field(default_factory=list)  # per segment (B, H, L, d_k)
    m_norm: list[torch.Tensor] = field(default_factory=list)  # per segment (B, H) ||M_s||_F
    z_sum: list[torch.Tensor] = field(default_factory=list)  # per segment (B, H) sum(z_s)
    # the last segment only:
    q: torch.Tensor | None = None  # (B, H, L, d_k) as the memory reads it (no position enc.)
    local: torch.Tensor | None = None  # (B, H, L, d_v) A_dot
    out: torch.Tensor | None = None  # (B, H, L, d_v) the gated output, eq. (6)
    M: torch.Tensor | None = None  # (B, H, d_k, d_v) M_{s-1}, before this segment's update
    z: torch.Tensor | None = None  # (B, H, d_k) z_{s-1}

    def stored_sk(self) -> torch.Tensor:
        """(B, H, N, d_k) sigma(K) of every token written before the last segment."""
        return torch.cat(self.sk[:-1], dim=2)


class InfiniRecorder:
    """Context manager: hooks on every InfiniMemory of ``model`` fill a ``LayerRecord``.

    ``records`` maps module names (e.g. "blocks.3.attn.memory") to records. The hooks
    only read; the forward pass is unchanged.
    """

    def __init__(self, model: torch.nn.Module):
        self.records = {name: LayerRecord(m) for name, m in model.named_modules()
                        if isinstance(m, InfiniMemory)}
        self._handles: list = []

    def __enter__(self) -> InfiniRecorder:
        for rec in self.records.values():
            mod = rec.module
            sig = inspect.signature(mod.forward)

            def pre(module, args, kwargs, rec=rec, sig=sig):
                a = sig.bind(*args, **kwargs).arguments
                q, k, mask = a["q"], a["k"], a["mask"]
                B, H, _, d = q.shape
                M = module.M if module.M is not None else torch.zeros(B, H, d, d)
                z = module.z if module.z is not None else torch.zeros(B, H, d)
                rec.M, rec.z = M.detach().float().cpu().clone(), z.detach().float().cpu().clone()
                rec.q = q.detach().float().cpu()
                rec.local = a["local_out"].detach().float().cpu()
                if a["commit"]:  # written tokens only, masked as the module writes them
                    sk = sigma(k.detach().float()) * mask[:, None, :, None].float()
                    rec.sk.append(sk.cpu())

            def post(module, args, kwargs, output, rec=rec, sig=sig):
                rec.out = output.detach().float().cpu()
                if sig.bind(*args, **kwargs).arguments["commit"]:
                    rec.m_norm.append(module.M.detach().float().flatten(2).norm(dim=-1).cpu())
                    rec.z_sum.append(module.z.detach().float().sum(-1).cpu())

            self._handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(mod.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_segments(model: torch.nn.Module, tokens: torch.Tensor, segment_len: int
                 ) -> tuple[dict[str, LayerRecord], torch.Tensor]:
    """Feed (B, T) tokens segment by segment from a fresh state (eval, no grad).

    Returns the InfiniMemory records and the (B, L, V) float logits of the last segment.
    """
    B, T = tokens.shape
    if T % segment_len:
        raise MemformersError(f"length {T} must be a multiple of segment_len {segment_len}")
    runner = SegmentRunner(model)
    with runner.fresh_state(B, tokens.device), InfiniRecorder(model) as rec:
        for _, logits, _ in runner.run(segments_of(tokens, segment_len)):  # noqa: B007
            pass  # the recorder's hooks keep what the probes read; the last logits are returned
    if not rec.records:
        raise MemformersError("the model has no Infini-attention layer (model.infini.layers)")
    return rec.records, logits.float()


# ----------------------------------------------------------------------------- measures


def needle_share(sq: torch.Tensor, sk: torch.Tensor, needle: torch.Tensor | np.ndarray
                 ) -> torch.Tensor:
    """The needle's share of the eq. (3) normaliser, (B, H, L).

    sum_{j in needle} sigma(q_t).sigma(k_j) / sum_{j stored} sigma(q_t).sigma(k_j) for
    query features ``sq`` (B, H, L, d_k) and stored key features ``sk`` (B, H, N, d_k);
    ``needle`` indexes the N stored tokens. The denominator is sigma(q_t) . z.
    """
    w = sq @ sk.transpose(-2, -1)  # (B, H, L, N) weights of the stored tokens
    return w[..., torch.as_tensor(needle, dtype=torch.long)].sum(-1) / w.sum(-1)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||a|| per (B, H), norms over (L, d) of (B, H, L, d) tensors."""
    return (a - b).flatten(2).norm(dim=-1) / a.flatten(2).norm(dim=-1).clamp_min(1e-30)


def _summary(series: np.ndarray) -> dict:
    """first / middle / last of a list over segments."""
    n = len(series)
    return {"first": float(series[0]), "middle": float(series[n // 2]),
            "last": float(series[-1])}


def _teacher_forced(logits: torch.Tensor, pairs: list[PasskeyPair], row: int, final: int
                    ) -> tuple[list[float], list[bool]]:
    """Per pair: mean probability of the key digits and whether all argmaxes hit them."""
    logp = torch.log_softmax(logits.cpu(), dim=-1)  # (S, L, V)
    p_digits, exact = [], []
    for i, pair in enumerate(pairs):
        lp = logp[i, torch.as_tensor(pair.answer_positions - final)]  # (n_ans, V)
        tgt = torch.as_tensor(pair.targets[row, pair.answer_positions])  # (n_ans,)
        p_digits.append(lp.gather(-1, tgt[:, None]).exp().mean().item())
        exact.append(bool((lp.argmax(-1) == tgt).all()))
    return p_digits, exact


def diagnose_passkey(model: torch.nn.Module, pairs: list[PasskeyPair], segment_len: int,
                     device: str | torch.device = "cpu") -> dict:
    """Feed S prompt pairs (all A as one batch, then all B as one batch) and measure.

    Per Infini layer and head (means over the pairs; over A and B where a measure is
    per prompt): ``gate``; ``needle_share`` and ``uniform_share``; ``memory_norm``
    (||M||_F, sum z after each segment); ``readout_sensitivity`` at the answer
    positions of
      memory              A_mem(A) vs A_mem(B), eq. (3), each with its own query
      memory_same_query   A's query read from A's and from B's memory (M, z): the
                          part of the difference that comes from the memory content
      local / output      local attention A_dot / the gated output, eq. (6)
    and ``readout_sensitivity_first``, the same at the first answer position only:
    its input token is the same in A and B, while later answer positions are fed the
    (different) key digits under teacher forcing. Model level: teacher-forced
    probability of the key digits and exact match of their argmax. ``checks`` compare
    the recomputation with the module (A_mem via the gated output, z via the captured
    sigma(K)): both should be ~0.

    A and B run as separate batches of the same shape, so identical prompts give
    bitwise identical records (sensitivity exactly 0).
    """
    T = pairs[0].tokens.shape[1]
    if any(p.tokens.shape[1] != T for p in pairs):
        raise MemformersError("all prompt pairs of one diagnosis must have the same length")
    runs = [run_segments(model, torch.as_tensor(np.stack([p.tokens[r] for p in pairs]),
                                                device=device), segment_len)
            for r in (0, 1)]  # [(records, (S, L, V) logits)] for A, B
    final = T - segment_len  # first position of the last segment = tokens in memory
    if any((p.answer_positions < final).any() for p in pairs):
        raise MemformersError("the answer must lie in the last segment")

    p_digits, exact = [], []
    for r, (_, logits) in enumerate(runs):
        p, e = _teacher_forced(logits, pairs, r, final)
        p_digits += p
        exact += e
    n_seg = T // segment_len
    needle_seg = sorted({int(p) // segment_len for p in pairs[0].needle_positions})
    result = {
        "length": T, "segments": n_seg, "n_stored": final,
        "needle_positions": pairs[0].needle_positions.tolist(), "needle_segments": needle_seg,
        "needle_segments_back": n_seg - 1 - max(needle_seg),
        "needle_in_memory": bool(max(needle_seg) < n_seg - 1),
        "needle_in_xl_cache": bool(n_seg - 2 in needle_seg),
        "keys": [list(p.keys) for p in pairs],
        "model": {"p_digits": float(np.mean(p_digits)), "exact_match": float(np.mean(exact)),
                  "p_digits_per_prompt": p_digits, "exact_match_per_prompt": exact},
        "layers": {},
    }

    for name, rec_a in runs[0][0].items():
        rec_b = runs[1][0][name]
        mod = rec_a.module
        H, eps = mod.n_heads, mod.cfg.eps
        g = mod.gate_values().float().cpu().view(1, H, 1, 1)
        a_mem, checks_out, checks_z, shares = [], [], [], []
        for rec in (rec_a, rec_b):
            a = read_memory(sigma(rec.q), rec.M, rec.z, eps)  # (S, H, L, d_v)
            a_mem.append(a)
            checks_out.append((g * a + (1 - g) * rec.local - rec.out).abs().max().item())
            sk = rec.stored_sk()  # (S, H, N, d_k)
            checks_z.append(((sk.sum(2) - rec.z).norm() / rec.z.norm().clamp_min(1e-30)).item())
            sq = sigma(rec.q)  # (S, H, L, d_k)
            for i, pair in enumerate(pairs):
                needle = pair.needle_positions[pair.needle_positions < final]
                if len(needle):
                    ans = torch.as_tensor(pair.answer_positions - final)
                    sh = needle_share(sq[i:i + 1, :, ans], sk[i:i + 1], needle)  # (1, H, n)
                    shares.append(sh.mean(dim=(0, 2)))  # (H,)
        same_q = read_memory(sigma(rec_a.q), rec_b.M, rec_b.z, eps)  # A's query, B's memory
        pairs_ab = {"memory": (a_mem[0], a_mem[1]), "memory_same_query": (a_mem[0], same_q),
                    "local": (rec_a.local, rec_b.local), "output": (rec_a.out, rec_b.out)}
        sens = {k: [] for k in pairs_ab}
        sens_first = {k: [] for k in pairs_ab}
        for i, pair in enumerate(pairs):
            ans = torch.as_tensor(pair.answer_positions - final)
            for k, (xa, xb) in pairs_ab.items():
                sens[k].append(relative_change(xa[i:i + 1, :, ans], xb[i:i + 1, :, ans])[0])
                sens_first[k].append(relative_change(xa[i:i + 1, :, ans[:1]],
                                                     xb[i:i + 1, :, ans[:1]])[0])
        n_needle = int((pairs[0].needle_positions < final).sum())
        uniform = n_needle / final if final else float("nan")
        share = torch.stack(shares).mean(0) if shares else torch.full((H,), float("nan"))
        m_norm = torch.cat([torch.stack(r.m_norm) for r in (rec_a, rec_b)], 1)  # (n_seg, 2S, H)
        z_sum = torch.cat([torch.stack(r.z_sum) for r in (rec_a, rec_b)], 1)
        m_norm, z_sum = m_norm.mean(1).T.numpy(), z_sum.mean(1).T.numpy()  # (H, n_seg)
        result["layers"][name] = {
            "layer": int(name.split(".")[1]) if name.startswith("blocks.") else name,
            "update": mod.cfg.update,
            "gate": mod.gate_values().float().cpu().tolist(),
            "needle_share": share.tolist(),
            "uniform_share": uniform,
            "share_ratio": (share / uniform).tolist() if n_needle else None,
            "readout_sensitivity": {k: torch.stack(v).mean(0).tolist() for k, v in sens.items()},
            "readout_sensitivity_first": {k: torch.stack(v).mean(0).tolist()
                                          for k, v in sens_first.items()},
            "memory_norm": {
                "M_fro": m_norm.tolist(), "z_sum": z_sum.tolist(),
                "M_fro_summary": [_summary(h) for h in m_norm],
                "z_sum_summary": [_summary(h) for h in z_sum],
            },
            "checks": {"a_mem_vs_module_max_abs": max(checks_out), "z_rel_err": max(checks_z)},
        }
    return result


# ----------------------------------------------------------------------------- capacity


def write_and_read(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, *,
                   update: str = "linear", chunk: int = 256, eps: float = 1e-6
                   ) -> torch.Tensor:
    """Write (B, N, d) key/value bindings into a one-head InfiniMemory, then read.

    The module's own update (eq. 4 "linear" or eq. 5 "delta") runs on segments of
    ``chunk`` tokens, as the model writes a segment at a time; the read is eq. (3)
    from the final state for (B, Q, d) queries. Returns (B, Q, d) retrieved vectors.
    """
    B, N, d = keys.shape
    mem = InfiniMemory(InfiniConfig(layers=[0], update=update, eps=eps),
                       n_heads=1, head_dim=d, d_model=d)
    mem.allocate(B, keys.device)
    with torch.no_grad():
        for s in range(0, N, chunk):
            k = keys[:, None, s:s + chunk].float()  # (B, 1, l, d)
            v = values[:, None, s:s + chunk].float()
            mem(k, k, v, torch.zeros_like(v), torch.ones(B, k.shape[2], dtype=torch.bool),
                True)
        q = queries[:, None].float()  # (B, 1, Q, d)
        zero = torch.zeros_like(q)
        out = mem(q, q, zero, zero, torch.ones(B, q.shape[2], dtype=torch.bool), False)
    return (out / mem.gate_values().view(1, 1, 1, 1))[:, 0]  # local_out = 0: out = g A_mem


def probe_bindings(n: int, d: int, kind: str, trials: int, gen: torch.Generator, *,
                   n_patterns: int = 64, key_scale: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(keys, values) (trials, n, d) and the needle's index (n // 2).

    ``gaussian``: every key and value i.i.d. N(0, key_scale^2) / N(0, 1).
    ``repeated``: the filler cycles through ``n_patterns`` fixed (key, value) patterns
    (a repeated filler text); the needle is a fresh Gaussian binding.
    """
    if kind == "gaussian":
        keys = torch.randn(trials, n, d, generator=gen) * key_scale
        values = torch.randn(trials, n, d, generator=gen)
    elif kind == "repeated":
        pk = torch.randn(trials, n_patterns, d, generator=gen) * key_scale
        pv = torch.randn(trials, n_patterns, d, generator=gen)
        idx = torch.arange(n) % n_patterns
        keys, values = pk[:, idx].clone(), pv[:, idx].clone()
        keys[:, n // 2] = torch.randn(trials, d, generator=gen) * key_scale
        values[:, n // 2] = torch.randn(trials, d, generator=gen)
    else:
        raise MemformersError(f"probe key kind must be 'gaussian' or 'repeated', got {kind!r}")
    return keys, values, n // 2


def capacity_probe(ns=(16, 64, 256, 1024, 4096), d: int = 32, *,
                   updates=("linear", "delta"), kinds=("gaussian", "repeated"),
                   trials: int = 8, chunk: int = 256, n_patterns: int = 64,
                   key_scale: float = 1.0, seed: int = 0) -> list[dict]:
    """Cosine of the needle's retrieved value with its stored value, vs N bindings.

    One row per (update, kind, N): ``cosine`` mean and std over ``trials`` and the
    needle's ``share`` of the eq. (3) normaliser when queried with its own key
    (uniform would be 1 / N).
    """
    rows = []
    for kind in kinds:
        for n in ns:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
            keys, values, j = probe_bindings(n, d, kind, trials, gen, n_patterns=n_patterns,
                                             key_scale=key_scale)
            sk = sigma(keys)  # (trials, n, d)
            share = needle_share(sk[:, None, j:j + 1], sk[:, None], [j])  # (trials, 1, 1)
            for update in updates:
                got = write_and_read(keys, values, keys[:, j:j + 1], update=update,
                                     chunk=chunk)[:, 0]  # (trials, d)
                cos = torch.nn.functional.cosine_similarity(got, values[:, j], dim=-1)
                rows.append({"update": update, "keys": kind, "N": n, "cosine": cos.mean().item(),
                             "cosine_std": cos.std().item() if trials > 1 else 0.0,
                             "share": share.mean().item(), "uniform_share": 1.0 / n})
    return rows
