"""The demo's SmolLM2 track (``slimforge demo --model smollm2``): the compression half of the
pipeline on the real SmolLM2-135M, measured at each step on held-out text.

Stages: ``dedup`` (the bundled corpus, as in the GPT track), ``prepare`` (SmolLM2 token files,
the held-out works aside), ``base`` (SmolLM2-135M from the pinned GGUF asset, as float32),
``adapt`` (LoRA on the corpus, merged), ``prune`` (whole MLP neurons out, then a LoRA recovery,
merged), ``quantize`` (GPTQ INT8 and INT4, group 32, asymmetric), ``export`` (GGUF: the INT4
codes copied into Q4_1 blocks, the INT8 model as Q8_0), ``evaluate`` (perplexity, size, decode
speed of every model, and llama.cpp on the GGUF where ``llama_cpp`` is installed) and
``report``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from slimforge.pipeline.runner import Stage, StageContext
from slimforge.pipeline.stages import (
    _fit,
    _is_held_out,
    _losses,
    _set_threads,
    _tokens,
    calibration_batches,
    dir_bytes,
    load_stage_model,
    save_model,
    save_quantized_model,
    stage_dedup,
)

__all__ = ["STAGES", "track_config"]

_BASE: dict[str, Any] = {
    "run": {"threads": 0, "seed": 0, "model": "smollm2"},
    "data": {
        "inputs": None,
        "field": "text",
        "val_works": ["hamlet_gut", "macbeth_gut", "tempest_gut"],
        "val_fraction": 0.02,
        "seq_len": 128,
        "train_tokens": 400_000,
        "val_tokens": 60_000,
    },
    "dedup": {"threshold": 0.8},
    "base": {"layers": 0},
    "adapt": {"r": 8, "alpha": 16.0, "steps": 60, "batch": 2, "lr": 1e-3, "save_every": 20},
    "prune": {
        "mlp_neurons": 0.125,
        "calibration_batches": 4,
        "recovery_steps": 60,
        "r": 8,
        "lr": 1e-3,
        "batch": 2,
        "save_every": 20,
    },
    "quantize": {"group_size": 32, "calibration_batches": 4},
    "export": {"types": ["q4_1", "q8_0"]},
    "evaluate": {
        "windows": 24,
        "prompt_tokens": 32,
        "gen_tokens": 64,
        "llama_cpp_windows": 2,
    },
}

_OVERRIDES: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {"seq_len": 64, "train_tokens": 40_000, "val_tokens": 8_000},
        "base": {"layers": 2},
        "adapt": {"steps": 4, "save_every": 2},
        "prune": {"recovery_steps": 4, "calibration_batches": 1, "save_every": 2},
        "quantize": {"calibration_batches": 1},
        "evaluate": {"windows": 4, "gen_tokens": 8, "prompt_tokens": 8, "llama_cpp_windows": 1},
    },
    "default": {},
    "full": {
        "data": {"seq_len": 256, "train_tokens": 2_000_000},
        "adapt": {"steps": 400},
        "prune": {"recovery_steps": 300, "calibration_batches": 8},
        "quantize": {"calibration_batches": 8},
        "evaluate": {"windows": 64, "gen_tokens": 128, "llama_cpp_windows": 4},
    },
}


def track_config(mode: str) -> dict[str, Any]:
    """The SmolLM2 track's configuration for ``quick`` (two of the 30 blocks: a smoke run),
    ``default`` or ``full``."""
    from slimforge.pipeline.config import MODES, merge_config

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return merge_config(_BASE, _OVERRIDES[mode])


# ------------------------------------------------------------------ helpers


def _seq(ctx: StageContext) -> int:
    return int(ctx.config["data"]["seq_len"])


def _val_windows(ctx: StageContext) -> Any:
    from slimforge.data.windows import spaced_windows

    n = int(ctx.config["evaluate"]["windows"])
    return spaced_windows(_tokens(ctx.output("prepare", "val")), _seq(ctx), n)


def _calibration(ctx: StageContext, n: int) -> list[Any]:
    seed = int(ctx.config["run"].get("seed", 0)) + 101
    return calibration_batches(_tokens(ctx.output("prepare", "train")), _seq(ctx), n, seed, batch=4)


def _perplexity(model: Any, windows: Any) -> float:
    from slimforge.eval import evaluate_lm

    return float(math.exp(evaluate_lm(model, windows, batch_size=4).nll))


def _params(model: Any) -> int:
    """Parameters of a float model (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _gguf() -> Path:
    from slimforge.data.assets import smollm2_gguf

    path = smollm2_gguf()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the SmolLM2-135M asset is not fetched (run `make assets` or "
            "`python scripts/fetch_assets.py`)"
        )
    return path


def _lora_finetune(
    ctx: StageContext, model: Any, p: dict[str, Any], steps: int, run_dir: Path, stream: int
) -> Any:
    """LoRA on every linear of ``model`` for ``steps`` Trainer steps on the training tokens,
    then merged into the float weights; returns the Trainer's result. ``stream`` offsets the
    seed, so that each fine-tune draws its own training windows (a recovery that re-read the
    adaptation's windows would only fit them harder)."""
    import torch

    from slimforge.lora import LoraConfig, apply_lora, merge_and_unload, trainable_parameters
    from slimforge.train import TrainConfig, Trainer

    torch.manual_seed(int(ctx.config["run"].get("seed", 0)))
    r = int(p.get("r", 8))
    apply_lora(
        model, LoraConfig(r=r, alpha=float(p.get("alpha", 2 * r)), target_modules="all-linear")
    )
    cfg = TrainConfig(
        steps=steps, batch_size=int(p.get("batch", 2)), seq_len=_seq(ctx), lr=float(p["lr"]),
        weight_decay=0.0, save_every=int(p.get("save_every", 20)), eval_windows=1,
        seed=int(ctx.config["run"].get("seed", 0)) + stream, progress=ctx.progress, log_every=5,
    )  # fmt: skip
    trainer = Trainer(
        model, _tokens(ctx.output("prepare", "train")), None, cfg,
        params=trainable_parameters(model), out_dir=run_dir,
    )  # fmt: skip
    result = _fit(trainer, run_dir)
    merge_and_unload(model, requantize=None)
    model.eval()
    return result


# ------------------------------------------------------------------ stages


def stage_prepare(ctx: StageContext) -> dict[str, Any]:
    """SmolLM2 token files: held-out works to ``val`` (up to ``val_tokens``), the rest to
    ``train`` (up to ``train_tokens``), documents separated by the end-of-text token."""
    import gzip

    from slimforge.data.tokens import TokenWriter
    from slimforge.models import ByteLevelBPETokenizer

    data = ctx.config["data"]
    tok = ByteLevelBPETokenizer.from_gguf(_gguf())
    val_works = list(data.get("val_works") or [])
    fraction = float(data.get("val_fraction", 0.02))
    field = data.get("field", "text")
    caps = {"train": int(data["train_tokens"]), "val": int(data["val_tokens"])}
    eos = tok.eos_token_id
    with (
        TokenWriter(ctx.dir / "train", tok.vocab_size, tokenizer="smollm2") as tw,
        TokenWriter(ctx.dir / "val", tok.vocab_size, tokenizer="smollm2") as vw,
        gzip.open(ctx.output("dedup", "corpus"), "rt", encoding="utf-8") as f,
    ):
        for i, line in enumerate(f):
            if tw.count >= caps["train"] and vw.count >= caps["val"]:
                break
            rec = json.loads(line)
            held = _is_held_out(rec, val_works, i, fraction)
            if held and rec.get("work") is not None and rec.get("work") not in val_works:
                continue  # another edition of a held-out work: in neither split
            w, cap = (vw, caps["val"]) if held else (tw, caps["train"])
            if w.count >= cap:
                continue
            ids = tok.encode(rec[field])
            if eos is not None:
                ids = [*ids, eos]
            w.write(np.asarray(ids[: cap - w.count], dtype=np.int64))
    seq = _seq(ctx)
    if vw.count < 4 * seq or tw.count < 4 * seq:
        raise ValueError(
            f"too few tokens ({tw.count:,} training, {vw.count:,} held out) for seq_len {seq}"
        )
    ctx.log(f"train {tw.count:,} tokens, validation {vw.count:,} tokens (SmolLM2 tokenizer)")
    return {
        "outputs": {"train": str(ctx.dir / "train"), "val": str(ctx.dir / "val")},
        "metrics": {"train_tokens": tw.count, "val_tokens": vw.count, "val_works": val_works},
    }  # fmt: skip


def stage_base(ctx: StageContext) -> dict[str, Any]:
    from slimforge.models import LlamaForCausalLM

    _set_threads(ctx.config)
    layers = int(ctx.params.get("layers", 0)) or None
    model = LlamaForCausalLM.from_gguf(_gguf(), num_layers=layers).eval()
    save_model(model, ctx.dir / "model")
    ppl = _perplexity(model, _val_windows(ctx))
    n = model.cfg.num_layers
    ctx.log(f"SmolLM2-135M ({n} blocks): {_params(model):,} parameters, perplexity {ppl:.2f}")
    return {
        "outputs": {"model": str(ctx.dir / "model")},
        "metrics": {"params": _params(model), "layers": n, "perplexity": ppl},
    }


def stage_adapt(ctx: StageContext) -> dict[str, Any]:
    _set_threads(ctx.config)
    p = ctx.params
    model = load_stage_model(ctx.output("base", "model"))
    val = _val_windows(ctx)
    before = _perplexity(model, val)
    run_dir = ctx.dir / "run"
    result = _lora_finetune(ctx, model, p, int(p["steps"]), run_dir, stream=0)
    after = _perplexity(model, val)
    save_model(model, ctx.dir / "model")
    ctx.log(f"LoRA r={p.get('r', 8)}, {len(result.losses)} steps: perplexity {before:.2f} -> "
            f"{after:.2f} (merged)")  # fmt: skip
    return {
        "outputs": {"model": str(ctx.dir / "model")},
        "metrics": {
            "perplexity_before": before, "perplexity": after, "steps": int(p["steps"]),
            "tokens": result.tokens, "train_seconds": result.train_seconds,
            "losses": _losses(run_dir),
        },
    }  # fmt: skip


def stage_prune(ctx: StageContext) -> dict[str, Any]:
    from slimforge.prune import MLPNeurons, prune_structured

    _set_threads(ctx.config)
    p = ctx.params
    model = load_stage_model(ctx.output("adapt", "model"))
    val = _val_windows(ctx)
    before = _perplexity(model, val)
    amount = float(p.get("mlp_neurons", 0.125))
    group = int(ctx.config["quantize"].get("group_size", 32))
    cal = _calibration(ctx, int(p.get("calibration_batches", 4)))
    res = prune_structured(model, MLPNeurons(amount, round_to=group), cal)
    pruned = _perplexity(model, val)
    run_dir = ctx.dir / "run"
    result = _lora_finetune(ctx, model, p, int(p["recovery_steps"]), run_dir, stream=1)
    recovered = _perplexity(model, val)
    save_model(model, ctx.dir / "model")
    ctx.log(f"MLP neurons {amount:.1%}: {res.params_before:,} -> {res.params_after:,} "
            f"parameters, perplexity {before:.2f} -> {pruned:.2f} -> {recovered:.2f} after "
            f"{p['recovery_steps']} LoRA recovery steps")  # fmt: skip
    return {
        "outputs": {"model": str(ctx.dir / "model")},
        "metrics": {
            "params_before": res.params_before, "params_after": res.params_after,
            "mlp_neurons_removed": amount, "perplexity_before": before,
            "perplexity_pruned": pruned, "perplexity": recovered,
            "intermediate_size": model.cfg.intermediate_size, "tokens": result.tokens,
            "train_seconds": result.train_seconds, "losses": _losses(run_dir),
        },
    }  # fmt: skip


def _is_embedding(module: Any, name: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Embedding)


def stage_quantize(ctx: StageContext) -> dict[str, Any]:
    from slimforge.quant import GPTQ, Int8WeightOnly, quantize_

    _set_threads(ctx.config)
    p = ctx.params
    src = Path(ctx.output("prune", "model"))
    float_config = json.loads((src / "model_config.json").read_text())
    cal = _calibration(ctx, int(p.get("calibration_batches", 4)))
    val = _val_windows(ctx)
    outputs: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    for bits in (8, 4):
        model = load_stage_model(src)
        start = time.perf_counter()
        # Columns in order (no act-order), asymmetric groups of 32: the INT4 codes are Q4_1
        # blocks as they are, so the GGUF export copies them without re-quantizing.
        cfg = GPTQ(bits=bits, group_size=int(p.get("group_size", 32)), act_order=False)
        quantize_(model, cfg, cal, progress=ctx.progress)
        # The (tied) embedding table is a third of the model: INT8 in groups of 32, like the
        # Q8_0 table llama.cpp's own quantizer writes for these types.
        quantize_(model, Int8WeightOnly(group_size=32), filter_fn=_is_embedding)
        seconds = time.perf_counter() - start
        path = save_quantized_model(model, float_config, ctx.dir / f"int{bits}")
        ppl = _perplexity(model, val)
        outputs[f"int{bits}"] = str(path)
        metrics[f"int{bits}"] = {"bytes": dir_bytes(path), "seconds": seconds, "perplexity": ppl}
        ctx.log(f"GPTQ INT{bits}: {dir_bytes(path):,} bytes, perplexity {ppl:.2f} "
                f"({seconds:.1f} s)")  # fmt: skip
    return {"outputs": outputs, "metrics": metrics}


def stage_export(ctx: StageContext) -> dict[str, Any]:
    from slimforge.quant.formats.gguf_writer import export_gguf

    src = {"q4_1": "int4", "q8_0": "int8", "q4_0": "int4", "f16": "int8"}
    outputs: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    for t in ctx.params.get("types", ["q4_1", "q8_0"]):
        if t not in src:
            raise ValueError(f"[export] types: {t!r} is not one of {sorted(src)}")
        model = load_stage_model(ctx.output("quantize", src[t]))
        path = ctx.dir / f"smollm2-slimforge-{t}.gguf"
        rep = export_gguf(model, path, t, tokenizer=_gguf(), name="SmolLM2-135M slimforge")
        copied = sum(x.mapping == "codes" for x in rep.tensors)
        worst = max((x.rel_rms_error for x in rep.tensors), default=0.0)
        outputs[t] = str(path)
        metrics[t] = {"bytes": path.stat().st_size, "tensors": len(rep.tensors),
                      "codes_copied": copied, "requantized": len(rep.requantized()),
                      "max_rel_rms_error": worst}  # fmt: skip
        ctx.log(rep.summary())
    return {"outputs": outputs, "metrics": metrics}


def _generation_speed(model: Any, prompt: list[int], new: int) -> tuple[float, list[int]]:
    from slimforge.models.llama import greedy_generate

    best, out = math.inf, []
    for _ in range(2):
        start = time.perf_counter()
        out = greedy_generate(model, prompt, new)
        best = min(best, time.perf_counter() - start)
    return len(out) / best, out


def _llama_cpp(
    path: Path, windows: Any, prompt: list[int], want: list[int], threads: int
) -> dict[str, Any]:
    """llama.cpp on the exported file: perplexity over ``windows`` (tokens fed one by one;
    batched evaluation of llama-cpp-python 0.3's build crashed on this AVX-512 CPU), the next
    token it picks along slimforge's greedy continuation ``want``, and decode tokens/s."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(256, windows.shape[1] + 8),
                          n_batch=1, n_ubatch=1, n_threads=threads, verbose=False)  # fmt: skip
    vocab = llm.n_vocab()

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).astype(np.float64)

    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        for i, t in enumerate(w[:-1]):
            llm.eval([t])
            z = logits()
            m = z.max()
            nll += float(m + math.log(np.exp(z - m).sum()) - z[w[i + 1]])
            count += 1
    llm.reset()
    llm.eval(prompt)
    got = [int(np.argmax(logits()))]
    start = time.perf_counter()
    for t in want[:-1]:
        llm.eval([t])
        got.append(int(np.argmax(logits())))
    seconds = time.perf_counter() - start
    llm.close()
    agree = sum(a == b for a, b in zip(got, want, strict=False))
    return {"perplexity": math.exp(nll / max(count, 1)), "tokens": count,
            "agreement": agree / max(len(want), 1),
            "tokens_per_s": (len(want) - 1) / seconds if len(want) > 1 else 0.0}  # fmt: skip


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.models import LlamaForCausalLM

    _set_threads(ctx.config)
    p = ctx.params
    val = _val_windows(ctx)
    n_prompt, new = int(p.get("prompt_tokens", 32)), int(p.get("gen_tokens", 64))
    prompt = val[0, :n_prompt].tolist()
    models = [("SmolLM2-135M (float32)", ctx.output("base", "model")),
              ("LoRA-adapted, merged", ctx.output("adapt", "model")),
              ("MLP neurons pruned + LoRA recovery", ctx.output("prune", "model")),
              ("GPTQ INT8", ctx.output("quantize", "int8")),
              ("GPTQ INT4 (group 32)", ctx.output("quantize", "int4"))]  # fmt: skip
    rows: list[dict[str, Any]] = []
    greedy_int4: list[int] = []
    threads = torch.get_num_threads()
    for name, path in models:
        model = load_stage_model(path)
        cfg = json.loads((Path(path) / "model_config.json").read_text())
        cfg.pop("model", None)
        from slimforge.models import LlamaConfig

        params = _params(LlamaForCausalLM(LlamaConfig.from_dict(cfg)))
        ppl = _perplexity(model, val)
        speed, out = _generation_speed(model, prompt, new)
        if "INT4" in name:
            greedy_int4 = out
        rows.append({"model": name, "path": str(path), "params": int(params),
                     "bytes": dir_bytes(path), "perplexity": ppl, "tokens_per_s": speed})  # fmt: skip
        ctx.log(f"{name:36s} {rows[-1]['bytes']:>12,} bytes  perplexity {ppl:8.2f}  "
                f"{speed:6.1f} tokens/s")  # fmt: skip
    gguf: dict[str, Any] = {}
    q41 = ctx.upstream.get("export", {}).get("outputs", {}).get("q4_1")
    if q41:
        # The file as slimforge reads it back, then as llama.cpp runs it.
        back = LlamaForCausalLM.from_gguf(q41).eval()
        gguf["bytes"] = Path(q41).stat().st_size
        gguf["perplexity_slimforge"] = _perplexity(back, val)
        k = max(1, min(int(p.get("llama_cpp_windows", 2)), val.shape[0]))
        gguf["perplexity_slimforge_windows"] = _perplexity(back, val[:k])
        gguf["llama_cpp_windows"] = k
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            gguf["llama_cpp"] = "not checked: llama-cpp-python is not installed"
        else:
            gguf["llama_cpp"] = _llama_cpp(Path(q41), val[:k], prompt, greedy_int4, threads)
        lc = gguf["llama_cpp"]
        ctx.log(f"GGUF Q4_1 {gguf['bytes']:,} bytes: perplexity {gguf['perplexity_slimforge']:.2f} "
                "read back by slimforge; llama.cpp: " + (
                    lc if isinstance(lc, str) else
                    f"loads it, perplexity {lc['perplexity']:.2f} on {k} window(s) (slimforge "
                    f"{gguf['perplexity_slimforge_windows']:.2f}), same greedy next token at "
                    f"{lc['agreement']:.0%} of positions, {lc['tokens_per_s']:.1f} tokens/s"))  # fmt: skip
    return {"outputs": {}, "metrics": {"rows": rows, "gguf": gguf, "threads": threads,
                                       "prompt_tokens": n_prompt, "gen_tokens": new}}  # fmt: skip


def _plots(root: Path, rows: list[dict[str, Any]], m: dict[str, dict[str, Any]]) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["bytes"] / 2**20, r["perplexity"])
        ax.annotate(r["model"], (r["bytes"] / 2**20, r["perplexity"]), fontsize=7)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M: size vs perplexity")
    fig.tight_layout()
    out["size_quality"] = root / "size_quality.png"
    fig.savefig(out["size_quality"], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in ("adapt", "prune"):
        losses = m.get(stage, {}).get("metrics", {}).get("losses", [])
        if losses:
            ax.plot([x[0] for x in losses], [x[1] for x in losses], label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tunes")
    ax.legend()
    fig.tight_layout()
    out["losses"] = root / "losses.png"
    fig.savefig(out["losses"], dpi=110)
    plt.close(fig)
    return out


def _summary(rows: list[dict[str, Any]], gguf: dict[str, Any]) -> str:
    b, f = rows[0], rows[-1]
    text = (f"SmolLM2-135M compressed: the {f['model']} model is {b['bytes'] / f['bytes']:.1f}x "
            f"smaller on disk than the float32 model, its held-out perplexity is "
            f"{f['perplexity']:.2f} against {b['perplexity']:.2f} "
            f"({(f['perplexity'] / b['perplexity'] - 1) * 100:+.1f} %), and it decodes "
            f"{f['tokens_per_s'] / b['tokens_per_s']:.2f}x as fast in slimforge.")  # fmt: skip
    lc = gguf.get("llama_cpp")
    if isinstance(lc, dict):
        text += (f" llama.cpp loads its GGUF (Q4_1, {gguf['bytes'] / 2**20:.1f} MiB) and runs it "
                 f"at {lc['tokens_per_s']:.1f} tokens/s.")  # fmt: skip
    return text


def stage_report(ctx: StageContext) -> dict[str, Any]:
    import html

    from slimforge.pipeline.report import (
        energy_estimate,
        fmt_bytes,
        html_table,
        md_table,
        versions,
        write_page,
    )

    m = ctx.upstream
    ev = m["evaluate"]["metrics"]
    rows, gguf, threads = ev["rows"], ev.get("gguf", {}), int(ev.get("threads", 1))
    base = rows[0]
    table = [["model", "parameters", "on disk", "float size / size", "held-out perplexity",
              "vs float", "tokens/s", "vs float"]]  # fmt: skip
    for r in rows:
        table.append([
            r["model"], f"{r['params']:,}", fmt_bytes(r["bytes"]),
            f"{base['bytes'] / r['bytes']:.1f}x", f"{r['perplexity']:.2f}",
            f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f} %",
            f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
        ])  # fmt: skip
    if gguf:
        lc = gguf.get("llama_cpp")
        table.append(["GGUF Q4_1 (read back by slimforge)", "", fmt_bytes(gguf["bytes"]),
                      f"{base['bytes'] / gguf['bytes']:.1f}x",
                      f"{gguf['perplexity_slimforge']:.2f}",
                      f"{(gguf['perplexity_slimforge'] / base['perplexity'] - 1) * 100:+.1f} %",
                      "", ""])  # fmt: skip
        if isinstance(lc, dict):
            table.append([f"GGUF Q4_1 in llama.cpp ({gguf['llama_cpp_windows']} window(s))", "",
                          fmt_bytes(gguf["bytes"]), f"{base['bytes'] / gguf['bytes']:.1f}x",
                          f"{lc['perplexity']:.2f} (slimforge on the same: "
                          f"{gguf['perplexity_slimforge_windows']:.2f})", "",
                          f"{lc['tokens_per_s']:.1f}",
                          f"{lc['tokens_per_s'] / base['tokens_per_s']:.2f}x"])  # fmt: skip
    stage_rows = [["stage", "wall time", "energy (estimate)"]]
    for name, man in m.items():
        sec = float(man.get("seconds", 0.0))
        stage_rows.append([name, f"{sec:.1f} s", f"{energy_estimate(sec, threads) * 1000:.0f} mWh"])
    pr = m["prune"]["metrics"]
    ad = m["adapt"]["metrics"]
    ex = m.get("export", {}).get("metrics", {})
    notes = [
        f"Held-out text: {ctx.config['evaluate']['windows']} windows of "
        f"{ctx.config['data']['seq_len']} SmolLM2 tokens from works no stage trained on "
        f"({', '.join(ctx.config['data']['val_works'])}).",
        "The float32 model is SmolLM2-135M-Instruct's Q4_1 GGUF release (the pinned asset), "
        "dequantized: its weights already sit on a 4-bit grid.",
        f"LoRA (r = {ctx.config['adapt']['r']}, every linear) for {ad['steps']} steps, merged: "
        f"perplexity {ad['perplexity_before']:.2f} -> {ad['perplexity']:.2f}.",
        f"Pruning: {pr['mlp_neurons_removed']:.1%} of every block's MLP neurons removed "
        f"(intermediate width {pr['intermediate_size']}, a multiple of the quantization group), "
        f"{pr['params_before']:,} -> {pr['params_after']:,} parameters; perplexity "
        f"{pr['perplexity_before']:.2f} -> {pr['perplexity_pruned']:.2f} -> "
        f"{pr['perplexity']:.2f} after the LoRA recovery.",
        "GPTQ: group 32, asymmetric, columns in order, calibrated on training windows; the "
        "tied embedding table INT8 in groups of 32 (round to nearest).",
    ]
    for t, e in ex.items():
        notes.append(f"GGUF {t}: {e['codes_copied']} of {e['tensors']} tensors' codes copied "
                     f"as they are, {e['requantized']} re-quantized (largest relative RMS error "
                     f"{e['max_rel_rms_error']:.1e}).")  # fmt: skip
    lc = gguf.get("llama_cpp")
    if isinstance(lc, dict):
        notes.append(f"llama.cpp (llama-cpp-python) loads the Q4_1 file; along slimforge's "
                     f"greedy continuation of the INT4 model it picks the same next token at "
                     f"{lc['agreement']:.0%} of positions.")  # fmt: skip
    elif lc:
        notes.append(f"llama.cpp: {lc}.")
    notes.append(f"Tokens/s: greedy decoding of {ev['gen_tokens']} tokens after a "
                 f"{ev['prompt_tokens']}-token prompt, batch 1, best of two, {threads} "
                 "thread(s). Energy: wall time x threads x 10 W, an assumption.")  # fmt: skip
    md_notes = "\n".join(f"- {n}" for n in notes)
    html_notes = "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    vers = versions()
    repro = f"{ctx.config['run'].get('command', 'slimforge demo --model smollm2')}\n\n" + "\n".join(
        f"{k}: {v}" for k, v in vers.items()
    )
    sections = [
        ("What each stage bought", md_table(table), html_table(table)),
        ("How these were measured", md_notes, html_notes),
        ("Stages", md_table(stage_rows), html_table(stage_rows)),
        ("Reproduce", f"```\n{repro}\n```", f"<pre>{html.escape(repro)}</pre>"),
    ]
    summary = _summary(rows, gguf)
    plots = _plots(ctx.dir.parent, rows, m)
    paths = write_page(ctx.dir.parent, "slimforge report: SmolLM2-135M", summary, plots, sections)
    for path in paths.values():
        ctx.log(f"wrote {path}")
    outputs = {k: str(v) for k, v in paths.items()}
    outputs["summary"] = summary
    return {"outputs": outputs, "metrics": {}}


STAGES = (
    Stage("dedup", stage_dedup, (), "exact and near-duplicate removal"),
    Stage("prepare", stage_prepare, ("dedup",), "SmolLM2 token files, held-out works aside"),
    Stage("base", stage_base, ("prepare",), "SmolLM2-135M from the pinned GGUF, float32"),
    Stage("adapt", stage_adapt, ("base",), "LoRA on the corpus, merged"),
    Stage("prune", stage_prune, ("adapt",), "MLP neurons out, LoRA recovery"),
    Stage("quantize", stage_quantize, ("prune",), "GPTQ INT8 and INT4 (group 32)"),
    Stage("export", stage_export, ("quantize",), "GGUF for llama.cpp"),
    Stage("evaluate", stage_evaluate, ("quantize",), "perplexity, size and speed of each"),
    Stage("report", stage_report, ("evaluate",), "report.md, report.html and plots"),
)
