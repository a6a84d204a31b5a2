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
  layers.py            drop-in layers: KNNAttention, ProductKeys, InfiniAttention,
                       ContinuousAttention, KNNLMHead (import memformers)
  cli.py               the `memformers` command
"""

from memformers.errors import MemformersError

__version__ = "0.1.0"
LAYERS = ("ContinuousAttention", "InfiniAttention", "KNNAttention", "KNNLMHead", "ProductKeys")
__all__ = ["MemformersError", "__version__", *LAYERS]


def __getattr__(name: str):
    """The drop-in layers (memformers/layers.py), imported on first use: ``import
    memformers`` stays light for the command line."""
    if name in LAYERS:
        from memformers import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'memformers' has no attribute {name!r}")
