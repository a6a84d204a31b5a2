"""Retrieval statistics of the kNN memory, for evaluation (issue: memory that pays off).

For each query position t of a kNN layer and each retrieved pair (the stored key of
document position w), the pair is a *hit* when the token that followed w equals the
token t has to predict:

    precision_h = #{(t, w) in top-k_h(t) : x_{w+1} = x_{t+1}} / #{(t, w) retrieved}
    top1_h      = the same over each query's best-scoring pair only
    copy_h      = #{(t, w) in top-k_h(t) : x_w = x_{t+1}} / #{(t, w) retrieved}

``copy`` is what an attention memory can use directly: the value stored at w is computed
from token x_w, so a head that retrieves a w whose own token is the next one can copy it
(an induction head does this within its window). For the kNN-LM, whose pairs store
x_{w+1} itself, ``precision`` is the measure.
    chance      = mean_t #{w in memory : x_{w+1} = x_{t+1}} / #{w in memory}

``chance`` is what a pair drawn at random from the same memory scores; a head whose
precision is near it retrieves nothing that predicts the next token.

How a slot maps to a document position: a stream's memory is reset at each new
document and written with that document's real tokens in order (``combine="gate"``:
each segment as it is read; ``"joint"``: each segment once it leaves the local
window). The written pair number ``i`` (0-based since the reset) is therefore document
token ``i`` and lives in ring slot ``i mod C``; with ``c`` pairs written before this
segment, slot ``s`` holds pair ``w = c - 1 - ((c - 1 - s) mod C)``. The statistics keep
each stream's targets since its reset to look ``x_{w+1}`` up.

The memory records what it retrieved (``KNNRetrievalStats.record``, only while enabled
by ``memformers.memory.track_usage``); the evaluation loop then hands each segment
to ``observe`` (its tokens, targets, mask and new-document flags).
"""

from __future__ import annotations

import torch


class _Tokens:
    """An append-only int64 sequence with amortised O(1) appends; ``view()`` is a tensor
    of what it holds (no copy)."""

    def __init__(self):
        self.buf, self.n = torch.empty(0, dtype=torch.long), 0

    def extend(self, values: torch.Tensor) -> None:
        m = self.n + len(values)
        if m > len(self.buf):
            grown = torch.empty(max(m, 2 * len(self.buf), 1024), dtype=torch.long)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:m] = values
        self.n = m

    def view(self) -> torch.Tensor:
        return self.buf[:self.n]

    def __len__(self) -> int:
        return self.n


class KNNRetrievalStats:
    def __init__(self, n_heads: int):
        self.n_heads = n_heads
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        H = self.n_heads
        self.hits = torch.zeros(H, dtype=torch.float64)  # retrieved pairs that predict
        self.top1 = torch.zeros(H, dtype=torch.float64)
        self.copies = torch.zeros(H, dtype=torch.float64)  # retrieved x_w = the target
        self.pairs = torch.zeros(H, dtype=torch.float64)  # retrieved pairs
        self.queries = torch.zeros(H, dtype=torch.float64)  # queries with a top-1
        self.chance = torch.zeros(1, dtype=torch.float64)  # sum over queries of the chance
        self.chance_n = torch.zeros(1, dtype=torch.float64)
        # per stream: targets and tokens of its document so far (grown by doubling, so that
        # a long document costs no more per segment than a short one)
        self.history: list[_Tokens] = []
        self.inputs: list[_Tokens] = []
        self.pending: list[tuple] = []  # what the forwards retrieved since the last observe

    def record(self, slots: torch.Tensor, count: torch.Tensor, capacity: int) -> None:
        """slots (B, H, L, k) retrieved (-1 = none), count (B,) pairs written before."""
        if self.enabled:
            self.pending.append(("slots", slots.detach().cpu(), count.detach().cpu(), capacity))

    def record_next_tokens(self, tokens: torch.Tensor, capacity: int) -> None:
        """For a memory that stores next tokens itself (the kNN-LM): the retrieved pairs'
        next tokens (B, H, L, k), -1 = none."""
        if self.enabled:
            self.pending.append(("tokens", tokens.detach().cpu(), None, capacity))

    @torch.no_grad()
    def observe(self, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                new_doc: torch.Tensor) -> None:
        """After the forward of a segment: tokens, targets (B, L) (-100 = none), mask (B, L)
        real tokens, new_doc (B,) the streams that started a document with this segment."""
        tokens, targets, mask, new_doc = tokens.cpu(), targets.cpu(), mask.cpu(), new_doc.cpu()
        B = targets.shape[0]
        while len(self.history) < B:
            self.history.append(_Tokens())
            self.inputs.append(_Tokens())
        for b in new_doc.nonzero().flatten().tolist():
            self.history[b], self.inputs[b] = _Tokens(), _Tokens()
        for kind, got, count, C in self.pending:
            for b in range(B):
                hist = self.history[b].view()
                c = int(count[b]) if kind == "slots" else len(hist)
                if c == 0:  # an empty memory retrieves nothing
                    continue
                if kind == "slots":
                    w = c - 1 - torch.remainder(c - 1 - got[b].clamp(min=0), C)  # pair numbers
                    nxt, own = hist[w], self.inputs[b].view()[w]
                else:
                    nxt, own = got[b], None
                self._score(nxt, own, got[b] >= 0, targets[b], hist[max(0, c - C):c])
        self.pending = []
        for b in range(B):  # the written pairs' tokens and next tokens, in write order
            self.history[b].extend(targets[b][mask[b]])
            self.inputs[b].extend(tokens[b][mask[b]])

    def _score(self, nxt, own, found, want, stored) -> None:
        """nxt, own, found (H, L, k): retrieved pairs' next and own tokens (own: None for
        a memory of next tokens); want (L,); stored: the memory's next tokens. With grouped
        query heads (the HF retrofit) a memory's rows are its G query heads' L positions
        one after another: (H, G*L, k)."""
        ok = want != -100
        if not bool(ok.any()) or not len(stored):
            return
        rows = want.repeat(nxt.shape[1] // len(want))  # (G*L,)
        found = found & (rows != -100)[None, :, None]
        hit = (nxt == rows[None, :, None]) & found
        if own is not None:
            self.copies += ((own == rows[None, :, None]) & found).sum((1, 2)).double()
        self.hits += hit.sum((1, 2)).double()
        self.pairs += found.sum((1, 2)).double()
        self.top1 += hit[:, :, 0].sum(1).double()
        self.queries += found[:, :, 0].sum(1).double()
        freq = torch.bincount(stored, minlength=int(want.max()) + 1).double()
        self.chance += (freq[want[ok].clamp(min=0)] / len(stored)).sum()
        self.chance_n += float(ok.sum())

    def report(self, world_size: int = 1) -> dict | None:
        """{"precision": [H], "top1": [H], "chance": float, "queries": int, and for an
        attention memory "copy": [H]} or None."""
        sums = torch.cat([self.hits, self.pairs, self.top1, self.queries, self.copies,
                          self.chance, self.chance_n])
        if world_size > 1:
            import torch.distributed as dist

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            sums = sums.to(dev)
            dist.all_reduce(sums)
            sums = sums.cpu()
        H = self.n_heads
        hits, pairs, top1, queries, copies = sums[:5 * H].view(5, H)
        chance, chance_n = float(sums[5 * H]), float(sums[5 * H + 1])
        if not chance_n:
            return None
        out = {"precision": (hits / pairs.clamp(min=1)).tolist(),
               "top1": (top1 / queries.clamp(min=1)).tolist(),
               "chance": chance / chance_n, "queries": int(chance_n)}
        if bool(copies.any()):
            out["copy"] = (copies / pairs.clamp(min=1)).tolist()
        return out
