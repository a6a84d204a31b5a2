"""The trainer: streams long documents, steps the optimiser, never loses work.

One optimiser step = ``grad_accum`` windows x ``bptt_segments`` consecutive
segments per stream. Gradients flow through carried state inside a window
(backpropagation through time, e.g. Infini-attention); the state is detached
at the end of each window. Checkpoints fall on window boundaries, so a run
resumed with ``--resume`` continues exactly as if never interrupted.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from memformers.config import RunConfig, to_dict
from memformers.data.corpus import CorpusSplit, open_corpus_manifest
from memformers.data.streaming import DocumentStreams
from memformers.data.tokenizer import load_tokenizer
from memformers.errors import MemformersError
from memformers.evaluate.lm import evaluate_lm, format_eval
from memformers.memory.base import AttentionMemory
from memformers.memory.state import (
    collect_state_tensors,
    load_collected_state_tensors,
    state_bytes_per_stream,
)
from memformers.model import MemformerLM, build_model, lm_loss
from memformers.pretrained import resolve_weights
from memformers.train.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model,
)
from memformers.train.optim import build_optimizers, set_lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemformersError(f"train.device={name} but no CUDA device is available")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def gate_report(model: torch.nn.Module) -> dict[str, list[float]]:
    """Per-head memory gates of every gated memory layer: {"blocks.4": [..H..]}."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AttentionMemory):
            g = m.gate_values()
            if g is not None:
                out[name.replace(".attn.memory", "")] = [round(float(x), 4) for x in g]
    return out


def aux_losses(model: torch.nn.Module) -> torch.Tensor | float:
    """Auxiliary losses a memory may expose (e.g. the infinity-former's KL term)."""
    total = 0.0
    for m in model.modules():
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = total + aux
    return total


def check_memory_budget(model_cfg, batch_size: int, n_params: int,
                        state_bytes: int | None = None) -> int:
    """Estimate bytes needed (weights, grads, Adam, per-stream state) and refuse impossible runs.

    ``state_bytes``: the per-stream state of a built model (a Hugging Face model,
    whose memories are not described by ``model_cfg``); else the kNN memories of
    ``model_cfg``."""
    need = n_params * 4 * 4  # weights + grads + 2 Adam moments
    if state_bytes is not None:
        need += state_bytes
    elif model_cfg.knn.layers:
        from memformers.memory.knn import knn_footprint_bytes

        need += knn_footprint_bytes(model_cfg.knn, model_cfg.n_heads, model_cfg.head_dim,
                                    batch_size, len(model_cfg.knn.layers))
    try:
        import os
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return need
    if need > 0.9 * total:
        raise MemformersError(
            f"too little memory: this configuration needs about {need / 2**30:.1f} GiB "
            f"(weights, optimiser, memories) but the machine has {total / 2**30:.1f} GiB; "
            "lower model.knn.capacity or data.batch_size")
    return need


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.corpus_dir = Path(cfg.data.corpus)
        manifest = open_corpus_manifest(self.corpus_dir)
        self.tokenizer = load_tokenizer(self.corpus_dir)
        cfg.model.vocab_size = self.tokenizer.vocab_size

        saved_cfg = self.run_dir / "config.json"
        if resume and not saved_cfg.is_file():
            raise MemformersError(f"nothing to resume: {saved_cfg} not found")
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise MemformersError(f"{self.run_dir} already holds a run; pass --resume to "
                                  "continue it or choose another --run-dir")
        self.cfg = cfg
        t = cfg.train
        self.device = resolve_device(t.device)
        self.autocast = autocast_for(self.device, t.precision)
        if cfg.model.hf_path:  # a Hugging Face model (memformers.hf.lm), on the CPU first
            torch.manual_seed(t.seed)
            model = build_model(cfg.model, self.tokenizer)
            self.state_need = check_memory_budget(
                cfg.model, cfg.data.batch_size, model.num_parameters(),
                state_bytes_per_stream(model) * cfg.data.batch_size)
            self.model = model.to(self.device)
        else:
            with torch.device("meta"):  # count parameters without allocating them
                n_params = MemformerLM(cfg.model).num_parameters()
            self.state_need = check_memory_budget(cfg.model, cfg.data.batch_size, n_params)
            torch.manual_seed(t.seed)
            self.model = MemformerLM(cfg.model).to(self.device)
        if t.init_from and not resume:
            self._init_from(t.init_from)
        self.optimizers = build_optimizers(self.model, t)
        self.train_split = CorpusSplit.concat(
            [CorpusSplit.open(d, "train") for d in [self.corpus_dir, *cfg.data.mix]])
        self.eval_split = CorpusSplit.open(self.corpus_dir, cfg.data.eval_split)
        self.stream = DocumentStreams(self.train_split, cfg.data.batch_size, cfg.data.segment_len,
                                      shuffle=True, seed=t.seed, loop=True,
                                      min_doc_tokens=cfg.data.min_doc_tokens)
        self.model.allocate_state(cfg.data.batch_size, self.device)
        self.step = 0
        self.tokens_seen = 0
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise MemformersError(
                    f"nothing to resume: no complete checkpoint in {self.run_dir}")
            meta, streams = load_checkpoint(ckpt, model=self.model, optimizers=self.optimizers)
            self.step, self.tokens_seen = meta["step"], meta.get("tokens_seen", 0)
            self.stream.load_state_dict(meta["data_state"])
            load_collected_state_tensors(self.model, streams)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved_cfg, json.dumps(to_dict(cfg), indent=2))
            atomic_write_text(self.run_dir / "corpus.json", json.dumps(manifest, indent=2))
            tok_file = self.corpus_dir / "tokenizer.json"
            if tok_file.is_file():  # a BPE tokenizer is saved with the run
                shutil.copy(tok_file, self.run_dir / "tokenizer.json")
        self._stop = False

    def _init_from(self, value: str) -> None:
        weights = resolve_weights(value)
        missing = load_model_weights(self.model, weights, strict=False)
        if missing:
            tqdm.write(f"init_from {weights}: new parameters left at init: {len(missing)} "
                       f"tensors ({', '.join(sorted({m.split('.')[-1] for m in missing}))})")

    # ------------------------------------------------------------------ loop

    def describe(self) -> str:
        c = self.cfg
        n = self.model.num_parameters()
        if c.model.hf_path:
            return (f"{self.model.describe()}; estimated footprint "
                    f"{self.state_need / 2**20:.0f} MiB (weights, optimiser, memories)")
        mech = [k for k in ("knn", "pkm", "infini", "continuous")
                if getattr(c.model, k).layers]
        return (f"model: {n / 1e6:.2f}M parameters, {c.model.n_layers} layers, d_model "
                f"{c.model.d_model}, xl_cache={c.model.xl_cache}, memory: "
                f"{', '.join(mech) or 'none'}; estimated footprint "
                f"{self.state_need / 2**20:.0f} MiB (weights, optimiser, memories)")

    def train_window(self) -> tuple[float, int]:
        """bptt_segments consecutive segments, one backward; returns (loss sum, tokens)."""
        losses, n_tok = [], 0
        for _ in range(self.cfg.train.bptt_segments):
            b = next(self.stream)
            tokens, targets = b.tokens.to(self.device), b.targets.to(self.device)
            with self.autocast:
                logits = self.model(tokens, new_doc=b.new_doc.to(self.device),
                                    mask=b.mask.to(self.device))
            n = int((targets != -100).sum())
            losses.append(lm_loss(logits, targets, reduction="sum") + aux_losses(self.model))
            n_tok += n
        total = sum(losses)
        scale = self.cfg.train.grad_accum * max(n_tok, 1)
        (total / scale).backward()
        self.model.detach_state()
        return float(total.detach()), n_tok

    def _handle_sigterm(self, *_):
        self._stop = True

    def run(self) -> dict:
        t = self.cfg.train
        metrics_path = self.run_dir / "metrics.jsonl"
        tb = None
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(self.run_dir / "tb"))
        old = signal.signal(signal.SIGTERM, self._handle_sigterm)
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        t0, tok0 = time.perf_counter(), self.tokens_seen
        last = {}
        try:
            while self.step < t.steps and not self._stop:
                lr = set_lr(self.optimizers, self.step, t)
                loss_sum, n_tok = 0.0, 0
                for _ in range(t.grad_accum):
                    ls, n = self.train_window()
                    loss_sum, n_tok = loss_sum + ls, n_tok + n
                if not math.isfinite(loss_sum):
                    raise MemformersError(f"loss is {loss_sum} at step {self.step}; lower "
                                          "train.lr or check the data")
                dense = [p for p in self.model.parameters()
                         if p.grad is not None and not p.grad.is_sparse]
                gnorm = torch.nn.utils.clip_grad_norm_(dense, t.grad_clip)
                for opt in self.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += n_tok
                tok_s = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
                last = {"step": self.step, "loss": loss_sum / max(n_tok, 1), "lr": lr,
                        "grad_norm": float(gnorm), "tokens": self.tokens_seen,
                        "tokens_per_s": tok_s}
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    gates = gate_report(self.model)
                    if gates:
                        last["gates"] = gates
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    if tb:
                        for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                            tb.add_scalar(f"train/{k}", last[k], self.step)
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    ev = self.evaluate()
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": self.step, "eval": ev}) + "\n")
                    tqdm.write(f"step {self.step}: " + format_eval(ev))
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.checkpoint()
        finally:
            signal.signal(signal.SIGTERM, old)
            bar.close()
            if tb:
                tb.close()
        if self._stop:  # SIGTERM: save where we are and leave
            self.checkpoint()
            return {"stopped_at": self.step, **last}
        self.checkpoint()
        save_model(self.model, self.run_dir / "model.safetensors")
        if self.cfg.model.hf_path:  # also in Hugging Face format, with its tokenizer
            self.model.save_hf(self.run_dir / "hf", self.tokenizer, self.cfg.data.segment_len)
        return last

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.step, model=self.model, optimizers=self.optimizers,
            stream_tensors=collect_state_tensors(self.model),
            data_state=self.stream.state_dict(),
            extra={"tokens_seen": self.tokens_seen,
                   "state_bytes_per_stream": state_bytes_per_stream(self.model)},
        )

    def evaluate(self, **kw) -> dict:
        d = self.cfg.data
        return evaluate_lm(self.model, self.eval_split, self.tokenizer.token_bytes,
                           batch_size=d.batch_size, segment_len=d.segment_len,
                           max_docs=d.eval_max_docs, max_tokens=d.eval_max_tokens,
                           autocast=self.autocast, progress=self.progress, **kw)
