"""The comparison report: one table, a section per extra, raw JSON, PNG plots.

``write_report(results, out_dir)`` writes ``report.md``, ``results.json`` and the
plots of ``memformers.compare.plots`` into ``out_dir``; ``print_table(results)``
gives the same main table fixed-width for a terminal. Every optional part
(passkey, memory sweep, sorting, gates, per-token losses) is skipped when absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memformers.evaluate.lm import bucket_start

MISSING = "-"

# --------------------------------------------------------------------------- formatting


def _num(x: float | None, fmt: str = "{:.4f}") -> str:
    return MISSING if x is None else fmt.format(x)


def _count(n: float | None) -> str:
    if n is None:
        return MISSING
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float | None) -> str:
    if n is None:
        return MISSING
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _get(d: dict | None, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- main table


def bucket_order(results: dict) -> list[str]:
    """Position buckets present in any variant, in increasing position order."""
    present: list[str] = []
    for v in results.get("variants", []):
        for name in _get(v, "eval", "by_position", default={}) or {}:
            if name not in present:
                present.append(name)
    return sorted(present, key=bucket_start)


def _passkey_mean(v: dict, length: int) -> float | None:
    pk = v.get("passkey")
    if not pk or length not in pk.get("lengths", []):
        return None
    return float(np.mean(pk["accuracy"][pk["lengths"].index(length)]))


def table_columns(results: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell formatter) of every column of the main table."""
    cols: list[tuple[str, Callable[[dict], str]]] = [
        ("variant", lambda v: v["name"]),
        ("params", lambda v: _count(_get(v, "static", "params"))),
        ("train tok/s", lambda v: _num(_get(v, "train", "tokens_per_s"), "{:,.0f}")),
        ("infer tok/s", lambda v: _num(_get(v, "eval", "tokens_per_s"), "{:,.0f}")),
        ("state/stream", lambda v: _bytes(_get(v, "static", "state_bytes_per_stream"))),
        ("loss", lambda v: _num(_get(v, "eval", "loss"))),
        ("ppl", lambda v: _num(_get(v, "eval", "ppl"),
                               "{:.3f}" if (_get(v, "eval", "ppl") or 0) < 1e4 else "{:.3g}")),
        ("bits/byte", lambda v: _num(_get(v, "eval", "bpb"))),
    ]
    for b in bucket_order(results):
        cols.append((f"loss {b}",
                     lambda v, b=b: _num(_get(v, "eval", "by_position", b, "loss"))))
    lengths: list[int] = []
    sort_lengths: list[str] = []
    for v in results.get("variants", []):
        for n in _get(v, "passkey", "lengths", default=[]) or []:
            if n not in lengths:
                lengths.append(n)
        for t in v.get("sorting") or {}:
            if t not in sort_lengths:
                sort_lengths.append(t)
    for n in sorted(lengths):
        cols.append((f"passkey@{n}", lambda v, n=n: _num(_passkey_mean(v, n), "{:.0%}")))
    for t in sorted(sort_lengths, key=int):
        cols.append((f"sorting@{t}",
                     lambda v, t=t: _num(_get(v, "sorting", t, "accuracy"), "{:.1%}")))
    return cols


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    cols = table_columns(results)
    rows = [[fmt(v) for _, fmt in cols] for v in results.get("variants", [])]
    return [h for h, _ in cols], rows


def markdown_table(headers: list[str], rows: list[list[str]], left: int | str = 1) -> str:
    """A markdown table; the first ``left`` columns left-aligned, the rest right-aligned
    (or ``left`` as a string of 'l'/'r', one letter per column)."""
    align = left if isinstance(left, str) else "l" * left + "r" * (len(headers) - left)
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
           "|" + "".join(":---|" if a == "l" else "---:|" for a in align)]
    out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_table(results: dict) -> str:
    """The main table, fixed-width, for a terminal."""
    headers, rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- loss difference


def _doc_losses(entry: dict | None) -> tuple[int, list[float]] | None:
    dl = _get(entry, "doc_losses")
    if not dl or not dl.get("losses"):
        return None
    return int(dl["doc"]), dl["losses"]


def sweep_xl_label(v: dict, point: dict) -> str:
    """'' for a sweep point at the variant's own XL setting, else ' XL on' / ' XL off'."""
    trained = _get(v, "config", "model", "xl_cache")
    xl = point.get("xl_cache", trained)
    return "" if xl == trained else f" XL {'on' if xl else 'off'}"


def _sweep_pair(v: dict, capacities: list[int]) -> tuple[dict, dict] | None:
    """Two points of a variant's memory sweep: ``capacities`` if both were swept, else the
    smallest and the largest capacity; at the XL setting it was trained with if swept."""
    points = [p for p in v.get("memory_sweep") or [] if _doc_losses(p)]
    if not points:
        return None
    own = [p for p in points if not sweep_xl_label(v, p)]
    points = own or [p for p in points if p.get("xl_cache") == points[0].get("xl_cache")]
    by_cap = {p["capacity"]: p for p in points}
    if len(capacities) == 2 and all(c in by_cap for c in capacities):
        return by_cap[capacities[0]], by_cap[capacities[1]]
    if len(by_cap) < 2:
        return None
    return by_cap[min(by_cap)], by_cap[max(by_cap)]


def choose_loss_pair(results: dict) -> tuple[str, dict, str, dict] | None:
    """(label A, eval A, label B, eval B) for the per-token loss-difference plot.

    ``eval.loss_diff = [A, B]`` if given; else two capacities of the first kNN variant's
    memory sweep (same weights): ``eval.loss_diff_capacities``, or the smallest vs the
    largest; else the first two variants.
    """
    variants = results.get("variants", [])
    by_name = {v["name"]: v for v in variants}
    pair = _get(results, "eval", "loss_diff", default=[]) or []
    if len(pair) == 2 and all(n in by_name for n in pair):
        a, b = by_name[pair[0]], by_name[pair[1]]
        return a["name"], a.get("eval"), b["name"], b.get("eval")
    capacities = _get(results, "eval", "loss_diff_capacities", default=[]) or []
    for v in variants:
        points = _sweep_pair(v, capacities)
        if points:
            lo, hi = points
            return (f"{v['name']}@{lo['capacity']}{sweep_xl_label(v, lo)}", lo,
                    f"{v['name']}@{hi['capacity']}{sweep_xl_label(v, hi)}", hi)
    if len(variants) >= 2:
        a, b = variants[0], variants[1]
        return a["name"], a.get("eval"), b["name"], b.get("eval")
    return None


def _doc_tokens(results: dict, doc: int):
    """(token ids, tokenizer, doc name) of the held-out document, or None if unreadable."""
    try:
        from memformers.data.corpus import CorpusSplit
        from memformers.data.tokenizer import load_tokenizer

        cfg = results["variants"][0]["config"]
        split = _get(results, "eval", "split") or cfg["data"]["eval_split"]
        s = CorpusSplit.open(cfg["data"]["corpus"], split)
        return np.asarray(s.doc(doc)), load_tokenizer(cfg["data"]["corpus"]), s.names[doc]
    except Exception:  # the corpus may be gone: the report goes on without token text
        return None


def loss_difference(results: dict) -> dict | None:
    """Per-token loss A - B over one held-out document, with B's biggest-winner tokens."""
    pair = choose_loss_pair(results)
    if pair is None:
        return None
    name_a, ev_a, name_b, ev_b = pair
    da, db = _doc_losses(ev_a), _doc_losses(ev_b)
    if da is None or db is None or da[0] != db[0]:
        return None
    n = min(len(da[1]), len(db[1]))
    diff = np.asarray(da[1][:n]) - np.asarray(db[1][:n])  # > 0: B predicts better
    out = {"a": name_a, "b": name_b, "doc": da[0], "tokens": n,
           "mean_diff": float(diff.mean()), "frac_b_better": float((diff > 0).mean()),
           "diff": [round(float(x), 4) for x in diff], "winners": []}
    k = int(_get(results, "eval", "winners", default=10))
    doc = _doc_tokens(results, da[0])
    if doc is not None:
        out["doc_name"] = doc[2]
    for i in np.argsort(-diff)[:k]:
        if diff[i] <= 0:
            break
        w = {"position": int(i) + 1, "diff": float(diff[i]), "loss_a": float(da[1][i]),
             "loss_b": float(db[1][i])}
        if doc is not None:
            ids, tok = doc[0], doc[1]
            w["token"] = tok.decode([int(ids[i + 1])])
            w["context"] = tok.decode([int(t) for t in ids[max(0, i + 1 - 24): i + 1]])
        out["winners"].append(w)
    return out


# --------------------------------------------------------------------------- sections


def _sweep_section(results: dict, plots: dict) -> str:
    buckets = bucket_order(results)
    rows = []
    for v in results.get("variants", []):
        trained_xl = _get(v, "config", "model", "xl_cache")
        for p in v.get("memory_sweep") or []:
            xl = p.get("xl_cache", trained_xl)
            cells = [v["name"], MISSING if xl is None else ("on" if xl else "off"),
                     f"{p['capacity']:,}"]
            if "error" in p:
                rows.append(cells + ["error: " + p["error"]] + [MISSING] * (len(buckets) + 1))
                continue
            rows.append(cells + [_num(p.get("loss")), _num(p.get("bpb"))]
                        + [_num(_get(p, "by_position", b, "loss")) for b in buckets])
    if not rows:
        return ""
    headers = ["variant", "XL cache", "kNN capacity", "loss", "bits/byte"] + [
        f"loss {b}" for b in buckets]
    return ("## Memory-size sweep\n\nThe same trained weights evaluated with "
            "`model.knn.capacity` (and `model.xl_cache`) overridden.\n\n"
            + markdown_table(headers, rows, left="ll" + "r" * (len(headers) - 2)) + "\n"
            + (f"\n![memory sweep]({plots['memory_sweep']})\n" if "memory_sweep" in plots else ""))


def _sorting_section(results: dict, plots: dict) -> str:
    rows = [[v["name"], f"{int(t):,}", _num(r.get("accuracy"), "{:.1%}"), _num(r.get("loss")),
             _num(r.get("train_seconds"), "{:,.0f}")]
            for v in results.get("variants", [])
            for t, r in sorted((v.get("sorting") or {}).items(), key=lambda kv: int(kv[0]))]
    if not rows:
        return ""
    ev = results.get("eval") or {}
    return ("## Sorting\n\nThe infinity-former's sorting task, trained from scratch at each "
            f"length T for {ev.get('sorting_steps', MISSING)} steps; accuracy = teacher-forced "
            "greedy prediction of the 20 symbols sorted by decreasing frequency, loss in "
            f"nats/symbol, over {ev.get('sorting_samples', MISSING)} fresh examples. Chance: "
            "5% guessing uniformly, 18% guessing uniformly among the symbols not yet listed.\n\n"
            + markdown_table(["variant", "T", "accuracy", "loss", "train seconds"], rows)
            + "\n" + (f"\n![sorting]({plots['sorting']})\n" if "sorting" in plots else ""))


def _gates_section(results: dict, plots: dict) -> str:
    rows = []
    for v in results.get("variants", []):
        for layer, vals in (_get(v, "static", "gates") or {}).items():
            rows.append([v["name"], layer, " ".join(f"{g:.3f}" for g in vals),
                         f"{np.mean(vals):.3f}"])
    if not rows:
        return ""
    return ("## Memory gates per head\n\nsigmoid(gate) per head: the weight of the memory "
            "read against local attention (1 = memory only).\n\n"
            + markdown_table(["variant", "layer", "heads", "mean"], rows, left=3) + "\n"
            + (f"\n![gates]({plots['gates']})\n" if "gates" in plots else "")
            + (f"\n![gate, temperature and memory-off trajectories]({plots['trajectories']})\n"
               if "trajectories" in plots else ""))


def _pkm_usage_section(results: dict) -> str:
    rows = []
    for v in results.get("variants", []):
        for layer, u in (_get(v, "eval", "pkm_usage") or {}).items():
            rows.append([v["name"], layer, f"{u['slots']:,}", f"{u['used']:.1%}",
                         _num(u.get("kl_uniform")), f"{u['slots_50']:,}", f"{u['slots_90']:,}",
                         f"{u['slots_99']:,}"])
    if not rows:
        return ""
    return ("## Product-key slot usage\n\nOver the held-out evaluation: share of slots that "
            "received any weight, KL divergence of the weight distribution from uniform, and "
            "the fewest slots holding 50/90/99% of the weight (Lample et al., section 4.4).\n\n"
            + markdown_table(["variant", "layer", "slots", "used", "KL(p||uniform)", "50%",
                              "90%", "99%"], rows, left=2) + "\n")


def _knn_retrieval_section(results: dict) -> str:
    rows = []
    for v in results.get("variants", []):
        for layer, r in (_get(v, "eval", "knn_retrieval") or {}).items():
            copy = r.get("copy")
            rows.append([v["name"], layer, " ".join(f"{p:.2f}" for p in r["precision"]),
                         f"{np.mean(r['precision']):.3f}", f"{np.mean(r['top1']):.3f}",
                         f"{r['chance']:.3f}",
                         " ".join(f"{p:.2f}" for p in copy) if copy else "-"])
    if not rows:
        return ""
    return ("## What the kNN memory retrieves\n\nOver the held-out evaluation: the share of "
            "retrieved pairs whose next token is the token the query predicts, per head, "
            "for each query's best pair (top-1), and for a pair drawn at random from the "
            "same memory; and the share whose own token is the next one, which an attention "
            "memory can copy (memory/knn_usage.py). A head near the random rate retrieves "
            "nothing that predicts the next token.\n\n"
            + markdown_table(["variant", "layer", "precision per head", "mean", "top-1",
                              "random pair", "copy per head"], rows, left=3) + "\n")


def _passkey_section(results: dict, plots: dict) -> str:
    from memformers.evaluate.passkey import passkey_table

    parts = []
    for v in results.get("variants", []):
        pk = v.get("passkey")
        if not pk:
            continue
        parts.append(f"### {v['name']}\n\n{passkey_table(pk)}\n")
        if v["name"] in plots.get("passkey", {}):
            parts.append(f"![passkey {v['name']}]({plots['passkey'][v['name']]})\n")
    if not parts:
        return ""
    return ("## Passkey retrieval\n\nExact-match accuracy, "
            f"{_get(results, 'eval', 'passkey_samples')} samples per cell.\n\n"
            + "\n".join(parts))


def _diff_section(diff: dict | None, plots: dict) -> str:
    if not diff:
        return ""
    doc = diff.get("doc_name", f"#{diff['doc']}")
    text = (f"## Per-token loss difference\n\n`{diff['a']}` minus `{diff['b']}` over held-out "
            f"document {doc} ({diff['tokens']:,} tokens): mean {diff['mean_diff']:+.4f} "
            f"nats/token; `{diff['b']}` is better on {diff['frac_b_better']:.1%} of tokens.\n\n")
    if "loss_diff" in plots:
        text += f"![loss difference]({plots['loss_diff']})\n\n"
    if diff["winners"]:
        rows = [[str(w["position"]), f"{w['diff']:+.3f}", f"{w['loss_a']:.3f}",
                 f"{w['loss_b']:.3f}", f"`{w['context']!r}`" if "context" in w else MISSING,
                 f"`{w['token']!r}`" if "token" in w else MISSING] for w in diff["winners"]]
        text += (f"Tokens where `{diff['b']}` gains the most:\n\n"
                 + markdown_table(["position", "gain", f"loss {diff['a']}",
                                   f"loss {diff['b']}", "context", "token"], rows,
                                  left="rrrrll")
                 + "\n")
    return text


def _runs_section(results: dict) -> str:
    rows = []
    for v in results.get("variants", []):
        state = "trained now" if v.get("trained") else (
            "cached" if v.get("cached") else "re-evaluated: " + ", ".join(v.get("recomputed", [])))
        rows.append([v["name"], f"`{v.get('run_dir', MISSING)}`", state,
                     _num(_get(v, "train", "loss")), _num(_get(v, "train", "step"), "{:.0f}")])
    return "## Runs\n\n" + markdown_table(["variant", "run directory", "this time",
                                           "final train loss", "steps"], rows, left=3) + "\n"


# --------------------------------------------------------------------------- writing


def extra_sections(results: dict, diff: dict | None, plots: dict) -> list[str]:
    """The markdown sections of the optional evaluations that are present: memory sweep,
    per-token loss difference, passkey, sorting, gates (``plots``: PNG names to link).
    Product-key usage is not among them: ``format_eval`` already prints it."""
    sections = (_sweep_section(results, plots), _diff_section(diff, plots),
                _passkey_section(results, plots), _sorting_section(results, plots),
                _gates_section(results, plots))
    return [s for s in sections if s]


def render_markdown(results: dict, diff: dict | None, plots: dict) -> str:
    headers, rows = table_rows(results)
    text = [f"# {results.get('title') or 'Comparison: ' + results.get('name', '')}\n"]
    description = _get(results, "compare_config", "compare", "description")
    if description:
        text.append(f"{description}\n")
    if results.get("config_file"):
        text.append(f"Config: `{results['config_file']}`"
                    + (f", with --set {' '.join(results['cli_set'])}"
                       if results.get("cli_set") else "") + "\n")
    for note in results.get("notes", []):
        text.append(f"**Note:** {note}\n")
    ev = results.get("variants", [{}])[0].get("eval") if results.get("variants") else None
    scope = (f" on {ev['documents']} held-out documents ({ev['tokens']:,} tokens)"
             if ev else "")
    text.append("## Results\n\n" + markdown_table(headers, rows) + "\n")
    text.append(f"Loss is nats/token{scope}; `loss A-B` columns are by position in the "
                "document (tokens A..B); train tok/s from the trainer, infer tok/s = "
                "evaluation tokens / evaluation seconds; state/stream = per-stream memory "
                "state after two segments; passkey = exact-match accuracy, mean over depths; "
                "sorting@T = accuracy on the sorted symbols at length T (section Sorting).\n")
    if "loss_by_position" in plots:
        text.append(f"![loss by position]({plots['loss_by_position']})\n")
    for section in [*extra_sections(results, diff, plots), _pkm_usage_section(results),
                    _knn_retrieval_section(results), _runs_section(results)]:
        if section:
            text.append(section)
    return "\n".join(text)


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write report.md, results.json and the PNG plots into ``out_dir``; returns report.md."""
    from memformers.compare import plots as P

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diff = loss_difference(results)
    made: dict = {"passkey": {}}
    for key, fn, arg in (("loss_by_position", P.plot_loss_by_position, results),
                         ("memory_sweep", P.plot_memory_sweep, results),
                         ("loss_diff", P.plot_loss_difference, diff),
                         ("gates", P.plot_gates, results),
                         ("trajectories", P.plot_memory_trajectories, results),
                         ("sorting", P.plot_sorting, results)):
        path = fn(arg, out / f"{key}.png") if arg else None
        if path is not None:
            made[key] = path.name
    for v in results.get("variants", []):
        if v.get("passkey"):
            path = P.plot_passkey(v, out / f"passkey-{v['name']}.png")
            made["passkey"][v["name"]] = path.name
    full = {**results, "loss_diff": diff, "plots": made}
    from memformers.train.checkpoint import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(full, indent=1))
    report = out / "report.md"
    atomic_write_text(report, render_markdown(results, diff, made))
    return report
