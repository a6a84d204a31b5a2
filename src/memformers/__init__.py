"""memformers: memory-augmented transformers.

The architecture, one concept per module:
  config.py            typed run configuration, validated in one place
  model/               decoder-only LM: attention (+ XL cache), FFN, positions
  memory/              long-term memories: kNN, product keys, Infini-attention,
                       continuous (infinity-former), behind one state interface
  data/                tokenizers, corpus building, long-document streaming
  train/               optimiser, trainer, atomic checkpoints
  evaluate/            held-out perplexity / bits per byte by position, passkey
  tasks/               synthetic tasks (sorting, associative recall)
  hf/                  memory retrofitted into pretrained Hugging Face models
  cli.py               the `memformers` command
"""

from memformers.errors import MemformersError

__version__ = "0.1.0"
__all__ = ["MemformersError", "__version__"]
