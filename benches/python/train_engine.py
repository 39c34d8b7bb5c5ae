"""The training engine's claims, measured on the bundled corpus (byte-level GPT, CPU).

    python benches/python/train_engine.py large-batch [--quick]   # LAMB at 8x / 32x batch vs AdamW
    python benches/python/train_engine.py memory [--quick]        # activation checkpointing
    python benches/python/train_engine.py precision [--quick]     # bf16 autocast vs fp32
    python benches/python/train_engine.py moe [--quick]           # MoE vs dense, 3 seeds
    python benches/python/train_engine.py all --quick             # every one, small

Curves go to --out (JSON, and PNG plots when matplotlib is installed: requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import slimforge
from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens
from slimforge.models import GPT, GPTConfig
from slimforge.train import Callback, TrainConfig, Trainer


def data() -> tuple[torch.Tensor, torch.Tensor]:
    train, val = lm_splits()
    return byte_tokens(train), byte_tokens(val)


class Curve(Callback):
    """Validation loss every `every` steps (the Trainer's eval_every does the evaluation)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_eval(self, trainer: Trainer, step: int, result: Any) -> None:
        self.points.append((step, result.nll))


def train_curve(cfg: GPTConfig, tc: TrainConfig, seed: int) -> dict[str, Any]:
    train, val = data()
    torch.manual_seed(seed)
    model = GPT(cfg)
    curve = Curve()
    res = Trainer(model, train, val, tc, callbacks=[curve]).fit()
    return {
        "steps": [s for s, _ in curve.points],
        "val": [v for _, v in curve.points],
        "tokens_per_step": tc.batch_size * tc.seq_len * tc.grad_accum,
        "tokens_per_s": res.tokens_per_s,
        "final_val": curve.points[-1][1],
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
    }


def first_step_reaching(run: dict[str, Any], target: float) -> int | None:
    for s, v in zip(run["steps"], run["val"], strict=True):
        if v <= target:
            return s
    return None


def plot(path: Path, runs: dict[str, dict[str, Any]], x: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in runs.items():
        xs = r["steps"] if x == "steps" else [s * r["tokens_per_step"] / 1e6 for s in r["steps"]]
        ax.plot(xs, [v / math.log(2) for v in r["val"]], label=name)
    ax.set_xlabel("optimizer steps" if x == "steps" else "training tokens (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


# --------------------------------------------------------------------------- large batch


def large_batch(args: argparse.Namespace) -> dict[str, Any]:
    """AdamW at the base batch against LAMB at 8x and 32x the batch, lr = base_lr x sqrt(k)."""
    base_b = 8 if args.quick else 16
    base_steps = 60 if args.quick else args.base_steps
    cfg = GPTConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_heads=4, max_seq_len=args.seq_len
    )
    seq = args.seq_len
    runs: dict[str, dict[str, Any]] = {}

    def tc(batch: int, steps: int, opt: str, lr: float, warmup: int) -> TrainConfig:
        return TrainConfig(
            steps=steps, batch_size=batch, seq_len=seq, lr=lr, optimizer=opt,
            weight_decay=0.1 if opt == "adamw" else 0.01, warmup_steps=warmup,
            betas=(0.9, 0.95) if opt == "adamw" else (0.9, 0.999),
            eval_every=max(1, steps // 12), eval_windows=64 if args.quick else 256,
            progress=not args.no_progress,
        )  # fmt: skip

    t0 = time.time()
    if args.only_lamb:  # one LAMB arm again, next to the curves of an earlier run in --out
        runs.update(json.loads((Path(args.out) / "large-batch.json").read_text())["runs"])
    else:
        runs[f"AdamW, batch {base_b}"] = train_curve(
            cfg, tc(base_b, base_steps, "adamw", args.adamw_lr, base_steps // 20), 0
        )
        print(f"  AdamW batch {base_b}: final {runs[f'AdamW, batch {base_b}']['final_val']:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    for k, frac in ((8, args.frac8), (32, args.frac32)):
        if args.only_lamb and k != args.only_lamb:
            continue
        steps = max(10, int(base_steps * frac))
        lr = args.lamb_lr * math.sqrt(k)
        t0 = time.time()
        name = f"LAMB, batch {base_b * k} (lr {lr:.3g}, {steps} steps)"
        runs[name] = train_curve(cfg, tc(base_b * k, steps, "lamb", lr, max(1, steps // 10)), 0)
        print(f"  {name}: final {runs[name]['final_val']:.4f} ({time.time() - t0:.0f} s)",
              flush=True)  # fmt: skip
    target = runs[f"AdamW, batch {base_b}"]["final_val"]
    print(f"AdamW's final validation loss: {target:.4f} nats/byte at step {base_steps}")
    for name, r in runs.items():
        s = first_step_reaching(r, target)
        print(f"  {name:<32} reaches it at step {s if s is not None else 'never (in its run)'}; "
              f"final {r['final_val']:.4f}")  # fmt: skip
    out = Path(args.out)
    plot(out / "large_batch_steps.png", runs, "steps", "LAMB at 8x / 32x batch vs AdamW")
    plot(out / "large_batch_tokens.png", runs, "tokens", "the same against training tokens")
    return {"target": target, "runs": runs}


# --------------------------------------------------------------------------- memory


MEM_CHILD = """
import json, sys, time, torch, slimforge
from slimforge.models import GPT, GPTConfig
from slimforge.train import checkpoint_blocks
seq, layers, ckpt, steps, batch = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1",
                                  int(sys.argv[4]), int(sys.argv[5]))
torch.manual_seed(0)
model = GPT(GPTConfig(num_layers=layers, hidden_size=256, num_heads=4, max_seq_len=seq))
if ckpt:
    checkpoint_blocks(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 256, (batch, seq))
def hwm_kb():  # the peak resident set of this process (VmHWM), in KiB
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def reset_hwm():  # writing "5" to clear_refs resets VmHWM to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
reset_hwm()
base = hwm_kb()
times = []
for i in range(steps):
    if i == 1:  # optimizer state and allocator caches now exist: measure one step's own peak
        first_peak = hwm_kb()
        reset_hwm()
        steady = rss_kb()
    t = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
step_peak = hwm_kb()
peak = max(first_peak, step_peak)
print(json.dumps({"peak_kb": peak, "before_kb": base, "step_peak_kb": step_peak,
                  "step_before_kb": steady, "step_s": min(times[1:] or times)}))
"""


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of GPT training at block size 1024, with and without checkpointing (each in a
    fresh process), and the step time, at two batch sizes."""
    seq, layers, steps, batches = (512, 4, 3, (4,)) if args.quick else (1024, 8, 4, (4, 16))
    out: dict[str, Any] = {}
    # glibc keeps freed heap memory, so RSS would keep every high-water mark: large blocks are
    # mapped and unmapped one by one instead, so the resident set follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for batch in batches:
        res = {}
        for ckpt in (False, True):
            proc = subprocess.run(
                [sys.executable, "-c", MEM_CHILD, str(seq), str(layers), "1" if ckpt else "0",
                 str(steps), str(batch)], capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            res["checkpointing" if ckpt else "plain"] = json.loads(
                proc.stdout.strip().splitlines()[-1]
            )
        a, b = res["plain"], res["checkpointing"]
        grow_a, grow_b = a["peak_kb"] - a["before_kb"], b["peak_kb"] - b["before_kb"]
        print(f"GPT {layers} x 256, batch {batch} x {seq} bytes, AdamW, one process each:")
        for name, r in res.items():
            print(f"  {name:<14} peak RSS {r['peak_kb'] / 1024:7.0f} MiB (training adds "
                  f"{(r['peak_kb'] - r['before_kb']) / 1024:6.0f} MiB), step {r['step_s']:.2f} s")  # fmt: skip
        step_a = a["step_peak_kb"] - a["step_before_kb"]
        step_b = b["step_peak_kb"] - b["step_before_kb"]
        print(f"  one step's own peak (activations, gradients, optimizer temporaries): "
              f"{step_a / 1024:.0f} vs {step_b / 1024:.0f} MiB")  # fmt: skip
        print(f"  peak RSS cut {a['peak_kb'] / b['peak_kb']:.2f}x, training memory "
              f"{grow_a / max(grow_b, 1):.2f}x, one step's {step_a / max(step_b, 1):.2f}x; step time "
              f"{b['step_s'] / a['step_s']:.2f}x")  # fmt: skip
        out[f"batch {batch}"] = res
    return out


# --------------------------------------------------------------------------- precision


def precision(args: argparse.Namespace) -> dict[str, Any]:
    steps = 40 if args.quick else 200
    cfg = GPTConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_heads=4, max_seq_len=args.seq_len
    )
    runs = {}
    for prec in ("fp32", "bf16", "fp32", "bf16"):
        tc = TrainConfig(steps=steps, batch_size=16, seq_len=args.seq_len, lr=3e-3, precision=prec,
                         eval_every=0, eval_windows=64 if args.quick else 256,
                         progress=not args.no_progress)  # fmt: skip
        r = train_curve(cfg, tc, 0)
        runs.setdefault(prec, []).append(r)
        print(f"  {prec}: final validation {r['final_val']:.4f} nats/byte, "
              f"{r['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip
    f32, b16 = runs["fp32"], runs["bf16"]
    speed = sum(r["tokens_per_s"] for r in b16) / sum(r["tokens_per_s"] for r in f32)
    print(f"bf16 / fp32 speed {speed:.2f}x; final loss bf16 - fp32 "
          f"{b16[0]['final_val'] - f32[0]['final_val']:+.4f} nats/byte")  # fmt: skip
    return {"runs": runs}


# --------------------------------------------------------------------------- moe


def moe(args: argparse.Namespace) -> dict[str, Any]:
    """Dense vs MoE at equal active parameters and tokens, over seeds."""
    steps = 60 if args.quick else 600
    seeds = (0, 1) if args.quick else (0, 1, 2)
    shape = {"num_layers": args.layers, "hidden_size": args.hidden, "num_heads": 4,
             "max_seq_len": args.seq_len}  # fmt: skip
    runs: dict[str, dict[str, Any]] = {}
    finals: dict[str, list[float]] = {"dense": [], "moe": []}
    for seed in seeds:
        for mlp in ("dense", "moe"):
            cfg = GPTConfig(mlp=mlp, num_experts=8, top_k=2, **shape)
            tc = TrainConfig(steps=steps, batch_size=16, seq_len=args.seq_len, lr=3e-3, seed=seed,
                             eval_every=max(1, steps // 10), eval_windows=64 if args.quick else 256,
                             progress=not args.no_progress)  # fmt: skip
            r = train_curve(cfg, tc, seed)
            runs[f"{mlp}, seed {seed}"] = r
            finals[mlp].append(r["final_val"])
            print(f"  {mlp} seed {seed}: final {r['final_val']:.4f} nats/byte, params "
                  f"{r['params']:,} (active {r['active_params']:,}), {r['tokens_per_s']:,.0f} "
                  "tokens/s", flush=True)  # fmt: skip
    diffs = [m - d for m, d in zip(finals["moe"], finals["dense"], strict=True)]
    spread = max(max(v) - min(v) for v in finals.values())
    print(f"MoE - dense per seed: {', '.join(f'{d:+.4f}' for d in diffs)} nats/byte; "
          f"largest seed spread within one model {spread:.4f}")  # fmt: skip
    plot(Path(args.out) / "moe_vs_dense.png", runs, "tokens", "MoE vs dense, equal active params")
    return {"finals": finals, "diffs": diffs, "spread": spread, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["large-batch", "memory", "precision", "moe", "all"],
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, about a minute each")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--adamw-lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=4, help="GPT size of large-batch/precision/moe")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--frac8", type=float, default=0.5, help="LAMB 8x steps / AdamW steps")
    ap.add_argument("--frac32", type=float, default=0.25, help="LAMB 32x steps / AdamW steps")
    ap.add_argument("--only-lamb", type=int, choices=(8, 32), help="run only this LAMB arm")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument(
        "--base-steps", type=int, default=600, help="AdamW's steps (LAMB: 1/2 at 8x, 1/4 at 32x)"
    )
    ap.add_argument(
        "--lamb-lr", type=float, default=0.0106, help="LAMB lr at the base batch (x sqrt(k))"
    )
    ap.add_argument("--out", default="bench-out/train_engine")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        slimforge.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    jobs = {"large-batch": large_batch, "memory": memory, "precision": precision, "moe": moe}
    chosen = list(jobs) if args.what == "all" else [args.what]
    results = {}
    for name in chosen:
        print(f"== {name}", flush=True)
        results[name] = jobs[name](args)
        Path(args.out, f"{name}.json").write_text(json.dumps(results[name], default=str))
    Path(args.out, "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("command: python benches/python/" + " ".join(Path(sys.argv[0]).name.split()) + " "
          + " ".join(sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
    main()
