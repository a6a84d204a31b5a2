"""train/checkpoint.py: checksums with fallback, and a failed write that keeps the last
good checkpoint."""

import errno
import json

import pytest

from memformers.config import load_config
from memformers.errors import MemformersError
from memformers.train import checkpoint as ck
from memformers.train.trainer import Trainer
from tests.conftest import TINY_MODEL


class Payload:  # not a tensor: a pickle of it is refused by weights_only loading
    pass


def run_steps(corpus, run, steps, resume=False):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{corpus}\"", f"train.steps={steps}",
                             "train.ckpt_every=2"])
    tr = Trainer(cfg, run, resume=resume, progress=False)
    try:
        return tr.run()
    finally:
        tr.close()


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "streams-rank0.safetensors", "optim.pt"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_corpus, tmp_path, capsys,
                                                              name):
    run = tmp_path / "run"
    run_steps(tiny_corpus, run, 4)  # checkpoints at steps 2 and 4
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000002", "step_0000004"]
    record = json.loads((ckpts[1] / "COMMIT").read_text())
    assert set(record["sha256"]) == {"model.safetensors", "optim.pt", "meta.json",
                                     "streams-rank0.safetensors"}
    flip_a_byte(ckpts[1] / name)
    assert ck.checkpoint_problem(ckpts[1]) == f"{name} fails its sha256"
    capsys.readouterr()
    assert ck.latest_checkpoint(run) == ckpts[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt" in err[0] and "using an older one" in err[0]
    # resuming continues from step 2 and ends like a run that was never corrupted
    again = run_steps(tiny_corpus, run, 4, resume=True)
    clean = run_steps(tiny_corpus, tmp_path / "clean", 4)
    assert again["loss"] == pytest.approx(clean["loss"], rel=1e-6)


def test_disk_full_cleans_up_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path,
                                                                  monkeypatch):
    run = tmp_path / "run"
    run_steps(tiny_corpus, run, 2)
    good = sorted((run / "checkpoints").glob("step_*"))
    real = ck.save_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(MemformersError, match="No space left on device.*last good "
                                              "checkpoint: step_0000002"):
        run_steps(tiny_corpus, run, 4, resume=True)
    monkeypatch.setattr(ck, "save_file", real)
    assert sorted((run / "checkpoints").glob("step_*")) == good  # no .tmp left behind
    assert ck.checkpoint_problem(good[0]) is None


def test_a_pickle_as_optim_state_is_refused_in_one_line(tiny_corpus, tmp_path):
    import torch

    run = tmp_path / "run"
    run_steps(tiny_corpus, run, 2)
    ckpt = ck.latest_checkpoint(run)

    torch.save({"state": Payload()}, ckpt / "optim.pt")  # an object: weights_only refuses
    with pytest.raises(MemformersError) as e:
        ck.read_checkpoint(ckpt)
    msg = str(e.value)
    assert "refused" in msg and "\n" not in msg and "weights_only" not in msg


def test_final_weights_are_checked_against_their_sha256(tiny_corpus, tmp_path, capsys):
    from memformers.cli import main

    run = tmp_path / "run"
    run_steps(tiny_corpus, run, 2)
    assert (run / "model.safetensors.sha256").is_file()
    flip_a_byte(run / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match its recorded sha256" in err
