"""Configuration of each memory mechanism (one dataclass per mechanism).

A mechanism is enabled for the layers listed in its ``layers`` field (0-based);
an empty list switches it off. Validation lives in ``memformers.config``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# how an IVF index stores its copy of a key, in bytes per dim: as fp16 or fp32 values, or
# "pq4": 4-bit product-quantised codes (d/4 sub-vectors of 4 dims, 16 centroids each,
# faiss's fast-scan IVFPQ) that only rank the candidates, rescored exactly from the ring
IVF_CODES = {"fp16": 2, "fp32": 4, "pq4": 0.125}
# ivf_train = 0: keys per IVF list the centroids train on (the settings measured at 65,536
# rows: 16,384 keys per kNN head, 32,768 per kNN-LM stream, for 1,024 lists)
IVF_TRAIN_PER_LIST = {"KNNConfig": 16, "KNNLMConfig": 32}


def ivf_codes_of(codes: str, storage_dtype: str) -> str:
    """``ivf_codes = "auto"``: the ring's own precision where faiss has it (fp16 keys are
    copied exactly as fp16 codes), else fp32; so the index never rounds a key the ring
    holds, and its scores are the exact search's."""
    if codes != "auto":
        return codes
    return "fp16" if storage_dtype == "float16" else "fp32"


def ivf_shape(cfg: KNNConfig | KNNLMConfig) -> tuple[int, int]:
    """(lists, training keys) of an IVF backend over ``cfg.capacity`` rows per stream.
    ``ivf_nlist = 0``: 4 sqrt(C) rounded to a power of two (at least ``ivf_nprobe``), so
    that a query's work -- nlist centroids, then nprobe lists of about C / nlist rows --
    grows as sqrt(C), not C. ``ivf_train = 0``: ``IVF_TRAIN_PER_LIST`` keys per list
    (k-means needs a few per centroid)."""
    nlist = cfg.ivf_nlist or max(cfg.ivf_nprobe, 1 << round(math.log2(4 * math.sqrt(
        max(cfg.capacity, 1)))))
    return nlist, cfg.ivf_train or IVF_TRAIN_PER_LIST[type(cfg).__name__] * nlist


@dataclass
class KNNConfig:
    """Memorizing Transformers kNN memory (docs/knn.md)."""

    # e.g. [3] of 6; "auto" (in a config or --set) = the layer at 3/4 depth, the paper's
    # 9 of 12 (config.knn_default_layer)
    layers: list[int] = field(default_factory=list)
    capacity: int = 65536  # (key, value) pairs per (stream, head), FIFO
    top_k: int = 32  # retrieved per query; a memory holding fewer rows returns what it has
    # "exact" | "ivf" (faiss inverted lists over the ring) | "block" (two-stage block
    # search) | "faiss" (faiss indexes on time-ordered blocks of the ring)
    backend: str = "exact"
    storage_dtype: str = "float16"  # "float16" | "bfloat16" | "float32"
    # how retrieved pairs join local attention: "gate" (the paper: a separate softmax over
    # the top-k, mixed with local attention by a learned per-head gate) | "joint" (one
    # softmax over the local window and the top-k, which hold only keys older than the
    # window, scored with the farthest position bias plus b_h; docs/knn.md)
    combine: str = "gate"
    # L2-normalise q and k with a learned per-head temperature (the paper) in the kNN
    # layers: true (all), false (none: the layer keeps its own 1/sqrt(d) scaling, e.g. a
    # pretrained layer that was trained without normalisation), or a list of layers
    normalize: bool | list[int] = True
    gate_init: float = 0.0  # b_h init; sigmoid(0) = 0.5 as the paper; < 0 starts mostly local
    gate_lr: float = 1e-2  # gates and temperatures: own parameter group, no weight decay
    scale_init: float = 8.0  # learned per-head temperature for normalised q.k
    search_chunk: int = 65536  # memory rows scored at a time by the exact backend
    faiss_block: int = 16384  # FIFO block size of the faiss backend (one index per block)
    faiss_index: str = "flat"  # "flat" | "ivf" | "hnsw"
    faiss_nprobe: int = 8
    faiss_nlist: int = 0  # IVF lists per block; 0 = auto (faiss_block // 64, at least 1)
    faiss_hnsw_m: int = 32  # HNSW graph degree
    faiss_ef_search: int = 64  # HNSW search breadth (raised to top_k when smaller)
    search_group: int = 16  # exact backend: rows per max-group in the two-stage top-k
    search_tile: int = 1 << 25  # exact backend: fp32 scores per batched matmul (x4 bytes)
    # exact backend: "float32" | "bfloat16" | "float16" (score every row in low precision on
    # the matrix units, AMX / tensor cores, then rescore the best search_rerank candidates
    # in fp32; 0 = 2 x top_k): the returned scores are exact, the candidate set approximate
    search_dtype: str = "float32"
    search_rerank: int = 0
    # block backend (knn_store.BlockSearch): blocks of block_size consecutive ring slots,
    # summarised by their mean key; each group of block_group queries searches the
    # block_probe blocks whose means score highest
    # ivf backend: lists (k-means centroids) per head; 0 = auto (ivf_shape: 1,024 at the
    # default 65,536 rows, 2,048 at 262,144, 4,096 at 1M: cost ~ sqrt(capacity))
    ivf_nlist: int = 0
    ivf_nprobe: int = 64  # lists a query scans (recall@32 0.96-0.98 on recorded keys)
    ivf_train: int = 0  # keys per head the centroids are trained on, once; 0 = 16 per list
    # the index's copy of a key: "auto" (as stored) | "fp16" | "fp32" | "pq4" (IVF_CODES)
    ivf_codes: str = "auto"
    ivf_rescore: int = 0  # pq4: candidates per query rescored exactly (0 = top_k)
    block_size: int = 64
    block_probe: int = 32
    block_group: int = 16


@dataclass
class KNNLMConfig:
    """Training-free kNN-LM over the model's own hidden states (docs/knnlm.md).

    Khandelwal et al. 2020 (kNN-LM) with a per-document datastore as in the neural
    cache of Grave et al. 2017: p = (1 - lambda) p_LM + lambda p_kNN.
    """

    capacity: int = 0  # (hidden state, next token) pairs per stream, FIFO; 0 = off
    top_k: int = 64
    # lam and temperature: chosen by `memformers knnlm-tune demo-base --split valid`
    temperature: float = 0.035  # p_kNN over neighbours = softmax(similarity / temperature)
    lam: float = 0.4  # lambda: the kNN distribution's weight in the mixture
    similarity: str = "cosine"  # "cosine" (normalised keys) | "l2" (-squared distance)
    key: str = "final_norm"  # "final_norm" | "ffn_input" (the last FFN's normalised input)
    # adaptive retrieval (He et al. 2021, with the model's own confidence as the rule):
    # search only at positions whose largest p_LM is below this; elsewhere p = p_LM.
    # 1.0 = search everywhere
    retrieve_below: float = 1.0
    min_distance: int = 0  # leave out the last N positions (e.g. segment + XL cache)
    storage_dtype: str = "float16"  # keys: "float16" | "bfloat16" | "float32"
    search_chunk: int = 16384  # stored rows scored at a time (bounds scratch memory)
    # "exact": score every stored key (torch); "ivf": faiss inverted lists over the stored
    # keys (one index per stream, one coarse quantizer trained on the first ivf_train keys;
    # exact until then); "auto": ivf on CPU, exact on GPU. The current segment's own pairs
    # are always scored exactly. At 65K entries on CPU ivf is 5x faster than exact, with
    # recall@64 0.92 and +0.25% held-out loss (docs/knnlm.md).
    backend: str = "auto"
    ivf_nlist: int = 0  # 0 = auto (ivf_shape): 1,024 at 65,536 entries, 2,048 at 262,144
    ivf_nprobe: int = 8
    ivf_train: int = 0  # 0 = 32 keys per list (32,768 at 65,536 entries)
    # the index's copy of a key: "auto" (as stored) | "fp16" | "fp32" | "pq4" (IVF_CODES)
    ivf_codes: str = "auto"
    ivf_rescore: int = 0  # pq4: candidates per query rescored exactly (0 = top_k)


@dataclass
class PKMConfig:
    """Product-key memory replacing the FFN of chosen layers (docs/pkm.md)."""

    layers: list[int] = field(default_factory=list)
    n_keys: int = 512  # sub-keys per half: n^2 slots
    heads: int = 4
    k_dim: int = 256
    top_k: int = 32
    query_norm: str = "batchnorm"  # "batchnorm" | "layernorm" | "none"
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    value_lr: float = 1e-3  # own optimizer group, constant lr
    # Value gradients: True = sparse + SparseAdam, False = dense + Adam, "auto" = the one
    # measured faster for the device (benchmarks/bench_pkm.py): sparse on CPU (262K slots:
    # 0.93x the dense step time, 1M: 0.40x), dense on CUDA (NCCL and FSDP2 need dense
    # gradients). The trainer resolves "auto"; a module built directly treats it as dense.
    sparse: bool | str = "auto"
    memory_plus: bool = False  # silu-gated output (Memory Layers at Scale)
    share_values: bool = False  # one value table for every PKM layer


@dataclass
class InfiniConfig:
    """Infini-attention compressive memory (docs/infini.md)."""

    layers: list[int] = field(default_factory=list)
    update: str = "delta"  # "linear" | "delta"
    # "elu": sigma = ELU + 1 (the paper) | "learned": sigma(x A + gelu(x W1) W2), trained
    feature: str = "elu"
    feature_dim: int = 0  # "learned": size of the feature space (0 = head_dim)
    gate_init: float = 0.0
    gate_lr: float = 1e-2  # own parameter group, no weight decay
    eps: float = 1e-6


@dataclass
class ContinuousConfig:
    """infinity-former continuous long-term memory (docs/continuous.md)."""

    layers: list[int] = field(default_factory=list)
    n_basis: int = 256  # N radial basis functions (centres x widths)
    widths: list[float] = field(default_factory=lambda: [0.005, 0.01])
    ridge_lambda: float = 0.5
    tau: float = 0.75  # old memory squeezed into [0, tau]
    n_samples: int = 256  # M points sampled from the old signal
    sticky: bool = True
    sticky_bins: int = 128
    kl_weight: float = 0.0  # weight of KL(N(mu, sigma^2) || N(kl_mu0, kl_sigma0^2)); code: 1e-6
    kl_mu0: float = 0.5
    kl_sigma0: float = 0.05
    sigma_min: float = 1e-4
    pad_fit: bool = False  # the official code's padding trick
