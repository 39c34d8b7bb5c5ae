"""Decode speed of SmolLM2-135M: slimforge's KV-cache generation vs transformers vs llama.cpp.

Batch 1, a 64-token prompt, 128 new tokens, greedy, on 1 and 2 threads. Engines, all on the
same weights (the pinned SmolLM2-135M GGUF, dequantized to float32):

- slimforge fp32, INT8 (``Int8WeightOnly``: per-channel, embeddings too) and INT4
  (``Int4WeightOnly(group_size=32)`` linears, the tied embedding / head in INT8 as llama.cpp's
  Q4 files keep it in Q8_0), ``model.generate`` with its defaults;
- transformers' ``LlamaForCausalLM.generate`` (its defaults: dynamic KV cache, sdpa), fp32;
- llama.cpp (``llama-cpp-python``, when importable) on slimforge's own ``export_gguf`` of the
  model in Q8_0 and Q4_0 (and Q4_1), one ``eval`` per token.

Decode tokens/s = (new tokens - 1) / time from the first new token to the last (prefill
excluded; reported apart). The engines take turns, --repeats rounds, best round each. Greedy
tokens are compared with slimforge fp32's (how many of the 128 agree) as a sanity check.

    PYTHONPATH=python python benches/python/generate_bench.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a wooden press adapted from "
    "those used for wine and olive oil. Within a few decades printing shops had spread to "
    "more than two hundred cities across Europe, and the price of books fell so quickly that "
    "reading, once the privilege of clergy and nobles, became part of ordinary life"
)


def hf_twin(model: Any) -> Any:
    """transformers' LlamaForCausalLM with the slimforge model's weights."""
    import transformers

    c = model.cfg
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_seq_len,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hcfg)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state)
    return hf.eval()


class Clock:
    """Timestamps of each new token (a streamer for slimforge and transformers)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def reset(self) -> None:
        self.times, self.start = [], time.perf_counter()

    def __call__(self, _tokens: Any) -> None:
        self.times.append(time.perf_counter())

    def rates(self) -> tuple[float, float]:
        """(decode tokens/s, prefill + first token seconds)."""
        t = self.times
        return (len(t) - 1) / (t[-1] - t[0]), t[0] - self.start


class HFStreamer(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.prompt_seen = False

    def reset(self) -> None:
        super().reset()
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # transformers first puts the prompt
            self.prompt_seen = True
            return
        self(value)

    def end(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=None, help="subset of the engine names")
    ap.add_argument("--quick", action="store_true", help="4 layers, 16 new tokens, 1 round")
    args = ap.parse_args()

    import slimforge
    from slimforge.data.assets import smollm2_gguf
    from slimforge.models.llama import LlamaForCausalLM
    from slimforge.models.tokenizer import ByteLevelBPETokenizer
    from slimforge.quant import Int4WeightOnly, Int8WeightOnly, quantize_
    from slimforge.quant.formats.gguf_writer import export_gguf

    layers = 4 if args.quick else None
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    path = smollm2_gguf()
    tok = ByteLevelBPETokenizer.from_gguf(path)
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(PROMPT)
    ids = ids[: args.prompt_tokens]
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the prompt has only {len(ids)} tokens")
    n_new = args.new_tokens

    def load() -> Any:
        return LlamaForCausalLM.from_gguf(path, num_layers=layers)

    fp32 = load()
    int8 = quantize_(load(), Int8WeightOnly(), progress=False)
    int4 = quantize_(load(), Int4WeightOnly(group_size=32), progress=False)
    # The tied embedding / LM head in INT8, as llama.cpp keeps it in Q8_0 for the 4-bit types.
    int4 = quantize_(int4, Int8WeightOnly(), progress=False,
                     filter_fn=lambda m, n: isinstance(m, torch.nn.Embedding))  # fmt: skip
    engines: dict[str, Callable[[int], tuple[list[int], float, float]]] = {}

    def slim(model: Any) -> Callable[[int], tuple[list[int], float, float]]:
        def run(threads: int) -> tuple[list[int], float, float]:
            torch.set_num_threads(threads)
            slimforge.set_num_threads(threads)
            clock = Clock()
            clock.reset()
            out = model.generate([ids], n_new, temperature=0.0, streamer=clock)
            return out[0, len(ids) :].tolist(), *clock.rates()

        return run

    engines["slimforge fp32"] = slim(fp32)
    engines["slimforge INT8"] = slim(int8)
    engines["slimforge INT4 g32 (INT8 head)"] = slim(int4)

    try:
        hf = hf_twin(fp32)
    except ImportError:
        hf = None
    if hf is not None:
        import transformers

        def run_hf(threads: int) -> tuple[list[int], float, float]:
            torch.set_num_threads(threads)
            clock = HFStreamer()
            clock.reset()
            with torch.no_grad():
                out = hf.generate(
                    torch.tensor([ids]), max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, streamer=clock, pad_token_id=0,
                )  # fmt: skip
            return out[0, len(ids) :].tolist(), *clock.rates()

        engines[f"transformers {transformers.__version__} fp32"] = run_hf

    tmp = Path(tempfile.mkdtemp(prefix="genbench-"))
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama_cpp not importable: llama.cpp rows skipped")
    if llama_cpp is not None:
        for qtype in ("q8_0", "q4_0", "q4_1"):
            gpath = tmp / f"smol-{qtype}.gguf"
            export_gguf(fp32, gpath, qtype, tokenizer=path)

            def run_llama(threads: int, gpath: Path = gpath) -> tuple[list[int], float, float]:
                # n_batch=1: batched evaluation of this build crashed on this CPU (AVX-512 /
                # AMX); decoding is one token per call anyway, the prompt pays for it.
                llm = llama_cpp.Llama(
                    model_path=str(gpath), n_ctx=256, n_batch=1, n_ubatch=1,
                    n_threads=threads, n_threads_batch=threads, verbose=False,
                )  # fmt: skip
                vocab = llm.n_vocab()
                t0 = time.perf_counter()
                llm.eval(ids)
                out, times = [], []
                for _ in range(n_new):
                    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
                    nxt = int(np.argmax(logits))
                    times.append(time.perf_counter())
                    out.append(nxt)
                    llm.eval([nxt])
                llm.close()
                return out, (n_new - 1) / (times[-1] - times[0]), times[0] - t0

            engines[f"llama.cpp {llama_cpp.__version__} {qtype.upper()}"] = run_llama
    if args.engines:
        engines = {k: v for k, v in engines.items() if any(e in k for e in args.engines)}

    print(
        f"SmolLM2-135M{' (4 layers)' if layers else ''}, batch 1, {len(ids)}-token prompt, "
        f"{n_new} new tokens, greedy; best of {args.repeats} rounds"
    )
    for threads in args.threads:
        best: dict[str, tuple[float, float]] = {}
        tokens: dict[str, list[int]] = {}
        for fn in engines.values():  # warm-up
            fn(threads)
        for _ in range(args.repeats):
            for name, fn in engines.items():
                toks, rate, prefill = fn(threads)
                tokens[name] = toks
                old = best.get(name)
                if old is None or rate > old[0]:
                    best[name] = (rate, prefill)
        ref = tokens.get("slimforge fp32")
        hf_name = next((k for k in best if k.startswith("transformers")), None)
        print(f"\n{threads} thread(s)")
        print(f"{'engine':<32} {'decode tok/s':>12} {'prefill ms':>11} {'vs hf':>7} "
              f"{'same tokens':>12}")  # fmt: skip
        for name, (rate, prefill) in best.items():
            ratio = f"{rate / best[hf_name][0]:.2f}x" if hf_name else "-"
            same = (
                "-"
                if ref is None
                else str(sum(a == b for a, b in zip(tokens[name], ref, strict=False)))
            )
            print(f"{name:<32} {rate:>12.1f} {prefill * 1e3:>11.0f} {ratio:>7} {same:>12}")


if __name__ == "__main__":
    main()
