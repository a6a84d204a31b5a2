"""kNN-LM: a training-free memory over the model's own hidden states (docs/knnlm.md).

Khandelwal et al. 2020 (eq. 2) with a per-document datastore, as in the neural
cache of Grave et al. 2017. Each stream keeps a FIFO of (key, next token) pairs:
the key of position p is the hidden state h_p (the final LayerNorm's output, or
the last FFN's normalised input), its value the token x_{p+1}. A pair is stored
once its next token is known, so position t may retrieve the pairs of positions
p <= t - 1 - min_distance (never itself, never later positions). Then

    s_i     = cos(h_t, k_i)   or   -|h_t - k_i|^2          (similarity)
    N_t     = the top_k pairs by s_i
    p_kNN   = sum_{i in N_t} softmax_i(s_i / temperature) [v_i = w]
    p(w)    = (1 - lambda) p_LM(w | x_<=t) + lambda p_kNN(w)

and the head returns log p (log-probabilities, so cross-entropy on them scores
log(mixture), never mixed logits). A position with no stored pair keeps
p = p_LM. With lambda = 0 the model's logits are returned untouched.

State per stream (``StreamState``; reset at a new document):

    keys   (B, C, D) storage dtype   ring of keys (normalised for cosine)
    values (B, C) int64              their next tokens
    pos    (B, C) int64              their positions in the document
    count  (B,)                      pairs written since the reset (slot = count mod C)
    seen   (B,)                      input tokens seen since the reset
    pending_key (B, D), pending (B,) the last position's key, waiting for its next token
                                     (the first token of the stream's next segment)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memformers.errors import MemformersError
from memformers.memory.configs import KNNLMConfig, ivf_codes_of, ivf_shape
from memformers.memory.ivf import IVFIndex, search_many
from memformers.memory.knn_store import STORAGE_DTYPES
from memformers.memory.knn_usage import KNNRetrievalStats
from memformers.memory.state import StreamState, remember, replaying


def searching(log_max: torch.Tensor, retrieve_below: float) -> torch.Tensor | None:
    """Adaptive retrieval's rule: the positions that search are those whose largest p_LM
    (``log_max``: its log, any shape) is below ``retrieve_below``; -> bool of that shape,
    or None when every position searches (``retrieve_below`` = 1)."""
    if retrieve_below >= 1.0:
        return None
    return log_max.exp() < retrieve_below


def masked_topk(
    q: torch.Tensor,  # (B, L, D) fp32 queries
    keys: torch.Tensor,  # (B, N, D) candidate keys, any float dtype
    bias: torch.Tensor | None,  # (B, N) fp32 added to every score (-|k|^2 for l2), or None
    valid: torch.Tensor,  # (B, N) bool: the candidate exists
    pos: torch.Tensor,  # (B, N) int64 the candidate's position in the document
    limit: torch.Tensor,  # (B, L) int64: query t may use candidates with pos <= limit[t]
    k: int,
    chunk: int,
    sorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``q . key + bias`` over the allowed candidates, ``chunk`` candidates
    at a time; (scores (B, L, k) fp32, indices (B, L, k) int64), -inf / -1 where fewer
    than k candidates are allowed; best first if ``sorted`` (else in no order: a CPU
    top-k that need not sort takes about half the time)."""
    B, L, _ = q.shape
    best_s = torch.full((B, L, 0), float("-inf"), device=q.device)
    best_i = torch.full((B, L, 0), -1, dtype=torch.long, device=q.device)
    N = keys.shape[1]
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        ok = valid[:, c0:c1]  # (B, n)
        if not bool(ok.any()):
            continue
        sc = torch.bmm(q, keys[:, c0:c1].float().transpose(1, 2))  # (B, L, n)
        if bias is not None:
            sc = sc + bias[:, None, c0:c1]
        p = pos[:, c0:c1]
        allowed = ok[:, None, :]  # (B, 1, n)
        if bool((p.masked_fill(~ok, -1).amax(1) > limit.amin(1)).any()):  # some too recent
            allowed = allowed & (p[:, None, :] <= limit[:, :, None])  # (B, L, n)
        sc = sc.masked_fill(~allowed, float("-inf"))
        s, i = sc.topk(min(k, c1 - c0), dim=-1, sorted=False)
        if best_s.shape[-1]:  # merge with the earlier chunks' best
            s, j = torch.cat([best_s, s], -1).topk(min(k, best_s.shape[-1] + s.shape[-1]),
                                                   dim=-1, sorted=False)
            i = torch.cat([best_i, i + c0], -1).gather(2, j)
            best_s, best_i = s, i
        else:
            best_s, best_i = s, i + c0
    if best_s.shape[-1] < k:  # fewer than k candidates in all
        pad = k - best_s.shape[-1]
        best_s = torch.cat([best_s, best_s.new_full((B, L, pad), float("-inf"))], -1)
        best_i = torch.cat([best_i, best_i.new_full((B, L, pad), -1)], -1)
    if sorted:
        best_s, j = best_s.sort(dim=-1, descending=True)
        best_i = best_i.gather(2, j)
    return best_s, best_i.masked_fill(torch.isinf(best_s), -1)


class KNNLM(StreamState, nn.Module):
    """The kNN-LM head; ``forward(logits, h, tokens, mask, commit) -> log p``. No parameters."""
    state_kind = "knnlm"

    def __init__(self, cfg: KNNLMConfig, d_model: int):
        super().__init__()
        if cfg.storage_dtype not in STORAGE_DTYPES:
            raise MemformersError(f"model.knnlm.storage_dtype must be one of "
                                  f"{', '.join(STORAGE_DTYPES)}; got '{cfg.storage_dtype}'")
        self.cfg, self.d_model = cfg, d_model
        self.dtype = STORAGE_DTYPES[cfg.storage_dtype]
        self.ivf: IVFIndex | None = None
        self.retrieval = KNNRetrievalStats(n_heads=1)  # evaluation statistics (track_usage)
        self.allocate(0, "cpu")

    # ----------------------------------------------------------------- stream state

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        B, C, D = batch_size, self.cfg.capacity, self.d_model
        dev = torch.device(device)
        try:
            self.keys = torch.zeros(B, C, D, dtype=self.dtype, device=dev)
            self.values = torch.zeros(B, C, dtype=torch.long, device=dev)
            self.pos = torch.zeros(B, C, dtype=torch.long, device=dev)
            self.sqnorm = torch.zeros(B, C, device=dev)  # |k|^2 for the l2 similarity
        except (RuntimeError, MemoryError) as e:
            raise MemformersError(f"the kNN-LM datastore needs "
                                  f"{B * self.state_bytes_per_stream() / 2**30:.2f} GiB for {B} "
                                  f"streams; lower model.knnlm.capacity "
                                  f"({e.__class__.__name__})") from None
        self.count = torch.zeros(B, dtype=torch.long, device=dev)
        self.seen = torch.zeros(B, dtype=torch.long, device=dev)
        self.pending_key = torch.zeros(B, D, device=dev)
        self.pending = torch.zeros(B, dtype=torch.bool, device=dev)
        ivf = self.cfg.backend == "ivf" or (self.cfg.backend == "auto" and dev.type == "cpu")
        if ivf and self.ivf is None:  # kept across allocations: its quantizer is trained once
            nlist, train = ivf_shape(self.cfg)
            self.ivf = IVFIndex(self.d_model, nlist, self.cfg.ivf_nprobe, train,
                                cosine=self.cfg.similarity == "cosine",
                                codes=ivf_codes_of(self.cfg.ivf_codes,
                                                   self.cfg.storage_dtype),
                                rescore=self.cfg.ivf_rescore)
        elif not ivf:
            self.ivf = None
        if self.ivf is not None:
            self.ivf.allocate(B)

    def reset(self, streams: torch.Tensor) -> None:
        if replaying():  # the recomputation of a segment leaves the state alone
            return
        streams = streams.to(self.count.device)
        zero = torch.zeros_like(self.count)
        self.count = torch.where(streams, zero, self.count)
        self.seen = torch.where(streams, zero, self.seen)
        self.pending = self.pending & ~streams
        if self.ivf is not None and self.ivf.ready:
            self.ivf.reset(streams.nonzero().flatten().tolist())

    @property
    def filled(self) -> torch.Tensor:  # (B,) valid ring slots are [0, filled)
        return self.count.clamp(max=self.cfg.capacity)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        rows = int(self.filled.max()) if self.count.numel() else 0
        # clones: the ring is written in place afterwards
        return {"keys": self.keys[:, :rows].clone(), "values": self.values[:, :rows].clone(),
                "pos": self.pos[:, :rows].clone(), "sqnorm": self.sqnorm[:, :rows].clone(),
                "count": self.count.clone(), "seen": self.seen.clone(),
                "pending_key": self.pending_key.clone(), "pending": self.pending.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self.allocate(self.count.shape[0], self.count.device)
            return
        keys = tensors["keys"]
        if keys.dim() != 3 or keys.shape[1] > self.cfg.capacity or keys.shape[2] != self.d_model:
            raise MemformersError(f"saved kNN-LM datastore of shape {tuple(keys.shape)} does "
                                  f"not fit capacity {self.cfg.capacity} x d_model "
                                  f"{self.d_model}")
        B, rows, dev = keys.shape[0], keys.shape[1], self.count.device
        self.allocate(B, dev)
        self.keys[:, :rows] = keys.to(dev, self.dtype)
        for name in ("values", "pos", "sqnorm"):
            getattr(self, name)[:, :rows] = tensors[name].to(dev)
        self.count = tensors["count"].to(dev, torch.long).clone()
        self.seen = tensors["seen"].to(dev, torch.long).clone()
        self.pending_key = tensors["pending_key"].to(dev, torch.float32).clone()
        self.pending = tensors["pending"].to(dev, torch.bool).clone()
        if self.ivf is not None:  # rebuilt from the ring (trained now if enough keys)
            self._ivf_add(torch.zeros_like(self.count))

    def state_bytes_per_stream(self) -> int:
        return self.bytes_per_stream(self.cfg, self.d_model)

    @staticmethod
    def bytes_per_stream(cfg: KNNLMConfig, d_model: int) -> int:
        """The datastore of one stream: key, next token, position and |k|^2 per pair."""
        per_pair = d_model * STORAGE_DTYPES[cfg.storage_dtype].itemsize + 8 + 8 + 4
        return cfg.capacity * per_pair + 4 * d_model + 32

    # ----------------------------------------------------------------- read

    def _keys(self, h: torch.Tensor) -> torch.Tensor:
        h = h.detach().float()
        return nn.functional.normalize(h, dim=-1) if self.cfg.similarity == "cosine" else h

    def _candidates(self, h, tokens, mask):
        """This segment's pairs, known once their next token is: the pending key (value:
        the segment's first token), then h_0 .. h_{L-2} (values tokens[1:]).
        -> keys (B, L, D), values (B, L), valid (B, L), pos (B, L)."""
        B, L = tokens.shape
        keys = torch.cat([self.pending_key[:, None], h[:, :L - 1]], 1)  # (B, L, D)
        valid = mask.clone()
        valid[:, 0] &= self.pending
        pos = self.seen[:, None] - 1 + torch.arange(L, device=tokens.device)  # (B, L)
        return keys, tokens, valid, pos

    def _bias(self, keys: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.similarity == "cosine":
            return None
        return -keys.float().pow(2).sum(-1)

    @torch.no_grad()
    def neighbours(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                   sorted: bool = True, coarse: tuple | None = None,
                   ask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top_k pairs each position may retrieve: (similarity (B, L, k) fp32, -inf where
        missing; next tokens (B, L, k) int64), best first if ``sorted``. Reads the state
        only. ``coarse``: ``_coarse(h)``, the IVF lists of the segment's keys, if known.
        ``ask`` (B, L) bool: the positions that search (the others get none; default all)."""
        cfg = self.cfg
        B, L = tokens.shape
        q = self._keys(h)  # (B, L, D)
        scale = 1.0 if cfg.similarity == "cosine" else 2.0  # -|q-k|^2 = 2qk - |k|^2 - |q|^2
        qs = q * scale
        limit = self._limit(torch.arange(L, device=q.device) - 1 - cfg.min_distance, ask)
        k = min(cfg.top_k, cfg.capacity + L)
        s1, v1 = self._ring_neighbours(q, qs, limit, k, sorted=False, coarse=coarse, ask=ask)
        ck, cv, cok, cpos = self._candidates(q, tokens, mask)
        s2, i2 = masked_topk(qs, ck, self._bias(ck), cok, cpos, limit, k, cfg.search_chunk,
                             sorted=False)
        v2 = cv.gather(1, i2.clamp(min=0).flatten(1)).view(B, L, k)
        s, j = torch.cat([s1, s2], -1).topk(k, dim=-1, sorted=sorted)
        v = torch.cat([v1, v2], -1).gather(2, j)
        if cfg.similarity == "l2":  # the constant -|q|^2 makes it the true -distance^2
            s = s - q.pow(2).sum(-1, keepdim=True)
        return s, v

    @torch.no_grad()
    def datastore_neighbours(self, h: torch.Tensor, ask: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top_k stored pairs of each query h (B, L, D), from the ring ONLY: never the
        query's own segment, never the pending key (its next token is unknown), and no
        ``min_distance``: a read of a fixed datastore (Khandelwal et al. 2020, eq. 2), as
        ``memformers.hf`` does. Same output as ``neighbours``; reads the state only."""
        B, L, _ = h.shape
        q = self._keys(h)
        qs = q * (1.0 if self.cfg.similarity == "cosine" else 2.0)
        limit = self._limit(torch.zeros(L, dtype=torch.long, device=q.device), ask)  # all
        s, v = self._ring_neighbours(q, qs, limit, min(self.cfg.top_k, self.cfg.capacity),
                                     ask=ask)
        if self.cfg.similarity == "l2":
            s = s - q.pow(2).sum(-1, keepdim=True)
        return s, v

    def _limit(self, offset: torch.Tensor, ask: torch.Tensor | None) -> torch.Tensor:
        """(B, L) int64: the latest position query t may retrieve, ``seen + offset[t]``;
        -1 (nothing) where ``ask`` (B, L) is False."""
        limit = self.seen[:, None] + offset  # (B, L)
        return limit if ask is None else limit.masked_fill(~ask, -1)

    def _ring_neighbours(self, q, qs, limit, k, sorted: bool = True, coarse=None, ask=None):
        """The ring's top-k for queries q (B, L, D) (scaled: qs) with positions <= limit
        (B, L): (scores (B, L, k), next tokens (B, L, k)); faiss once its index is trained,
        searching only the positions ``ask`` (B, L) marks, if given."""
        if self.ivf is not None and self.ivf.ready:
            return self._ivf_neighbours(q, qs, limit, k, sorted, coarse, ask)
        B, L, _ = q.shape
        C = self.keys.shape[1]
        ring_ok = torch.arange(C, device=q.device)[None, :] < self.filled[:, None]
        s, i = masked_topk(qs, self.keys, None if self.cfg.similarity == "cosine" else
                           -self.sqnorm, ring_ok, self.pos, limit, k, self.cfg.search_chunk,
                           sorted)
        return s, self.values.gather(1, i.clamp(min=0).flatten(1)).view(B, L, k)

    def _ivf_neighbours(self, q, qs, limit, k, sorted: bool = True, coarse=None, ask=None):
        """The ring's top-k through faiss: its pairs every query may use (positions <= the
        segment's smallest limit) from the index, the few more recent ones exactly. Only
        the positions ``ask`` marks are given to faiss (the others find nothing there)."""
        B, L, _ = q.shape
        C = self.cfg.capacity
        every = slice(None)  # (no copies when every position searches)
        rows = [every if ask is None else ask[b].nonzero()[:, 0].cpu().numpy()
                for b in range(B)]  # the positions that search, per stream
        found = search_many([(self.ivf, b, q[b].cpu().numpy()[rows[b]],
                              max(0, int(self.count[b]) - C),
                              None if coarse is None else (coarse[0][b, 1:][rows[b]],
                                                           coarse[1][b, 1:][rows[b]]),
                              self.keys[b]) for b in range(B)], k)
        sims, vals = [], []
        for b in range(B):
            s, ids = (torch.from_numpy(x).to(q.device) for x in found[b])
            if rows[b] is not every:  # the positions that do not search find nothing
                s = s.new_full((L, k), float("-inf")).index_copy_(
                    0, torch.from_numpy(rows[b]).to(q.device), s)
                ids = ids.new_full((L, k), -1).index_copy_(
                    0, torch.from_numpy(rows[b]).to(q.device), ids)
            mine = limit[b] if ask is None else limit[b][ask[b]]  # the searchers' limits
            lim0 = int(mine.min()) if len(mine) else -1
            n = int(self.count[b])
            if not self.ivf.cosine:  # the exact path's scale: 2qk - |k|^2 = -dist^2 + |q|^2
                s = s + q[b].pow(2).sum(-1, keepdim=True)
            if n - 1 > lim0:  # pairs too recent for some queries (min_distance): exact
                s = s.masked_fill(ids > lim0, float("-inf"))
                recent = torch.arange(max(lim0 + 1, n - C), n, device=q.device)  # positions
                rk = self.keys[b, recent % C][None]
                bias = None if self.ivf.cosine else -self.sqnorm[b, recent % C][None]
                rs, ri = masked_topk(qs[b:b + 1], rk, bias, torch.ones_like(recent)[None].bool(),
                                     recent[None], limit[b:b + 1], k, self.cfg.search_chunk,
                                     sorted=False)
                s = torch.cat([s, rs[0]], -1)
                ids = torch.cat([ids, torch.where(ri[0] < 0, ri[0], recent[ri[0].clamp(min=0)])],
                                -1)
                s, j = s.topk(k, dim=-1, sorted=sorted)  # faiss's own results come sorted
                ids = ids.gather(1, j)
            sims.append(s)
            vals.append(self.values[b, ids.clamp(min=0) % C])
        return torch.stack(sims), torch.stack(vals)

    def asks(self, logits: torch.Tensor) -> torch.Tensor | None:
        """(B, L) bool: the positions that search, those whose largest p_LM is below
        ``retrieve_below`` (adaptive retrieval); None = every position."""
        if self.cfg.retrieve_below >= 1.0:  # (spares the logsumexp)
            return None
        x = logits.float()  # log max p = top logit - logsumexp: no (B, L, V) log-softmax
        return searching(x.max(-1).values - torch.logsumexp(x, -1), self.cfg.retrieve_below)

    def mix(self, logits: torch.Tensor, sim: torch.Tensor, values: torch.Tensor,
            lam: float | None = None, temperature: float | None = None) -> torch.Tensor:
        """log((1 - lam) p_LM + lam p_kNN) (B, L, V) fp32 from ``neighbours``' output."""
        lam = self.cfg.lam if lam is None else lam
        temperature = self.cfg.temperature if temperature is None else temperature
        log_lm = torch.log_softmax(logits.float(), dim=-1)
        found = torch.isfinite(sim).any(-1, keepdim=True)  # (B, L, 1)
        w = torch.softmax(sim.masked_fill(~found, 0.0) / temperature, dim=-1)
        w = w.masked_fill(~torch.isfinite(sim), 0.0)
        p_knn = torch.zeros_like(log_lm).scatter_add_(2, values, w)  # (B, L, V)
        mixed = torch.logaddexp(log_lm + math.log1p(-lam), torch.log(p_knn) + math.log(lam))
        return torch.where(found, mixed, log_lm)

    # ----------------------------------------------------------------- write

    def _coarse(self, h: torch.Tensor) -> tuple | None:
        """The IVF lists (similarities, lists), each (B, L + 1, nprobe), of the pending key
        (row 0) and of this segment's keys h (rows 1..L): the search of the segment's
        queries and the add of its pairs (the same vectors, one position apart) share one
        run of the coarse quantizer. None before the index is trained."""
        if self.ivf is None or not self.ivf.ready:
            return None
        B, L, D = h.shape
        x = torch.cat([self.pending_key[:, None], self._keys(h)], 1)  # (B, L + 1, D)
        sims, lists = self.ivf.assign(x.reshape(-1, D).cpu().numpy())
        return sims.reshape(B, L + 1, -1), lists.reshape(B, L + 1, -1)

    @torch.no_grad()
    def write(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
              coarse: tuple | None = None) -> None:
        """Store this segment's known pairs (FIFO); the last real position becomes pending.
        ``coarse``: ``_coarse(h)`` from before the write, if known."""
        B, L = tokens.shape
        C = self.cfg.capacity
        q = self._keys(h)
        keys, values, valid, pos = self._candidates(q, tokens, mask)
        n_new = valid.sum(1)  # (B,)
        rank = valid.long().cumsum(1) - 1
        keep = valid & (rank >= (n_new - C)[:, None])
        b, t = keep.nonzero(as_tuple=True)
        slot = (self.count[b] + rank[b, t]) % C
        self.keys[b, slot] = keys[b, t].to(self.dtype)
        self.values[b, slot] = values[b, t]
        self.pos[b, slot] = pos[b, t]
        self.sqnorm[b, slot] = self.keys[b, slot].float().pow(2).sum(-1)  # of the stored key
        old, first = self.count, self.seen - 1  # the candidates' positions start at first
        self.count = self.count + n_new
        if self.ivf is not None:
            lists = None
            if coarse is not None:  # candidate t is row t of coarse (pending, h_0, ...)
                nearest = coarse[1][:, :L, 0]  # (B, L)
                lists = lambda b, p: nearest[b, p.numpy() - int(first[b])]  # noqa: E731
            self._ivf_add(old, lists)
        n_real = mask.sum(1)  # (B,) real tokens: a prefix of the segment
        last = (n_real - 1).clamp(min=0)
        has = n_real > 0
        self.pending_key = torch.where(has[:, None], q[torch.arange(B), last], self.pending_key)
        self.pending = self.pending | has
        self.seen = self.seen + n_real

    def _ivf_add(self, old: torch.Tensor, lists=None) -> None:
        """Give the faiss indexes the pairs stored since ``old`` (per stream); before the
        quantizer is trained, collect them for training (then add every stored pair).
        ``lists(b, positions)``: their nearest IVF lists, if already known."""
        C = self.cfg.capacity
        self.ivf.add_stored(old, self.count, C,
                            lambda b, pos: self.keys[b, pos.to(self.keys.device) % C], lists)

    def forward(self, logits: torch.Tensor, h: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, commit: bool) -> torch.Tensor:
        """logits (B, L, V), keys h (B, L, D), tokens (B, L), mask (B, L) -> log p (B, L, V)."""
        # The ring is written in place: a checkpointed segment recomputed in backward reads
        # what its first run retrieved and writes nothing (memory/state.py).
        out = logits
        coarse = None
        if self.cfg.lam > 0:
            def read():  # the coarse lists serve the search now and the write below
                coarse = self._coarse(h)
                # best first only where the retrieval statistics look at the top-1
                return coarse, *self.neighbours(h, tokens, mask, sorted=self.retrieval.enabled,
                                                coarse=coarse, ask=self.asks(logits))

            coarse, sim, values = remember(self, read)
            if self.retrieval.enabled and not replaying():
                self.retrieval.record_next_tokens(
                    values.masked_fill(torch.isinf(sim), -1)[:, None], self.cfg.capacity)
            out = self.mix(logits, sim, values)
        if commit and not replaying():
            self.write(h, tokens, mask, coarse)
        return out
