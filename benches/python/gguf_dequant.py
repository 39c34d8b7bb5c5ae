"""GGUF dequantization speed: slimforge's NumPy decoders vs the `gguf` package, same bytes.

Random blocks of each type (finite fp16 scales) for a 4096 x 4096 tensor, decoded to float32 by
`slimforge.quant.formats.dequantize_gguf_tensor` and by `gguf.quants.dequantize`; outputs are
checked equal, then the best of --repeats runs of each (taking turns) is reported, with the
ratio.

    PYTHONPATH=python python benches/python/gguf_dequant.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np

from slimforge.bench import best_times
from slimforge.quant.formats.gguf import GGML_TYPES, dequantize_gguf_tensor

# byte offsets of each block's fp16 scale fields
_HALVES = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=4096 * 4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="256K weights, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.elements, args.repeats = 1 << 18, 1
    import gguf  # the peer; a test dependency

    print(f"{args.elements:,} weights per type; best of {args.repeats}; float32 output")
    print(f"{'type':<6} {'slimforge ms':>13} {'gguf ms':>9} {'speed-up':>9} {'GB/s out':>9}")
    rng = np.random.default_rng(0)
    for ttype, (name, block, nbytes) in GGML_TYPES.items():
        if name not in _HALVES:
            continue
        n_blocks = args.elements // block
        raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
        for at in _HALVES[name]:
            raw[:, at : at + 2] = rng.normal(0, 0.1, (n_blocks, 1)).astype("<f2").view(np.uint8)
        qt = gguf.GGMLQuantizationType(ttype)
        mine = dequantize_gguf_tensor(raw, ttype)
        ref = gguf.quants.dequantize(raw, qt).reshape(-1)
        if not np.array_equal(mine, ref):
            raise SystemExit(f"{name}: outputs differ")
        best = best_times(
            {
                "slimforge": lambda: dequantize_gguf_tensor(raw, ttype),  # noqa: B023
                "gguf": lambda: gguf.quants.dequantize(raw, qt),  # noqa: B023
            },
            args.repeats,
        )
        t_mine, t_ref = best["slimforge"], best["gguf"]
        gbs = mine.nbytes / t_mine / 1e9
        print(
            f"{name:<6} {1e3 * t_mine:13.1f} {1e3 * t_ref:9.1f} {t_ref / t_mine:8.2f}x {gbs:9.2f}"
        )


if __name__ == "__main__":
    main()
