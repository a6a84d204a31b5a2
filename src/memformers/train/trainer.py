"""The trainer: streams long documents, steps the optimiser, never loses work.

One optimiser step = ``grad_accum`` windows x ``bptt_segments`` consecutive
segments per stream. Gradients flow through carried state inside a window
(backpropagation through time, e.g. Infini-attention); the state is detached
at the end of each window. Checkpoints fall on window boundaries, so a run
resumed with ``--resume`` continues exactly as if never interrupted.

Under torchrun every rank runs this trainer on its own streams (see
``train.distributed``): a window's loss is normalised by the GLOBAL number of
target tokens, so the averaged gradients equal the single-process gradients of
the same global batch; rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from memformers.config import RunConfig, to_dict
from memformers.data.corpus import open_corpus_manifest
from memformers.data.tokenizer import ByteTokenizer, load_tokenizer
from memformers.diagnostics.key_staleness import key_overlap, knn_layers, snapshot
from memformers.errors import MemformersError
from memformers.memory import configured_mechanisms, memory_off, resolve_for_device
from memformers.memory.base import AttentionMemory
from memformers.memory.state import (
    collect_state_tensors,
    load_collected_state_tensors,
    planned_state_bytes,
    state_bytes_per_stream,
    state_report,
)
from memformers.model import MemformerLM, build_model
from memformers.pretrained import resolve_weights, untrained_tensors
from memformers.runner import Segment, SegmentRunner
from memformers.tasks.base import build_task
from memformers.train import distributed
from memformers.train.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_model_weights,
    load_rank_state,
    lock_run_dir,
    model_tensors,
    read_checkpoint,
    record_config_changes,
    save_checkpoint,
    save_tensors,
    truncate_metrics,
)
from memformers.train.distributed import resolve_device
from memformers.train.optim import build_optimizers, optimizer_step, set_lr

__all__ = ["Trainer", "TrainWindow", "autocast_for", "gate_report", "resolve_device",
           "state_report"]


def autocast_for(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def gate_report(model: torch.nn.Module, values: str = "gate_values") -> dict[str, list[float]]:
    """Per-head memory gates of every gated memory layer: {"blocks.4": [..H..]}
    (``values="scale_values"``: their learned temperatures)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AttentionMemory) and m.holds_memory:
            g = getattr(m, values)()
            if g is not None:  # FSDP2 shards gates: gathered (every rank calls this)
                out[name.replace(".attn.memory", "")] = [
                    round(float(x), 4) for x in distributed.full_tensor(g)]
    return out


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), else the machine's total, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory_budget(model_cfg, batch_size: int, n_params: int, state_bytes: int,
                        segment_len: int = 0) -> int:
    """Estimate bytes needed (weights, grads, Adam, per-stream state, one segment's
    activations) and refuse impossible runs before anything is allocated.

    ``state_bytes``: the per-stream state of all ``batch_size`` streams, as the model's
    memories plan it (``memory.state.planned_state_bytes``)."""
    m, L = model_cfg, segment_len
    need = n_params * 4 * 4  # weights + grads + 2 Adam moments
    # activations kept for backward, per stream: every layer's residual-stream tensors and
    # attention scores over the segment (+ XL cache), float32 -- a lower bound
    keys = 2 * L if m.xl_cache else L
    need += batch_size * m.n_layers * L * (12 * m.d_model + m.d_ff + 2 * m.n_heads * keys) * 4
    need += state_bytes
    total = available_memory()
    if total is None:
        return need
    if need > 0.9 * total:
        raise MemformersError(
            f"too little memory: this configuration needs about {need / 2**30:.1f} GiB "
            f"(weights, optimiser, memories, activations) but {total / 2**30:.1f} GiB are "
            "available; lower model.knn.capacity, model.knnlm.capacity or data.batch_size")
    return need


class TrainWindow(torch.nn.Module):
    """One BPTT window -- consecutive segments of every stream -- as ONE forward.

    ``forward(segments)`` returns ``(loss_sum, n_targets)``: the summed token loss plus the
    auxiliary losses, and the number of scored tokens as a 0-d tensor
    (``SegmentRunner.loss``). DDP wraps this module rather than the LM, so one
    forward/backward pair covers the window and DDP's unused-parameter search sees every
    segment's graph.

    ``checkpoint_activations``: each segment keeps no activations for backward, which
    runs it again (``memory.state.checkpoint_segment``): activation memory is then
    one segment's, not the window's, for about one more forward of compute
    (kNN layers still keep the keys and values they retrieved).
    """

    def __init__(self, model: MemformerLM, autocast, world_size: int = 1,
                 checkpoint_activations: bool = False):
        super().__init__()
        self.model, self.world_size = model, world_size
        self.runner = SegmentRunner(model, autocast, checkpoint_activations)

    def forward(self, segments: list[Segment]):
        # auxiliary losses are means over a rank's tokens: averaged over ranks
        return self.runner.loss(segments, aux_scale=1 / self.world_size)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True):
        self.run_dir = Path(run_dir)
        existed = self.run_dir.exists()
        # one process per run directory (rank 0 of a distributed run holds the lock)
        self._lock = lock_run_dir(self.run_dir) if os.environ.get("RANK", "0") == "0" \
            else None
        try:
            self._build(cfg, resume, progress)
        except BaseException:  # refused before training: leave no trace of this attempt
            self.close_lock()
            if not existed and {p.name for p in self.run_dir.iterdir()} <= {".lock"}:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _build(self, cfg: RunConfig, resume: bool, progress: bool) -> None:
        self.corpus_dir = Path(cfg.data.corpus)
        manifest, self.tokenizer = self._open_corpus(cfg)
        cfg.model.vocab_size = self.tokenizer.vocab_size

        saved_cfg = self.run_dir / "config.json"
        if resume and not saved_cfg.is_file():
            raise MemformersError(f"nothing to resume: {saved_cfg} not found")
        if not resume and latest_checkpoint(self.run_dir, verify=False) is not None:
            raise MemformersError(f"{self.run_dir} already holds a run; pass --resume to "
                                  "continue it or choose another --run-dir")
        self.cfg = cfg
        t, B = cfg.train, cfg.data.batch_size
        self.dist = env = distributed.init_distributed(t.device)
        if B % env.world_size:
            raise MemformersError(f"data.batch_size ({B}) is the global number of streams and "
                                  f"must be divisible by the number of processes "
                                  f"({env.world_size})")
        self.progress = progress and env.is_main
        self.device = env.device
        self.autocast = autocast_for(self.device, t.precision)
        B_rank = B // env.world_size
        resolve_for_device(cfg.model, self.device, t)  # "auto" settings -> the device's
        torch.manual_seed(t.seed)
        hf = bool(cfg.model.hf_path)  # a Hugging Face model is built on the CPU first
        with nullcontext() if hf else torch.device("meta"):  # plan without allocating
            planned = build_model(cfg.model, self.tokenizer)
        self.state_need = check_memory_budget(
            cfg.model, B_rank, planned.num_parameters(),
            planned_state_bytes(planned, cfg.data.segment_len) * B_rank, cfg.data.segment_len)
        self.model = (planned if hf else build_model(cfg.model, self.tokenizer)).to(self.device)
        del planned
        if env.world_size > 1:
            torch.manual_seed(t.seed + env.rank)  # same init everywhere, own dropout masks
        self.sharded = distributed.is_sharded(t, env)
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise MemformersError(
                    f"nothing to resume: no complete checkpoint in {self.run_dir}")
            meta, optim_state = read_checkpoint(ckpt)
            self._check_resumable(ckpt, meta)
            load_model_weights(self.model, ckpt / "model.safetensors")
        elif t.init_from:
            self._init_from(t.init_from)
        self.window = TrainWindow(self.model, self.autocast, env.world_size,
                                  t.checkpoint_activations)
        self.runner = self.window.runner
        self.wrapped = distributed.wrap(self.window, self.model, t, env)  # FSDP2 shards
        self.optimizers = build_optimizers(self.model, t)
        self.task = build_task(cfg, self.tokenizer, rank=env.rank, world_size=env.world_size)
        self.model.allocate_state(B_rank, self.device)
        self.step = 0
        self.tokens_seen = 0
        if resume:
            distributed.load_optimizer_state(self.model, self.optimizers, optim_state,
                                             self.sharded)
            self.step, self.tokens_seen = meta["step"], meta.get("tokens_seen", 0)
            self.task.load_state_dict(meta["data_state"])
            streams = load_rank_state(ckpt, env.rank)
            if streams:
                load_collected_state_tensors(self.model, streams)
            if env.is_main:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
                for c in record_config_changes(self.run_dir, json.loads(saved_cfg.read_text()),
                                               to_dict(cfg), self.step):
                    tqdm.write(f"resume: {c['key']} changed from {c['old']!r} to {c['new']!r} "
                               f"at step {c['step']} (recorded in changes.jsonl)")
        elif env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved_cfg, json.dumps(to_dict(cfg), indent=2))
            if manifest is not None:
                atomic_write_text(self.run_dir / "corpus.json", json.dumps(manifest, indent=2))
            tok_file = self.corpus_dir / "tokenizer.json"
            if manifest is not None and tok_file.is_file():  # a BPE tokenizer: kept with it
                shutil.copy(tok_file, self.run_dir / "tokenizer.json")
        env.barrier()
        self._stop = False

    def _open_corpus(self, cfg: RunConfig):
        """(the corpus manifest, its tokenizer). A task that needs no documents (passkey)
        runs without a corpus: then (None, the byte tokenizer)."""
        if cfg.task.name != "lm" and not (self.corpus_dir / "manifest.json").is_file():
            tqdm.write(f"task {cfg.task.name}: no corpus at {self.corpus_dir}; using the byte "
                       "tokenizer")
            return None, ByteTokenizer()
        return open_corpus_manifest(self.corpus_dir), load_tokenizer(self.corpus_dir)

    def _check_resumable(self, ckpt: Path, meta: dict) -> None:
        world, saved_world = self.dist.world_size, meta["world_size"]
        if meta.get("stream_state", True) and saved_world != world:
            raise MemformersError(
                f"{ckpt} holds the per-stream memories of {saved_world} process(es), each "
                f"its own streams; resume it with {saved_world} (--nproc {saved_world}), "
                f"not {world}")
        if (meta.get("optim_format") == "dcp-full") != self.sharded:
            raise MemformersError(f"{ckpt} was written with other train.parallel / "
                                  "train.shard_pkm_values settings; resume with the same")

    def _init_from(self, value: str) -> None:
        weights = resolve_weights(value)
        missing = load_model_weights(self.model, weights, strict=False,
                                     skip=untrained_tensors(value))
        if missing and self.dist.is_main:
            tqdm.write(f"init_from {weights}: new parameters left at init: {len(missing)} "
                       f"tensors ({', '.join(sorted({m.split('.')[-1] for m in missing}))})")

    def close(self, finished: bool = False) -> None:
        """Leave the process group (a no-op in a single process), after the other ranks if
        the run ``finished`` normally; release the run lock."""
        distributed.close_distributed(self.dist, wait_for_peers=finished)
        self.close_lock()

    def close_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ loop

    def describe(self) -> str:
        c, env = self.cfg, self.dist
        n = self.model.num_parameters()
        cache_dtype = getattr(self.autocast, "fast_dtype", torch.float32)  # bf16 autocast
        state = state_report(self.model, c.data.segment_len,
                             c.data.batch_size // env.world_size, cache_dtype.itemsize)
        if c.model.hf_path:
            return (f"{self.model.describe()}; estimated footprint "
                    f"{self.state_need / 2**20:.0f} MiB (weights, optimiser, memories)\n"
                    f"{state}")
        mech = configured_mechanisms(c.model)
        text = (f"model: {n / 1e6:.2f}M parameters, {c.model.n_layers} layers, d_model "
                f"{c.model.d_model}, xl_cache={c.model.xl_cache}, memory: "
                f"{', '.join(mech) or 'none'}; estimated footprint "
                f"{self.state_need / 2**20:.0f} MiB (weights, optimiser, memories)\n{state}")
        if env.enabled:
            shard = " + sharded PKM values" if c.train.shard_pkm_values else ""
            text += (f"\n{env.world_size} processes ({c.train.parallel}{shard}, "
                     f"{distributed.backend()} on {self.device.type}), "
                     f"{c.data.batch_size // env.world_size} of "
                     f"{c.data.batch_size} streams and their memories each")
        return text

    def train_window(self, sync: bool = True) -> tuple[float, int]:
        """The task's next window, one backward; returns the (loss sum, tokens) of the whole
        global batch. ``sync=False``: no gradient communication."""
        segments = [seg.to(self.device) for seg in self.task.next_window()]
        with distributed.gradient_sync(self.wrapped, self.model, sync):
            total, n_tok = self.wrapped(segments)
            loss_sum, n_global = self.dist.sum([float(total.detach()), float(n_tok)])
            # mean over the global batch's tokens: DDP/FSDP average over ranks, hence x N
            scale = self.cfg.train.grad_accum * max(n_global, 1) / self.dist.world_size
            if total.requires_grad:  # a window with no scored token has nothing to learn
                (total / scale).backward()
        self.model.detach_state()
        return loss_sum, int(n_global)

    def _handle_sigterm(self, *_):
        self._stop = True

    def run(self) -> dict:
        t, main = self.cfg.train, self.dist.is_main
        metrics_path = self.run_dir / "metrics.jsonl"
        tb = None
        if t.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(self.run_dir / "tb"))
        old = signal.signal(signal.SIGTERM, self._handle_sigterm)
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        t0, tok0 = time.perf_counter(), self.tokens_seen
        last = {}
        # kNN key staleness (diagnostics/key_staleness.py): weights of the last probe
        stale_ref = None
        if (t.eval_every and t.staleness_segments and self.dist.world_size == 1
                and knn_layers(self.model)):
            stale_ref = (self.step, snapshot(self.model))
        stop = False  # agreed by every rank, so all stop after the same step
        try:
            while self.step < t.steps and not stop:
                lr = set_lr(self.optimizers, self.step, t)
                loss_sum, n_tok = 0.0, 0
                for i in range(t.grad_accum):
                    ls, n = self.train_window(sync=i == t.grad_accum - 1)
                    loss_sum, n_tok = loss_sum + ls, n_tok + n
                if not math.isfinite(loss_sum):
                    raise MemformersError(f"loss is {loss_sum} at step {self.step}; lower "
                                          "train.lr or check the data")
                gnorm = optimizer_step(self.model, self.optimizers, t.grad_clip)
                self.step += 1
                self.tokens_seen += n_tok
                tok_s = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
                last = {"step": self.step, "loss": loss_sum / max(n_tok, 1), "lr": lr,
                        "grad_norm": gnorm, "tokens": self.tokens_seen,
                        "tokens_per_s": tok_s}
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    for key, values in (("gates", "gate_values"), ("scales", "scale_values")):
                        if report := gate_report(self.model, values):
                            last[key] = report
                    if main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(last) + "\n")
                    if tb:
                        for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                            tb.add_scalar(f"train/{k}", last[k], self.step)
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    record = {"step": self.step, "eval": self.evaluate()}
                    if any(isinstance(m, AttentionMemory) and m.holds_memory
                           for m in self.model.modules()):
                        with memory_off(self.model):  # what the memory is worth right now
                            record["eval_memory_off"] = self.evaluate()
                    if stale_ref is not None:
                        segments = self.task.held_out_segments(t.staleness_segments + 1)
                        if len(segments) >= 2:
                            overlap = key_overlap(self.model, stale_ref[1], segments,
                                                  self.autocast)
                            record["key_overlap"] = {"age_steps": self.step - stale_ref[0],
                                                     **overlap}
                        stale_ref = (self.step, snapshot(self.model))
                    if main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        tqdm.write(f"step {self.step}: " + self.task.format_result(record["eval"]))
                        if "eval_memory_off" in record:
                            tqdm.write("  memory off: " + self.task.format_result(
                                record["eval_memory_off"]).splitlines()[0])
                        if "key_overlap" in record:
                            ko = record["key_overlap"]
                            tqdm.write(f"  kNN top-k overlap, keys {ko['age_steps']} steps "
                                       "stale vs fresh: " + ", ".join(
                                           f"{n} {sum(v) / len(v):.2f}" for n, v in ko.items()
                                           if n != "age_steps"))
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.checkpoint()
                stop = self.dist.any(self._stop)
        finally:
            signal.signal(signal.SIGTERM, old)
            bar.close()
            if tb:
                tb.close()
        if stop:  # SIGTERM: save where we are and leave
            self.checkpoint()
            return {"stopped_at": self.step, **last}
        self.checkpoint()
        self.save_model(self.run_dir / "model.safetensors")
        if self.cfg.model.hf_path and self.dist.is_main:  # also in HF format, with tokenizer
            self.model.save_hf(self.run_dir / "hf", self.tokenizer, self.cfg.data.segment_len)
        return last

    def save_model(self, path: Path) -> None:
        state = distributed.full_model_state(self.model, self.sharded)  # gathered under FSDP2
        if self.dist.is_main:
            save_tensors(model_tensors(state), path)
        self.dist.barrier()

    def checkpoint(self) -> Path:
        env, t = self.dist, self.cfg.train
        model_state = distributed.full_model_state(self.model, self.sharded)
        optim_state = distributed.optimizer_state(self.model, self.optimizers, self.sharded)
        meta = {"data_state": self.task.state_dict(), "tokens_seen": self.tokens_seen,
                "state_bytes_per_stream": state_bytes_per_stream(self.model),
                "world_size": env.world_size, "stream_state": t.save_stream_state,
                "optim_format": "dcp-full" if self.sharded else "per-optimizer"}
        return save_checkpoint(
            self.run_dir, self.step, rank=env.rank, barrier=env.barrier,
            model_state=model_state, optim_state=optim_state, meta=meta,
            stream_tensors=collect_state_tensors(self.model) if t.save_stream_state else {})

    def evaluate(self, **kw) -> dict:
        """The task's evaluation (held-out loss for ``lm``); with several processes every
        rank takes part and gets the same result."""
        return self.task.evaluate(self.runner, progress=self.progress, **kw)
