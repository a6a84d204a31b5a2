"""Memory-augmented attention for pretrained HF causal LMs (GPT-2 and the Llama family).

``add_memory(model, kind, layers, **cfg)`` replaces the attention module of each
chosen decoder layer (``model.transformer.h[i].attn`` for GPT-2,
``model.model.layers[i].self_attn`` for Llama / Mistral / Qwen2) by a wrapper
that adopts the original module's projections under their own names (so
``save_pretrained`` keeps every base weight where it was) and adds one
memformers memory module, ``.memory``:

    q, k, v = the layer's pretrained projections            q (B, H, L, d), k, v (B, Hkv, L, d)
    local   = the library's own attention on RoPE(q), RoPE(k), v, with its KV
              cache and attention kernel: exactly the original  (B, H, L, d)
    out     = memory(q, k, v, local)    q, k WITHOUT RoPE: memories carry no
                                        position (docs/knn.md, docs/infini.md)
    y       = W_o out

kind="knn" (Memorizing Transformers, Wu et al. 2022, sec. 3): top-k retrieval
    from a FIFO of past (key, value) pairs per (row, kv head), q and k
    L2-normalised times a learned per-head scale s_h, V = g V_m + (1 - g) V_c with
    g = sigmoid(b_h), applied only where a row's memory holds something
    (``memory/knn.py``, ``memory/knn_store.py``).
kind="infini" (Infini-attention, Munkhdalai et al. 2024, eqs. 3-6):
    A = g A_mem + (1 - g) A_dot with the compressive memory of
    ``memory/infini.py``; for a retrofit the gate is applied only to rows whose
    memory is non-empty, so that a fresh memory changes nothing.

New parameters are only the per-head gates b_h (and kNN's temperatures s_h);
with an empty memory the outputs are the original model's, bit for bit.
Grouped-query attention: one memory per (row, kv head); the G query heads
sharing a kv head search it together, and gate and scale are per kv head.

Writing: the memory is written ONLY inside ``writing(model)``, which
``memorize`` (feed a long text chunk by chunk) and the trainer use. A plain
forward and ``model.generate`` read the memory and never write it: the prompt
and the generated tokens live in the KV cache (local attention), the memory
holds what was committed before. Every token is thus written exactly once,
after its own chunk has read the memory (a chunk never retrieves itself).

kind="knnlm" (kNN-LM, Khandelwal et al. 2020, eq. 2; ``memory/knnlm.py``, docs/knnlm.md)
changes no layer and adds no parameter: one ``HFKNNLM`` datastore, ``model.knnlm``, of
(h_p, x_{p+1}) pairs, h_p the final norm's output, attached by two PyTorch forward hooks:

    final norm (GPT-2 ``transformer.ln_f``, Llama ``model.norm``): inside ``writing(model,
        tokens=ids)`` it keeps its output h (B, L, D) of every position (``memorize`` asks
        for ``logits_to_keep=1``, so ``lm_head`` sees only the last one)
    ``lm_head``: if the datastore holds a pair and lam > 0, its logits become
        log p = log((1 - lam) softmax(logits) + lam p_kNN(h))         (B, L', V) fp32
        with p_kNN over the top_k STORED pairs by similarity to lm_head's input h; then,
        inside ``writing``, the chunk's pairs (h_p, x_{p+1}) are stored (FIFO, ``capacity``)

Reading retrieves only what was memorised, never the current input's own positions, and
ignores ``min_distance``: the log-probs of position t depend on h_t and the datastore
alone, so ``generate`` with the KV cache equals full forwards step by step. A memorised
text's last position has no next token yet: it stays pending (never retrieved) until the
next chunk written shows it. Rows whose datastore is empty keep the model's logits; with
lam = 0 or an empty datastore the outputs are the base model's, bit for bit.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from tqdm import tqdm

from memformers.errors import MemformersError
from memformers.memory.configs import InfiniConfig, KNNConfig, KNNLMConfig
from memformers.memory.knn_store import STORAGE_DTYPES
from memformers.memory.knnlm import KNNLM

TRANSFORMERS_RANGE = ">=5.0,<6"  # CI tests 5.0.0 and the newest (.ci/); 4.x differs inside
# model_type -> attention layout ("gpt2": fused c_attn, no RoPE; "llama": q/k/v/o_proj + RoPE)
SUPPORTED_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
KINDS = {"knn": KNNConfig, "infini": InfiniConfig, "knnlm": KNNLMConfig}
KNNLM_CAPACITY = 65536  # add_memory(kind="knnlm")'s default: pairs per row


def require_transformers():
    """The ``transformers`` module, or a one-line error naming the supported range."""
    try:
        import transformers
    except ImportError:
        raise MemformersError(f"memformers.hf needs transformers{TRANSFORMERS_RANGE}: "
                              "pip install 'memformers[hf]'") from None
    if transformers.__version__.split(".")[0] != "5":
        raise MemformersError(f"transformers {transformers.__version__} is not supported; "
                              f"memformers.hf needs transformers{TRANSFORMERS_RANGE}")
    return transformers


@dataclass
class MemoryControl:
    """What the memory layers of one model do in the current forward (shared by its layers)."""

    write: bool = False
    mask: torch.Tensor | None = None  # (B, L) bool: tokens to write; None = all
    skip_read_from: int | None = None  # memory layers with index >= this do not read
    tokens: torch.Tensor | None = None  # (B, L) the input ids (the kNN-LM's next tokens)


# --------------------------------------------------------------------------- the wrappers


class MemoryAttention(nn.Module):
    """An HF attention module with a memory: base of the two layout-specific wrappers."""

    def __init__(self, original: nn.Module, memory: nn.Module, kind: str,
                 control: MemoryControl, n_heads: int, n_kv_heads: int):
        super().__init__()
        for name, child in original.named_children():  # q_proj, c_attn, ...: same names
            self.add_module(name, child)
        for name, buf in original.named_buffers(recurse=False):  # GPT-2's causal "bias" (5.0)
            self.register_buffer(name, buf, persistent=name not in
                                 original._non_persistent_buffers_set)
        for key, value in vars(original).items():  # config, layer_idx, scaling, head_dim...
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.train(original.training)
        self._original_class = type(original)
        self._modeling = sys.modules[type(original).__module__]  # the library's helpers
        self._control = control
        self.kind, self.mem_heads, self.mem_kv_heads = kind, n_heads, n_kv_heads
        self.memory = memory
        # transformers 5.24 renamed the attention's ``past_key_values`` to ``cache`` and passes
        # the forward's kwargs on to ``cache.update``; older 5.x take neither.
        params = inspect.signature(type(original).forward).parameters
        self._cache_takes_kwargs = "cache" in params

    def _update_kv_cache(self, cache, k, v, kwargs):
        """Append this step's k, v (B, Hkv, L, d) to the HF KV cache; returns all keys, values."""
        if self._cache_takes_kwargs:
            return cache.update(k, v, self.layer_idx, kwargs=kwargs)
        return cache.update(k, v, self.layer_idx)

    def _attention_function(self):
        """The library's attention kernel for ``config._attn_implementation``, as it picks it."""
        impl, modeling = self.config._attn_implementation, self._modeling
        functions = modeling.ALL_ATTENTION_FUNCTIONS
        if hasattr(functions, "get_interface"):  # transformers >= 5.x (later releases)
            return functions.get_interface(impl, modeling.eager_attention_forward)
        return modeling.eager_attention_forward if impl == "eager" else functions[impl]

    # ----------------------------------------------------------------- memory state

    def rows(self) -> int:
        """Batch rows the memory holds (0 before the first use)."""
        if self.kind == "knn":
            return self.memory.store.batch_size
        return 0 if self.memory.M is None else self.memory.M.shape[0]

    def empty_rows(self) -> torch.Tensor:
        """(rows,) bool: rows whose memory holds nothing."""
        if self.kind == "knn":
            return self.memory.store.count == 0
        return self.memory.z.flatten(1).eq(0).all(1)

    def _device(self) -> torch.device | None:
        if self.kind == "knn":
            return self.memory.store.device
        return None if self.memory.M is None else self.memory.M.device

    def _ensure_rows(self, batch: int, device: torch.device) -> None:
        """Allocate empty memory for ``batch`` rows on ``device`` unless it is there."""
        held = self.rows()
        if held == batch and self._device() == device:
            return
        if held and not bool(self.empty_rows().all()):
            raise MemformersError(f"the memory holds {held} batch rows on {self._device()} but "
                                  f"the input has {batch} on {device}; match it or call "
                                  "memformers.hf.reset_memory(model) first")
        self.memory.allocate(batch, device)

    # ----------------------------------------------------------------- memory path

    def _with_memory(self, q, k, v, local):
        """q (B, H, L, d), k, v (B, Hkv, L, d) without RoPE; local (B, H, L, d) -> same shape."""
        ctl = self._control
        B, H, L, d = q.shape
        self._ensure_rows(B, q.device)
        empty = self.empty_rows()  # (B,) before this chunk is written
        if not ctl.write and bool(empty.all()):
            return local  # nothing to read or write: the original output, untouched
        Hkv = k.shape[1]
        qg = q.reshape(B, Hkv, (H // Hkv) * L, d)  # a kv head's query heads one after another
        lg = local.reshape(B, Hkv, (H // Hkv) * L, d)
        mask = ctl.mask if ctl.write and ctl.mask is not None else \
            torch.ones(B, L, dtype=torch.bool, device=q.device)
        if mask.shape != (B, L):
            raise MemformersError(f"write mask has shape {tuple(mask.shape)}, expected {(B, L)}")
        mask = mask.to(q.device, torch.bool)
        if self.kind == "knn":
            qm, km, _ = self.memory.transform_qk(qg, k)  # normalised, q times s_h
            if ctl.skip_read_from is not None and self.layer_idx >= ctl.skip_read_from:
                self.memory.store.write(km, v, mask)  # nothing later depends on this read
                out = lg
            else:
                out = self.memory(qm, km, v, lg, mask, ctl.write)  # read, then write
        else:
            out = self.memory(qg, k, v, lg, mask, ctl.write)
            out = torch.where(empty[:, None, None, None], lg, out)  # empty memory: no change
        return out.reshape(B, H, L, d)


class GPT2MemoryAttention(MemoryAttention):
    """``GPT2Attention`` (self-attention only) plus memory; no RoPE (learned absolute positions)."""

    def forward(self, hidden_states, past_key_values=None, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, cache=None, **kwargs):
        if encoder_hidden_states is not None:
            raise MemformersError("memory layers do not support GPT-2 cross-attention")
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        keys, values = k, v
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            keys, values = self._update_kv_cache(cache, k, v, kwargs)
        impl = self.config._attn_implementation
        # transformers < 5.2x: no ``scaling`` attribute; the kernels scale by 1/sqrt(d) themselves
        scaling = {"scaling": self.scaling} if hasattr(self, "scaling") else {}
        if impl == "eager" and self.reorder_and_upcast_attn:
            attn, weights = self._original_class._upcast_and_reordered_attn(
                self, q, keys, values, attention_mask)
        else:
            attn, weights = self._attention_function()(self, q, keys, values, attention_mask,
                                      dropout=self.attn_dropout.p if self.training else 0.0,
                                      **scaling, **kwargs)  # (B, L, H, d)
        out = self._with_memory(q, k, v, attn.transpose(1, 2)).transpose(1, 2)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(out)), weights


class LlamaMemoryAttention(MemoryAttention):
    """``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention`` plus memory."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, L, d)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hkv, L, d)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = self._modeling.apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = k_rot, v
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            keys, values = self._update_kv_cache(cache, k_rot, v, kwargs)
        interface = self._attention_function()
        extra = {}
        if self.config.model_type == "mistral":
            extra["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif self.config.model_type == "qwen2":
            extra["sliding_window"] = self.sliding_window
        attn, weights = interface(self, q_rot, keys, values, attention_mask,
                                  dropout=0.0 if not self.training else self.attention_dropout,
                                  scaling=self.scaling, **extra, **kwargs)  # (B, L, H, d)
        out = self._with_memory(q, k, v, attn.transpose(1, 2)).transpose(1, 2)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


WRAPPERS = {"gpt2": GPT2MemoryAttention, "llama": LlamaMemoryAttention}


class HFKNNLM(KNNLM):
    """The kNN-LM datastore of an HF causal LM; its two methods are the forward hooks on the
    final norm and on ``lm_head`` (module docstring). Bound methods, so a deep copy of the
    model hooks its own copy of the datastore."""

    def __init__(self, cfg: KNNLMConfig, d_model: int, control: MemoryControl):
        super().__init__(cfg, d_model)
        self._control = control
        self._hidden: torch.Tensor | None = None  # final norm output of a writing forward
        # moves with model.to(...): where an empty datastore is allocated (not saved)
        self.register_buffer("device_probe", torch.empty(0), persistent=False)

    def retrievable(self) -> torch.Tensor:
        """(rows,) bool: rows whose datastore holds a pair."""
        return self.count > 0

    def _check_rows(self, batch: int, device: torch.device) -> None:
        """The datastore must hold ``batch`` rows on ``device``; allocated if it is empty."""
        held = self.count.shape[0]
        if held == batch and self.count.device == device:
            return
        if held and bool((self.retrievable() | self.pending).any()):
            raise MemformersError(f"the kNN-LM datastore holds {held} batch rows on "
                                  f"{self.count.device} but the input has {batch} on {device}; "
                                  "match it or call memformers.hf.reset_memory(model) first")
        self.allocate(batch, device)

    def on_final_norm(self, module, args, output) -> None:
        if self._control.write:
            self._hidden = output[0] if isinstance(output, tuple) else output

    def on_lm_head(self, module, args, logits: torch.Tensor) -> torch.Tensor | None:
        """logits (B, L', V) of lm_head's input h (B, L', D) -> log p, or None (unchanged)."""
        out = None
        h = args[0]
        if self.cfg.lam > 0 and self.count.numel() and bool(self.retrievable().any()):
            self._check_rows(h.shape[0], h.device)
            mixed = self.mix(logits, *self.datastore_neighbours(h, self.asks(logits)))
            out = torch.where(self.retrievable()[:, None, None], mixed, logits.float())
        if self._control.write:
            self._write_chunk()
        return out

    def _write_chunk(self) -> None:
        """Store the pairs (h_p, x_{p+1}) of the chunk just run (``writing``'s tokens, mask)."""
        ctl, h, self._hidden = self._control, self._hidden, None
        if ctl.tokens is None:
            raise MemformersError("writing a kNN-LM needs the input ids: "
                                  "writing(model, tokens=input_ids)")
        if h is None or h.shape[:2] != ctl.tokens.shape:
            raise MemformersError(f"writing tokens of shape {tuple(ctl.tokens.shape)} do not "
                                  f"match the forward's input "
                                  f"{None if h is None else tuple(h.shape[:2])}")
        B, L = ctl.tokens.shape
        mask = torch.ones(B, L, dtype=torch.bool, device=h.device) if ctl.mask is None \
            else ctl.mask.to(h.device, torch.bool)
        if mask.shape != (B, L):
            raise MemformersError(f"write mask has shape {tuple(mask.shape)}, expected {(B, L)}")
        if not torch.equal(mask.long().cumprod(1).sum(1), mask.sum(1)):
            raise MemformersError("the kNN-LM writes right-padded rows only (attention_mask: "
                                  "ones, then zeros)")
        self._check_rows(B, h.device)
        self.write(h, ctl.tokens.to(h.device), mask)

    # ----------------------------------------------------------------- saved memories

    def set_storage(self, capacity: int, storage_dtype: str | None = None) -> None:
        """An empty datastore of ``capacity`` pairs per row (and ``storage_dtype``)."""
        if capacity <= 0:
            raise MemformersError(f"knnlm capacity must be > 0, got {capacity}")
        storage_dtype = storage_dtype or self.cfg.storage_dtype
        if storage_dtype not in STORAGE_DTYPES:
            raise MemformersError(f"knnlm storage_dtype must be one of "
                                  f"{', '.join(STORAGE_DTYPES)}; got '{storage_dtype}'")
        batch, device = self.count.shape[0], self.count.device
        self.cfg = dataclasses.replace(self.cfg, capacity=capacity, storage_dtype=storage_dtype)
        self.dtype = STORAGE_DTYPES[storage_dtype]
        self.allocate(batch, device)

    def storage_settings(self) -> dict:
        return {"capacity": self.cfg.capacity, "storage_dtype": self.cfg.storage_dtype}

    def adopt_storage_settings(self, settings: dict) -> None:
        self.set_storage(settings["capacity"], settings["storage_dtype"])

    def describe_settings(self, settings: dict) -> str:
        return f"kNN-LM capacity {settings['capacity']} ({settings['storage_dtype']})"

    def tokens_written(self) -> list[int]:
        return self.seen.tolist()


# --------------------------------------------------------------------------- add_memory


def _layout(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MemformersError(f"add_memory supports causal LMs of type "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}")
    return SUPPORTED_MODEL_TYPES[model_type]


def _attention_slots(model: nn.Module, layout: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every decoder layer's self-attention, in layer order."""
    try:
        blocks = model.transformer.h if layout == "gpt2" else model.model.layers
    except AttributeError:
        raise MemformersError(f"{type(model).__name__} is not a causal LM with the "
                              f"{layout} layout (use AutoModelForCausalLM)") from None
    return [(b, "attn" if layout == "gpt2" else "self_attn") for b in blocks]


def _check_options(kind: str, options: dict) -> None:
    if kind not in KINDS:
        raise MemformersError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    names = [f.name for f in dataclasses.fields(KINDS[kind]) if f.name != "layers"]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MemformersError(f"unknown {kind} memory option '{key}'{hint}")


def _memory_config(kind: str, layers: list[int], options: dict):
    _check_options(kind, options)
    cfg = KINDS[kind](layers=list(layers), **options)
    if kind == "knn" and (cfg.capacity < 0 or cfg.top_k <= 0):
        raise MemformersError(f"knn memory needs capacity >= 0 and top_k > 0; got capacity "
                              f"{cfg.capacity}, top_k {cfg.top_k}")
    if kind == "knn" and (cfg.combine != "gate" or not isinstance(cfg.normalize, bool)):
        raise MemformersError("a Hugging Face retrofit takes combine='gate' and normalize "
                              "true or false (the wrapper keeps the library's own attention "
                              "kernel, which exposes no softmax normaliser)")
    return cfg


def default_layers(n_layers: int) -> list[int]:
    """The paper's placement: one memory layer at 3/4 depth (9th of 12 = index 8)."""
    return [max(0, 3 * n_layers // 4 - 1)]


def add_memory(model: nn.Module, kind: str = "knn", layers: Sequence[int] | None = None,
               chunk_len: int | None = None, **memory_config) -> nn.Module:
    """Give the chosen decoder layers of an HF causal LM a memory; returns ``model``.

    ``memory_config`` are the fields of ``KNNConfig`` (capacity, top_k,
    gate_init, scale_init, storage_dtype, backend, ...) or ``InfiniConfig``
    (update, gate_init, ...); kind="knnlm" takes no ``layers`` and the fields of
    ``KNNLMConfig`` (capacity (default 65536 pairs), top_k, temperature, lam,
    similarity, storage_dtype, backend, ...; key "final_norm" only). ``chunk_len`` is
    the chunk length ``memorize`` uses by default (the segment length the memory was
    trained with). The settings are stored as ``model.config.memformers``, so
    ``save_pretrained`` keeps them and ``memformers.hf.load_pretrained`` rebuilds the model.
    """
    require_transformers()
    layout = _layout(model)
    if getattr(model, "_memformers_control", None) is not None:
        raise MemformersError("this model already has memory layers")
    if kind == "knnlm":
        if layers is not None:
            raise MemformersError("kind='knnlm' reads the final norm's output and changes no "
                                  "layer: leave out layers")
        return _add_knnlm(model, layout, chunk_len, memory_config)
    slots = _attention_slots(model, layout)
    n = len(slots)
    layers = default_layers(n) if layers is None else list(layers)
    if not layers or len(set(layers)) != len(layers) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers):
        raise MemformersError(f"layers must be distinct layer indices in 0..{n - 1}; "
                              f"got {layers}")
    cfg = _memory_config(kind, sorted(layers), memory_config)
    from memformers.memory import attention_memory_class

    control = MemoryControl()
    for i in cfg.layers:
        parent, attr = slots[i]
        original = getattr(parent, attr)
        if layout == "gpt2":
            n_heads = n_kv = original.num_heads
        else:
            n_heads = model.config.num_attention_heads
            n_kv = n_heads // original.num_key_value_groups
        weight = next(original.parameters())
        memory = attention_memory_class(kind)(cfg, n_heads=n_kv, head_dim=original.head_dim,
                                              d_model=model.config.hidden_size)
        memory.to(weight.device)
        setattr(parent, attr, WRAPPERS[layout](original, memory, kind, control, n_heads, n_kv))
    model._memformers_control = control
    saved = {"kind": kind, **dataclasses.asdict(cfg)}
    if chunk_len:
        saved["chunk_len"] = int(chunk_len)
    model.config.memformers = saved
    return model


def _final_norm_and_head(model: nn.Module, layout: str) -> tuple[nn.Module, nn.Module]:
    try:
        norm = model.transformer.ln_f if layout == "gpt2" else model.model.norm
        return norm, model.lm_head
    except AttributeError:
        raise MemformersError(f"{type(model).__name__} is not a causal LM with the "
                              f"{layout} layout (use AutoModelForCausalLM)") from None


def _add_knnlm(model: nn.Module, layout: str, chunk_len: int | None, options: dict):
    """``add_memory(kind="knnlm")``: ``model.knnlm`` and its two hooks (module docstring)."""
    _check_options("knnlm", options)
    options = {"capacity": KNNLM_CAPACITY, **options}
    cfg = KNNLMConfig(**options)
    if cfg.key != "final_norm":
        raise MemformersError(f"knnlm key must be 'final_norm' on a Hugging Face model (the "
                              f"lm_head's input); got {cfg.key!r}")
    if cfg.capacity <= 0:
        raise MemformersError(f"knnlm capacity must be > 0, got {cfg.capacity}")
    from memformers.config import ModelConfig, RunConfig, validate

    validate(RunConfig(model=ModelConfig(n_layers=1, knnlm=cfg)))  # the library's value checks
    norm, head = _final_norm_and_head(model, layout)
    control = MemoryControl()
    knnlm = HFKNNLM(cfg, model.config.hidden_size, control)
    knnlm.to(next(norm.parameters()).device)
    knnlm.allocate(0, knnlm.device_probe.device)
    model.knnlm = knnlm  # a submodule without parameters or buffers: no new weights
    norm.register_forward_hook(knnlm.on_final_norm)
    head.register_forward_hook(knnlm.on_lm_head)
    model._memformers_control = control
    saved = {"kind": "knnlm", **dataclasses.asdict(cfg)}
    if chunk_len:
        saved["chunk_len"] = int(chunk_len)
    model.config.memformers = saved
    return model


# --------------------------------------------------------------------------- using the memory


def _control(model: nn.Module) -> MemoryControl:
    control = getattr(model, "_memformers_control", None)
    if control is None:
        raise MemformersError("this model has no memory layers; call "
                              "memformers.hf.add_memory(model, ...) first")
    return control


def memory_layers(model: nn.Module) -> list[tuple[int, MemoryAttention]]:
    """(layer index, wrapper) of every memory layer of ``model``, in layer order (none for
    kind="knnlm": its datastore is ``knnlm_of(model)``)."""
    _control(model)
    found = [(m.layer_idx, m) for m in model.modules() if isinstance(m, MemoryAttention)]
    return sorted(found, key=lambda t: t[0])


def knnlm_of(model: nn.Module) -> HFKNNLM | None:
    """The kNN-LM datastore of ``model`` (kind="knnlm"), else None."""
    _control(model)
    knnlm = getattr(model, "knnlm", None)
    return knnlm if isinstance(knnlm, HFKNNLM) else None


@contextmanager
def writing(model: nn.Module, mask: torch.Tensor | None = None,
            skip_read_from: int | None = None, tokens: torch.Tensor | None = None):
    """Forwards inside this context write their tokens (``mask`` (B, L): which) to memory;
    a kNN-LM also needs the input ids, ``tokens`` (B, L) (the values x_{p+1})."""
    control = _control(model)
    saved = dataclasses.replace(control)
    control.write, control.mask, control.skip_read_from = True, mask, skip_read_from
    control.tokens = tokens
    try:
        yield control
    finally:
        control.write, control.mask = saved.write, saved.mask
        control.skip_read_from, control.tokens = saved.skip_read_from, saved.tokens
        knnlm = knnlm_of(model)
        if knnlm is not None:
            knnlm._hidden = None


def reset_memory(model: nn.Module, rows: Sequence[int] | torch.Tensor | None = None) -> None:
    """Forget the memory of the given batch rows (indices or a (B,) bool mask); None = all."""
    knnlm = knnlm_of(model)
    states = [(knnlm.count.shape[0], knnlm)] if knnlm is not None else \
        [(layer.rows(), layer.memory) for _, layer in memory_layers(model)]
    for held, memory in states:
        if rows is None:
            memory.allocate(0, next(chain(memory.parameters(), memory.buffers())).device)
            continue
        flags = torch.as_tensor(rows)
        if flags.dtype != torch.bool:
            idx = flags.long().flatten()
            if idx.numel() and (idx.min() < 0 or idx.max() >= held):
                raise MemformersError(f"reset_memory: rows {idx.tolist()} out of range "
                                      f"(the memory holds {held} rows)")
            flags = torch.zeros(held, dtype=torch.bool).index_fill_(0, idx, True)
        if flags.shape != (held,):
            raise MemformersError(f"reset_memory: mask of shape {tuple(flags.shape)} for a "
                                  f"memory of {held} rows")
        memory.reset(flags)


def max_positions(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def default_chunk_len(model: nn.Module) -> int:
    """The chunk length the memory was trained with, else min(512, the model's positions)."""
    saved = (getattr(model.config, "memformers", None) or {}).get("chunk_len")
    return int(saved or min(512, max_positions(model.config) or 512))


@torch.no_grad()
def memorize(model: nn.Module, input_ids: torch.Tensor, *,
             attention_mask: torch.Tensor | None = None, chunk_len: int | None = None,
             progress: bool = False) -> int:
    """Feed a long text (B, T) (or (T,)) into the memory, ``chunk_len`` tokens at a time.

    Each chunk is one forward without KV cache (positions restart at 0, as in
    training): it reads the memory of the previous chunks, then is written.
    Only the memory layers before the last one need to read (nothing written
    depends on the last layer's read), so memorising skips that read. Padding
    (``attention_mask`` 0) is never written. A kNN-LM stores the pairs (h_p, x_{p+1})
    of every position; the chunk's last one waits (pending) for the next chunk's first
    token, so pairs across chunk boundaries are stored too. Returns the tokens written
    per row (the maximum over rows).
    """
    layers = memory_layers(model)
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    mask = None if attention_mask is None else (
        attention_mask[None] if attention_mask.dim() == 1 else attention_mask).bool()
    if mask is not None and mask.shape != ids.shape:
        raise MemformersError(f"attention_mask {tuple(mask.shape)} does not match input_ids "
                              f"{tuple(ids.shape)}")
    chunk_len = chunk_len or default_chunk_len(model)
    limit = max_positions(model.config)
    if chunk_len <= 0 or (limit and chunk_len > limit):
        raise MemformersError(f"chunk_len must be in 1..{limit or 'inf'}; got {chunk_len}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    last = layers[-1][0] if layers else None  # a kNN-LM has no memory layers
    was_training = model.training
    model.eval()
    T = ids.shape[1]
    try:
        for s in tqdm(range(0, T, chunk_len), desc="memorize", unit="chunk",
                      disable=not progress, leave=False):
            chunk = ids[:, s:s + chunk_len]
            m = mask[:, s:s + chunk_len] if mask is not None else None
            with writing(model, mask=m, skip_read_from=last, tokens=chunk):
                model(input_ids=chunk, attention_mask=None if m is None else m.long(),
                      use_cache=False, logits_to_keep=1)
    finally:
        model.train(was_training)
    return int(mask.sum(1).max()) if mask is not None else T
