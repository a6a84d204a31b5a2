"""Diagnostics: probes that explain a trained model's behaviour (not training or scoring).

  infini_probe.py  why Infini-attention misses a passkey: hooks on its memory, capacity
                   (driven by scripts/infini_diagnose.py)
  pkm_bn.py        a product-key model's held-out loss with its query BatchNorm's running
                   vs each batch's own statistics (memformers diagnose pkm-bn RUN_DIR)
  cli.py           the ``memformers diagnose`` command
"""
