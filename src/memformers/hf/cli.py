"""The Hugging Face commands of the ``memformers`` CLI.

    memformers finetune --hf-model PATH_OR_NAME [--config FILE] [--set key=value ...]
                        --run-dir DIR [--resume]
        train a Hugging Face causal LM with the memformers trainer (streaming,
        checkpoints, evaluation), with model.knn / model.infini memory retrofitted;
        the result is also exported to RUN_DIR/hf in Hugging Face format (a kNN-LM,
        add_memory(kind="knnlm"), needs no training: memorize / ask use it as it is)
    memformers memorize --model DIR --input FILE_OR_DIR [--include GLOB ...] --out MEMDIR
        feed a large text (a book, a code base) into the model's memory and save it
    memformers ask --model DIR --memory MEMDIR --prompt TEXT [--max-new-tokens N]
        load a saved memory (memory-mapped) and generate an answer from it
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from memformers.errors import MemformersError


def cmd_finetune(args) -> int:
    from memformers.cli import _load_run_config, run_training
    from memformers.config import apply_overrides, config_from_dict, read_toml

    run_dir = Path(args.run_dir)
    if args.resume and args.config is None and (run_dir / "config.json").is_file():
        cfg = _load_run_config(run_dir, args.set)
        if args.hf_model and cfg.model.hf_path != args.hf_model:
            raise MemformersError(f"{run_dir} trains {cfg.model.hf_path}, not {args.hf_model}")
    else:
        raw = apply_overrides(read_toml(args.config) if args.config else {}, args.set)
        raw.setdefault("model", {})["hf_path"] = args.hf_model
        cfg = config_from_dict(raw)
    if Path(cfg.model.hf_path).expanduser().is_dir() or \
            cfg.model.hf_path.startswith((".", "/", "~")):
        from memformers.hf.lm import resolve_model_source

        resolve_model_source(cfg.model.hf_path)  # before the run directory is created
    return run_training(cfg, run_dir, args.resume, not args.no_progress)


def _model_and_tokenizer(model_dir: str, device: str):
    from memformers.data.tokenizer import HFTokenizer
    from memformers.hf.lm import resolve_model_source
    from memformers.hf.persist import load_pretrained
    from memformers.hf.retrofit import require_transformers
    from memformers.train.trainer import resolve_device

    require_transformers().utils.logging.disable_progress_bar()  # stderr: errors only
    path = resolve_model_source(model_dir)
    model = load_pretrained(path).to(resolve_device(device)).eval()
    return model, HFTokenizer.load(path), path


def read_input_text(source: Path, include: list[str], exclude: list[str]) -> tuple[str, int]:
    """The text of a file, or of every selected text file under a directory (with headers)."""
    from memformers.data.sources import GROUP_HEADER, Skipped, list_files, read_text_file

    skipped = Skipped()
    if source.is_file():
        text = read_text_file(source, skipped)
        if text is None:
            raise MemformersError(f"{source} is not UTF-8 text")
        return text, 1
    if not source.is_dir():
        raise MemformersError(f"input not found: {source}")
    parts = []
    for rel in list_files(source, include or ["**/*"], exclude, skipped=skipped):
        text = read_text_file(source / rel, skipped)
        if text:
            parts.append(GROUP_HEADER.format(path=rel) + text + ("" if text.endswith("\n")
                                                                  else "\n"))
    if not parts:
        raise MemformersError(f"no text files under {source} (include={include or ['**/*']}, "
                              f"exclude={exclude}; skipped {skipped.binary} binary, "
                              f"{skipped.undecodable} undecodable)")
    if skipped.outside_links:
        print(f"skipped {skipped.outside_links} symlinks to files outside {source}",
              file=sys.stderr)
    return "".join(parts), len(parts)


def cmd_memorize(args) -> int:
    import torch

    from memformers.hf import knnlm_of, memorize, memory_layers, reset_memory, save_memory

    model, tok, path = _model_and_tokenizer(args.model, args.device)
    text, n_files = read_input_text(Path(args.input).expanduser(), args.include, args.exclude)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    if ids.numel() == 0:
        raise MemformersError(f"{args.input} holds no tokens")
    layers = memory_layers(model)
    reset_memory(model)
    knnlm = knnlm_of(model)
    if knnlm is not None:  # the kNN-LM: one pair per token but the last (pending)
        knnlm.set_storage(args.capacity or max(1, ids.numel() - 1))
    elif layers[0][1].kind == "knn":  # size the ring to the text: a full ring maps back as is
        capacity = args.capacity or ids.numel()
        for _, layer in layers:
            layer.memory.set_storage(capacity)
    t0 = time.perf_counter()
    memorize(model, ids, chunk_len=args.chunk_len, progress=not args.no_progress)
    out = save_memory(model, args.out, extra={"source": str(args.input), "files": n_files,
                                              "tokens": int(ids.numel()), "model": str(path)})
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"memorised {ids.numel():,} tokens from {n_files} file(s) in "
          f"{time.perf_counter() - t0:.1f} s; memory saved in {out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_ask(args) -> int:
    import torch

    from memformers.hf import load_memory
    from memformers.hf.retrofit import max_positions
    from memformers.memory.persist import read_manifest

    if not args.prompt:
        raise MemformersError("--prompt must not be empty")
    if args.max_new_tokens < 1:
        raise MemformersError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    read_manifest(args.memory)  # a damaged memory fails before the model is loaded
    model, tok, _ = _model_and_tokenizer(args.model, args.device)
    t0 = time.perf_counter()
    manifest = load_memory(model, args.memory)
    loaded = time.perf_counter() - t0
    device = next(model.parameters()).device
    ids = torch.tensor([tok.encode(args.prompt)], device=device)
    limit = max_positions(model.config)
    if limit and ids.shape[1] + args.max_new_tokens > limit:
        raise MemformersError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens "
                              f"({args.max_new_tokens}) exceed the model's {limit} positions")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=args.max_new_tokens, do_sample=sample,
                         temperature=args.temperature if sample else None, top_k=None,
                         top_p=None, pad_token_id=model.config.eos_token_id or 0)
    print(tok.decode(out[0, ids.shape[1]:].tolist()))
    if args.verbose:
        print(f"[memory: {manifest.get('tokens', '?')} tokens, loaded in {loaded * 1e3:.0f} ms]")
    return 0


def add_hf_subparsers(sub: argparse._SubParsersAction) -> None:
    """Register ``finetune``, ``memorize`` and ``ask`` on the main CLI's subparsers."""
    f = sub.add_parser("finetune", help="train a Hugging Face causal LM with retrofitted memory")
    f.add_argument("--hf-model", required=True,
                   help="model directory (weights + config.json + tokenizer.json; a config "
                        "alone is a random initialisation) or Hub name")
    f.add_argument("--config", help="TOML run config: [model.knn] or [model.infini], [data], "
                                    "[train]")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.knn.layers=[8]")
    f.add_argument("--run-dir", default="runs/finetune")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("memorize", help="feed a text or a directory into a model's memory")
    m.add_argument("--model", required=True, help="a model directory with memory "
                                                  "(e.g. RUN_DIR/hf of `memformers finetune`)")
    m.add_argument("--input", required=True, help="a text file or a directory")
    m.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="files under --input to read (repeatable; default **/*)")
    m.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    m.add_argument("--out", required=True, help="memory directory to write")
    m.add_argument("--chunk-len", type=int, help="tokens per chunk (default: the trained one)")
    m.add_argument("--capacity", type=int, default=0,
                   help="kNN entries per (row, head), or kNN-LM pairs; default: all the "
                        "input's tokens")
    m.add_argument("--device", default="cpu")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_memorize)

    a = sub.add_parser("ask", help="generate from a prompt with a saved memory")
    a.add_argument("--model", required=True)
    a.add_argument("--memory", required=True, help="a directory written by `memorize`")
    a.add_argument("--prompt", required=True)
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="cpu")
    a.add_argument("--verbose", action="store_true", help="also print memory size and load time")
    a.set_defaults(func=cmd_ask)
