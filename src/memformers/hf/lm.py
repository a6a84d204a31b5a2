"""The memformers trainer's model contract around a retrofitted Hugging Face causal LM.

``HFMemoryLM`` behaves like ``MemformerLM`` for the trainer, the evaluator and
``feed_and_generate``::

    logits = model(tokens, new_doc=new_doc, mask=mask, commit=True)   # (B, L) -> (B, L, V)

One segment per stream (batch row = memory row); each segment is one forward
without KV cache (positions 0..L-1, as ``memorize`` feeds chunks); rows flagged
``new_doc`` forget their memory first; with ``commit`` the segment's real
tokens (``mask``) are written after they have read the memory. The memories
are ``StreamState``s, so checkpoints hold them and a resumed run continues
mid-document exactly.

``from_model_config`` loads ``model.hf_path`` -- its weights if the directory
has them, else a random initialisation of its ``config.json`` (seeded by the
caller) --, checks that the corpus was tokenised with the model's tokenizer,
and adds the ``model.knn`` or ``model.infini`` memory. ``save_hf`` exports the
trained model in Hugging Face format with a ``tokenizer.json`` (memformers'
byte tokenizer included), so the directory is self-contained.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from memformers.data.tokenizer import HFTokenizer, Tokenizer, as_hf_tokenizer, tokenizers_match
from memformers.errors import MemformersError
from memformers.hf.persist import load_pretrained, weight_files
from memformers.hf.retrofit import (
    SUPPORTED_MODEL_TYPES,
    add_memory,
    max_positions,
    require_transformers,
    writing,
)
from memformers.memory.state import allocate_states, begin_segment, detach_states


def resolve_model_source(source: str) -> Path:
    """A local model directory, or the Hub snapshot of model ``source`` (needs the network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MemformersError(f"not a Hugging Face model directory: {path} (no config.json)")
        return path
    if source.startswith((".", "/", "~")) or path.exists():
        raise MemformersError(f"Hugging Face model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repository, gated model...
        raise MemformersError(f"cannot get Hugging Face model '{source}': not a local directory "
                              f"and not downloadable from the Hub ({e.__class__.__name__})"
                              ) from None


def load_hf_model(path: Path) -> nn.Module:
    """The causal LM in ``path`` in float32: its safetensors weights, else a random init."""
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(str(path))
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise MemformersError(f"{path}: model type {getattr(config, 'model_type', None)!r} is "
                              f"not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    memory = getattr(config, "memformers", None)
    pickles = [p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl")
               for p in path.glob(pattern)]
    if pickles and not weight_files(path):
        raise MemformersError(f"{path} holds only pickle weights ({pickles[0]}); memformers "
                              f"loads safetensors only (convert them with save_pretrained("
                              f"safe_serialization=True) where you trust the file)")
    if weight_files(path):
        if memory:
            return load_pretrained(path, dtype=torch.float32)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, use_safetensors=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if memory:
        add_memory(model, kind=memory["kind"], **{k: v for k, v in memory.items() if k != "kind"})
    return model


def check_tokenizer(path: Path, model: nn.Module, tokenizer: Tokenizer) -> None:
    """The corpus tokenizer must be the model's (checked when the model has one)."""
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise MemformersError(f"the corpus tokenizer has {tokenizer.vocab_size} tokens but "
                              f"the model {path} has a vocabulary of {vocab}")
    if (path / "tokenizer.json").is_file():
        if not tokenizers_match(tokenizer, HFTokenizer.load(path)):
            raise MemformersError(f"the corpus was not tokenised with the tokenizer of {path}; "
                                  f"rebuild it with `memformers data build --tokenizer "
                                  f"hf:{path} --out DIR`")
    elif weight_files(path):
        raise MemformersError(f"{path} has weights but no tokenizer.json: cannot check that "
                              "the corpus was tokenised for this model")


class HFMemoryLM(nn.Module):
    """A Hugging Face causal LM (with or without retrofitted memory) for the trainer."""

    def __init__(self, hf_model: nn.Module, source: str = ""):
        super().__init__()
        self.hf = hf_model
        self.source = source
        self.n_streams = 0
        self.max_len = max_positions(hf_model.config)

    @classmethod
    def from_model_config(cls, cfg, tokenizer: Tokenizer | None = None) -> HFMemoryLM:
        path = resolve_model_source(cfg.hf_path)
        hf = load_hf_model(path)
        if tokenizer is not None:
            check_tokenizer(path, hf, tokenizer)
        kind = "knn" if cfg.knn.layers else "infini" if cfg.infini.layers else None
        has = getattr(hf.config, "memformers", None)
        if has and has["kind"] == "knnlm":
            raise MemformersError(f"{path} has a kNN-LM (kind 'knnlm'), which has nothing to "
                                  "train: fine-tune the base model, then add_memory(kind='knnlm')")
        if has and kind:
            raise MemformersError(f"{path} already has a {has['kind']} memory in layers "
                                  f"{has['layers']}; leave model.knn.layers and "
                                  "model.infini.layers empty to fine-tune it as it is")
        if kind:
            sub = getattr(cfg, kind)
            options = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)
                       if f.name != "layers"}
            add_memory(hf, kind=kind, layers=sub.layers, **options)
        return cls(hf, str(path))

    # ----------------------------------------------------------------- the contract

    @property
    def memory(self) -> dict | None:
        return getattr(self.hf.config, "memformers", None)

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None) -> None:
        allocate_states(self, batch_size, device or next(self.parameters()).device)
        self.n_streams = batch_size

    def detach_state(self) -> None:
        detach_states(self)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, L) int64
        *,
        new_doc: torch.Tensor | None = None,  # (B,) bool: these rows forget their memory first
        mask: torch.Tensor | None = None,  # (B, L) bool: real tokens
        commit: bool = True,  # write this segment into memory
        aux_losses: list | None = None,  # unused: the retrofitted memories have none
    ) -> torch.Tensor:  # (B, L, V) logits
        L = tokens.shape[1]
        if self.max_len and L > self.max_len:
            raise MemformersError(f"segments of {L} tokens are longer than the model's "
                                  f"{self.max_len} positions; lower data.segment_len")
        mask = begin_segment(self, tokens, new_doc, mask)
        ctx = writing(self.hf, mask=mask, tokens=tokens) if commit and self.memory \
            else nullcontext()
        with ctx:
            out = self.hf(input_ids=tokens, use_cache=False,
                          attention_mask=None if bool(mask.all()) else mask.long())
        return out.logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        c, mem = self.hf.config, self.memory
        what = ("none" if not mem else f"knnlm (capacity {mem['capacity']})"
                if mem["kind"] == "knnlm" else f"{mem['kind']} in layers {mem['layers']}"
                + (f" (capacity {mem['capacity']})" if mem["kind"] == "knn" else ""))
        return (f"model: {type(self.hf).__name__} from {self.source}, "
                f"{self.num_parameters() / 1e6:.2f}M parameters, {c.num_hidden_layers} layers, "
                f"d_model {c.hidden_size}, memory: {what}")

    def save_hf(self, out_dir: str | Path, tokenizer: Tokenizer, chunk_len: int) -> Path:
        """``save_pretrained`` plus ``tokenizer.json``; the memory's chunk length is recorded."""
        out = Path(out_dir)
        if self.memory:
            self.hf.config.memformers = {**self.memory, "chunk_len": int(chunk_len)}
        self.hf.save_pretrained(str(out))
        as_hf_tokenizer(tokenizer).save(out)
        return out
