"""The ``memformers data`` command: ``data build`` and ``data stats DIR``."""

from __future__ import annotations

import argparse

from memformers.data.corpus import (
    build_corpus,
    default_corpus_dir,
    format_stats,
    open_corpus_manifest,
)
from memformers.errors import MemformersError


def add_data_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` (with ``build`` and ``stats``) on the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="build and inspect tokenised corpora")
    sub = data.add_subparsers(dest="data_command", metavar="{build,passkey,stats}")
    sub.required = True

    b = sub.add_parser("build", help="tokenise a source into a corpus directory")
    b.add_argument("--source", default="stdlib",
                   help="'stdlib' (default), a directory of text files, a .jsonl file, "
                        "or a HF dataset dir (with --hf)")
    b.add_argument("--hf", action="store_true",
                   help="--source is a dataset saved with datasets.save_to_disk")
    b.add_argument("--out", default=None,
                   help="corpus directory (default for stdlib: data/stdlib-<tokenizer>)")
    b.add_argument("--tokenizer", default="byte",
                   help="byte (default), bpe (trained on the train split), hf:MODEL (a Hugging "
                        "Face model's tokenizer.json: a model directory or Hub name), or a "
                        "corpus directory whose tokenizer to reuse")
    b.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size")
    b.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="keep files matching GLOB (repeatable; default **/* or **/*.py)")
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="drop files matching GLOB (repeatable)")
    b.add_argument("--text-field", default="text", help="text field of jsonl/HF records")
    b.add_argument("--split", default="0.9,0.05,0.05", help="train,valid,test fractions")
    b.add_argument("--group-by-package", action="store_true",
                   help="one long document per top-level directory")
    b.add_argument("--max-docs", type=int, default=0, help="keep only the first N documents")
    b.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    b.add_argument("--follow-links", action="store_true",
                   help="also read symlinks to files outside the source directory (skipped "
                        "and counted by default)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    pk = sub.add_parser("passkey", help="build a corpus of passkey documents (to mix in)")
    pk.add_argument("--out", required=True, help="corpus directory")
    pk.add_argument("--docs", type=int, default=2000)
    pk.add_argument("--min-length", type=int, default=256, help="tokens per document, at least")
    pk.add_argument("--max-length", type=int, default=4096, help="tokens per document, at most")
    pk.add_argument("--tokenizer", default="byte",
                    help="'byte' or a corpus directory whose tokenizer to use")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("stats", help="print a corpus's statistics")
    s.add_argument("dir", help="corpus directory")
    s.add_argument("--verify", action="store_true", help="recompute the content hash")

    data.set_defaults(func=run_data_command)
    return data


def run_data_command(args: argparse.Namespace) -> int:
    """Run ``data build`` or ``data stats``; prints the corpus statistics."""
    if args.data_command == "build":
        out = args.out
        if out is None:
            if args.source != "stdlib" or args.tokenizer not in ("byte", "bpe"):
                raise MemformersError("--out is required unless --source is 'stdlib' and "
                                      "--tokenizer is byte or bpe")
            out = default_corpus_dir(args.tokenizer)
        manifest = build_corpus(
            out, args.source, tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab,
            include=args.include, exclude=args.exclude, text_field=args.text_field,
            split=args.split, max_docs=args.max_docs, group=args.group_by_package,
            overwrite=args.overwrite, source_kind="hf" if args.hf else "auto",
            progress=not args.quiet, follow_links=args.follow_links,
        )
        print(f"wrote corpus to {out}")
    elif args.data_command == "passkey":
        from memformers.tasks.passkey import build_passkey_corpus

        manifest = build_passkey_corpus(args.out, args.docs, args.min_length, args.max_length,
                                        tokenizer=args.tokenizer, seed=args.seed,
                                        overwrite=args.overwrite)
        print(f"wrote passkey corpus to {args.out}")
    else:
        manifest = open_corpus_manifest(args.dir, verify=args.verify)
        if args.verify:
            print("content hash verified")
    print(format_stats(manifest))
    return 0
