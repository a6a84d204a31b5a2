"""Fewer kNN-LM searches by following pointers (RetoMaton, Alon et al. 2022)?

If position t-1 retrieved the stored position i, then position t's state is often close
to the state stored at i + 1, the entry that follows i. So a position could take as
candidates the successors of an earlier position's neighbours, instead of searching.
Searching only every S-th position ("anchors") would cut the list scans by S. This
measures what that costs, on demo-base's real datastore, before building it:

* recall@64 against exact search, for the IVF search (the default on the CPU) alone
  and joined with the successors of the previous position's IVF neighbours (each
  candidate set scored exactly);
* the kNN-LM's loss on the next 1,023 tokens when the non-anchor positions use only the
  successor chains of their anchor's neighbours (lambda 0.4, temperature 0.035, the
  values tuned on valid; scored as log of the mixture).

One stream fills a 65,536-pair datastore on held-out text (``bench_knnlm.long_streams``);
the next four 256-token segments are the queries (the datastore is not updated between
them). CPU, ``--threads`` threads.

    python benchmarks/bench_knnlm_pointers.py --out benchmarks/results/knnlm_pointers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_knnlm import long_streams  # noqa: E402

from memformers.pretrained import load_shipped_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--corpus", default="data/stdlib-byte-grouped")
    ap.add_argument("--segments", type=int, default=4, help="query segments of 256 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=0.4)
    ap.add_argument("--temperature", type=float, default=0.035)
    ap.add_argument("--out", default="benchmarks/results/knnlm_pointers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    C, L, k = args.capacity, 256, 64
    _, m = load_shipped_model("demo-base", [f"model.knnlm.capacity={C}", "model.knnlm.lam=0.0",
                                            "model.knnlm.backend=exact"])
    fill = C // L + 1
    tok = long_streams(Path(args.corpus), (fill + args.segments) * L + 1, 1)
    qs, logps = [], []
    with torch.no_grad():
        for i in range(fill):
            m(tok[:, i * L:(i + 1) * L], new_doc=torch.ones(1, dtype=torch.bool) if i == 0
              else None)
        for j in range(args.segments):  # features only: the datastore stays as it is
            h, keys, _ = m.features(tok[:, (fill + j) * L:(fill + j + 1) * L])
            qs.append(torch.nn.functional.normalize(keys[0].float(), dim=-1))
            logps.append(torch.log_softmax(m.head(h)[0].float(), -1))
    xq, logp = torch.cat(qs), torch.cat(logps)  # (N, D), (N, V)
    y = tok[0, fill * L + 1:(fill + args.segments) * L + 1]  # (N,) the next tokens
    xb = m.knnlm.keys[0].float()  # (C, D) ring slots
    pos, vals = m.knnlm.pos[0].numpy(), m.knnlm.values[0]
    slot_at = np.full(pos.max() + 2, -1)
    slot_at[pos] = np.arange(C)
    succ = slot_at[pos + 1]  # the slot holding the next position, -1 if not stored

    def follow(ids, hops):
        for _ in range(hops):
            ids = np.where(ids >= 0, succ[np.clip(ids, 0, None)], -1)
        return ids

    def rescored(ids):  # each candidate set's exact best k, duplicates dropped
        ct = torch.from_numpy(ids)
        sc = torch.einsum("qd,qkd->qk", xq, xb[ct.clamp(min=0)]).masked_fill(ct < 0, -1e9)
        srt, o = ct.sort(1)
        dup = torch.zeros_like(ct, dtype=torch.bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        sc = sc.masked_fill(torch.zeros_like(dup).scatter_(1, o, dup), -1e9)
        s, j = sc.topk(k, 1)
        return s, ct.gather(1, j)

    exact_s, exact = (xq @ xb.T).topk(k)
    exact_sets = [set(r) for r in exact.tolist()]

    def recall(ids):
        return float(np.mean([len(set(r) & e) / k for r, e in zip(ids.tolist(), exact_sets)]))

    def loss(s, ids):
        w = torch.softmax(s / args.temperature, -1).masked_fill(ids < 0, 0.0)
        p_knn = (w * (vals[ids.clamp(min=0)] == y[:, None]).float()).sum(-1)
        p_lm = logp.gather(1, y[:, None])[:, 0].exp()
        return float(-torch.log((1 - args.lam) * p_lm + args.lam * p_knn).mean())

    quant = faiss.IndexFlatIP(xb.shape[1])
    index = faiss.IndexIVFScalarQuantizer(quant, xb.shape[1], 1024,
                                          faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(xb[:32768].numpy())
    index.add(xb.numpy())
    base = float(-logp.gather(1, y[:, None]).mean())
    rows = [{"method": "demo-base alone", "loss": base},
            {"method": "exact search", "recall": 1.0, "loss": loss(exact_s, exact)}]
    for nprobe in (4, 8):
        index.nprobe = nprobe
        ivf = index.search(xq.numpy(), k)[1]
        s, ids = rescored(ivf)
        rows.append({"method": f"IVF 1024/{nprobe}", "recall": recall(ids), "loss": loss(s, ids)})
        prev = np.full_like(ivf, -1)
        prev[1:] = follow(ivf[:-1], 1)  # successors of position t-1's neighbours
        s, ids = rescored(np.concatenate([ivf, prev], 1))
        rows.append({"method": f"IVF 1024/{nprobe} + successors of t-1",
                     "recall": recall(ids), "loss": loss(s, ids)})
        for every in (2, 3, 4):  # only anchors search; the others follow their anchor
            chains = np.stack([follow(ivf[(t // every) * every], t % every)
                               for t in range(len(ivf))])
            s, ids = rescored(chains)
            rows.append({"method": f"IVF 1024/{nprobe} at 1 in {every} positions, "
                                   f"successor chains between", "recall": recall(ids),
                         "loss": loss(s, ids)})
    exact_loss = rows[1]["loss"]
    print(f"{len(y)} tokens after a {C:,}-pair datastore; loss in nats/token")
    print(f"{'method':62} {'recall@64':>9} {'loss':>8} {'vs exact':>9}")
    for r in rows:
        r["vs_exact"] = r["loss"] / exact_loss - 1
        rec = f"{r['recall']:.3f}" if "recall" in r else ""
        print(f"{r['method']:62} {rec:>9} {r['loss']:8.4f} {r['vs_exact']:+8.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "tokens": len(y), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
