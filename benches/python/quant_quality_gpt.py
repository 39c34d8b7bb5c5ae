"""Perplexity of slimforge's own byte-level GPT after INT8/INT4 RTN, GPTQ, AWQ and QAT.

A dense nanoGPT-style model (`slimforge.models.GPT`, GELU MLP by default, SwiGLU with
``--activation swiglu``) is trained on the CPU on the bundled Shakespeare corpus
(`slimforge.data.lm_splits()`: byte level, Hamlet, Macbeth and The Tempest held out), then
quantized with the library's public APIs (`quantize_`, `quantize_gptq`, `quantize_awq`,
`prepare_qat` + `convert`) and evaluated on the held-out plays. Every block linear is quantized;
the tied embedding / LM head stays fp32. Calibration windows come from the training split. The
trained weights are cached as safetensors under ~/.cache/slimforge/gpt/ (key: shape, training
settings and seed), so re-runs skip training.

    PYTHONPATH=python python benches/python/quant_quality_gpt.py --quick     # < 1 minute
    PYTHONPATH=python python benches/python/quant_quality_gpt.py --threads 1 # full table
    PYTHONPATH=python python benches/python/quant_quality_gpt.py --activation swiglu  # Llama-style MLP
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_data import lm_tensors, random_windows  # this directory is on sys.path as a script
from quant_quality import (
    mean_kl,
    print_draw_summary,
    print_summary,
)  # this directory is on sys.path when run as a script
from safetensors.torch import load_model, save_model
from torch import nn

from slimforge.models import GPT, GPTConfig
from slimforge.quant import Int4WeightOnly, Int8WeightOnly, quantize_
from slimforge.quant.awq import AWQ, quantize_awq
from slimforge.quant.gptq import GPTQ, quantize_gptq
from slimforge.quant.qat import QATConfig, convert, prepare_qat


@dataclass(frozen=True)
class TrainSpec:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    steps: int
    batch: int
    lr: float
    seed: int
    activation: str = "gelu"

    def config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=256,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            activation=self.activation,
        )

    def key(self) -> str:
        # Fields at their default are left out, so adding a field with a default keeps the keys
        # of models cached before it existed.
        values = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != f.default
        }
        blob = json.dumps(values, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


QUICK = TrainSpec(
    n_layer=2, n_head=2, n_embd=128, block_size=64, steps=60, batch=16, lr=3e-3, seed=0
)
FULL = TrainSpec(
    n_layer=4, n_head=4, n_embd=256, block_size=128, steps=1200, batch=16, lr=2e-3, seed=0
)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMFORGE_CACHE", Path.home() / ".cache" / "slimforge")) / "gpt"


def train(spec: TrainSpec, data: torch.Tensor) -> tuple[GPT, float]:
    """Trains (AdamW, warm-up + cosine) or loads the cached weights. Returns (model, seconds)."""
    path = cache_dir() / f"quant-gpt-{spec.key()}.safetensors"
    torch.manual_seed(spec.seed)
    model = GPT(spec.config())
    if path.exists():
        load_model(model, str(path))
        print(f"loaded trained weights from {path}")
        return model.eval(), 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
    it = random_windows(data, spec.block_size, spec.batch, torch.Generator().manual_seed(spec.seed))
    warmup = max(1, spec.steps // 20)
    t0 = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        lr = spec.lr * min(1.0, (step + 1) / warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(it)
        _, loss = model(x, y)
        assert loss is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == spec.steps - 1:
            print(f"  train step {step:5d}  loss {loss.item():.4f}", flush=True)
    secs = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    print(f"trained in {secs:.0f} s; cached at {path}")
    return model.eval(), secs


def eval_windows(data: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(n, block + 1) windows spread evenly over `data` (input and next-byte target)."""
    stride = (data.numel() - block - 1) // n
    return torch.stack([data[i * stride : i * stride + block + 1] for i in range(n)])


@torch.no_grad()
def window_stats(
    model: nn.Module, windows: torch.Tensor, batch: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-byte cross-entropy (nats) of each window, float64 (n,), next-byte
    log-probabilities (n, block, 256))."""
    model.eval()
    ces, logps = [], []
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        logits, _ = model(w[:, :-1], w[:, 1:])
        logp = F.log_softmax(logits.float(), -1)
        ce = F.nll_loss(logp.transpose(1, 2), w[:, 1:], reduction="none")
        ces.append(ce.double().mean(dim=1))
        logps.append(logp)
    return torch.cat(ces), torch.cat(logps)


def window_ce(model: nn.Module, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of each window, float64 (n,)."""
    return window_stats(model, windows, batch)[0]


def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-byte cross-entropy) over every position of every window."""
    return math.exp(float(window_ce(model, windows).mean()))


def block_linears(mod: nn.Module, name: str) -> bool:
    """filter_fn: the linears inside the transformer blocks (not the tied LM head)."""
    return isinstance(mod, nn.Linear) and name.startswith("blocks.")


def qat_finetune(
    teacher: nn.Module,
    data: torch.Tensor,
    spec: TrainSpec,
    bits: int,
    gs: int,
    steps: int,
    lr: float,
) -> nn.Module:
    """Distil the fp model into its fake-quantized copy (KL on next-byte distributions), convert."""
    student = copy.deepcopy(teacher)
    prepare_qat(student, QATConfig(bits=bits, group_size=gs), filter_fn=block_linears)
    for p in (student.tok_emb.weight, student.pos_emb.weight):
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    it = random_windows(data, spec.block_size, spec.batch, torch.Generator().manual_seed(99))
    teacher.eval()
    student.train()
    for _ in range(steps):
        x, y = next(it)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(x, y)[0].float(), -1)
        s_logp = F.log_softmax(student(x, y)[0].float(), -1)
        loss = F.kl_div(
            s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    student.eval()
    return convert(student)


Quantizer = Callable[[nn.Module, list[torch.Tensor]], object]


def calib_spread(
    model: nn.Module,
    windows: torch.Tensor,
    ref_logp: torch.Tensor,
    ce_of: dict[str, torch.Tensor],
    kl: dict[str, float],
    rtn_name: str,
    quantizers: dict[str, Quantizer],
    calibration: Callable[[int], list[torch.Tensor]],
    draws: int,
) -> None:
    """Each of ``quantizers`` (keyed by its row in the table, which is draw 0) on calibration
    draws 1 .. draws - 1 too: share of the INT4 RTN gap recovered and KL cut vs RTN per draw,
    then mean, sd and range."""
    base = float(ce_of["fp32"].mean())
    gap, kl_rtn = float(ce_of[rtn_name].mean()) - base, kl[rtn_name]
    print(f"\ncalibration spread over {draws} draws (draw 0 is the table's):")
    for name, quantize in quantizers.items():
        ces, kls = [float(ce_of[name].mean())], [kl[name]]
        for d in range(1, draws):
            m = copy.deepcopy(model)
            quantize(m, calibration(d))
            ce, logp = window_stats(m, windows)
            ces.append(float(ce.mean()))
            kls.append(mean_kl(ref_logp, logp))
        rec = [100 * (1 - (c - base) / gap) for c in ces]
        cut = [100 * (1 - k / kl_rtn) for k in kls]
        for d, (r, k) in enumerate(zip(rec, cut, strict=True)):
            print(f"  {name:<32} draw {d}: recovered {r:6.1f} %, KL {k:5.1f} % below RTN")
        print_draw_summary(name, rec, cut)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and eval, under a minute")
    ap.add_argument(
        "--steps", type=int, default=None, help="training steps (changes the cache key)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--activation",
        default=FULL.activation,
        choices=["gelu", "swiglu"],
        help="MLP of the trained model (swiglu: Llama-style gate/up/down; changes the cache key)",
    )
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-seqs", type=int, default=None, help="calibration windows")
    ap.add_argument(
        "--eval-windows",
        type=int,
        default=None,
        help="held-out windows (default: every byte of the held-out plays; 16 with --quick)",
    )
    ap.add_argument("--qat-steps", type=int, default=None)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--awq-scales",
        default=AWQ.scales,
        choices=["activation", "duo", "both"],
        help="AWQ scale family (default: the library default)",
    )
    ap.add_argument(
        "--calib-draws",
        type=int,
        default=1,
        help="repeat GPTQ and AWQ on this many calibration draws and print the spread",
    )
    args = ap.parse_args()
    if args.calib_draws < 1:
        ap.error("--calib-draws must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = QUICK if args.quick else FULL
    spec = replace(spec, seed=args.seed, steps=args.steps or spec.steps, activation=args.activation)
    calib_seqs = args.calib_seqs or (4 if args.quick else 64)
    qat_steps = args.qat_steps if args.qat_steps is not None else (10 if args.quick else 100)
    gs = args.group_size

    train_data, val_data = lm_tensors()
    n_eval = args.eval_windows or (16 if args.quick else (val_data.numel() - 1) // spec.block_size)
    print(
        f"corpus: {train_data.numel():,} train bytes, {val_data.numel():,} held-out bytes; model "
        f"{spec.n_layer} layers x {spec.n_embd} wide ({spec.activation} MLP), {spec.steps} steps "
        f"of {spec.batch} x {spec.block_size}, seed {spec.seed}; torch {torch.get_num_threads()} threads"
    )
    model, _ = train(spec, train_data)
    print(f"params: {model.num_params():,}")

    windows = eval_windows(val_data, spec.block_size, n_eval)

    def calibration(draw: int) -> list[torch.Tensor]:
        """Draw 0 is the table's calibration set; later draws use other random windows."""
        gen = torch.Generator().manual_seed(1234 + draw)
        it = random_windows(train_data, spec.block_size, 1, gen)
        return [next(it)[0] for _ in range(calib_seqs)]

    calib = calibration(0)
    print(
        f"eval: {n_eval} windows x {spec.block_size} held-out bytes; calibration: {calib_seqs} x "
        f"{spec.block_size} training bytes; INT4 group size {gs}; QAT {qat_steps} steps"
    )

    rows: list[tuple[str, float, float]] = []
    ce_of: dict[str, torch.Tensor] = {}
    kl: dict[str, float] = {}
    ref_logp: list[torch.Tensor] = []

    def record(name: str, m: nn.Module, secs: float) -> float:
        ce, logp = window_stats(m, windows)
        if not ref_logp:
            ref_logp.append(logp)
        ce_of[name] = ce
        kl[name] = mean_kl(ref_logp[0], logp)
        ppl = math.exp(float(ce.mean()))
        rows.append((name, ppl, secs))
        # Paired over windows: how far this row's mean CE is from fp32's, and its standard error.
        d = ce - ce_of["fp32"]
        se = float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
        print(
            f"  {name:<32} ppl {ppl:8.4f}   CE - fp32 {float(d.mean()):+.5f} +- {se:.5f} nats"
            f"   KL {kl[name]:.2e}   ({secs:5.1f} s to quantize)",
            flush=True,
        )
        return ppl

    def timed(fn) -> tuple[nn.Module, float]:  # type: ignore[no-untyped-def]
        m = copy.deepcopy(model)
        t = time.perf_counter()
        out = fn(m)
        return (out if isinstance(out, nn.Module) else m), time.perf_counter() - t

    base = record("fp32", model, 0.0)
    m, s = timed(lambda m: quantize_(m, Int8WeightOnly(no_clip=False), block_linears))
    int8 = record("INT8 RTN per-channel sym", m, s)
    m, s = timed(lambda m: quantize_(m, Int8WeightOnly(symmetric=False), block_linears))
    int8a = record("INT8 RTN per-channel asym", m, s)
    m, s = timed(lambda m: quantize_(m, Int8WeightOnly(no_clip=True), block_linears))
    int8n = record("INT8 RTN per-channel sym no-clip (default)", m, s)
    rtn_name = f"INT4 RTN g{gs}"
    m, s = timed(lambda m: quantize_(m, Int4WeightOnly(group_size=gs), block_linears))
    int4 = record(rtn_name, m, s)
    gptq_cfg = GPTQ(bits=4, group_size=gs)
    awq_cfg = AWQ(bits=4, group_size=gs, scales=args.awq_scales)
    quantizers: dict[str, Quantizer] = {
        f"GPTQ INT4 g{gs} act-order": lambda m, c: quantize_gptq(
            m, gptq_cfg, c, block_linears, False
        ),
        f"AWQ INT4 g{gs} ({args.awq_scales} scales)": lambda m, c: quantize_awq(
            m, awq_cfg, c, block_linears, False
        ),
    }
    gptq_name, awq_name = quantizers
    m, s = timed(lambda m: quantizers[gptq_name](m, calib))
    gptq = record(gptq_name, m, s)
    m, s = timed(lambda m: quantizers[awq_name](m, calib))
    awq = record(awq_name, m, s)
    qat = math.nan
    if qat_steps:
        t = time.perf_counter()
        m = qat_finetune(model, train_data, spec, 4, gs, qat_steps, args.qat_lr)
        qat = record(f"QAT INT4 g{gs} ({qat_steps} steps)", m, time.perf_counter() - t)
    del m
    if args.calib_draws > 1:
        calib_spread(
            model,
            windows,
            ref_logp[0],
            ce_of,
            kl,
            rtn_name,
            quantizers,
            calibration,
            args.calib_draws,
        )

    print_summary(
        base,
        int8,
        int8a,
        int8n,
        int4,
        gptq,
        awq,
        qat,
        "a tiny, barely trained model" if args.quick else None,
        [kl[name] for name, _, _ in rows[4:]],
    )


if __name__ == "__main__":
    main()
