"""Small Hugging Face model configurations, built offline (tests, experiments, pretraining).

``tiny_config("llama" | "gpt2", ...)`` is a randomly initialisable config of
the given size with no special tokens and no dropout; ``write_model_dir``
writes it with a ``tokenizer.json`` into a directory that ``memformers
finetune --hf-model DIR`` trains from a random initialisation (a directory
without weights), e.g. to pretrain a byte-vocabulary model with memformers.
"""

from __future__ import annotations

from pathlib import Path

from memformers.data.tokenizer import Tokenizer, byte_tokenizer_json
from memformers.errors import MemformersError
from memformers.hf.retrofit import require_transformers


def tiny_config(arch: str = "llama", *, vocab_size: int = 256, d_model: int = 128,
                n_layers: int = 4, n_heads: int = 4, n_kv_heads: int | None = None,
                d_ff: int | None = None, max_positions: int = 1024):
    """A ``LlamaConfig`` or ``GPT2Config`` of this size (untied Llama, tied GPT-2 embeddings)."""
    transformers = require_transformers()
    d_ff = d_ff or 4 * d_model
    common = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=max_positions,
            **common)
    if arch == "gpt2":
        if n_kv_heads not in (None, n_heads):
            raise MemformersError("GPT-2 has no grouped-query attention (n_kv_heads)")
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_inner=d_ff, n_layer=n_layers,
            n_head=n_heads, n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common)
    raise MemformersError(f"arch must be llama or gpt2, got {arch!r}")


def write_model_dir(out: str | Path, config, tokenizer: Tokenizer | None = None) -> Path:
    """``config.json`` + ``tokenizer.json`` (default: memformers' byte tokenizer), no weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    (tokenizer or byte_tokenizer_json()).save(out)
    return out
