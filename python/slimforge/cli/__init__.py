"""The `slimforge` command line.

slimforge dedup INPUT... -o OUTPUT [--threshold 0.8] [--field text] [--engine local|ray] ...
slimforge demo [--out DIR]
slimforge prepare INPUT... -o DIR [--tokenizer byte|smollm2|GGUF]
slimforge train --data DIR --out RUN [--model gpt|gpt-moe|llama] [--resume] ...
slimforge generate MODEL (--prompt TEXT | --ids IDS) [--max-new-tokens N] ...
slimforge export MODEL --format gguf --type q4_1 -o OUT.gguf
slimforge vision {classify,prune,quantize,export} ...

Exit status: 0 on success; 2 for a user error (bad arguments, out-of-range values, malformed
or unreadable input, an output that would overwrite an input), with a one-line message and no
traceback; 1 when the run fails for another reason it can name (out of memory, inputs changed
while reading); 130 on Ctrl-C. Outputs are only replaced by a run that succeeds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from slimforge import __version__
from slimforge.cli.compress import add_distill, add_eval, add_prune, add_quantize, add_synth
from slimforge.cli.generate import add_export, add_generate
from slimforge.cli.lora import add_lora
from slimforge.cli.train import add_prepare, add_train
from slimforge.cli.vision import add_vision
from slimforge.io import DEFAULT_MAX_LINE_BYTES, MAX_LINE_BYTES_LIMIT

__all__ = ["main"]


def _int(text: str) -> int:
    """An argparse type: a decimal integer (``1_000`` allowed), else a usage error."""
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    """An argparse type: a finite float, else a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_dedup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="remove exact and near-duplicate documents (MinHash + LSH)",
        description=(
            "Deduplicate JSONL (plain or gzip) and Parquet document files. Writes the kept "
            "documents to OUTPUT, a clusters TSV beside it (every document with its cluster and "
            "whether it was kept) and, with --on-error skip, the malformed lines to a rejects "
            "file. Inputs are never modified; outputs appear only when complete."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.gz or .parquet")
    p.add_argument("-o", "--output", required=True, help="output file; format from its name")
    p.add_argument("--field", default="text", help="JSON field / Parquet column with the text")
    p.add_argument("--threshold", type=_float, default=0.8, help="Jaccard threshold in (0, 1]")
    p.add_argument("--num-perm", type=_int, default=128, help="MinHash permutations (at most 8192)")
    p.add_argument("--ngram", type=_int, default=5, help="shingle size in tokens (at most 1024)")
    p.add_argument("--tokenizer", choices=["word", "char"], default="word")
    p.add_argument("--seed", type=_int, default=1, help="in [0, 2**64)")
    p.add_argument("--bands", type=_int, default=None, help="LSH bands (default: optimised)")
    p.add_argument("--rows", type=_int, default=None, help="LSH rows per band")
    p.add_argument(
        "--verify",
        choices=["estimate", "exact"],
        default="estimate",
        help="check candidates by estimated Jaccard (signatures) or exact shingle-set Jaccard",
    )
    p.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="malformed lines: stop with file:line (fail) or set aside in a rejects file (skip)",
    )
    p.add_argument(
        "--batch-size",
        type=_int,
        default=8192,
        help="documents hashed per batch (1 to 2**20; batch-size * num-perm <= 2**28)",
    )
    p.add_argument(
        "--memory-mb", type=_int, default=1024, help="memory budget for the candidate stage"
    )
    p.add_argument(
        "--max-line-mb",
        type=_int,
        default=DEFAULT_MAX_LINE_BYTES >> 20,
        metavar="MB",
        help="longest JSONL line read, in MiB (default 64, at most 16384); a longer line "
        "stops the run with its file:line",
    )
    p.add_argument("--work-dir", default=None, help="where signatures spill (default: by OUTPUT)")
    p.add_argument("--clusters", default=None, help="clusters TSV path (default: beside OUTPUT)")
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="INDEX_FILE",
        help="drop documents matching this LSHIndex file of earlier shards (repeatable)",
    )
    p.add_argument(
        "--save-index",
        default=None,
        metavar="PATH",
        help="write an LSHIndex of the kept documents (keys: global document index)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="run the stages in this process (local) or as Ray tasks (ray; docs/scale-out.md)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: auto or HOST:PORT (default: start a local one)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="keep the stages' files here; re-running with the same DIR resumes the job",
    )
    p.add_argument(
        "--partitions",
        type=_int,
        default=None,
        help="band-key partitions of the candidate stage (1 to 4096; default: one per GiB "
        "of input, at least one per worker); they never change the result",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_dedup)


def _max_line_bytes(mb: int) -> int:
    limit = MAX_LINE_BYTES_LIMIT >> 20
    if not 1 <= mb <= limit:
        raise ValueError(f"--max-line-mb must lie in [1, {limit}], got {mb}")
    return mb << 20


def _run_dedup(args: argparse.Namespace) -> int:
    import json

    from slimforge.dedup.files import dedup_files

    report = dedup_files(
        args.inputs,
        args.output,
        field=args.field,
        threshold=args.threshold,
        num_perm=args.num_perm,
        ngram=args.ngram,
        tokenizer=args.tokenizer,
        seed=args.seed,
        bands=args.bands,
        rows=args.rows,
        verify=args.verify,
        on_error=args.on_error,
        batch_size=args.batch_size,
        memory_mb=args.memory_mb,
        work_dir=args.work_dir,
        clusters_path=args.clusters,
        against=args.against,
        save_index=args.save_index,
        progress=not args.quiet,
        max_line_bytes=_max_line_bytes(args.max_line_mb),
        engine=args.engine,
        address=args.address,
        run_dir=args.run_dir,
        partitions=args.partitions,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole efficiency pipeline on the bundled corpus",
        description=(
            "Deduplicates the bundled public-domain corpus, trains a small MoE teacher, writes "
            "a filtered synthetic set with it, distils a dense student, prunes and quantizes "
            "it, measures every stage on held-out text and writes OUT/report.md and "
            "OUT/report.html. Re-running resumes a stopped run; --from STAGE redoes a stage "
            "and those after it. Default: under 10 minutes on 2 cores; --quick: a smoke run. "
            "--model smollm2 runs the compression half on the real SmolLM2-135M (LoRA, "
            "pruning, GPTQ, GGUF for llama.cpp, perplexity of each); --model mobilenet_v2 the "
            "vision path (channel pruning, INT8, ONNX; accuracy, size and latency of each)."
        ),
    )
    p.add_argument("--out", default=None,
                   help="run folder (default: slimforge-demo, or slimforge-demo-MODEL)")  # fmt: skip
    p.add_argument("--model", default="gpt", choices=("gpt", "smollm2", "mobilenet_v2"),
                   help="which track: the bundled-corpus GPT pipeline (default), SmolLM2-135M "
                        "or MobileNetV2")  # fmt: skip
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the smallest run (about a minute)")
    size.add_argument("--full", action="store_true", help="larger models, longer training")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help="redo this stage and the ones after it")  # fmt: skip
    p.add_argument("--threads", type=_int, default=0, help="torch and slimforge threads")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from slimforge.demo import run_demo

    out = args.out or ("slimforge-demo" if args.model == "gpt" else f"slimforge-demo-{args.model}")
    run_demo(out, progress=not args.quiet, quick=args.quick, full=args.full,
             from_stage=args.from_stage, threads=args.threads, model=args.model)  # fmt: skip
    return 0


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run a chain of stages from a TOML file on your own data",
        description=(
            "Runs the stages named in CONFIG ([run] stages = [...], default all: dedup, "
            "prepare, teacher, synth, distill, prune, quantize, evaluate, report) with the "
            "parameters of its [stage] tables over [data] inputs (JSONL or Parquet documents). "
            "The run folder is resumable like `slimforge demo`'s. See docs/pipeline.md."
        ),
    )
    p.add_argument("config", help="pipeline TOML file")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help="redo this stage and the ones after it")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> int:
    from slimforge.pipeline import load_config, run_pipeline

    config = load_config(args.config)
    config["run"]["command"] = f"slimforge pipeline {args.config} --out {args.out}"
    run_pipeline(args.out, config, from_stage=args.from_stage, progress=not args.quiet)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slimforge", description="Cheap training and compression of neural networks."
    )
    parser.add_argument("--version", action="version", version=f"slimforge {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress details (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dedup(sub)
    _add_demo(sub)
    _add_pipeline(sub)
    add_prepare(sub)
    add_train(sub)
    add_lora(sub)
    add_generate(sub)
    add_synth(sub)
    add_distill(sub)
    add_prune(sub)
    add_quantize(sub)
    add_eval(sub)
    add_export(sub)
    add_vision(sub)
    args = parser.parse_args(argv)
    # The library logs through `logging`; the command line shows warnings, or more with -v.
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OverflowError, OSError, ImportError) as e:
        # User errors: bad values, malformed or unreadable inputs, refused outputs, a missing
        # optional dependency (the message names the extra to install).
        print(f"slimforge {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        print(f"slimforge {args.command}: failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slimforge {args.command}: interrupted; no output was replaced", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (file names may hold newlines)."""
    msg = str(e) or type(e).__name__
    if isinstance(e, MemoryError):
        msg = f"out of memory ({msg}); lower --batch-size or --memory-mb"
    return msg.replace("\n", "\\n").replace("\r", "\\r")


if __name__ == "__main__":
    sys.exit(main())
