"""Evaluation: held-out perplexity / bits per byte by position, passkey retrieval.

  generate.py   stream a long prompt segment by segment, then decode (greedy or sampled)
  passkey.py    passkey accuracy over a (context length x needle depth) grid, table, heatmap
  lm.py         held-out loss / perplexity / bits per byte by position, per-document bootstrap
  knnlm_tune.py the kNN-LM's lambda and temperature (memformers knnlm-tune)

Probes that explain a model's behaviour (Infini-attention's passkey misses, PKM's query
BatchNorm) live in memformers.diagnostics.
"""
