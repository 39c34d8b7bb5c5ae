"""The `slimforge` command line.

slimforge dedup INPUT... -o OUTPUT [--threshold 0.8] [--field text] ...
slimforge demo [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from slimforge import __version__

__all__ = ["main"]


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
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold in (0, 1]")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--ngram", type=int, default=5, help="shingle size in tokens")
    p.add_argument("--tokenizer", choices=["word", "char"], default="word")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bands", type=int, default=None, help="LSH bands (default: optimised)")
    p.add_argument("--rows", type=int, default=None, help="LSH rows per band")
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
    p.add_argument("--batch-size", type=int, default=8192, help="documents hashed per batch")
    p.add_argument(
        "--memory-mb", type=int, default=1024, help="memory budget for the candidate stage"
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_dedup)


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
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job on the bundled corpus",
        description="Deduplicate the bundled public-domain corpus and print the report.",
    )
    p.add_argument("--out", default="slimforge-demo", help="output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from slimforge.demo import run_demo

    run_demo(args.out, progress=not args.quiet)
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
    args = parser.parse_args(argv)
    # The library logs through `logging`; the command line shows warnings, or more with -v.
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"slimforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimforge {args.command}: interrupted; no output was replaced", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
