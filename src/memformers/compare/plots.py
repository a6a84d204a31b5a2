"""PNG plots of a comparison (matplotlib ``Figure`` on the Agg canvas, no pyplot).

Each function takes the report-level results (or one of its parts), writes one PNG
and returns its path, or returns ``None`` when the data it needs is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(w: float = 6.4, h: float = 4.0):
    from matplotlib.figure import Figure  # Agg canvas, no global backend

    return Figure(figsize=(w, h))


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_loss_by_position(results: dict, path: Path) -> Path | None:
    """Held-out loss per position-in-document bucket, one line per variant."""
    from memformers.compare.report import bucket_order

    buckets = bucket_order(results)
    lines = []
    for v in results.get("variants", []):
        bp = (v.get("eval") or {}).get("by_position") or {}
        ys = [bp[b]["loss"] if b in bp else np.nan for b in buckets]
        if not all(np.isnan(ys)):
            lines.append((v["name"], ys))
    if not buckets or not lines:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for name, ys in lines:
        ax.plot(range(len(buckets)), ys, marker="o", label=name)
    ax.set_xticks(range(len(buckets)), buckets)
    return _finish(fig, ax, path, "position in document (tokens)",
                   "held-out loss (nats/token)", "Loss by position in document")


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str,
            legend_size: int = 8) -> Path:
    """Axis labels, title, light grid and legend shared by the line plots; saves the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return _save(fig, path)


def _capacity_label(n: int) -> str:
    if n >= 1024 and n % 512 == 0:
        return f"{n / 1024:g}K"
    return str(n)


def plot_memory_sweep(results: dict, path: Path) -> Path | None:
    """Loss vs kNN capacity (same weights), one line per (variant, XL setting, position bucket).

    Capacities are placed evenly (they are usually geometric: 0, 1.5K, 8K, 65K).
    """
    from memformers.compare.report import bucket_order, sweep_xl_label

    buckets = ["all", *bucket_order(results)]
    groups: dict[str, list[dict]] = {}  # "variant[ XL on/off]" -> its points
    for v in results.get("variants", []):
        for p in v.get("memory_sweep") or []:
            if "error" not in p:
                groups.setdefault(v["name"] + sweep_xl_label(v, p), []).append(p)
    swept = [(name, sorted(points, key=lambda p: p["capacity"]))
             for name, points in groups.items()]
    caps = sorted({p["capacity"] for _, points in swept for p in points})
    series = []
    for name, points in swept:
        xs = [caps.index(p["capacity"]) for p in points]
        for b in buckets:
            ys = [p["loss"] if b == "all" else (p.get("by_position") or {}).get(b, {}).get(
                "loss", np.nan) for p in points]
            if not all(np.isnan(ys)):
                series.append((f"{name} {b}", xs, ys, b == "all"))
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label, xs, ys, overall in series:
        ax.plot(xs, ys, marker="o", label=label, linewidth=2.5 if overall else 1.2)
    ax.set_xticks(range(len(caps)), [_capacity_label(c) for c in caps])
    return _finish(fig, ax, path, "kNN memory capacity (entries per stream and head)",
                   "held-out loss (nats/token)", "Memory-size sweep", legend_size=7)


SORTING_CHANCE = 1 / 20  # a uniform guess over the task's 20 symbols


def plot_sorting(results: dict, path: Path) -> Path | None:
    """Sorting accuracy vs sequence length T, one line per variant; chance 1/20 dashed."""
    lines = [(v["name"], sorted((int(t), r["accuracy"]) for t, r in v["sorting"].items()))
             for v in results.get("variants", []) if v.get("sorting")]
    if not lines:
        return None
    lengths = sorted({t for _, points in lines for t, _ in points})
    fig = _figure()
    ax = fig.add_subplot()
    for name, points in lines:
        ax.plot([t for t, _ in points], [a for _, a in points], marker="o", label=name)
    ax.axhline(SORTING_CHANCE, linestyle="--", color="gray", label="chance (1/20)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_capacity_label(t) for t in lengths])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, "sequence length T (symbols)",
                   "accuracy on the 20 sorted symbols", "Sorting by frequency")


def plot_sorting_curves(results: dict, path: Path) -> Path | None:
    """Sorting accuracy vs training step (``--eval-every`` curves), one line per variant and
    length; None when no run has a curve."""
    lines = [(f"{v['name']} T={t}", [p for p in r.get("curve", []) if "step" in p])
             for v in results.get("variants", [])
             for t, r in sorted((v.get("sorting") or {}).items(), key=lambda kv: int(kv[0]))]
    lines = [(label, curve) for label, curve in lines if curve]
    if not lines:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label, curve in lines:
        ax.plot([p["step"] for p in curve], [p["accuracy"] for p in curve], marker=".",
                label=label)
    ax.axhline(SORTING_CHANCE, linestyle="--", color="gray", label="chance (1/20)")
    return _finish(fig, ax, path, "training step", "accuracy on the 20 sorted symbols",
                   "Sorting: learning curves")


def plot_passkey(variant: dict, path: Path) -> Path:
    from memformers.evaluate.passkey import plot_passkey_heatmap

    return plot_passkey_heatmap(variant["passkey"], path, title=f"Passkey: {variant['name']}")


def plot_loss_difference(diff: dict | None, path: Path) -> Path | None:
    """Per-token loss A - B along one document (raw and a moving average)."""
    if not diff or not diff.get("diff"):
        return None
    d = np.asarray(diff["diff"], dtype=float)
    pos = np.arange(1, len(d) + 1)
    win = max(1, min(256, len(d) // 20))
    smooth = np.convolve(d, np.ones(win) / win, mode="valid")
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    ax.plot(pos, d, linewidth=0.4, alpha=0.35, color="tab:gray", label="per token")
    ax.plot(pos[win - 1:], smooth, color="tab:blue", label=f"mean of {win}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel(f"loss {diff['a']} - loss {diff['b']}")
    ax.set_title(f"Per-token loss difference (> 0: {diff['b']} better)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gates(results: dict, path: Path) -> Path | None:
    """sigmoid(gate) per head, one group of bars per (variant, memory layer)."""
    groups = [(f"{v['name']} {layer}", vals) for v in results.get("variants", [])
              for layer, vals in ((v.get("static") or {}).get("gates") or {}).items()]
    if not groups:
        return None
    n_heads = max(len(vals) for _, vals in groups)
    width = 0.8 / n_heads
    fig = _figure(max(5.0, 1.2 * len(groups) + 2), 3.8)
    ax = fig.add_subplot()
    for h in range(n_heads):
        xs = [i + (h - (n_heads - 1) / 2) * width for i, (_, vals) in enumerate(groups)
              if h < len(vals)]
        ys = [vals[h] for _, vals in groups if h < len(vals)]
        ax.bar(xs, ys, width=width, label=f"head {h}")
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], rotation=15, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("memory gate sigmoid(b)")
    ax.set_title("Learned memory gates per head")
    if n_heads <= 16:
        ax.legend(fontsize=6, ncol=min(n_heads, 8))
    return _save(fig, path)


def _trajectory(run_dir) -> list[dict]:
    """The training lines of a run's metrics.jsonl that carry gates or a memory-off eval."""
    import json

    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except (OSError, TypeError):
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "gates" in rec or "eval_memory_off" in rec:
            out.append(rec)
    return out


def plot_memory_trajectories(results: dict, path: Path) -> Path | None:
    """Per variant with a memory: the mean gate (and temperature) of each memory layer
    against the training step, and, where the trainer evaluated with the memory off too
    (train.eval_every), held-out loss with memory off minus on and the kNN key staleness
    (top-k overlap of stale against fresh keys, diagnostics/key_staleness.py)."""
    runs = [(v["name"], _trajectory(v.get("run_dir"))) for v in results.get("variants", [])]
    runs = [(n, t) for n, t in runs if t]
    if not runs:
        return None
    fig = _figure(14.5, 3.6)
    ax_g, ax_s, ax_m, ax_k = (fig.add_subplot(1, 4, i) for i in range(1, 5))
    for name, recs in runs:
        for key, ax in (("gates", ax_g), ("scales", ax_s)):
            layers = sorted({layer for r in recs for layer in r.get(key, {})})
            for layer in layers:
                pts = [(r["step"], np.mean(r[key][layer])) for r in recs
                       if layer in r.get(key, {})]
                if pts:
                    ax.plot(*zip(*pts), label=f"{name} {layer}")
        gain = [(r["step"], r["eval_memory_off"]["loss"] - r["eval"]["loss"]) for r in recs
                if "eval_memory_off" in r]
        if gain:
            ax_m.plot(*zip(*gain), marker="o", label=name)
        probes = [r["key_overlap"] for r in recs if "key_overlap" in r]
        for layer in sorted({k for p in probes for k in p if k != "age_steps"}):
            pts = [(r["step"], np.mean(r["key_overlap"][layer])) for r in recs
                   if layer in r.get("key_overlap", {})]
            ax_k.plot(*zip(*pts), marker="o", label=f"{name} {layer}")
    ax_g.set(xlabel="step", ylabel="mean sigmoid(gate)", title="Memory gates")
    ax_s.set(xlabel="step", ylabel="mean temperature", title="Memory score scales")
    ax_m.set(xlabel="step", ylabel="loss(memory off) - loss(on)", title="What memory is worth")
    ax_m.axhline(0, color="grey", lw=0.8)
    ax_k.set(xlabel="step", ylabel="top-k overlap, stale vs fresh keys", ylim=(0, 1.05),
             title="Key staleness (since the last probe)")
    for ax in (ax_g, ax_s, ax_m, ax_k):
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=6)
    return _save(fig, path)
