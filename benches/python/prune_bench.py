"""Pruning, side by side: thresholds, unstructured / 2:4 quality, structured speed, 2:4 GEMV,
lottery tickets.

Parts (``--part``, all by default; each finishes in minutes on a laptop-class CPU):

``threshold``: a global magnitude threshold over ``--numel`` parameters (default 100M, in 100
tensors) by `slimforge.prune.global_threshold` (radix selection across the tensors, no copy) vs
`torch.kthvalue` and `torch.sort` on the concatenated ``|w|`` (the concatenation is timed too,
as a user of those has to make it); the three thresholds must agree.

``unstructured``: SmolLM2-135M-Instruct (the dequantized Q4_1 GGUF of the asset wheel, as in
quant_quality.py) pruned at 50 % and at 2:4 by magnitude (per layer), Wanda and SparseGPT
through ``prune_``; perplexity on the Apache-2.0 licence text (windows of 128 tokens),
calibration on ``--calib-seqs`` windows of the GPL-3 licence. SparseGPT's time is printed next to
GPTQ INT4 (group 64) on the same calibration batches.

``structured``: SmolLM2-135M with 30 % of MLP neurons, 25 % of attention heads, 2 of 30 blocks
removed by `prune_structured` (activation importance on the calibration batches): forward time
of a ``(1, 256)`` prompt in plain PyTorch before/after, perplexity before/after and after a short
recovery fine-tune with `slimforge.train.Trainer` on the GPL-3 text (``--recovery-steps``);
Torch-Pruning (`torch_pruning.pruner.MetaPruner` with its default `GroupMagnitudeImportance`) at
the same MLP ratio on the same model, side by side (heads and blocks: it does not apply).
``--model gpt``: the same on the library's own GPT (6 blocks, hidden 192, byte level), trained
first for ``--gpt-train-steps`` `Trainer` steps on the bundled corpus; bits/byte on held-out
plays, forward of an ``(8, 256)`` batch, recovery at ``--gpt-recovery-lr``.

``gemv``: `Sparse24Linear` (2:4, INT8 values + 2-bit indices, per-row scales) vs `QuantLinear`
INT8 (dense) vs fp32 `nn.Linear`, one token, at 1 and 2 threads.

``lottery``: `LotteryTicket` with 20 % of the remaining weights pruned per round, the ticket
trained from the rewound weights vs the same mask with a random re-initialisation, vs dense
accuracy, per seed (``--lottery-seeds``; a plain Adam loop as the user's training function).
``--dataset digits`` (default): scikit-learn digits (8x8), MLP 64-256-256-10, 7 rounds (79 %),
rewound to theta_0. ``--dataset fashion_mnist``: Fashion-MNIST (the pinned Debian package),
LeNet-300-100, ``--lottery-epochs`` per run, rewound to iteration ``--rewind-steps``, rounds to
``--lottery-rounds`` (14: 95.6 %) with re-initialisation controls after ``--lottery-controls``
(7: 79 %, 10: 89 %, 14: 95.6 %).

    PYTHONPATH=python python benches/python/prune_bench.py --threads 2
    PYTHONPATH=python python benches/python/prune_bench.py --part threshold,gemv,lottery
    PYTHONPATH=python python benches/python/prune_bench.py --part lottery --dataset fashion_mnist
    PYTHONPATH=python python benches/python/prune_bench.py --part structured --model gpt
    PYTHONPATH=python python benches/python/prune_bench.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slimforge import _native
from slimforge.bench import best_of, best_times
from slimforge.prune import (
    NM,
    AttentionHeads,
    Blocks,
    LotteryTicket,
    Magnitude,
    MaskCallback,
    MLPNeurons,
    Sparse24Linear,
    SparseGPT,
    Wanda,
    global_threshold,
    make_permanent,
    prune_,
    prune_structured,
    sparsity_report,
)

LICENSES = Path("/usr/share/common-licenses")


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    _native.set_num_threads(n)


# ---------------------------------------------------------------------------- threshold


def part_threshold(numel: int, reps: int) -> None:
    n_tensors = 100
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(numel // n_tensors, generator=g) for _ in range(n_tensors)]
    total = sum(t.numel() for t in ts)
    amount = 0.5
    k = round(amount * total)
    print(
        f"\n## global threshold, {total / 1e6:.0f}M parameters in {n_tensors} tensors, {amount:.0%}"
    )
    t_sf, (thr_sf, _) = best_of(lambda: global_threshold(ts, amount), reps, warmup=True)

    def kth() -> float:
        flat = torch.cat([t.abs().reshape(-1) for t in ts])
        return float(torch.kthvalue(flat, k).values)

    def srt() -> float:
        flat = torch.cat([t.abs().reshape(-1) for t in ts])
        return float(torch.sort(flat).values[k - 1])

    t_kth, thr_kth = best_of(kth, reps)
    t_sort, thr_sort = best_of(srt, reps)
    print(f"{'method':<34} {'seconds':>8} {'vs slimforge':>12}  threshold")
    print(f"{'slimforge global_threshold':<34} {t_sf:8.3f} {1.0:11.1f}x  {thr_sf:.8g}")
    print(f"{'torch.cat + torch.kthvalue':<34} {t_kth:8.3f} {t_kth / t_sf:11.1f}x  {thr_kth:.8g}")
    print(f"{'torch.cat + torch.sort':<34} {t_sort:8.3f} {t_sort / t_sf:11.1f}x  {thr_sort:.8g}")
    assert thr_sf == thr_kth == thr_sort, (thr_sf, thr_kth, thr_sort)


# ---------------------------------------------------------------------------- SmolLM2


def load_smollm2(gguf: str | None) -> tuple[nn.Module, object]:
    from slimforge.data.assets import asset_dir, smollm2_gguf
    from slimforge.models import ByteLevelBPETokenizer, LlamaForCausalLM

    path = Path(gguf) if gguf else smollm2_gguf(asset_dir())
    return LlamaForCausalLM.from_gguf(path), ByteLevelBPETokenizer.from_gguf(path)


def text_windows(tok: object, name: str, seq: int, count: int | None) -> torch.Tensor:
    from slimforge.data.windows import chunk_windows

    ids = torch.tensor(tok.encode((LICENSES / name).read_text()))  # type: ignore[attr-defined]
    w = [x for x in chunk_windows(ids, seq) if len(x) == seq]
    return torch.stack(w if count is None else w[:count])


def ppl(model: nn.Module, ev: torch.Tensor) -> float:
    from slimforge.eval import evaluate_lm

    return evaluate_lm(model, ev, batch_size=4).perplexity


def part_unstructured(args: argparse.Namespace) -> None:
    from slimforge.quant import GPTQ, quantize_

    model, tok = load_smollm2(args.gguf)
    ev = text_windows(tok, "Apache-2.0", 128, args.eval_seqs)
    cal = [w[None] for w in text_windows(tok, "GPL-3", 128, args.calib_seqs)]
    print(
        f"\n## SmolLM2-135M unstructured / 2:4: perplexity on Apache-2.0 ({ev.numel()} tokens), "
        f"calibration {len(cal)} x 128 tokens of GPL-3"
    )
    print(f"{'config':<28} {'perplexity':>10} {'sparsity':>9} {'seconds':>8}")
    print(f"{'dense':<28} {ppl(model, ev):10.2f} {0:9.1%} {0:8.1f}", flush=True)
    rows: list[tuple[str, object, bool]] = [
        ("magnitude 50% (per layer)", Magnitude(0.5, scope="layer"), False),
        ("Wanda 50%", Wanda(0.5), True),
        ("SparseGPT 50%", SparseGPT(0.5), True),
        ("magnitude 2:4", NM(2, 4), False),
        ("Wanda 2:4", Wanda(n=2, m=4), True),
        ("SparseGPT 2:4", SparseGPT(n=2, m=4), True),
    ]
    if args.quick:
        rows = rows[:3]
    for name, cfg, calibrated in rows:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        prune_(m, cfg, cal if calibrated else None, progress=False)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        sp = sparsity_report(m).sparsity
        print(f"{name:<28} {ppl(m, ev):10.2f} {sp:9.1%} {dt:8.1f}", flush=True)
        del m
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_(m, GPTQ(bits=4, group_size=64), cal)
    dt = time.perf_counter() - t0
    print(f"{'GPTQ INT4 g64 (time peer)':<28} {ppl(m, ev):10.2f} {'-':>9} {dt:8.1f}", flush=True)


# ---------------------------------------------------------------------------- structured


def recover(model: nn.Module, train_ids: torch.Tensor, steps: int, lr: float = 5e-5) -> None:
    from slimforge.train import TrainConfig, Trainer

    cfg = TrainConfig(
        steps=steps,
        batch_size=4,
        seq_len=128,
        lr=lr,
        weight_decay=0.0,
        warmup_steps=2,
        log_every=max(1, steps),
        progress=False,
    )
    Trainer(model, train_ids, config=cfg, callbacks=[MaskCallback()]).fit()


def torch_pruning_mlp(model: nn.Module, amount: float, example: torch.Tensor) -> str | None:
    """Torch-Pruning at ``amount`` of the MLP neurons (everything else ignored); None or the
    reason it could not run."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        return f"torch-pruning not installed ({e})"
    ignored = [
        mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Embedding)) and ".mlp." not in f".{name}."
    ]
    ignored += [
        mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.endswith(("down_proj", "mlp.proj"))
    ]
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=amount,
            ignored_layers=ignored,
            output_transform=lambda out: out.logits,
        )
        pruner.step()
    except Exception as e:  # a peer failure is a printed row, not a crash
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def part_structured(args: argparse.Namespace) -> None:
    if args.model == "gpt":
        part_structured_gpt(args)
        return
    model, tok = load_smollm2(args.gguf)
    ev = text_windows(tok, "Apache-2.0", 128, args.eval_seqs)
    cal = [w[None] for w in text_windows(tok, "GPL-3", 128, args.calib_seqs)]
    train_ids = torch.tensor(tok.encode((LICENSES / "GPL-3").read_text()))  # type: ignore[attr-defined]
    prompt = ev.reshape(-1)[:256][None]
    print(
        f"\n## SmolLM2-135M structured: forward (1, 256), perplexity on Apache-2.0, "
        f"recovery {args.recovery_steps} Trainer steps (batch 4 x 128, GPL-3 text, lr 5e-5)"
    )
    blocks = len(model.spec().block_list(model))  # type: ignore[operator]
    structured_table(model, ev, cal, train_ids, prompt, args, blocks, lr=5e-5, bpb=False)


def part_structured_gpt(args: argparse.Namespace) -> None:
    """The library's own GPT: trained here on the bundled corpus (byte level), then the same
    three structured cuts and the Torch-Pruning peer."""
    from slimforge.data import lm_splits
    from slimforge.data.windows import byte_tokens, spaced_windows
    from slimforge.models import GPT, GPTConfig
    from slimforge.train import TrainConfig, Trainer

    tr, va = lm_splits()
    train_ids = byte_tokens(tr)
    ev = spaced_windows(byte_tokens(va), 128, 8 if args.quick else args.gpt_eval_seqs)
    n_cal = args.calib_seqs
    cal = [w[None] for w in spaced_windows(train_ids, 128, n_cal)]
    layers, hidden, heads = (2, 64, 4) if args.quick else (6, 192, 4)
    cfg = GPTConfig(
        num_layers=layers, hidden_size=hidden, num_heads=heads, max_seq_len=256, position="rope"
    )
    torch.manual_seed(1234)
    model = GPT(cfg)
    steps = 10 if args.quick else args.gpt_train_steps
    t0 = time.perf_counter()
    ckpt = Path(args.gpt_checkpoint) if args.gpt_checkpoint else None
    how = "trained"
    if ckpt is not None and ckpt.is_file():  # the same model, trained by an earlier run
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        how = f"loaded from {ckpt} (trained {steps} steps earlier)"
    else:
        tcfg = TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=3e-3, progress=False)
        Trainer(model, train_ids, None, tcfg).fit()
        if ckpt is not None:
            from slimforge.io import atomic_path

            with atomic_path(ckpt) as tmp:
                torch.save(model.state_dict(), tmp)
        how = f"trained {steps} steps in {time.perf_counter() - t0:.0f} s"
    model.eval()
    prompt = spaced_windows(byte_tokens(va), 256, 8)
    print(
        f"\n## slimforge GPT ({layers} blocks, hidden {hidden}, {heads} heads, byte level) on "
        f"16 x 128-byte batches of the bundled corpus, {how}; forward {tuple(prompt.shape)}, "
        f"bits/byte on {ev.shape[0]} x 128 held-out bytes (Hamlet, Macbeth, Tempest); "
        f"calibration {n_cal} x 128 training bytes; "
        f"recovery {args.recovery_steps} Trainer steps (batch 4 x 128, "
        f"lr {args.gpt_recovery_lr:g})",
        flush=True,
    )
    structured_table(
        model, ev, cal, train_ids, prompt, args, layers, lr=args.gpt_recovery_lr, bpb=True
    )


def structured_table(
    model: nn.Module,
    ev: torch.Tensor,
    cal: list[torch.Tensor],
    train_ids: torch.Tensor,
    prompt: torch.Tensor,
    args: argparse.Namespace,
    n_blocks: int,
    lr: float,
    bpb: bool,
) -> None:
    """Forward time, quality and quality after recovery of the three structured cuts and the
    Torch-Pruning MLP peer, next to the dense model and its recovery control."""
    import math

    def quality(m: nn.Module) -> float:
        p = ppl(m, ev)
        return math.log2(p) if bpb else p

    unit = "bits/byte" if bpb else "ppl"
    reps = 2 if args.quick else 5
    nb = 2
    cases: list[tuple[str, Callable[[nn.Module], str | None]]] = [
        ("slimforge MLP neurons 30%", lambda m: _sf(m, MLPNeurons(0.3), cal)),
        ("torch-pruning MLP neurons 30%", lambda m: torch_pruning_mlp(m, 0.3, prompt[:1])),
        ("slimforge attention heads 25%", lambda m: _sf(m, AttentionHeads(0.25), cal)),
        (f"slimforge {nb} of {n_blocks} blocks", lambda m: _sf(m, Blocks(nb), cal)),
    ]
    if args.quick:
        cases = cases[:2]
    models: dict[str, nn.Module] = {"dense": model}
    rows: dict[str, tuple[float, float, float]] = {}  # name: params, quality, recovered
    rows["dense"] = (sum(p.numel() for p in model.parameters()), quality(model), float("nan"))
    for name, fn in cases:
        m = copy.deepcopy(model)
        err = fn(m)
        if err is not None:
            print(f"{name:<36} could not run: {err}", flush=True)
            continue
        p = quality(m)
        recover(m, train_ids, args.recovery_steps, lr)
        rows[name] = (sum(q.numel() for q in m.parameters()), p, quality(m))
        models[name] = m.eval()  # recovery changes no shape: timed after it, with the others
        print(f"{name:<36} {unit} {p:.3f}, recovered {rows[name][2]:.3f}", flush=True)
    m = copy.deepcopy(model)
    recover(m, train_ids, args.recovery_steps, lr)
    control = quality(m)
    del m
    # Forward times: the models take turns (best of reps each), so load on a shared host falls
    # on all of them alike.
    with torch.inference_mode():
        times = best_times({k: (lambda v=v: v(prompt)) for k, v in models.items()}, reps)
    print(
        f"{'config':<36} {'params':>7} {'fwd ms':>7} {'speed-up':>8} {unit:>9} "
        f"{'recovered':>10}  (forward {tuple(prompt.shape)}, best of {reps}, taking turns)"
    )
    for name, (n, p, pr) in rows.items():
        t = times[name]
        rec = f"{pr:10.3f}" if pr == pr else f"{'-':>10}"
        print(
            f"{name:<36} {n / 1e6:6.2f}M {t * 1e3:7.1f} {times['dense'] / t:7.2f}x {p:9.3f} {rec}",
            flush=True,
        )
    print(
        f"{'dense + same recovery (control)':<36} {'':>7} {'':>7} {'':>8} {'':>9} {control:10.3f}"
    )


def _sf(model: nn.Module, cfg: object, cal: list[torch.Tensor]) -> None:
    prune_structured(model, cfg, cal)  # type: ignore[arg-type]
    return None


# ---------------------------------------------------------------------------- 2:4 GEMV


def time_layer(layer: nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.inference_mode():
        t, _ = best_of(lambda: layer(x), reps, warmup=True)
    return t


def part_gemv(args: argparse.Namespace) -> None:
    from slimforge.quant import QuantLinear

    shapes = [(576, 1536), (4096, 4096)] if not args.quick else [(576, 1536)]
    reps = 50 if not args.quick else 5
    print("\n## 2:4 compressed GEMV (one token), best of", reps)
    print(
        f"{'out x in':<12} {'threads':>7} {'fp32 ms':>8} {'INT8 ms':>8} {'2:4 INT8 ms':>11} {'2:4 vs INT8':>11} {'2:4 vs fp32':>11}"
    )
    for out, k in shapes:
        g = torch.Generator().manual_seed(out + k)
        lin = nn.Linear(k, out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out, k, generator=g) * 0.05)
        prune_(lin, NM(2, 4), progress=False)
        make_permanent(lin)
        q8 = QuantLinear.from_float(lin, bits=8, group_size=None)
        s8 = Sparse24Linear.from_linear(lin, bits=8, group_size=None)
        x = torch.randn(1, k, generator=g)
        for threads in (1, 2):
            set_threads(threads)
            tf, tq, ts = (time_layer(layer, x, reps) for layer in (lin, q8, s8))
            with torch.inference_mode():
                ys = s8(x)
            err = float((ys - lin(x).detach()).abs().max())
            print(
                f"{out}x{k:<7} {threads:>7} {tf * 1e3:8.3f} {tq * 1e3:8.3f} {ts * 1e3:11.3f} "
                f"{tq / ts:10.2f}x {tf / ts:10.2f}x  (max |2:4 - fp32| {err:.2e})",
                flush=True,
            )
    set_threads(args.threads)


# ---------------------------------------------------------------------------- lottery


def _lottery_data(dataset: str, quick: bool) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as float features in [0, 1] and int64 labels."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        return x[:1200], y[:1200], x[1200:], y[1200:]
    from slimforge.data import fashion_mnist

    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    if quick:
        xtr, ytr, xte, yte = xtr[:6000], ytr[:6000], xte[:2000], yte[:2000]
    flat = [t.reshape(len(t), -1).float() / 255.0 for t in (xtr, xte)]
    return flat[0], ytr.long(), flat[1], yte.long()


def part_lottery(args: argparse.Namespace) -> None:
    """Iterative magnitude pruning (20 % of the remaining weights per round) with rewinding;
    the ticket vs the same mask randomly re-initialised vs dense, per seed. ``digits``: MLP
    64-256-256-10, rewound to theta_0, 7 rounds. ``fashion_mnist``: LeNet-300-100 (Frankle &
    Carbin's MNIST net), rewound to iteration ``--rewind-steps`` ("late resetting"), rounds
    to ``--lottery-rounds`` with re-initialisation controls at the rounds ``--lottery-controls``
    (round 7: 79 % sparse; the later ones are the extra, higher sparsities)."""
    from slimforge.prune import apply_masks

    xtr, ytr, xte, yte = _lottery_data(args.dataset, args.quick)
    n_train = len(xtr)
    if args.dataset == "digits":
        epochs, batch, lr, rewind_steps = (10 if args.quick else 40), 64, 1e-3, 0
        rounds, controls = (2, [2]) if args.quick else (7, [7])  # 1 - 0.8^7 = 79 %
        sizes = [64, 256, 256, 10]
    else:
        epochs, batch, lr, rewind_steps = args.lottery_epochs, 60, 1.2e-3, args.rewind_steps
        rounds = 2 if args.quick else args.lottery_rounds
        controls = [2] if args.quick else [int(c) for c in args.lottery_controls.split(",")]
        sizes = [784, 300, 100, 10]
        if args.quick:
            epochs, rewind_steps = 1, 10
    steps_per_epoch = -(-n_train // batch)
    total = epochs * steps_per_epoch

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers)

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean()) * 100

    def train(model: nn.Module, seed: int, steps: int, at_step: Callable[[int], None]) -> float:
        # The user's training function (plain Adam on minibatches): LotteryTicket.run takes any
        # callable; apply_masks after each step keeps the pruned weights at zero.
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        step = 0
        while step < steps:
            order = torch.randperm(n_train, generator=g)
            for i in range(0, n_train, batch):
                if step == steps:
                    break
                at_step(step)
                idx = order[i : i + batch]
                opt.zero_grad()
                nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
                apply_masks(model)
                step += 1
        return accuracy(model)

    rewind = "theta_0" if rewind_steps == 0 else f"iteration {rewind_steps}"
    print(
        f"\n## Lottery ticket: {args.dataset} ({n_train} train / {len(xte)} test), MLP "
        f"{'-'.join(map(str, sizes))}, Adam {lr:g}, batch {batch}, {epochs} epochs "
        f"({total} steps) per run, 20 % of the remaining weights per round x {rounds}, "
        f"rewound to {rewind}; random re-init controls after rounds {controls}",
        flush=True,
    )
    print(
        f"{'seed':>4} {'round':>5} {'sparsity':>8} {'ticket (rewound) %':>18} "
        f"{'random re-init %':>16} {'dense %':>8}",
        flush=True,
    )
    for seed in args.lottery_seeds:
        model = make(seed)
        ticket = LotteryTicket(model, rate=0.2)
        dense: list[float] = []

        def run_round(
            m: nn.Module, s: int = seed, t: LotteryTicket = ticket, dense: list[float] = dense
        ) -> float:
            r = t.rounds_done
            if r == 0:  # the dense run: takes the rewind point at iteration rewind_steps
                acc = train(
                    m, s, total, lambda i: t.set_rewind_point() if i == rewind_steps else None
                )
                dense.append(acc)
                print(f"{s:>4} {0:>5} {0:8.1%} {'':>18} {'':>16} {acc:8.2f}", flush=True)
                return acc
            rand = float("nan")
            if r in controls:  # same mask, fresh weights, the full budget from scratch
                ctrl = copy.deepcopy(t)
                ctrl.reinitialize(s + 1000)
                rand = train(ctrl.model, s, total, lambda i: None)
            acc = train(m, s, total - rewind_steps, lambda i: None)
            rand_s = f"{rand:16.2f}" if rand == rand else f"{'-':>16}"
            print(
                f"{s:>4} {r:>5} {t.sparsity:8.1%} {acc:18.2f} {rand_s} {dense[0]:8.2f}",
                flush=True,
            )
            return acc

        ticket.run(run_round, rounds)


PARTS = {
    "threshold": lambda a: part_threshold(a.numel, 1 if a.quick else 3),
    "unstructured": part_unstructured,
    "structured": part_structured,
    "gemv": part_gemv,
    "lottery": part_lottery,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the asset wheel)")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--eval-seqs", type=int, default=None, help="default: every Apache-2.0 window")
    ap.add_argument("--recovery-steps", type=int, default=30)
    ap.add_argument(
        "--model", choices=("smollm2", "gpt"), default="smollm2", help="structured: which model"
    )
    ap.add_argument("--gpt-train-steps", type=int, default=300, help="structured --model gpt")
    ap.add_argument("--gpt-eval-seqs", type=int, default=128, help="structured --model gpt")
    ap.add_argument(
        "--gpt-recovery-lr",
        type=float,
        default=3e-4,
        help="structured --model gpt (3e-4: the lr its training schedule ends at)",
    )
    ap.add_argument(
        "--gpt-checkpoint", default=None, help="structured --model gpt: load / save the trained GPT"
    )
    ap.add_argument(
        "--dataset", choices=("digits", "fashion_mnist"), default="digits", help="lottery data"
    )
    ap.add_argument(
        "--lottery-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2]
    )
    ap.add_argument("--lottery-epochs", type=int, default=5, help="fashion_mnist: per run")
    ap.add_argument("--lottery-rounds", type=int, default=14, help="fashion_mnist: 14 = 95.6 %%")
    ap.add_argument(
        "--lottery-controls", default="7,10,14", help="fashion_mnist: rounds with a re-init run"
    )
    ap.add_argument("--rewind-steps", type=int, default=250, help="fashion_mnist: rewind point")
    args = ap.parse_args()
    if args.quick:
        args.numel = min(args.numel, 2_000_000)
        args.calib_seqs = min(args.calib_seqs, 2)
        args.eval_seqs = 2
        args.recovery_steps = min(args.recovery_steps, 2)
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for p in args.part.split(","):
        if p not in PARTS:
            raise SystemExit(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
        PARTS[p](args)


if __name__ == "__main__":
    main()
