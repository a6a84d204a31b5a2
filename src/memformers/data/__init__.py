"""Data: tokenizers, corpus building, long-document streaming.

  tokenizer.py   ByteTokenizer, BPETokenizer, load_tokenizer
  sources.py     reading documents from the stdlib, a directory, jsonl, HF datasets
  corpus.py      build_corpus -> memory-mapped CorpusSplit on disk
  streaming.py   DocumentStreams: B parallel document streams, resumable
  cli.py         the `memformers data` command
"""

from memformers.data.cli import add_data_subparser, run_data_command
from memformers.data.corpus import (
    CorpusSplit,
    build_corpus,
    default_corpus_dir,
    ensure_default_corpus,
    format_stats,
    open_corpus_manifest,
)
from memformers.data.streaming import Batch, DocumentStreams
from memformers.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "CorpusSplit",
    "DocumentStreams",
    "Tokenizer",
    "add_data_subparser",
    "build_corpus",
    "default_corpus_dir",
    "ensure_default_corpus",
    "format_stats",
    "load_tokenizer",
    "open_corpus_manifest",
    "run_data_command",
]
