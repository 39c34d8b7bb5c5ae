"""GPTQ's Q4_1 against llama.cpp's own round-to-nearest Q4_1 of the same float model, both
evaluated by llama.cpp.

Input: a finished ``slimforge demo --model smollm2`` run folder. Its ``prune`` stage holds the
float model GPTQ started from (SmolLM2-135M adapted with LoRA, 12.5 % of MLP neurons removed,
recovered: weights off any Q4 grid) and its ``export`` stage the GPTQ INT4 (group 32,
asymmetric) model written as Q4_1 with its codes copied. This script

1. writes that float model as an f16 GGUF (`export_gguf`),
2. quantizes the f16 file with llama.cpp's own quantizer (``llama_model_quantize``) to Q4_1 and
   Q4_0, the token embedding / tied head in Q8_0 as in slimforge's export,
3. evaluates the f16 file, the two round-to-nearest files and slimforge's GPTQ Q4_1 file with
   llama.cpp (``llama-cpp-python``): perplexity over the same held-out windows of the run
   (its ``prepare`` stage's validation tokens: the held-out plays), tokens fed one by one.

    PYTHONPATH=python python benches/python/gguf_quality.py --run slimforge-demo-smollm2 \
        [--windows 16] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run", type=Path, required=True, help="a `slimforge demo --model smollm2` folder"
    )
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the track's default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import llama_cpp

    import slimforge
    from slimforge.data.windows import file_tokens, spaced_windows
    from slimforge.pipeline.smollm2 import _gguf, _llama_cpp, _perplexity, track_config
    from slimforge.pipeline.stages import load_stage_model
    from slimforge.quant.formats.gguf_writer import export_gguf

    slimforge.set_threads(args.threads)
    man = {s: json.loads((args.run / s / "manifest.json").read_text()) for s in
           ("prepare", "prune", "quantize", "export")}  # fmt: skip
    seq = args.seq_len or int(track_config("default")["data"]["seq_len"])
    val = spaced_windows(file_tokens(man["prepare"]["outputs"]["val"]), seq, args.windows)
    float_model = load_stage_model(man["prune"]["outputs"]["model"])
    gptq_q41 = Path(man["export"]["outputs"]["q4_1"])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "float-f16.gguf"
        export_gguf(float_model, f16, "f16", tokenizer=_gguf(), name="SmolLM2-135M float")
        files = {"f16 (float model)": f16}
        for name, ftype in (("q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1),
                            ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):  # fmt: skip
            out = Path(tmp) / f"rtn-{name}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.nthread = args.threads
            params.ftype = ftype
            params.token_embedding_type = 8  # GGML_TYPE_Q8_0, as slimforge's export
            params.output_tensor_type = 8
            start = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(),
                                                ctypes.byref(params))  # fmt: skip
            if rc != 0:
                raise SystemExit(f"llama_model_quantize({name}) failed with {rc}")
            print(f"llama.cpp RTN {name}: {time.perf_counter() - start:.1f} s", flush=True)
            files[f"llama.cpp round-to-nearest {name.upper()}"] = out
        files["slimforge GPTQ Q4_1 (export stage)"] = gptq_q41
        for label, path in files.items():
            start = time.perf_counter()
            res = _llama_cpp(path, val, val[0, :8].tolist(), val[0, 8:24].tolist(), args.threads)
            rows.append({"file": label, "bytes": path.stat().st_size,
                         "perplexity": res["perplexity"], "tokens": res["tokens"]})  # fmt: skip
            print(f"{label}: perplexity {res['perplexity']:.3f} over {res['tokens']} tokens, "
                  f"{path.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - start:.0f} s)",
                  flush=True)  # fmt: skip
    float_ppl = _perplexity(float_model, val)
    gptq = load_stage_model(man["quantize"]["outputs"]["int4"])
    gptq_ppl = _perplexity(gptq, val)
    print(f"slimforge's own evaluation: float {float_ppl:.3f}, GPTQ INT4 {gptq_ppl:.3f}")
    print("\n| file (evaluated by llama.cpp) | size | perplexity |\n|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['bytes'] / 1e6:.1f} MB | {r['perplexity']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"windows": args.windows, "seq_len": seq, "rows": rows,
                                         "slimforge_float": float_ppl, "slimforge_gptq": gptq_ppl},
                                        indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
