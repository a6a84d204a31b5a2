"""Passkey retrieval accuracy over a grid of context lengths x needle depths.

For every (length, depth) cell, ``samples_per_cell`` prompts with different random keys
(all exactly ``length`` tokens, so they form one batch of independent streams) are fed
to the model segment by segment from a fresh state, and the answer is decoded greedily
(``feed_and_generate``). A sample counts when the whole key comes out exactly: the
generated answer tokens equal the answer's ids, or decode to the key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memformers.errors import MemformersError
from memformers.evaluate.generate import feed_and_generate
from memformers.runner import SegmentRunner
from memformers.tasks.passkey import Tokenizer, make_passkey_example


def _is_correct(tokenizer: Tokenizer, generated: np.ndarray, answer: np.ndarray, key: str) -> bool:
    got = generated[: len(answer)]
    if np.array_equal(got, answer):
        return True
    return tokenizer.decode([int(t) for t in got]).strip() == key


def evaluate_passkey(
    model,
    tokenizer: Tokenizer,
    lengths: list[int],
    depths: list[float],
    *,
    segment_len: int,
    samples_per_cell: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    digits: int = 5,
) -> dict:
    """Accuracy (len(lengths) x len(depths)) of exact-match passkey retrieval.

    The model is put in eval mode and its per-stream state is saved and restored around
    the evaluation, so a training loop can call this between steps.
    Returns ``{"lengths", "depths", "accuracy", "seconds_per_sample",
    "seconds_per_sample_grid", "samples_per_cell", "segment_len"}``.
    """
    if segment_len < 1 or samples_per_cell < 1:
        raise MemformersError("passkey evaluation needs segment_len >= 1 and samples_per_cell >= 1")
    if not lengths or not depths:
        raise MemformersError("passkey evaluation needs at least one length and one depth")
    accuracy = np.zeros((len(lengths), len(depths)))
    seconds = np.zeros((len(lengths), len(depths)))
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    with SegmentRunner(model).fresh_state(samples_per_cell, device):
        for i, j in tqdm(cells, desc="passkey", disable=not progress):
            rng = np.random.default_rng([seed, int(lengths[i]), j])
            examples = [make_passkey_example(tokenizer, int(lengths[i]), float(depths[j]), rng,
                                             digits=digits) for _ in range(samples_per_cell)]
            prompts = torch.as_tensor(np.stack([e.tokens for e in examples]), device=device)
            n_new = max(len(e.answer) for e in examples)
            start = time.perf_counter()
            generated = feed_and_generate(model, prompts, n_new, segment_len).cpu().numpy()
            seconds[i, j] = (time.perf_counter() - start) / samples_per_cell
            hits = [_is_correct(tokenizer, g, e.answer, e.key) for g, e in zip(generated, examples)]
            accuracy[i, j] = float(np.mean(hits))

    return {
        "lengths": [int(n) for n in lengths],
        "depths": [float(d) for d in depths],
        "accuracy": accuracy.tolist(),
        "seconds_per_sample": float(seconds.mean()),
        "seconds_per_sample_grid": seconds.tolist(),
        "samples_per_cell": samples_per_cell,
        "segment_len": segment_len,
    }


def passkey_table(result: dict) -> str:
    """Markdown table: one row per context length, one column per depth, accuracy in %."""
    depths = result["depths"]
    head = "| length | " + " | ".join(f"depth {d:.2f}" for d in depths) + " | mean |"
    rule = "|---:|" + "---:|" * (len(depths) + 1)
    rows = [head, rule]
    for n, accs in zip(result["lengths"], result["accuracy"]):
        cells = " | ".join(f"{100 * a:.0f}%" for a in accs)
        rows.append(f"| {n} | {cells} | {100 * float(np.mean(accs)):.0f}% |")
    return "\n".join(rows)


def plot_passkey_heatmap(result: dict, path: str | Path, title: str = "Passkey retrieval") -> Path:
    """Save a depth (y) x length (x) accuracy heatmap as a PNG; returns the path."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot / global backend

    acc = np.asarray(result["accuracy"], dtype=float).T  # (depths, lengths)
    fig = Figure(figsize=(max(4.2, 1.6 + 0.9 * acc.shape[1]), 1.2 + 0.6 * acc.shape[0]))
    ax = fig.add_subplot()
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(acc.shape[1]), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:.2f}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for y in range(acc.shape[0]):
        for x in range(acc.shape[1]):
            ax.text(x, y, f"{100 * acc[y, x]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_passkey_file(path: str | Path, png: str | Path | None = None) -> Path:
    """Render the heatmap of a stored passkey result (``evaluate_passkey``'s JSON, or one
    holding it under ``"passkey"``) to ``png``
    (default: next to the JSON, same name); returns the PNG's path."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MemformersError(f"cannot read passkey results {path}: {e}") from None
    result = data.get("passkey", data) if isinstance(data, dict) else None
    if not isinstance(result, dict) or not {"lengths", "depths", "accuracy"} <= set(result):
        raise MemformersError(f"{path} holds no passkey result (lengths, depths, accuracy)")
    return plot_passkey_heatmap(result, png or path.with_suffix(".png"),
                                title=f"Passkey: {path.stem}")
