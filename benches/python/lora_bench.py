"""LoRA and QLoRA on SmolLM2-135M (from its GGUF): what trains, what it costs, what it buys.

    python benches/python/lora_bench.py            # the full run (about an hour on 2 cores)
    python benches/python/lora_bench.py --quick    # first 2 blocks, a few steps (< 3 minutes)
    python benches/python/lora_bench.py --batch 2 --seq-len 64 --speed-steps 3 \
        --curve-steps 40 --no-checkpointing        # the whole model in about 15 minutes

1. Trainable share of LoRA r=8 on q/k/v/o/gate/up/down (slimforge's count and peft's).
2. Step time and peak memory, same model, same batch, one fresh process per engine, engines
   alternated over rounds (best step time of the rounds): full fine-tuning (AdamW), slimforge
   LoRA, peft's LoRA on the same slimforge model, peft on transformers' twin of the model (as
   peft users run it), slimforge QLoRA on the INT4 base; without and with activation
   checkpointing.
3. Fine-tuning on the King James Bible (Debian sword-text-kjv via diatheke; Milton from the
   bundled corpus when diatheke is missing): held-out perplexity curves of LoRA on the float
   base and QLoRA on the INT4 base, then QLoRA merged into INT4 by RTN and by GPTQ.

Results go to --out (JSON). Needs the SmolLM2 asset (make assets), peft and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HELD_OUT_BOOKS = ("Ruth", "Ecclesiastes", "John", "Hebrews")


# ------------------------------------------------------------------------------ data


def kjv_text() -> tuple[str, str, str]:
    """(train text, held-out text, source) of the KJV: verses joined per chapter, whole books
    held out; Milton's works from the bundled corpus when diatheke is not installed."""
    if shutil.which("diatheke") is None:
        from slimforge.data import load_corpus

        docs = [r["text"] for r in load_corpus(["milton"])]
        cut = int(len(docs) * 0.9)
        print("(diatheke not found: `apt-get install sword-text-kjv diatheke` for the KJV; "
              "using Milton's works from the bundled corpus)")  # fmt: skip
        return "\n\n".join(docs[:cut]), "\n\n".join(docs[cut:]), "milton (bundled corpus)"
    out = subprocess.run(
        ["diatheke", "-b", "engKJV2006eb", "-f", "plain", "-k", "Gen 1:1-Rev 22:21"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    verse = re.compile(r"^\s*(.+?) (\d+):(\d+): (.*)$")
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in out.splitlines():
        m = verse.match(line)
        if m:
            text = m.group(4).replace("¶", "").strip()
            chapters.setdefault((m.group(1), m.group(2)), []).append(text)
    train, held = [], []
    for (book, _), verses in chapters.items():
        (held if book in HELD_OUT_BOOKS else train).append(" ".join(verses))
    return "\n\n".join(train), "\n\n".join(held), "KJV (sword-text-kjv, engKJV2006eb)"


def token_data(quick: bool) -> dict[str, Any]:
    from slimforge.data.assets import smollm2_gguf
    from slimforge.models import ByteLevelBPETokenizer

    train, held, source = kjv_text()
    tok = ByteLevelBPETokenizer.from_gguf(smollm2_gguf())
    if quick:
        train, held = train[:400_000], held[:100_000]
    return {
        "train": torch.tensor(tok.encode(train)),
        "held": torch.tensor(tok.encode(held)),
        "source": source,
    }


# ------------------------------------------------------------------------------ workers


def hwm_kib() -> int:
    """The peak resident set of this process (VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def build(engine: str, layers: int | None, r: int, alpha: float, checkpointing: bool) -> Any:
    """The model (or peft wrapper) an engine trains, and the parameters its optimizer gets."""
    from slimforge.data.assets import smollm2_gguf
    from slimforge.lora import LoraConfig, apply_lora, hf_state_dict, trainable_parameters
    from slimforge.models import LlamaForCausalLM
    from slimforge.quant import Int4WeightOnly, quantize_
    from slimforge.train import checkpoint_blocks

    model = LlamaForCausalLM.from_gguf(smollm2_gguf(), num_layers=layers, attn_impl="sdpa")
    if engine == "full":
        model.requires_grad_(True)
        return model, list(model.parameters())
    if engine in ("lora", "qlora"):
        if engine == "qlora":
            quantize_(model, Int4WeightOnly(group_size=64), progress=False)
        apply_lora(model, LoraConfig(r=r, alpha=alpha, target_modules=LINEARS))
        return model, trainable_parameters(model)
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LINEARS), lora_dropout=0.0,
                          init_lora_weights="gaussian")  # fmt: skip
    if engine == "peft":  # peft's LoRA on the very same slimforge model
        if checkpointing:
            checkpoint_blocks(model)
        return peft.get_peft_model(model, cfg), None
    import transformers  # engine == "peft-hf": peft on transformers' Llama, as its users run it

    c = model.cfg
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_seq_len,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hcfg)
    hf.load_state_dict(hf_state_dict(model))
    del model
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft.get_peft_model(hf, cfg), None


def speed_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Step times and memory of one engine: Trainer steps on random windows of the text."""
    from slimforge.lora import parameter_counts
    from slimforge.train import Callback, TrainConfig, Trainer

    torch.manual_seed(0)
    data = torch.load(spec["data"], weights_only=True)
    ckpt = spec["checkpointing"]
    model, params = build(spec["engine"], spec["layers"], spec["r"], spec["alpha"], ckpt)
    trainable, total = parameter_counts(model)
    stamps: list[float] = []

    class Clock(Callback):
        def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
            stamps.append(time.perf_counter())

    full = spec["engine"] == "full"
    cfg = TrainConfig(
        steps=spec["warmup"] + spec["steps"], batch_size=spec["batch"], seq_len=spec["seq_len"],
        lr=5e-5 if full else 1e-3, weight_decay=0.0, progress=False,
        checkpointing=ckpt and spec["engine"] in ("full", "lora", "qlora"),
    )  # fmt: skip
    trainer = Trainer(model, data["train"], config=cfg, params=params, callbacks=[Clock()])
    reset_hwm()
    before = hwm_kib()  # the resident set of the loaded model, just before training
    start = time.perf_counter()
    trainer.fit()
    times = [b - a for a, b in zip([start, *stamps], stamps, strict=False)][spec["warmup"] :]
    dequant_s = None
    if spec["engine"] == "qlora":  # what the INT4 base costs per step: two dequantizations a layer
        from slimforge.quant import QuantLinear

        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        t0 = time.perf_counter()
        for m in layers:
            m.dequantize()
            m.dequantize()
        dequant_s = time.perf_counter() - t0
    return {
        "engine": spec["engine"], "step_s": statistics.median(times), "steps": len(times),
        "dequant_s": dequant_s,
        "peak_mib": hwm_kib() / 1024, "model_mib": before / 1024,
        "trainable": trainable, "total": total,
    }  # fmt: skip


def pair_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """slimforge LoRA and peft's LoRA on two copies of one model in one process, their training
    steps (forward, backward, AdamW) taking turns on the same batches: a step-time ratio that a
    busy host's load swings affect alike. Best step of each after one warm-up step."""
    import copy

    import peft

    from slimforge.lora import LoraConfig, apply_lora, trainable_parameters

    torch.manual_seed(0)
    data = torch.load(spec["data"], weights_only=True)["train"]
    model, _ = build("full", spec["layers"], spec["r"], spec["alpha"], False)
    model.requires_grad_(False)
    ours = apply_lora(copy.deepcopy(model), LoraConfig(r=spec["r"], alpha=spec["alpha"],
                      target_modules=LINEARS))  # fmt: skip
    cfg = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=list(LINEARS),
                          init_lora_weights="gaussian")  # fmt: skip
    theirs = peft.get_peft_model(model, cfg)
    engines = {
        "lora": (ours, torch.optim.AdamW(trainable_parameters(ours), lr=1e-3)),
        "peft": (theirs, torch.optim.AdamW(
            [p for p in theirs.parameters() if p.requires_grad], lr=1e-3)),
    }  # fmt: skip
    n, b, t = spec["steps"] + 1, spec["batch"], spec["seq_len"]
    starts = torch.randint(0, data.numel() - t, (n, b))
    times: dict[str, list[float]] = {k: [] for k in engines}
    for i in range(n):
        batch = torch.stack([data[s : s + t] for s in starts[i].tolist()])
        for key in list(engines) if i % 2 == 0 else list(engines)[::-1]:
            m, opt = engines[key]
            t0 = time.perf_counter()
            m(batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[key].append(time.perf_counter() - t0)
    return {k: {"best_s": min(v[1:]), "median_s": statistics.median(v[1:])}
            for k, v in times.items()}  # fmt: skip


def curve_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Held-out perplexity every `eval_every` steps, memory, and (QLoRA) the merged INT4
    model's perplexity after RTN and GPTQ re-quantization."""
    import copy

    from slimforge.data.windows import spaced_windows
    from slimforge.eval import evaluate_lm
    from slimforge.lora import merge_and_unload
    from slimforge.train import Callback, TrainConfig, Trainer

    torch.manual_seed(0)
    data = torch.load(spec["data"], weights_only=True)
    held = spaced_windows(data["held"], spec["seq_len"], spec["eval_windows"])
    model, params = build(spec["engine"], spec["layers"], spec["r"], spec["alpha"], False)
    points: list[tuple[int, float]] = []

    class Curve(Callback):
        def on_eval(self, trainer: Any, step: int, result: Any) -> None:
            points.append((step, result.perplexity))

    full = spec["engine"] == "full"
    cfg = TrainConfig(
        steps=spec["steps"], batch_size=spec["batch"], seq_len=spec["seq_len"],
        lr=5e-5 if full else 1e-3, weight_decay=0.0, eval_every=spec["eval_every"],
        eval_windows=spec["eval_windows"], progress=False,
    )  # fmt: skip
    reset_hwm()
    res = Trainer(model, data["train"], held, cfg, params=params, callbacks=[Curve()]).fit()
    out: dict[str, Any] = {
        "engine": spec["engine"], "steps": [s for s, _ in points],
        "perplexity": [p for _, p in points], "peak_mib": hwm_kib() / 1024,
        "tokens_per_s": res.tokens_per_s,
    }  # fmt: skip
    if spec["engine"] == "qlora":
        n = spec["calibration_windows"]
        calibration = list(spaced_windows(data["train"], spec["seq_len"], n).split(4))
        for method in ("rtn", "gptq"):
            merged = copy.deepcopy(model)
            errors = merge_and_unload(
                merged, requantize=method, calibration=calibration if method == "gptq" else None
            )
            out[f"merged_{method}"] = {
                "perplexity": evaluate_lm(merged, held, batch_size=spec["batch"]).perplexity,
                "weight_error": statistics.mean(e.weight_error for e in errors.values()),
                "delta_error": statistics.mean(e.delta_error for e in errors.values()),
            }
    return out


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker {spec.get('engine')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks, a few steps (< 3 minutes)")
    ap.add_argument("--out", default="lora_bench.json")
    ap.add_argument("--rounds", type=int, default=None, help="speed rounds (best is kept)")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N blocks")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--speed-steps", type=int, default=None, help="timed steps per engine")
    ap.add_argument("--curve-steps", type=int, default=None, help="fine-tuning steps per curve")
    ap.add_argument("--no-checkpointing", action="store_true", help="skip the +ckpt runs")
    ap.add_argument("--no-peft-hf", action="store_true", help="skip peft on transformers")
    ap.add_argument("--curve-engines", default="lora,qlora", help="lora, qlora or both")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows")
    ap.add_argument("--calibration-windows", type=int, default=None, help="GPTQ merge")
    ap.add_argument(
        "--parts", default="speed,curves", help="comma-separated: speed (incl. pairs), curves"
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 16))
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"speed": speed_worker, "pair": pair_worker, "curve": curve_worker}[kind]
        print(json.dumps(fn(spec)))
        return

    q = args.quick

    def pick(given: int | None, quick: int | None, full: int | None) -> int | None:
        return given if given is not None else quick if q else full

    layers = pick(args.layers, 2, None)
    base = {"layers": layers, "r": 8, "alpha": 16.0, "batch": pick(args.batch, 2, 4),
            "seq_len": pick(args.seq_len, 64, 128)}  # fmt: skip
    rounds = args.rounds or (1 if q else 2)
    engines = ["full", "lora", "peft", "qlora"] + ([] if q or args.no_peft_hf else ["peft-hf"])
    ckpt_modes = [False] if q or args.no_checkpointing else [False, True]
    speed_steps = pick(args.speed_steps, 2, 4)
    load = os.getloadavg()
    print(f"SmolLM2-135M{f' (first {layers} blocks)' if layers else ''}, torch threads "
          f"{torch.get_num_threads()}, load average {load[0]:.1f} at start")  # fmt: skip
    data = token_data(q)
    tmp = Path(args.out).with_suffix(".tokens.pt")
    torch.save({k: data[k] for k in ("train", "held")}, tmp)
    print(f"text: {data['source']}: {data['train'].numel():,} training tokens, "
          f"{data['held'].numel():,} held-out tokens")  # fmt: skip
    results: dict[str, Any] = {"quick": q, "source": data["source"], **base}

    parts = set(args.parts.split(","))
    if "speed" in parts:
        # 2. speed and memory
        speed: dict[str, dict[str, Any]] = {}
        for ckpt in ckpt_modes:
            for rnd in range(rounds):
                order = engines if rnd % 2 == 0 else engines[::-1]
                for eng in order:
                    spec = {**base, "engine": eng, "data": str(tmp), "checkpointing": ckpt,
                            "warmup": 1 if q else 2, "steps": speed_steps}  # fmt: skip
                    r = run_worker("speed", spec)
                    key = f"{eng}{' +ckpt' if ckpt else ''}"
                    if key not in speed or r["step_s"] < speed[key]["step_s"]:
                        speed[key] = r
                    print(f"  round {rnd + 1} {key:<14} step {r['step_s']:.2f} s, peak "
                          f"{r['peak_mib']:.0f} MiB", flush=True)  # fmt: skip
        results["speed"] = speed
        lora = speed["lora"]
        print(f"\n1. trainable: {lora['trainable']:,} of {lora['total']:,} parameters "
              f"({100 * lora['trainable'] / lora['total']:.2f}%); peft on the same model: "
              f"{speed['peft']['trainable']:,}")  # fmt: skip
        print(f"\n2. batch {base['batch']} x {base['seq_len']} tokens, median step of "
              f"{speed['lora']['steps']} after warm-up, best of {rounds} round(s); peak RSS of the "
              "process (model load included) and what training adds to the loaded model")  # fmt: skip
        for key, r in speed.items():
            ref = speed["full +ckpt" if "ckpt" in key else "full"]
            print(f"  {key:<14} step {r['step_s']:6.2f} s ({r['step_s'] / ref['step_s']:.2f}x full)"
                  f"  peak {r['peak_mib']:6.0f} MiB ({ref['peak_mib'] / r['peak_mib']:.2f}x below "
                  f"full)  training adds {r['peak_mib'] - r['model_mib']:6.0f} MiB")  # fmt: skip
        ql = speed["qlora"]
        print(f"  QLoRA: dequantizing the INT4 base (forward + backward) takes {ql['dequant_s']:.2f} s "
              f"a step ({100 * ql['dequant_s'] / ql['step_s']:.0f}% of the step)")  # fmt: skip
        for suffix in ("", " +ckpt"):
            if "lora" + suffix in speed:
                ratio = speed["lora" + suffix]["step_s"] / speed["peft" + suffix]["step_s"]
                print(f"  slimforge LoRA / peft LoRA step time{suffix}: {ratio:.2f}")
        pair = run_worker("pair", {**base, "data": str(tmp), "steps": speed_steps})
        results["pair"] = pair
        ratio = pair["lora"]["best_s"] / pair["peft"]["best_s"]
        print(f"  one process, steps taking turns: slimforge LoRA best {pair['lora']['best_s']:.2f} s, "
              f"peft best {pair['peft']['best_s']:.2f} s; ratio {ratio:.2f}")  # fmt: skip

    if "curves" in parts:
        # 3. curves
        steps = pick(args.curve_steps, 8, 150)
        assert steps is not None
        cspec = {**base, "data": str(tmp), "steps": steps, "eval_every": max(1, steps // 3),
                 "eval_windows": pick(args.eval_windows, 8, 48),
                 "calibration_windows": pick(args.calibration_windows, 8, 32)}  # fmt: skip
        curves = {
            eng: run_worker("curve", {**cspec, "engine": eng})
            for eng in args.curve_engines.split(",")
        }
        results["curves"] = curves
        print(f"\n3. held-out {data['source']} perplexity, {steps} steps of batch "
              f"{base['batch']} x {base['seq_len']}, lr 1e-3, r 8, alpha 16:")  # fmt: skip
        for eng, c in curves.items():
            pts = ", ".join(
                f"{s}: {p:.2f}" for s, p in zip(c["steps"], c["perplexity"], strict=True)
            )
            print(f"  {eng:<6} peak {c['peak_mib']:.0f} MiB  {pts}")
        for method in ("rtn", "gptq") if "qlora" in curves else ():
            m = curves["qlora"][f"merged_{method}"]
            print(f"  qlora merged into INT4 by {method}: perplexity {m['perplexity']:.2f} "
                  f"(weight error {m['weight_error']:.4f}, adapter change lost "
                  f"{100 * m['delta_error']:.0f}%)")  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=1))
    tmp.unlink()
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; results in {args.out}")


if __name__ == "__main__":
    main()
