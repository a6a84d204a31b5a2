"""Decoder-only Transformer LM with swappable attention memories and FFNs.

Pre-norm blocks: x = x + Attn(LN(x)); x = x + FFN(LN(x)); tied embeddings.
An optional kNN-LM head (``model.knnlm``, memory/knnlm.py) mixes the output
distribution with one retrieved from the stream's own past hidden states.

The model walks long documents segment by segment: ``forward`` takes one
segment per stream plus the per-stream ``new_doc`` flags; every piece of
per-stream state (XL cache, memories) is reset for exactly those streams
before the segment is processed, and updated after it (when ``commit``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memformers.config import ModelConfig
from memformers.memory import build_attention_memory, build_ffn
from memformers.memory.knnlm import KNNLM
from memformers.memory.state import (
    allocate_states,
    begin_segment,
    detach_states,
    iter_stream_states,
)
from memformers.model.attention import Attention
from memformers.model.position import RelativePositionBias, Rotary


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary | None, shared_modules: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.head_dim, xl_cache=cfg.xl_cache,
            memory=build_attention_memory(cfg, layer), rotary=rotary, dropout=cfg.dropout,
        )
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = build_ffn(cfg, layer, shared_modules)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, rel_bias, commit, mask_cache=None, aux_losses=None):
        """-> (block output, the FFN's normalised input), each (B, L, D)."""
        x = x + self.drop(self.attn(self.norm1(x), mask, rel_bias, commit, mask_cache,
                                    aux_losses))
        h = self.norm2(x)
        return x + self.drop(self.ffn(h, mask)), h


class MemformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rel_bias = (RelativePositionBias(cfg.n_heads, cfg.rel_buckets, cfg.rel_max_distance,
                                              cfg.rel_bias_lr_scale, cfg.rel_bias_init_slope)
                         if cfg.position == "t5" else None)
        rotary = Rotary(cfg.head_dim, cfg.rope_base) if cfg.position == "rope" else None
        shared_modules: dict = {}  # modules shared across layers (e.g. one PKM value table)
        self.blocks = nn.ModuleList(Block(cfg, i, rotary, shared_modules)
                                    for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # the training-free kNN-LM over the model's own hidden states (no parameters)
        self.knnlm = KNNLM(cfg.knnlm, cfg.d_model) if cfg.knnlm.capacity > 0 else None
        self.apply(self._init)
        nn.init.normal_(self.embed.weight, std=0.02)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual outputs
            if name.endswith("attn.out.weight") or name.endswith("ffn.down.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layers) ** 0.5)
        self.n_streams = 0

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- state

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None) -> None:
        """Fresh, empty per-stream state for ``batch_size`` streams."""
        allocate_states(self, batch_size, device or self.embed.weight.device)
        self.n_streams = batch_size

    def detach_state(self) -> None:
        detach_states(self)

    def has_state(self) -> bool:
        return any(True for _ in iter_stream_states(self))

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        tokens: torch.Tensor,  # (B, L) int64
        *,
        new_doc: torch.Tensor | None = None,  # (B,) bool: reset these streams first
        mask: torch.Tensor | None = None,  # (B, L) bool: real tokens
        commit: bool = True,  # write this segment into per-stream state
        aux_losses: list | None = None,  # a list: the memories append auxiliary losses to it
    ) -> torch.Tensor:  # (B, L, V) logits; log-probabilities with the kNN-LM on
        h, knnlm_keys, mask = self.features(tokens, new_doc=new_doc, mask=mask, commit=commit,
                                            aux_losses=aux_losses)
        logits = self.head(h)  # (B, L, V)
        if self.knnlm is not None:
            logits = self.knnlm(logits, knnlm_keys, tokens, mask, commit)
        return logits

    def features(self, tokens, *, new_doc=None, mask=None, commit=True, aux_losses=None):
        """The blocks without the output head: (final hidden states h (B, L, D), the kNN-LM's
        keys (B, L, D): h or the last FFN's normalised input, the (B, L) bool mask)."""
        mask = begin_segment(self, tokens, new_doc, mask)
        x = self.embed(tokens)  # (B, L, D)
        mask_cache: dict = {}  # per-forward: the additive attention mask every layer reuses
        for block in self.blocks:
            x, ffn_input = block(x, mask, self.rel_bias, commit, mask_cache, aux_losses)
        h = self.norm(x)  # (B, L, D)
        return h, ffn_input if self.cfg.knnlm.key == "ffn_input" else h, mask

    def fsdp_units(self) -> list[nn.Module]:
        """What FSDP2 shards one by one under ``train.parallel = "fsdp"``: the blocks."""
        return list(self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over (B, L, V) logits; targets -100 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction=reduction)
