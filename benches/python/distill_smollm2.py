"""SmolLM2-135M as a teacher: a student initialised from every other block (15 of 30, about
60 % of the parameters), trained for the same steps on the same windows of public-domain text
twice: distilled from the teacher (slimforge's ``Distiller``, T = 1, alpha = 0.5) and
fine-tuned on the text alone (the ``Trainer``). Perplexity on held-out plays before and after,
wall time of each, and the teacher's own perplexity.

The text is the bundled corpus through the SmolLM2 track's ``dedup`` and ``prepare`` stages
(SmolLM2 tokenizer; Hamlet, Macbeth and The Tempest held out).

    python benches/python/distill_smollm2.py                    # about 30-40 minutes on 2 cores
    python benches/python/distill_smollm2.py --quick            # a smoke run (2-block teacher)
    python benches/python/distill_smollm2.py --steps 80 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time

import numpy as np
import torch

import slimforge
from slimforge.data.tokens import TokenFile
from slimforge.data.windows import spaced_windows
from slimforge.distill import DistillConfig, Distiller, init_student
from slimforge.eval import evaluate_lm
from slimforge.models import LlamaForCausalLM
from slimforge.pipeline import demo_config, run_pipeline
from slimforge.train import TrainConfig, Trainer


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return math.exp(evaluate_lm(model, windows, batch_size=4).nll)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="run folder for the data stages")
    ap.add_argument(
        "--engines",
        default="plain,distill",
        help="which students to train: plain, distill or both (comma-separated)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    slimforge.set_threads(args.threads)
    layers = 2 if args.quick else None
    steps = 3 if args.quick else args.steps

    cfg = demo_config("quick" if args.quick else "default", "smollm2")
    cfg["run"]["stages"] = ["dedup", "prepare"]
    work = args.work or tempfile.mkdtemp(prefix="distill-smollm2-")
    m = run_pipeline(work, cfg, progress=False)
    out = m["prepare"]["outputs"]
    train = torch.from_numpy(np.asarray(TokenFile(out["train"]).tokens, dtype=np.int64))
    val = spaced_windows(
        torch.from_numpy(np.asarray(TokenFile(out["val"]).tokens, dtype=np.int64)),
        args.seq_len,
        4 if args.quick else args.windows,
    )

    from slimforge.data.assets import smollm2_gguf

    teacher = LlamaForCausalLM.from_gguf(smollm2_gguf(), num_layers=layers).eval()
    student0 = init_student(teacher, "every_other")
    result: dict = {
        "teacher_params": params(teacher),
        "student_params": params(student0),
        "teacher_blocks": teacher.cfg.num_layers,
        "student_blocks": student0.config.num_layers,
        "train_tokens_available": int(train.numel()),
        "steps": steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "threads": args.threads,
    }
    result["teacher_ppl"] = perplexity(teacher, val)
    result["student_ppl_init"] = perplexity(student0, val)
    print(f"teacher {result['teacher_params']:,} params, perplexity {result['teacher_ppl']:.2f}")
    print(f"student {result['student_params']:,} params "
          f"({result['student_params'] / result['teacher_params']:.0%}), perplexity at init "
          f"{result['student_ppl_init']:.2f}")  # fmt: skip

    def train_cfg() -> TrainConfig:
        return TrainConfig(
            steps=steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
            warmup_steps=max(1, steps // 10), eval_windows=1, seed=0, progress=False,
            log_every=10, save_every=10_000,
        )  # fmt: skip

    names = {"plain": "fine-tuned (no teacher)", "distill": "distilled (T=1, alpha=0.5)"}
    for key in args.engines.split(","):
        if key not in names:
            raise SystemExit(f"--engines: {key!r} is not plain or distill")
        name = names[key]
        student = copy.deepcopy(student0).train()
        torch.manual_seed(0)
        start = time.perf_counter()
        if name.startswith("distilled"):
            d = Distiller(student, teacher, train, None, DistillConfig(temperature=1.0, alpha=0.5),
                          train_cfg())  # fmt: skip
            res = d.fit()
        else:
            res = Trainer(student, train, None, train_cfg()).fit()
        if res.interrupted:
            raise SystemExit("interrupted: the numbers of a cut run are not comparable")
        seconds = time.perf_counter() - start
        ppl = perplexity(student.eval(), val)
        result[name] = {"perplexity": ppl, "seconds": seconds, "tokens": res.tokens,
                        "final_loss": res.losses[-1] if res.losses else None}  # fmt: skip
        print(f"{name:28s} perplexity {ppl:8.2f}  ({seconds:.0f} s, {res.tokens:,} tokens)")
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
