"""Evaluation: held-out perplexity / bits per byte by position, passkey retrieval.

  generate.py   stream a long prompt segment by segment, then decode (greedy or sampled)
  passkey.py    passkey accuracy over a (context length x needle depth) grid, table, heatmap
  infini_probe.py  why Infini-attention misses a passkey: hooks on its memory, capacity
"""
