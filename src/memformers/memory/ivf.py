"""Inverted-file (IVF) search over append-only streams of keys, with faiss.

Used by both searches that index a per-stream history: the kNN-LM's datastore
(memory/knnlm.py, ``model.knnlm.backend = "ivf"``) and the kNN memory's rings
(memory/knn_store.py, ``model.knn.backend = "ivf"``, one index set per head). Keys are
identified by their position in the stream (the p-th key stored since the stream's
reset), so FIFO eviction of the oldest keys is an id range.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from memformers.errors import MemformersError
from memformers.memory.configs import IVF_CODES


class IVFIndex:
    """faiss inverted lists over each stream's stored keys.

    One inverted-file index per stream, all sharing one coarse quantizer (k-means,
    spherical for cosine) trained once on the first ``train`` keys ``collect`` is given;
    until then the owner searches exactly. A query scans the ``nprobe`` nearest of
    ``nlist`` lists, scoring every key there: ``codes="fp16"`` keeps the keys as fp16 (an
    ``IndexIVFScalarQuantizer``; the same recall as fp32 on recorded keys and faster, the
    scan being memory-bound: BENCHMARKS.md), ``"fp32"`` as they are (``IndexIVFFlat``).
    ``"pq4"`` keeps 4-bit product codes (``IndexIVFPQFastScan``, d/8 bytes a key: a
    sixteenth of fp16; its sub-quantizers train with the coarse one) that only choose
    the ``max(k, rescore)`` candidates of a query; those are then scored exactly from the
    owner's ring (``search(ring=...)``, ``rescore_exactly``), so every returned score is
    the exact search's and only the candidate set is approximate (Jegou et al. 2011's
    re-ranking of an IVFADC short-list).
    faiss ids are the keys' positions in the stream (key p is the p-th key the stream
    stored since its reset), so FIFO eviction is an id range: searches skip ids below
    the oldest kept position (an ``IDSelectorRange``), and the evicted ids are removed from
    the lists in batches of ``EVICT_EVERY`` (a removal scans every list). A reset empties
    the stream's index.
    """

    EVICT_EVERY = 4096

    def __init__(self, d: int, nlist: int, nprobe: int, train: int, cosine: bool = True,
                 codes: str = "fp32", rescore: int = 0):
        try:
            import faiss
        except ImportError:
            raise MemformersError("an IVF search backend needs faiss: pip install "
                                  "faiss-cpu") from None
        self.faiss, self.d = faiss, d
        self.nlist, self.nprobe, self.train = nlist, nprobe, train
        self.cosine = cosine
        if codes not in IVF_CODES:
            raise MemformersError(f"ivf_codes must be one of {', '.join(IVF_CODES)}, got "
                                  f"'{codes}'")
        if codes == "pq4" and d % 8:
            raise MemformersError(f"ivf_codes 'pq4' needs a key size divisible by 8, got {d}")
        self.codes, self.rescore = codes, rescore
        self.pq_template = None  # pq4: an empty index with trained product codes
        self.metric = faiss.METRIC_INNER_PRODUCT if self.cosine else faiss.METRIC_L2
        self.quantizer = None
        self.indexes: list = []
        self.seen: list[np.ndarray] = []  # keys collected for training
        self.removed: list[int] = []  # per stream: ids below this are gone from the lists

    @property
    def ready(self) -> bool:
        return self.quantizer is not None

    def allocate(self, batch_size: int) -> None:
        self.indexes = [self._new_index() if self.ready else None for _ in range(batch_size)]
        self.removed = [0] * batch_size

    def _new_index(self):
        f = self.faiss
        if self.codes == "pq4":
            return f.clone_index(self.pq_template)
        if self.codes == "fp32":
            index = f.IndexIVFFlat(self.quantizer, self.d, self.nlist, self.metric)
        else:  # fp16 codes of the keys themselves (not of residuals): nothing to train
            index = f.IndexIVFScalarQuantizer(self.quantizer, self.d, self.nlist,
                                              f.ScalarQuantizer.QT_fp16, self.metric, False)
        index.is_trained = True  # the shared quantizer is
        return index

    def collect(self, keys: np.ndarray) -> bool:
        """Keep keys for training; True once there are enough and the quantizer is trained."""
        self.seen.append(keys)
        if sum(len(k) for k in self.seen) < self.train:
            return False
        data = np.ascontiguousarray(np.concatenate(self.seen)[: self.train])
        km = self.faiss.Kmeans(self.d, self.nlist, niter=10, seed=1234,
                               spherical=self.cosine, verbose=False, min_points_per_centroid=1)
        km.train(data)
        flat = self.faiss.IndexFlatIP if self.cosine else self.faiss.IndexFlatL2
        self.quantizer = flat(self.d)
        self.quantizer.add(np.ascontiguousarray(km.centroids))
        if self.codes == "pq4":  # d/4 sub-vectors of 4 dims, 16 centroids each (4 bits)
            # ranked by L2 to the code whatever the similarity (for unit keys the order of
            # the inner product; faiss's fast-scan inner product can drop a list's last key)
            pq = self.faiss.IndexIVFPQFastScan(self.quantizer, self.d, self.nlist, self.d // 4,
                                               4, self.faiss.METRIC_L2, 32)
            pq.by_residual = False  # codes of the keys themselves, as the other codes
            pq.train(data)  # (the coarse quantizer is trained: only the codes are)
            self.pq_template = pq
        self.seen = []
        self.allocate(len(self.indexes))
        return True

    def reset(self, streams: list[int]) -> None:
        for b in streams:
            if self.indexes[b] is not None:
                self.indexes[b].reset()
            self.removed[b] = 0

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``nprobe`` nearest lists of each vector x (N, d): (similarities, lists), each
        (N, nprobe), best first. A search given them (``coarse``) skips the quantizer, and
        an add given their first column (``lists``) too."""
        return self.quantizer.search(np.ascontiguousarray(x, dtype=np.float32), self.nprobe)

    def add(self, b: int, keys: np.ndarray, ids: np.ndarray, keep_from: int,
            lists: np.ndarray | None = None) -> None:
        """Add stream b's new keys under their positions (into ``lists`` (N,) if given: the
        keys' nearest lists, from ``assign``; "pq4" assigns them itself); drop positions
        < keep_from."""
        index = self.indexes[b]
        if len(ids):
            keys = np.ascontiguousarray(keys, dtype=np.float32)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            if lists is None or self.codes == "pq4":  # (fast-scan lists pack their codes
                index.add_with_ids(keys, ids)           # in blocks: add_core cannot)
            else:
                lists = np.ascontiguousarray(lists, dtype=np.int64)
                sp = self.faiss.swig_ptr
                index.add_core(len(ids), sp(keys), sp(ids), sp(lists))
        if keep_from - self.removed[b] >= self.EVICT_EVERY:
            index.remove_ids(self.faiss.IDSelectorRange(0, keep_from))
            self.removed[b] = keep_from

    def add_stored(self, old: torch.Tensor, count: torch.Tensor, capacity: int,
                   rows: Callable[[int, torch.Tensor], torch.Tensor],
                   lists: Callable[[int, torch.Tensor], np.ndarray] | None = None) -> None:
        """Index what a FIFO of ``capacity`` rows per stream stored since ``old`` (B,), now
        ``count`` (B,) rows written per stream; ``rows(b, positions)`` gives stream b's keys
        at those positions (any float tensor), ``lists(b, positions)``, if given, their
        nearest lists (``assign``). Before the quantizer is trained the rows go to
        ``collect``; once it is, every row still stored is indexed. The streams' adds run
        side by side, one thread each (as ``search_many``)."""
        start = torch.maximum(old, count - capacity)  # (B,) first position still stored
        B = len(count)
        if not self.ready:
            new = [rows(b, torch.arange(int(start[b]), int(count[b]))) for b in range(B)]
            got = (torch.cat(new).float().cpu().numpy() if new
                   else np.zeros((0, self.d), dtype=np.float32))
            if not self.collect(got.astype(np.float32)):
                return
            start = (count - capacity).clamp(min=0)  # trained now: index every stored row
            lists = None  # (assigned before the quantizer existed: none)
        jobs = []
        for b in range(B):
            pos = torch.arange(int(start[b]), int(count[b]))
            jobs.append((b, rows(b, pos).float().cpu().numpy(), pos.numpy(),
                         int(count[b]) - capacity, None if lists is None else lists(b, pos)))
        _side_by_side(lambda job: self.add(*job), jobs, self.faiss)

    def search(self, b: int, q: np.ndarray, k: int, keep_from: int,
               coarse: tuple[np.ndarray, np.ndarray] | None = None,
               ring: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stream b's top-k among ids >= ``keep_from``: (similarity (L, k): q.k for cosine,
        -|q - k|^2 for l2, -inf where missing; positions (L, k), -1 where missing), best
        first. ``coarse``: the queries' lists from ``assign``, if already known. ``ring``
        (C, d): the stream's stored keys, key p in row p mod C (needed by "pq4")."""
        if self.codes == "pq4":
            if ring is None:
                raise MemformersError("ivf_codes 'pq4' rescores from the ring: pass ring=")
            found = self._search(b, q, max(k, self.rescore), keep_from, coarse)[1]
            return rescore_exactly(q, found, ring, self.cosine, k)
        return self._search(b, q, k, keep_from, coarse)

    def _search(self, b, q, k, keep_from, coarse):
        params = self.faiss.SearchParametersIVF(nprobe=self.nprobe)
        if keep_from > self.removed[b]:  # evicted ids still in the lists: skip them
            sel = self.faiss.IDSelectorRange(keep_from, 1 << 62)
            params.sel = sel  # (``sel`` must outlive the search)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if coarse is None:
            dist, ids = self.indexes[b].search(q, k, params=params)
        else:  # the C++ search over given lists (faiss's python wrapper takes no params)
            n, sp = len(q), self.faiss.swig_ptr
            dist = np.empty((n, k), dtype=np.float32)
            ids = np.empty((n, k), dtype=np.int64)
            c_dis, c_lists = (np.ascontiguousarray(c) for c in coarse)
            self.indexes[b].search_preassigned_c(n, sp(q), k, sp(c_lists), sp(c_dis), sp(dist),
                                                 sp(ids), False, params)
        sim = dist if self.cosine else -dist
        return np.where(ids < 0, -np.inf, sim).astype(np.float32), ids


def rescore_exactly(q: np.ndarray, ids: np.ndarray, ring: torch.Tensor, cosine: bool, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidates ``ids`` (L, n) (positions, -1 = none), scored
    exactly against the ring (C, d) (key p in row p mod C): q.k (cosine) or -|q - k|^2;
    -> (similarity (L, k) fp32 best first, -inf where missing; positions (L, k))."""
    L, n = ids.shape
    slots = np.where(ids < 0, 0, ids % ring.shape[0])
    q = np.ascontiguousarray(q, dtype=np.float32)
    if ring.dtype == torch.float32 and ring.device.type == "cpu" and ring.is_contiguous():
        import faiss  # its by-index kernels read the rows in place (and free the GIL)

        sim, sp = np.empty((L, n), dtype=np.float32), faiss.swig_ptr
        by_idx = faiss.fvec_inner_products_by_idx if cosine else faiss.fvec_L2sqr_by_idx
        by_idx(sp(sim), sp(q), sp(ring.numpy()), sp(np.ascontiguousarray(slots)), q.shape[1],
               L, n)
        if not cosine:
            sim = -sim
    else:  # other precisions: gathered and scored in fp32 by torch
        keys = ring[torch.from_numpy(slots).to(ring.device)].float().cpu()  # (L, n, d)
        qt = torch.from_numpy(q)[:, None]  # (L, 1, d)
        sim = ((keys * qt).sum(-1) if cosine else -(keys - qt).pow(2).sum(-1)).numpy()
    sim = np.where(ids < 0, -np.inf, sim).astype(np.float32)
    best = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, best, 1), np.take_along_axis(ids, best, 1)


_POOL: list = [None, 0]  # one thread pool for faiss calls, reused: (executor, threads)


def _side_by_side(fn: Callable, items: list, faiss) -> list:
    """``[fn(x) for x in items]`` in ``torch.get_num_threads()`` threads, each running faiss
    on one OpenMP thread (see ``search_many``). The pool is made once per thread count."""
    n = max(1, torch.get_num_threads())
    if n == 1 or len(items) < 2:
        return [fn(x) for x in items]
    if _POOL[1] != n:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        # OpenMP settings are per thread: each worker holds faiss to one thread for good
        _POOL[:] = [ThreadPoolExecutor(n, thread_name_prefix="ivf",
                                       initializer=faiss.omp_set_num_threads,
                                       initargs=(1,)), n]
    return list(_POOL[0].map(fn, items))


def search_many(jobs: list[tuple[IVFIndex, int, np.ndarray, int, tuple | None,
                                 torch.Tensor | None]], k: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``index.search(b, q, k, keep_from, coarse, ring)`` for each job ``(index, b, q,
    keep_from, coarse, ring)``, as ``torch.get_num_threads()`` concurrent one-thread faiss
    searches (a job's queries are split into parts when there are fewer jobs than threads).

    Measured on 2 cores (2 streams x 256 queries, 65,536 keys, IVF 1024/8): faiss's own
    OpenMP over the queries of one search at a time takes 44 ms per step next to torch,
    one-thread searches side by side 22 ms; the two OpenMP pools spin against each other
    otherwise (BENCHMARKS.md, kNN-LM speed)."""
    n = max(1, torch.get_num_threads())
    if n == 1 or not jobs:
        return [index.search(b, q, k, *more) for index, b, q, *more in jobs]
    parts = max(1, -(-n // len(jobs)))  # query chunks per job
    tasks = []
    for j, (index, b, q, keep, coarse, ring) in enumerate(jobs):
        for rows in np.array_split(np.arange(len(q)), max(1, min(parts, len(q)))):
            if len(rows):
                part = None if coarse is None else (coarse[0][rows], coarse[1][rows])
                tasks.append((j, index, b, q[rows], keep, part, ring))
    found = _side_by_side(lambda t: t[1].search(t[2], t[3], k, *t[4:]), tasks,
                          jobs[0][0].faiss)
    out = []
    for j in range(len(jobs)):
        mine = [f for t, f in zip(tasks, found) if t[0] == j]
        out.append((np.concatenate([m[0] for m in mine]) if mine
                    else np.full((0, k), -np.inf, np.float32),
                    np.concatenate([m[1] for m in mine]) if mine
                    else np.full((0, k), -1, np.int64)))
    return out
