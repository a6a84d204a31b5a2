"""Multi-process training on CPU: 2 processes with gloo, launched by `memformers train --nproc`.

The reference run trains 2 ranks x 2 streams; a single process with the same 4 streams
must reach the same weights. Kill-and-resume, FSDP2 and sharded PKM values are checked
against that reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memformers.cli import main
from memformers.config import load_config
from memformers.errors import MemformersError
from memformers.train.checkpoint import latest_checkpoint
from memformers.train.trainer import Trainer
from tests.conftest import TINY_MODEL

SRC = Path(__file__).parents[1] / "src"
STEPS = 8
SETS = [*TINY_MODEL, "data.batch_size=4", "model.xl_cache=true", f"train.steps={STEPS}",
        "train.ckpt_every=2", "train.grad_accum=2", "train.bptt_segments=2",
        "data.eval_max_tokens=512",
        "model.knn.layers=[1]", "model.knn.capacity=64", "model.knn.top_k=4",
        "model.pkm.layers=[0]", "model.pkm.n_keys=8", "model.pkm.k_dim=16", "model.pkm.heads=2",
        "model.pkm.top_k=4", "model.pkm.query_norm=layernorm",
        "model.pkm.sparse=false"]  # dense value gradients in every layout (FSDP2 needs them)

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(),
                                reason="needs the gloo backend")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _cmd(corpus: Path, run_dir: Path, *extra: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "memformers", "train", "--run-dir", str(run_dir),
           "--no-progress", "--nproc", "2"]
    if resume:
        return [*cmd, "--resume"]
    for s in [*SETS, f"data.corpus=\"{corpus}\"", *extra]:
        cmd += ["--set", s]
    return cmd


def _train(*args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(_cmd(*args, **kw), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(run_dir / "model.safetensors"))
    w.pop("head.weight", None)  # tied to embed.weight (FSDP2 state dicts leave it out)
    return w


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _streams(ckpt: Path, rank: int) -> dict[str, torch.Tensor]:
    saved = load_file(str(ckpt / f"streams-rank{rank}.safetensors"))
    return {k: v for k, v in saved.items() if k.startswith("stream.")}


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of a launcher's worker process of ``rank`` (Linux /proc)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (p / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(p.name)
    return None


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory) -> Path:
    """An uninterrupted 2-process DDP run."""
    run = tmp_path_factory.mktemp("ddp") / "ref"
    _train(tiny_corpus, run)
    return run


def test_ddp_matches_single_process_on_the_same_global_batch(reference, tiny_corpus, tmp_path):
    cfg = load_config(None, [*SETS, f"data.corpus=\"{tiny_corpus}\""])
    single = Trainer(cfg, tmp_path / "single", progress=False)
    single.run()
    _assert_close(_weights(reference), _weights(tmp_path / "single"), atol=1e-5)

    # rank 0 alone logs: one line per step, the global batch's loss
    ddp_log = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in ddp_log] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in ddp_log] == [r["tokens"] for r in one_log]
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5)

    # evaluation gathered over the ranks = single-process evaluation
    ev, ev1 = json.loads((reference / "eval.json").read_text()), single.evaluate()
    assert ev["tokens"] == ev1["tokens"] > 0 and ev["bytes"] == ev1["bytes"]
    assert ev["loss"] == pytest.approx(ev1["loss"], rel=1e-5)
    assert ev["by_position"].keys() == ev1["by_position"].keys()

    # per-stream memories stay with their rank: rank r holds streams 2r, 2r+1 of the
    # single process, and the two ranks' memories differ (never broadcast or averaged)
    ckpt, ckpt1 = latest_checkpoint(reference), latest_checkpoint(tmp_path / "single")
    r0, r1, whole = _streams(ckpt, 0), _streams(ckpt, 1), _streams(ckpt1, 0)
    assert r0.keys() == r1.keys() == whole.keys()
    assert any("memory.keys" in k for k in r0) and any("cache.keys" in k for k in r0)
    for k in whole:
        assert r0[k].shape[0] == r1[k].shape[0] == 2
        atol = 4e-3 if whole[k].element_size() == 2 else 1e-4  # kNN keys are fp16
        torch.testing.assert_close(torch.cat([r0[k], r1[k]]), whole[k], atol=atol, rtol=0,
                                   msg=k)
        if r0[k].is_floating_point():
            assert not torch.equal(r0[k], r1[k]), k


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds ranks in /proc")
def test_kill_a_rank_then_resume_matches_uninterrupted_run(reference, tiny_corpus, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_corpus, run), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        rank1 = None

        def found():
            nonlocal rank1
            rank1 = _worker_pid(proc.pid, 1)
            return rank1 is not None

        _wait_for(found, proc, "rank 1 to start")
        _wait_for(lambda: latest_checkpoint(run) is not None, proc, "a checkpoint")
        os.kill(rank1, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    finally:
        proc.kill()
    assert not (run / "model.safetensors").exists()  # really interrupted
    assert int(latest_checkpoint(run).name.split("_")[1]) < STEPS

    _train(tiny_corpus, run, resume=True)
    a, b = _weights(reference), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (json.loads((run / "eval.json").read_text())
            == json.loads((reference / "eval.json").read_text()))


def test_fsdp_stopped_by_sigterm_resumes_with_sharded_pkm_values(reference, tiny_corpus,
                                                                 tmp_path):
    """FSDP2 everywhere, stopped by SIGTERM; resumed as DDP + sharded PKM value tables
    (full state dicts do not depend on the layout); both match the DDP run."""
    run = tmp_path / "fsdp"
    proc = subprocess.Popen(_cmd(tiny_corpus, run, "train.parallel=\"fsdp\""), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_for(lambda: latest_checkpoint(run) is not None, proc, "a checkpoint")
        proc.send_signal(signal.SIGTERM)  # the launcher passes it on to every process
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "checkpoint saved, continue with --resume" in out, out
    ckpt = latest_checkpoint(run)
    assert int(ckpt.name.split("_")[1]) < STEPS and not (run / "model.safetensors").exists()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["optim_format"] == "dcp-full"

    done = subprocess.run([*_cmd(tiny_corpus, run, resume=True), "--set",
                           "train.parallel=\"ddp\"", "--set", "train.shard_pkm_values=true"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ddp + sharded PKM values" in done.stdout
    _assert_close(_weights(reference), _weights(run), atol=1e-5)


def test_resume_with_another_world_size_is_refused(reference, tiny_corpus):
    cfg = load_config(None, [*SETS, f"data.corpus=\"{tiny_corpus}\""])
    with pytest.raises(MemformersError, match="memories of 2 process"):
        Trainer(cfg, reference, resume=True, progress=False)


def test_config_and_launcher_errors(tmp_path, capsys):
    with pytest.raises(MemformersError, match="sparse gradients"):
        load_config(None, ["model.pkm.layers=[0]", "model.pkm.sparse=true",
                           "train.parallel=\"fsdp\""])
    with pytest.raises(MemformersError, match="needs product-key memory layers"):
        load_config(None, ["train.shard_pkm_values=true"])
    with pytest.raises(MemformersError, match="train.parallel"):
        load_config(None, ["train.parallel=\"zero3\""])
    assert main(["train", "--nproc", "0", "--run-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "error: --nproc must be at least 1, got 0\n"


def _memory_model(**extra):
    from memformers.config import ModelConfig
    from memformers.memory.configs import ContinuousConfig, InfiniConfig, KNNConfig, PKMConfig
    from memformers.model import MemformerLM

    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=4, d_model=32, n_heads=4, head_dim=8, d_ff=64, xl_cache=True,
                      knn=KNNConfig(layers=[1], capacity=64, top_k=4),
                      infini=InfiniConfig(layers=[2]),
                      continuous=ContinuousConfig(layers=[3], n_basis=8, n_samples=8),
                      pkm=PKMConfig(layers=[0], n_keys=8, k_dim=16, heads=2, top_k=4), **extra)
    return MemformerLM(cfg)


def test_per_stream_memories_are_neither_parameters_nor_buffers():
    """DDP broadcasts buffers and all-reduces gradients: memories must be neither."""
    from memformers.memory.state import iter_stream_states

    model = _memory_model()
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens)
    model(tokens)  # every memory now holds a segment
    owned = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    states = [t for _, s in iter_stream_states(model) for t in s.state_tensors().values()]
    assert len(states) >= 8 and all(t.data_ptr() not in owned for t in states)


def test_fsdp_gives_every_parameter_a_gradient_while_a_memory_is_empty():
    """FSDP2 reduce-scatters the gradients a rank has: a kNN gate skipped on one rank
    (empty memory) but used on another would mismatch the collective, so under FSDP2
    the gate gets an exact zero gradient instead of none."""
    import torch.distributed as dist

    from memformers.config import TrainConfig
    from memformers.train.distributed import DistEnv, wrap

    tokens = torch.randint(0, 256, (2, 17))
    plain = _memory_model()
    ref = plain(tokens[:, :-1])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _memory_model()
        wrap(torch.nn.Module(), model, TrainConfig(parallel="fsdp"), DistEnv(enabled=True))
        knn = model.blocks[1].attn.memory
        assert knn.store.is_empty() and knn.touch_skipped_parameters
        logits = model(tokens[:, :-1])
        assert torch.equal(logits, ref)  # + 0.0 * gate changes nothing
        logits.float().logsumexp(-1).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
        assert torch.equal(knn.gate.grad.full_tensor(), torch.zeros(4))
    finally:
        dist.destroy_process_group()
    assert plain.blocks[1].attn.memory.touch_skipped_parameters is False
