"""FIFO (key, value) memories of the kNN layer and the searches over them.

One memory per (stream, head) -- S = B * H memories -- each a ring buffer of
``capacity`` rows (Memorizing Transformers sec. 3: FIFO, cleared when its
stream starts a new document, nothing backpropagated into it):

    keys, values : (B, H, C, d) in ``storage_dtype``   (fp16 halves the footprint)
    count        : (B,) int64 rows written since the stream's last reset
    filled_b     = min(count_b, C)        valid rows are always slots [0, filled_b)
    next slot_b  = count_b mod C          (the oldest row is overwritten first)

Every head of a stream receives the same tokens, so ``count`` is per stream.

Searches implement one small interface, ``SearchBackend.search(queries, k)``:
queries (S, Q, d) fp32 -> (scores (S, Q, k) fp32, slots (S, Q, k) int64), best
first, missing entries (memory holding fewer than k rows) as score -inf and
slot -1. Slots index the ring, so values are always gathered from the store.

* ``ExactSearch``: exact maximum inner product, chunked over memory rows, never
  materialising a (queries x capacity) score matrix.
* ``FaissSearch``: approximate search with faiss (flat / IVF / HNSW indexes) on
  time-ordered blocks of the ring: one index per (memory, block), the oldest
  block dropped whole when the ring wraps into it.

Measured cost of one segment (benchmarks/bench_knn_search.py, 16 full memories
of d=32, 512 queries each, top-32, then adding the segment's 512 keys of every
(stream, head); medians of 3, quiet 2-core CPU, torch 2 threads):

    capacity  exact(fp16)  faiss flat  faiss ivf nprobe 8 / 64 (recall@32)
    65,536       1.3 s       2.1 s      0.34 s (0.38) / 1.2 s (0.89)
    262,144      5.3 s      10.5 s      1.5 s (0.43) / 5.2 s (0.92)

(HNSW at 65,536, an earlier run under load 4: 11.8 s per segment, recall 0.99, half of
it graph insertion.)
Keys there are random unit vectors, the hardest case for IVF recall.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from memformers.errors import MemformersError
from memformers.memory.configs import IVF_CODES, KNNConfig, ivf_codes_of, ivf_shape

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float32": torch.float32}


AUTO_IVF_CAPACITY = 65536  # "auto": IVF from this many rows per (stream, head), on the CPU


def auto_backend(cfg: KNNConfig, device: torch.device) -> str:
    """``backend = "auto"``: IVF on the CPU for memories of 65,536 rows and more (1.7x
    faster training at recall 0.96-0.97, BENCHMARKS.md "Fast kNN search"), else exact
    (a smaller memory is cheap to search exactly, and a GPU's batched matmul is fast)."""
    if device.type == "cpu" and cfg.capacity >= AUTO_IVF_CAPACITY:
        return "ivf"
    return "exact"


def knn_footprint_bytes(cfg: KNNConfig, n_heads: int, head_dim: int, batch_size: int,
                        n_layers_with_knn: int = 1) -> int:
    """Up-front estimate of the bytes all kNN memories of a model will hold.

    Ring storage is ``capacity * H * d * 2 (keys, values) * bytes`` per stream and
    layer; the ivf backend also keeps a copy of every key in its indexes
    (``ivf_codes``) and an 8-byte id, the faiss backend an fp32 copy (plus graph links
    for HNSW).
    """
    per_vec = 2 * head_dim * STORAGE_DTYPES[cfg.storage_dtype].itemsize
    if cfg.backend == "block":
        per_vec += 4 * head_dim / cfg.block_size  # one fp32 mean key per block
    if cfg.backend == "ivf" or cfg.backend == "auto" and cfg.capacity >= AUTO_IVF_CAPACITY:
        codes = ivf_codes_of(cfg.ivf_codes, cfg.storage_dtype)
        per_vec += IVF_CODES[codes] * head_dim + 8  # faiss's copy of the key and
        # its id (planned for "auto" whatever the device: an upper bound)
    if cfg.backend == "faiss":
        per_vec += 4 * head_dim
        if cfg.faiss_index == "hnsw":
            per_vec += 2 * cfg.faiss_hnsw_m * 4  # level-0 links (upper levels are small)
        elif cfg.faiss_index == "ivf":
            per_vec += 8  # stored ids
    per_stream = int(cfg.capacity * n_heads * per_vec) + 8
    return per_stream * batch_size * n_layers_with_knn


# --------------------------------------------------------------------------- the store


class KNNStore:
    """Ring buffers of (key, value) pairs, one per (stream, head)."""

    def __init__(self, cfg: KNNConfig, n_heads: int, head_dim: int):
        if cfg.storage_dtype not in STORAGE_DTYPES:
            raise MemformersError(f"knn storage_dtype must be one of "
                                  f"{', '.join(STORAGE_DTYPES)}; got '{cfg.storage_dtype}'")
        self.cfg = cfg
        self.capacity, self.n_heads, self.head_dim = cfg.capacity, n_heads, head_dim
        self.dtype = STORAGE_DTYPES[cfg.storage_dtype]
        self.batch_size = 0
        self.device: torch.device = torch.device("cpu")
        self.keys: torch.Tensor | None = None  # (B, H, C, d), allocated on first write
        self.values: torch.Tensor | None = None  # (B, H, C, d)
        self.count = torch.zeros(0, dtype=torch.long)  # (B,)
        # "auto" starts exact and is resolved for the device at ``allocate``
        self.backend_name = "exact" if cfg.backend == "auto" else cfg.backend
        self.backend = make_backend(dataclasses.replace(cfg, backend=self.backend_name),
                                    n_heads, head_dim)

    # ----------------------------------------------------------------- lifecycle

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        """Empty memories for ``batch_size`` streams; storage comes on first write."""
        self.batch_size, self.device = batch_size, torch.device(device)
        if self.cfg.backend == "auto":  # the device is known now
            chosen = auto_backend(self.cfg, self.device)
            if self.backend_name != chosen:
                self.backend, self.backend_name = make_backend(
                    dataclasses.replace(self.cfg, backend=chosen), self.n_heads,
                    self.head_dim), chosen
        self.keys = self.values = None
        self.count = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.backend.clear_all(self)

    def _ensure_storage(self) -> None:
        if self.keys is None:
            shape = (self.batch_size, self.n_heads, self.capacity, self.head_dim)
            try:
                self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            except (RuntimeError, MemoryError) as e:  # torch raises RuntimeError on OOM
                need = 2 * math.prod(shape) * self.dtype.itemsize
                raise MemformersError(f"kNN memory needs {need / 2**30:.2f} GiB for "
                                      f"{self.batch_size} streams; lower model.knn.capacity "
                                      f"or data.batch_size ({e.__class__.__name__})") from None

    def reset(self, streams: torch.Tensor) -> None:
        """Forget everything stored for the streams flagged in ``streams`` (B,) bool."""
        streams = streams.to(self.count.device)
        self.count = torch.where(streams, torch.zeros_like(self.count), self.count)
        self.backend.reset_streams(self, streams.nonzero().flatten().tolist())

    @property
    def filled(self) -> torch.Tensor:  # (B,) valid rows per stream
        return self.count.clamp(max=self.capacity)

    def is_empty(self) -> bool:
        return self.capacity == 0 or not bool((self.count > 0).any())

    # ----------------------------------------------------------------- write

    @torch.no_grad()
    def write(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the tokens where ``mask`` (B, L) is True of k, v (B, H, L, d), FIFO."""
        if self.capacity == 0:
            return
        self._ensure_storage()
        C = self.capacity
        mask = mask.to(self.device)
        n_new = mask.sum(1)  # (B,)
        rank = mask.long().cumsum(1) - 1  # (B, L) position among this stream's new tokens
        keep = mask & (rank >= (n_new - C)[:, None])  # more than C new: keep the last C
        b_idx, t_idx = keep.nonzero(as_tuple=True)  # (N,), (N,)
        slot = (self.count[b_idx] + rank[b_idx, t_idx]) % C  # (N,)
        k_new = k.detach()[b_idx, :, t_idx].to(self.dtype)  # (N, H, d)
        v_new = v.detach()[b_idx, :, t_idx].to(self.dtype)
        self.keys[b_idx, :, slot] = k_new
        self.values[b_idx, :, slot] = v_new
        old = self.count.clone()
        self.count = self.count + n_new
        self.backend.on_write(self, old, self.count)

    # ----------------------------------------------------------------- read

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (S, Q, d) fp32 -> (scores, slots), each (S, Q, k); see module doc."""
        S, Q, _ = queries.shape
        if self.is_empty():
            return (torch.full((S, Q, k), float("-inf"), device=queries.device),
                    torch.full((S, Q, k), -1, dtype=torch.long, device=queries.device))
        with torch.no_grad():
            return self.backend.search(self, queries.detach().float(), k)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ring ``slots`` (S, Q, k) -> two (S, Q, k, d) fp32 tensors.

        Missing slots (-1) return zeros; the caller masks them out of the softmax.
        """
        S, Q, k = slots.shape
        d = self.head_dim
        base = torch.arange(S, device=slots.device)[:, None, None] * self.capacity
        flat = (base + slots.clamp(min=0)).flatten()  # (S*Q*k,)
        keys = self.keys.view(-1, d).index_select(0, flat).view(S, Q, k, d).float()
        values = self.values.view(-1, d).index_select(0, flat).view(S, Q, k, d).float()
        return keys, values

    def memory_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (S, C, d) in storage dtype and valid rows per memory (S,)."""
        S = self.batch_size * self.n_heads
        keys = self.keys.view(S, self.capacity, self.head_dim)
        filled = self.filled.repeat_interleave(self.n_heads)
        return keys, filled

    # ----------------------------------------------------------------- save / load

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": self.count.clone()}
        if self.keys is not None:
            rows = int(self.filled.max()) if self.batch_size else 0  # unwritten rows: omit
            out["keys"] = self.keys[:, :, :rows].contiguous()
            out["values"] = self.values[:, :, :rows].contiguous()
        out.update(self.backend.state_tensors(self))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], copy: bool = True) -> None:
        """Restore ``state_tensors()``. With ``copy=False`` a full ring (rows == capacity)
        of the storage dtype on the store's device is adopted as the buffer itself --
        e.g. a memory-mapped file, so nothing is read until searched."""
        count = tensors["count"].to(self.device, torch.long)
        if count.shape[0] != self.batch_size:
            self.allocate(count.shape[0], self.device)
        self.count = count.clone()
        self.keys = self.values = None
        if "keys" in tensors:
            keys, values = tensors["keys"], tensors["values"]
            if keys.shape[1:2] != (self.n_heads,) or keys.shape[3] != self.head_dim \
                    or keys.shape[2] > self.capacity:
                raise MemformersError(f"saved kNN memory of shape {tuple(keys.shape)} does "
                                      f"not fit capacity {self.capacity}, {self.n_heads} heads "
                                      f"x {self.head_dim}")
            rows = keys.shape[2]
            adopt = (not copy and rows == self.capacity and keys.shape == values.shape
                     and all(t.dtype == self.dtype and t.device == self.device
                             and t.is_contiguous() for t in (keys, values)))
            if adopt:
                self.keys, self.values = keys, values  # (B, H, C, d), no copy
            else:
                self._ensure_storage()
                self.keys[:, :, :rows] = keys.to(self.device, self.dtype)
                self.values[:, :, :rows] = values.to(self.device, self.dtype)
        self.backend.load(self, tensors)

    def state_bytes_per_stream(self) -> int:
        return knn_footprint_bytes(self.cfg, self.n_heads, self.head_dim, 1, 1)


# --------------------------------------------------------------------------- searches


class SearchBackend:
    """top-k maximum inner product over a store's S = B * H memories.

    The store passes itself to every call; a backend keeps only its own search
    structures (built from the store's ring), never a reference to the store."""

    def __init__(self, cfg: KNNConfig, n_heads: int, head_dim: int):
        self.cfg, self.n_heads, self.head_dim = cfg, n_heads, head_dim

    def search(self, store: KNNStore, queries: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def on_write(self, store: KNNStore, old_count: torch.Tensor, new_count: torch.Tensor
                 ) -> None:
        """Rows ``old_count .. new_count`` (per stream) were just written to the ring."""

    def reset_streams(self, store: KNNStore, streams: list[int]) -> None:
        """These streams' memories were cleared."""

    def clear_all(self, store: KNNStore) -> None:
        """Every memory was (re)allocated empty."""

    def state_tensors(self, store: KNNStore) -> dict[str, torch.Tensor]:
        return {}

    def load(self, store: KNNStore, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild search structures from the (just loaded) ring."""


def exact_topk(
    keys: torch.Tensor,  # (S, C, d) any float dtype
    filled: torch.Tensor,  # (S,) valid rows (a prefix of the C slots)
    queries: torch.Tensor,  # (S, Q, d) fp32
    k: int,
    chunk: int = 65536,
    group: int = 16,
    tile_elems: int = 1 << 25,
    score_dtype: torch.dtype = torch.float32,
    rerank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of q . key over each memory's valid rows, in fp32.

    Rows are scored ``chunk`` at a time for as many memories as fit ``tile_elems``
    scores (a batched matmul); each tile is reduced to its own top-k with a
    two-stage selection: the rows are split into ``group`` strided slices, the
    element-wise max over slices gives one score per group of ``group`` rows, and
    the top-k elements must lie in the k groups with the largest maxima (each
    of the k best rows lifts its group's max to at least its own score). Only
    those k * group candidates go through the final top-k. Per-tile results are
    merged with one last top-k. Ties may be broken differently from a full sort.

    ``score_dtype`` bfloat16 / float16 scores every row in that precision (matrix units:
    tensor cores on GPUs, AMX (bf16) on recent x86 CPUs) and keeps ``max(k, rerank)``
    candidates per query (0 = 2k), which are then rescored in fp32 from the stored keys:
    the returned scores are exact, and only the candidate set can differ from exact search
    (a true top-k row whose low-precision score falls below the candidates' last).
    """
    S, Q, d = queries.shape
    k_out = k
    low = score_dtype != torch.float32
    if low:  # candidates for the fp32 re-rank
        k = max(k, rerank if rerank > 0 else 2 * k)
        q_all = queries
        queries = queries.to(score_dtype)
    rows = int(filled.max()) if filled.numel() else 0
    dev = queries.device
    out_s = torch.full((S, Q, k), float("-inf"), device=dev)
    out_i = torch.full((S, Q, k), -1, dtype=torch.long, device=dev)
    if rows == 0:
        return out_s[..., :k_out], out_i[..., :k_out]
    chunk = max(1, min(chunk, rows))
    per_tile = max(1, min(S, tile_elems // (Q * chunk)))
    filled = filled.to(dev)
    group_off = {}  # chunk length -> (group, rows per group, offsets of the group's rows)
    buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # reused: no page faults
    for s0 in range(0, S, per_tile):
        s1 = min(S, s0 + per_tile)
        q = queries[s0:s1]  # (s, Q, d)
        lim = filled[s0:s1]
        s_rows = int(lim.max())
        if s_rows == 0:  # every memory of this tile is empty: nothing to find
            continue
        cand_s, cand_i = [], []
        for c0 in range(0, s_rows, chunk):
            c1 = min(s_rows, c0 + chunk)
            n = c1 - c0
            shape = (s1 - s0, n)
            if shape not in buffers:
                buffers[shape] = (torch.empty(s1 - s0, n, d, device=dev, dtype=score_dtype),
                                  torch.empty(s1 - s0, Q, n, device=dev, dtype=score_dtype))
            kc, sc = buffers[shape]
            kc.copy_(keys[s0:s1, c0:c1])  # (s, n, d) one conversion per chunk
            torch.bmm(q, kc.transpose(1, 2), out=sc)  # (s, Q, n) scores (score_dtype)
            if bool((lim < c1).any()):  # rows past a memory's fill are empty
                dead = torch.arange(c0, c1, device=dev)[None, :] >= lim[:, None]  # (s, n)
                sc.masked_fill_(dead[:, None, :], float("-inf"))
            kk = min(k, n)
            if n not in group_off:
                m = n // group
                ok = group > 1 and n % group == 0 and m >= kk
                group_off[n] = (m, torch.arange(group, device=dev) * m) if ok else None
            if group_off[n] is not None:
                m, off = group_off[n]
                gmax = sc.view(s1 - s0, Q, group, m).amax(2)  # (s, Q, m) one max per group
                gi = gmax.float().topk(kk, dim=-1).indices  # (s, Q, kk) the best groups
                rows_c = (gi[..., None] + off).flatten(2)  # (s, Q, kk * group) their rows
                ts, ti = sc.gather(2, rows_c).float().topk(kk, dim=-1)  # (s, Q, kk)
                ti = rows_c.gather(2, ti)
            else:
                ts, ti = sc.float().topk(kk, dim=-1)
            cand_s.append(ts)
            cand_i.append(ti + c0)
        all_s, all_i = torch.cat(cand_s, -1), torch.cat(cand_i, -1)  # (s, Q, n_chunks*k)
        kk = min(k, all_s.shape[-1])
        top_s, j = all_s.topk(kk, dim=-1)
        out_s[s0:s1, :, :kk] = top_s.float()
        out_i[s0:s1, :, :kk] = all_i.gather(2, j)
    out_i = out_i.masked_fill(torch.isinf(out_s), -1)  # fewer than k rows: missing
    if not low:
        return out_s, out_i
    # fp32 re-rank: the candidates' exact scores, then the best k_out of them
    C = keys.shape[1]
    rows_all = out_i.clamp(min=0) + torch.arange(S, device=dev)[:, None, None] * C
    cand = keys.reshape(S * C, d)[rows_all.flatten()].view(S, Q, k, d).float()
    exact = torch.einsum("sqd,sqkd->sqk", q_all, cand)  # (S, Q, k) fp32 scores
    exact = exact.masked_fill(out_i < 0, float("-inf"))
    top_s, j = exact.topk(min(k_out, k), dim=-1)
    return top_s, out_i.gather(2, j).masked_fill(torch.isinf(top_s), -1)


class ExactSearch(SearchBackend):
    """Exact search (default): see ``exact_topk``."""

    def search(self, store, queries, k):
        keys, filled = store.memory_view()
        return exact_topk(keys, filled, queries, k, self.cfg.search_chunk,
                          self.cfg.search_group, self.cfg.search_tile,
                          STORAGE_DTYPES[self.cfg.search_dtype], self.cfg.search_rerank)


class FaissSearch(SearchBackend):
    """Approximate search with faiss on time-ordered blocks of the ring.

    Ring slots ``[j * blk, (j + 1) * blk)`` form block j; each (memory, block) has
    its own index holding that block's rows in slot order, so a faiss id i of
    block j is ring slot ``j * blk + i``. When the ring wraps into block j its
    index is dropped whole and refilled (FIFO at block granularity: the oldest
    <= blk rows disappear together, so a full memory holds between C - blk and C
    searchable rows). Index types: "flat" (IndexFlatIP, exact), "ivf"
    (IndexIVFFlat, inner product; k-means centroids trained once per memory on
    its first full block -- which is searched flat until then -- and reused),
    "hnsw" (IndexHNSWFlat, inner product).
    """

    def __init__(self, cfg: KNNConfig, n_heads: int, head_dim: int):
        super().__init__(cfg, n_heads, head_dim)
        try:
            import faiss
        except ImportError:
            raise MemformersError("model.knn.backend='faiss' needs faiss: pip install "
                                  "faiss-cpu (or faiss-gpu)") from None
        self.faiss = faiss
        self.blk = min(cfg.faiss_block, max(cfg.capacity, 1))
        if cfg.capacity % self.blk:
            raise MemformersError(f"model.knn.capacity ({cfg.capacity}) must be a multiple of "
                                  f"model.knn.faiss_block ({cfg.faiss_block})")
        self.n_blocks = max(cfg.capacity // self.blk, 1)
        self.nlist = cfg.faiss_nlist or max(1, self.blk // 64)
        self.indexes: list[list] = []  # [S][n_blocks] index or None
        self.trained: list = []  # [S] (empty IVF template, quantizer, centroids) or None

    # ----------------------------------------------------------------- indexes

    def _new_index(self, s: int):
        f, d = self.faiss, self.head_dim
        if self.cfg.faiss_index == "hnsw":
            index = f.IndexHNSWFlat(d, self.cfg.faiss_hnsw_m, f.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(self.cfg.faiss_ef_search, self.cfg.top_k)
            return index
        if self.cfg.faiss_index == "ivf" and self.trained[s] is not None:
            index = f.clone_index(self.trained[s][0])
            index.nprobe = self.cfg.faiss_nprobe
            return index
        return f.IndexFlatIP(d)  # also IVF's first block until it can be trained

    def _ivf_template(self, centroids: np.ndarray):
        f, d = self.faiss, self.head_dim
        quantizer = f.IndexFlatIP(d)
        quantizer.add(centroids)
        index = f.IndexIVFFlat(quantizer, d, centroids.shape[0], f.METRIC_INNER_PRODUCT)
        index.is_trained = True
        return index, quantizer, centroids  # keep the quantizer alive with its index

    def _train(self, s: int, data: np.ndarray) -> None:
        km = self.faiss.Kmeans(self.head_dim, self.nlist, niter=10, seed=1234,
                               spherical=True, verbose=False, min_points_per_centroid=1)
        km.train(data)
        self.trained[s] = self._ivf_template(np.ascontiguousarray(km.centroids))

    @staticmethod
    def _rows(store: KNNStore, s: int, a: int, b: int) -> np.ndarray:
        keys, _ = store.memory_view()
        return np.ascontiguousarray(keys[s, a:b].float().cpu().numpy())

    def clear_all(self, store) -> None:
        S = store.batch_size * self.n_heads
        self.indexes = [[None] * self.n_blocks for _ in range(S)]
        self.trained = [None] * S

    def reset_streams(self, store, streams: list[int]) -> None:
        H = self.n_heads
        for b in streams:
            for s in range(b * H, (b + 1) * H):
                self.indexes[s] = [None] * self.n_blocks  # trained centroids are kept

    def _add_range(self, store: KNNStore, b: int, start: int, stop: int) -> None:
        """Rows written at positions ``start .. stop`` of stream b (start < stop, <= C)."""
        H, C, blk = self.n_heads, store.capacity, self.blk
        pos = start
        while pos < stop:
            slot = pos % C
            j = slot // blk
            end = min(stop, pos + (blk - slot % blk))  # up to the end of block j
            a, e = slot, slot + (end - pos)
            for s in range(b * H, (b + 1) * H):
                if slot % blk == 0 or self.indexes[s][j] is None:
                    self.indexes[s][j] = self._new_index(s)  # entering block j: drop it
                index = self.indexes[s][j]
                index.add(self._rows(store, s, a, e))
                if (self.cfg.faiss_index == "ivf" and self.trained[s] is None
                        and index.ntotal == blk):  # first full block: train, rebuild
                    data = self._rows(store, s, j * blk, (j + 1) * blk)
                    self._train(s, data)
                    self.indexes[s][j] = self._new_index(s)
                    self.indexes[s][j].add(data)
            pos = end

    def on_write(self, store, old_count, new_count) -> None:
        C = store.capacity
        for b, (o, n) in enumerate(zip(old_count.tolist(), new_count.tolist())):
            if n > o:
                self._add_range(store, b, max(o, n - C), n)

    # ----------------------------------------------------------------- search

    def search(self, store, queries, k):
        S, Q, _ = queries.shape
        blk = self.blk
        qn = np.ascontiguousarray(queries.cpu().numpy())
        out_s = torch.full((S, Q, k), float("-inf"))
        out_i = torch.full((S, Q, k), -1, dtype=torch.long)
        for s in range(S):
            found_s, found_i = [], []
            for j, index in enumerate(self.indexes[s]):
                if index is None or index.ntotal == 0:
                    continue
                D, ids = index.search(qn[s], k)  # (Q, k) each
                ids = torch.from_numpy(ids)
                found_s.append(torch.from_numpy(D).masked_fill(ids < 0, float("-inf")))
                found_i.append(torch.where(ids < 0, ids, ids + j * blk))
            if not found_s:
                continue
            all_s, all_i = torch.cat(found_s, 1), torch.cat(found_i, 1)  # (Q, blocks * k)
            top_s, j = all_s.topk(k, dim=1)
            out_s[s], out_i[s] = top_s, all_i.gather(1, j).masked_fill(torch.isinf(top_s), -1)
        return out_s.to(queries.device), out_i.to(queries.device)

    # ----------------------------------------------------------------- save / load

    def state_tensors(self, store) -> dict[str, torch.Tensor]:
        if self.cfg.faiss_index != "ivf" or not self.trained:
            return {}
        S, d = len(self.trained), self.head_dim
        cents = torch.zeros(S, self.nlist, d)
        ok = torch.zeros(S, dtype=torch.bool)
        for s, t in enumerate(self.trained):
            if t is not None:
                cents[s] = torch.from_numpy(t[2])
                ok[s] = True
        B, H = store.batch_size, self.n_heads  # stream first, like all state
        return {"ivf_centroids": cents.view(B, H, self.nlist, d), "ivf_trained": ok.view(B, H)}

    def load(self, store, tensors: dict[str, torch.Tensor]) -> None:
        self.clear_all(store)
        if "ivf_trained" in tensors:  # (B, H) or, saved before streams came first, (S,)
            cents = tensors["ivf_centroids"].reshape(-1, *tensors["ivf_centroids"].shape[-2:])
            for s, ok in enumerate(tensors["ivf_trained"].flatten().tolist()):
                if ok:
                    cents_s = cents[s].float().numpy()
                    self.trained[s] = self._ivf_template(np.ascontiguousarray(cents_s))
        if store.keys is None:
            return
        C, blk, H = store.capacity, self.blk, self.n_heads
        for b, n in enumerate(store.count.tolist()):
            if n == 0:
                continue
            ptr = n % C
            if n <= C:  # never wrapped: blocks in slot order up to the fill
                self._add_range(store, b, 0, n)
                continue
            # wrapped: every block full of older rows except the one being refilled
            j_now = ptr // blk
            for j in range(self.n_blocks):
                stop = ptr if (j == j_now and ptr % blk) else (j + 1) * blk
                for s in range(b * H, (b + 1) * H):
                    index = self._new_index(s)
                    index.add(self._rows(store, s, j * blk, stop))
                    self.indexes[s][j] = index


class BlockSearch(SearchBackend):
    """Two-stage block search: score block summaries, then the keys of the best blocks.

    Ring slots ``[j * bs, (j + 1) * bs)`` form block j (``bs = model.knn.block_size``),
    summarised by the mean of its valid keys, mu_j (fp32, recomputed for the blocks each
    write touches). For the queries of one memory, in groups of ``block_group``
    consecutive queries:

        stage 1   s_j = max over the group of q . mu_j          for every block j
        stage 2   exact q . k over the rows of the ``block_probe`` blocks with the largest
                  s_j (one batched fp32 matmul per group), then the top-k.

    Per query that is C / bs + probe * bs scores instead of C (65,536 rows, bs 64, probe
    32: 3,072, a 21st). Consecutive tokens of a document have related keys, so a block's
    mean stands for its rows (recall measured on recorded keys: BENCHMARKS.md). Blocks are
    ring slots, so FIFO eviction and per-stream reset are exactly those of exact search;
    with ``block_probe`` >= the number of blocks the result is exact search's.
    """

    def __init__(self, cfg: KNNConfig, n_heads: int, head_dim: int):
        super().__init__(cfg, n_heads, head_dim)
        self.bs = cfg.block_size
        self.means: torch.Tensor | None = None  # (B, H, n_blocks, d) fp32

    def clear_all(self, store) -> None:
        self.means = None

    def reset_streams(self, store, streams: list[int]) -> None:
        pass  # a stream's blocks past its fill (now 0) are never read; writes recompute

    def _update(self, store: KNNStore, b_idx: torch.Tensor, j_idx: torch.Tensor) -> None:
        """Recompute the means of blocks ``j_idx`` of streams ``b_idx`` (N,) each."""
        B, H, C, d = store.keys.shape
        nb = C // self.bs
        if self.means is None or self.means.shape[:3] != (B, H, nb):
            self.means = torch.zeros(B, H, nb, d, device=store.device)
        blocks = store.keys.view(B, H, nb, self.bs, d)[b_idx, :, j_idx].float()  # (N, H, bs, d)
        slot = j_idx[:, None] * self.bs + torch.arange(self.bs, device=j_idx.device)  # (N, bs)
        valid = (slot < store.filled[b_idx][:, None]).float()  # (N, bs)
        total = torch.einsum("nhbd,nb->nhd", blocks, valid)
        self.means[b_idx, :, j_idx] = total / valid.sum(1).clamp(min=1)[:, None, None]

    def on_write(self, store, old_count, new_count) -> None:
        C, bs = store.capacity, self.bs
        pairs = []
        for b, (o, n) in enumerate(zip(old_count.tolist(), new_count.tolist())):
            if n > o:
                start = max(o, n - C)  # positions start .. n - 1 were written
                first, last = start // bs, (n - 1) // bs
                blocks = range(first, last + 1) if last - first < C // bs else range(C // bs)
                pairs += [(b, j % (C // bs)) for j in blocks]
        if pairs:
            idx = torch.tensor(pairs, device=store.device)
            self._update(store, idx[:, 0], idx[:, 1])

    def load(self, store, tensors) -> None:
        self.means = None
        if store.keys is None:
            return
        B, nb = store.batch_size, store.capacity // self.bs
        b_idx = torch.arange(B, device=store.device).repeat_interleave(nb)
        j_idx = torch.arange(nb, device=store.device).repeat(B)
        self._update(store, b_idx, j_idx)

    def search(self, store, queries, k):
        S, Q, d = queries.shape
        bs, g = self.bs, max(1, min(self.cfg.block_group, Q))
        keys, filled = store.memory_view()  # (S, C, d), (S,)
        nb = keys.shape[1] // bs
        means = self.means.view(S, nb, d)
        m = max(1, min(self.cfg.block_probe, nb))
        G = -(-Q // g)
        block_ok = torch.arange(nb, device=queries.device)[None] * bs < filled[:, None]  # (S, nb)
        out_s = torch.full((S, G * g, k), float("-inf"), device=queries.device)
        out_i = torch.full((S, G * g, k), -1, dtype=torch.long, device=queries.device)
        q_all = torch.nn.functional.pad(queries, (0, 0, 0, G * g - Q))  # (S, G*g, d)
        per_tile = max(1, min(S, self.cfg.search_tile // max(1, G * g * m * bs)))
        offsets = torch.arange(bs, device=queries.device)
        for s0 in range(0, S, per_tile):
            s1 = min(S, s0 + per_tile)
            n = s1 - s0
            q = q_all[s0:s1]  # (n, G*g, d)
            # stage 1: every block summary, the group's best blocks
            coarse = torch.bmm(q, means[s0:s1].transpose(1, 2))  # (n, G*g, nb)
            coarse = coarse.masked_fill(~block_ok[s0:s1, None], float("-inf"))
            best = coarse.view(n, G, g, nb).amax(2).topk(m, dim=-1).indices  # (n, G, m)
            # stage 2: exact scores over the chosen blocks' rows
            rows = keys[s0:s1].view(n, nb, bs, d)[
                torch.arange(n, device=q.device)[:, None, None], best]  # (n, G, m, bs, d)
            cand = rows.view(n * G, m * bs, d).float()
            scores = torch.bmm(q.reshape(n * G, g, d), cand.transpose(1, 2))  # (nG, g, m*bs)
            slots = (best[..., None] * bs + offsets).view(n * G, 1, m * bs)  # ring slots
            dead = slots >= filled[s0:s1].repeat_interleave(G)[:, None, None]
            scores = scores.masked_fill(dead, float("-inf"))
            kk = min(k, m * bs)
            top_s, j = scores.topk(kk, dim=-1)  # (nG, g, kk)
            top_i = slots.expand(-1, g, -1).gather(2, j)
            out_s[s0:s1, :, :kk] = top_s.view(n, G * g, kk)
            out_i[s0:s1, :, :kk] = top_i.view(n, G * g, kk)
        out_s, out_i = out_s[:, :Q], out_i[:, :Q]
        return out_s, out_i.masked_fill(torch.isinf(out_s), -1)


class IVFSearch(SearchBackend):
    """faiss inverted lists over every memory's ring (``model.knn.backend = "ivf"``).

    One ``memory.ivf.IVFIndex`` per head (its streams share that head's coarse quantizer:
    spherical k-means on the first ``ivf_train`` keys the head stores, trained once and
    kept across documents; until then the search is exact). A query scans the
    ``ivf_nprobe`` nearest of ``ivf_nlist`` lists, exactly (fp32 inner products). faiss
    ids are positions in the stream, the ring slot is position mod C: a segment never
    finds itself (it is written after its search), the oldest rows are dropped first
    (positions below count - C are skipped, then removed), and a reset empties the
    stream's lists -- the semantics of exact search. Real keys cluster by content, so a
    few lists hold a query's neighbours (recall measured on recorded keys: BENCHMARKS.md).
    """

    def __init__(self, cfg: KNNConfig, n_heads: int, head_dim: int):
        super().__init__(cfg, n_heads, head_dim)
        from memformers.memory.ivf import IVFIndex

        nlist, train = ivf_shape(cfg)
        self.ivf = [IVFIndex(head_dim, nlist, cfg.ivf_nprobe, train,
                             codes=ivf_codes_of(cfg.ivf_codes, cfg.storage_dtype),
                             rescore=cfg.ivf_rescore)
                    for _ in range(n_heads)]
        self.exact = ExactSearch(cfg, n_heads, head_dim)

    def clear_all(self, store) -> None:
        for ivf in self.ivf:
            ivf.allocate(store.batch_size)

    def reset_streams(self, store, streams: list[int]) -> None:
        for ivf in self.ivf:
            if ivf.ready:
                ivf.reset(streams)

    def on_write(self, store, old_count, new_count) -> None:
        self._add(store, old_count)

    def load(self, store, tensors) -> None:
        self.clear_all(store)
        if store.keys is not None:
            self._add(store, torch.zeros_like(store.count))

    def _add(self, store: KNNStore, old: torch.Tensor) -> None:
        """Index the rows stored since ``old`` (per stream); before a head's quantizer is
        trained, collect them for training (then index every stored row)."""
        C = store.capacity
        for h, ivf in enumerate(self.ivf):
            ivf.add_stored(old, store.count, C,
                           lambda b, pos, h=h: store.keys[b, h, pos.to(store.device) % C])

    def search(self, store, queries, k):
        if not all(ivf.ready for ivf in self.ivf):
            return self.exact.search(store, queries, k)
        S, Q, _ = queries.shape
        C, H = store.capacity, self.n_heads
        from memformers.memory.ivf import search_many

        q = queries.cpu().numpy()
        out_s, out_i = torch.empty(S, Q, k), torch.empty(S, Q, k, dtype=torch.long)
        found = search_many([(self.ivf[s % H], s // H, q[s],
                              max(0, int(store.count[s // H]) - C), None,
                              store.keys[s // H, s % H]) for s in range(S)], k)
        for s, (sim, ids) in enumerate(found):
            out_s[s], ids = torch.from_numpy(sim), torch.from_numpy(ids)
            out_i[s] = torch.where(ids < 0, ids, ids % C)
        return out_s.to(queries.device), out_i.to(queries.device)


def make_backend(cfg: KNNConfig, n_heads: int, head_dim: int) -> SearchBackend:
    if cfg.backend == "ivf":
        return IVFSearch(cfg, n_heads, head_dim)
    if cfg.backend == "exact":
        return ExactSearch(cfg, n_heads, head_dim)
    if cfg.backend == "block":
        return BlockSearch(cfg, n_heads, head_dim)
    if cfg.backend == "faiss":
        if cfg.faiss_index not in ("flat", "ivf", "hnsw"):
            raise MemformersError(f"model.knn.faiss_index must be flat, ivf or hnsw; "
                                  f"got '{cfg.faiss_index}'")
        return FaissSearch(cfg, n_heads, head_dim)
    raise MemformersError(f"model.knn.backend must be exact, ivf, block or faiss; got "
                          f"'{cfg.backend}'")
