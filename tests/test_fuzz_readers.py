"""Fuzz tests of the readers of untrusted files: GGUF (``read_gguf``), LSH index files
(``LSHIndex.load``, Rust) and quantized checkpoints (``load_quantized``: safetensors + JSON).

Each starts from a small valid file written by the library's own writers (the ``gguf``
package's ``GGUFWriter`` for GGUF), mutates it with hypothesis (bit flips, truncation, random
insertions, and mutations aimed at the fields that declare sizes: counts, dims, offsets,
alignment, string and array lengths, config values, stored tensor values) and runs every
example in a worker process, which must answer with a ``ValueError`` or a correct result (the
reader's own invariants hold, a re-saved file is identical, a loaded model runs). Never:

- a crash (the worker dies: a native reader's segfault or abort cannot take pytest down);
- a hang (an example over ``PER_EXAMPLE_SECONDS``);
- memory beyond a bound: the worker's peak RSS (``ru_maxrss``) may not grow past its baseline
  (after reading each valid file once) by more than ``RSS_BOUND_MB``, and its address space is
  capped at baseline + ``AS_BOUND_MB``, so an untouched giant allocation fails too.

The number of examples per test is ``SLIMFORGE_FUZZ_EXAMPLES`` (default 150, the whole file
~20 s). Plus targeted regression tests for the bugs these readers had.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

EXAMPLES = int(os.environ.get("SLIMFORGE_FUZZ_EXAMPLES", "150"))
PER_EXAMPLE_SECONDS = 20.0
RSS_BOUND_MB = 192
AS_BOUND_MB = 4096

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- readers run by the worker


def _factory() -> nn.Module:
    """The float model the quantized checkpoint belongs to."""
    return nn.Sequential(nn.Embedding(16, 64), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def _check_gguf(path: Path) -> str:
    from slimforge.quant.formats.gguf import GGML_TYPES, read_gguf

    f = read_gguf(path)
    try:
        size = path.stat().st_size
        assert all(isinstance(k, str) for k in f.metadata)
        for t in f.tensors.values():
            assert t.data.size <= size
            if t.ggml_type in GGML_TYPES:
                out = t.dequantize()
                assert out.dtype == np.float32 and out.shape == t.shape
    except Exception as e:
        raise AssertionError(f"accepted, but inconsistent: {e!r}") from e
    return f"{len(f.metadata)} keys, {len(f.tensors)} tensors"


def _check_lsh(path: Path) -> str:
    from slimforge.dedup import LSHIndex

    idx = LSHIndex.load(path)
    try:
        again = path.with_name(path.name + ".again")
        idx.save(again)
        assert again.read_bytes() == path.read_bytes(), "an accepted file is not canonical"
        sigs = idx._sigs
        assert sigs.shape == (len(idx), idx.num_perm)
        assert len(idx.query_many(sigs, verify=False)) == len(idx)
    except Exception as e:
        raise AssertionError(f"accepted, but inconsistent: {e!r}") from e
    return f"{len(idx)} entries"


def _check_quant(path: Path) -> str:
    from slimforge.quant import InputTransformedLinear, QuantEmbedding, QuantLinear, load_quantized

    model = load_quantized(_factory, path)
    try:
        with torch.no_grad():
            out = model(torch.tensor([[1, 2, 3]]))
        assert out.shape == (1, 3, 16)
        for m in model.modules():  # the documented layout, restated independently
            if isinstance(m, QuantLinear | QuantEmbedding):
                assert m.qweight.dtype == torch.uint8
                assert bool((m.scales.isfinite() & (m.scales > 0)).all())
                z = m.zeros
                assert bool(((z == z.round()) & (z >= 0) & (z < 2**m.bits)).all())
            if isinstance(m, InputTransformedLinear):
                n = m.inner.in_features
                if m.perm is not None:
                    assert torch.equal(m.perm.sort().values, torch.arange(n))
                if m.pre_scale is not None:
                    assert bool((m.pre_scale.isfinite() & (m.pre_scale > 0)).all())
    except Exception as e:
        raise AssertionError(f"accepted, but the model does not run: {e!r}") from e
    return "loaded"


_READERS = {"gguf": _check_gguf, "lsh": _check_lsh, "quant": _check_quant}


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker_main() -> None:
    """Reads one JSON request per line ({"kind", "path"}), answers one JSON line."""
    import traceback

    torch.set_num_threads(1)
    for line in sys.stdin:
        req = json.loads(line)
        if req["kind"] == "cap_address_space":
            cap = _vm_size_bytes() + (req["extra_mb"] << 20)
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
            print(json.dumps({"outcome": "ok", "detail": cap}), flush=True)
            continue
        t0 = time.perf_counter()
        try:
            reply = {"outcome": "ok", "detail": _READERS[req["kind"]](Path(req["path"]))}
        except ValueError as e:
            reply = {"outcome": "ValueError", "detail": str(e)[:1000]}
        except BaseException as e:  # reported to the parent, which fails the example
            reply = {"outcome": type(e).__name__, "detail": traceback.format_exc()[-3000:]}
        reply["seconds"] = time.perf_counter() - t0
        reply["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------- the parent's side


class _Worker:
    """One long-lived reader process; restarted after a crash, hang or memory failure."""

    def __init__(self, seeds: dict[str, Path]) -> None:
        self.seeds = seeds
        self.proc: subprocess.Popen[str] | None = None
        self.baseline_kb = 0

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for kind, path in self.seeds.items():  # warm up: imports, first allocations
            r = self._ask({"kind": kind, "path": str(path)}, timeout=120)
            assert r["outcome"] == "ok", f"the valid {kind} seed does not load: {r}"
        self.baseline_kb = r["maxrss_kb"]
        self._ask({"kind": "cap_address_space", "extra_mb": AS_BOUND_MB}, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _ask(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            raise AssertionError(f"hang: no answer in {timeout} s for {req}")
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            raise AssertionError(f"crash: the worker died (exit status {rc}) on {req}")
        return json.loads(line)

    def run(self, kind: str, path: Path) -> dict[str, Any]:
        """The worker's answer; fails on a crash, hang, non-ValueError or memory growth."""
        if self.proc is None:
            self._start()
        r = self._ask({"kind": kind, "path": str(path)}, PER_EXAMPLE_SECONDS)
        grown_mb = (r["maxrss_kb"] - self.baseline_kb) / 1024
        if grown_mb > RSS_BOUND_MB:
            self.stop()  # the high-water mark stays: start afresh for the next example
            raise AssertionError(f"memory: peak RSS grew by {grown_mb:.0f} MiB on {path}")
        if r["outcome"] not in ("ok", "ValueError"):
            if r["outcome"] == "MemoryError":
                self.stop()
            raise AssertionError(f"{r['outcome']} (not ValueError) on {path}:\n{r['detail']}")
        if r["outcome"] == "ValueError" and str(path) not in r["detail"]:
            raise AssertionError(f"the ValueError does not name {path}: {r['detail']}")
        return r


def _note(r: dict[str, Any], path: Path) -> None:
    """Records what an example reached (``--hypothesis-show-statistics`` lists them)."""
    what = r["detail"] if r["outcome"] == "ValueError" else "accepted"
    what = re.sub(r"\d+", "N", what.replace(str(path), "").replace(str(path.parent), ""))
    event(what[:70])


# ---------------------------------------------------------------- seeds


def _write_gguf_seed(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_uint32("t.count", 7)
    w.add_float32("t.ratio", 0.5)
    w.add_string("t.name", "tiny")
    w.add_bool("t.flag", True)
    w.add_array("t.words", ["a b", "c"])
    w.add_array("t.ints", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("t.a", rng.normal(size=(2, 8)).astype(np.float32))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("t.b", gguf.quants.quantize(rng.normal(size=(2, 32)).astype(np.float32), q8),
                 raw_dtype=q8)  # fmt: skip
    w.add_tensor("t.c", rng.normal(size=(3,)).astype(np.float16))
    q4 = gguf.GGMLQuantizationType.Q4_0
    w.add_tensor("t.d", gguf.quants.quantize(rng.normal(size=(1, 32)).astype(np.float32), q4),
                 raw_dtype=q4)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_fields(data: bytes) -> dict[str, tuple[int, int]]:
    """Label -> (offset, width) of every count, length, type, dim, offset and scalar value in a
    valid GGUF file (a small independent walker, so mutations can aim at them)."""
    fields = {"version": (4, 4), "n_tensors": (8, 8), "n_kv": (16, 8)}
    pos = 24

    def num(label: str, width: int) -> int:
        nonlocal pos
        fields[label] = (pos, width)
        v = int.from_bytes(data[pos : pos + width], "little")
        pos += width
        return v

    def string(label: str) -> str:
        nonlocal pos
        n = num(label + ".len", 8)
        pos += n
        return data[pos - n : pos].decode()

    def value(label: str, t: int) -> None:
        nonlocal pos
        if t in _GGUF_SCALAR_SIZES:
            num(label + ".value", _GGUF_SCALAR_SIZES[t])
        elif t == 8:
            string(label)
        else:
            et = num(label + ".elem_type", 4)
            n = num(label + ".array_len", 8)
            for i in range(n):
                if et in _GGUF_SCALAR_SIZES:
                    pos += _GGUF_SCALAR_SIZES[et]
                else:
                    value(f"{label}[{i}]", et)

    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    for _ in range(n_kv):
        start = pos
        key = string("kv")
        fields[f"kv[{key}].key_len"] = (start, 8)
        value(f"kv[{key}]", num(f"kv[{key}].type", 4))
    for _ in range(n_tensors):
        start = pos
        name = string("tensor")
        fields[f"tensor[{name}].name_len"] = (start, 8)
        n_dims = num(f"tensor[{name}].n_dims", 4)
        for i in range(n_dims):
            num(f"tensor[{name}].dim{i}", 8)
        num(f"tensor[{name}].type", 4)
        num(f"tensor[{name}].offset", 8)
    fields.pop("kv.len", None)
    fields.pop("tensor.len", None)
    return fields


def _write_lsh_seed(path: Path, str_keys: bool) -> None:
    from slimforge.dedup import LSHIndex, signatures

    sigs = signatures(["alpha beta gamma delta", "zeta eta theta", ""], num_perm=8)
    idx = LSHIndex(threshold=0.5, num_perm=8, bands=4, rows=2)
    idx.insert(sigs, keys=["a", "bc", "d€"] if str_keys else [5, -1, 7])
    idx.save(path)


_LSH_FIELDS = {
    "kind": (12, 4),
    "threshold": (16, 8),
    "num_perm": (24, 4),
    "bands": (28, 4),
    "rows": (32, 4),
    "reserved": (36, 4),
    "n": (40, 8),
    "offset0": (48 + 3 * 32, 8),
    "offset1": (48 + 3 * 32 + 8, 8),
    "offset3": (48 + 3 * 32 + 24, 8),
}


def _quant_model() -> nn.Module:
    from slimforge.quant import InputTransformedLinear, QuantEmbedding, QuantLinear

    torch.manual_seed(0)
    m = _factory()
    m[0] = QuantEmbedding.from_float(m[0], bits=8, group_size=32)
    m[1] = QuantLinear.from_float(m[1], bits=4, group_size=32)
    inner = QuantLinear.from_float(m[3], bits=8, group_size=None)
    m[3] = InputTransformedLinear(inner, perm=torch.randperm(32), pre_scale=torch.rand(32) + 0.5)
    return m


def _fix_lsh_checksum(b: bytearray) -> None:
    from slimforge import _native

    if len(b) >= 8:
        b[-8:] = _native.xxh3_64(bytes(b[:-8])).to_bytes(8, "little")


# ---------------------------------------------------------------- mutations

_INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 33, 48, 63, 64, 255, 256, 2**16, 2**31 - 1, 2**31,
                2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -32]  # fmt: skip
_values = st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 2**64 - 1))
_pos = st.integers(0, 2**32)


def _mutations(n_fields: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    one = st.one_of(
        st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
        st.tuples(st.just("truncate"), _pos),
        st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=24)),
        st.tuples(st.just("set"), st.integers(0, n_fields - 1), _values),
        st.tuples(st.just("add"), st.integers(0, n_fields - 1), st.integers(-64, 64)),
    )
    return st.lists(one, min_size=1, max_size=4)


def _mutate(data: bytes, muts: list[tuple[Any, ...]], fields: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for m in muts:
        if m[0] == "flip" and b:
            b[m[1] % len(b)] ^= 1 << m[2]
        elif m[0] == "truncate":
            del b[m[1] % (len(b) + 1) :]
        elif m[0] == "insert":
            i = m[1] % (len(b) + 1)
            b[i:i] = m[2]
        elif m[0] in ("set", "add"):
            off, width = fields[m[1]]
            if off + width <= len(b):
                cur = int.from_bytes(b[off : off + width], "little")
                v = m[2] if m[0] == "set" else cur + m[2]
                b[off : off + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(b)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from slimforge.quant import save_quantized

    d = tmp_path_factory.mktemp("seeds")
    _write_gguf_seed(d / "seed.gguf")
    _write_lsh_seed(d / "seed_str.idx", str_keys=True)
    _write_lsh_seed(d / "seed_int.idx", str_keys=False)
    save_quantized(_quant_model(), d / "ckpt")
    return {"gguf": d / "seed.gguf", "lsh": d / "seed_str.idx", "quant": d / "ckpt"}


@pytest.fixture(scope="module")
def worker(seeds: dict[str, Path]) -> Any:
    w = _Worker(seeds)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- GGUF


def test_gguf_seed_fields_are_where_the_walker_says(seeds: dict[str, Path]) -> None:
    data = seeds["gguf"].read_bytes()
    fields = _gguf_fields(data)
    off, width = fields["kv[general.alignment].value"]
    assert int.from_bytes(data[off : off + width], "little") == 64
    assert {f"tensor[t.{c}].offset" for c in "abcd"} <= fields.keys()


@FUZZ
@given(muts=st.data())
def test_fuzz_gguf(seeds: dict[str, Path], worker: _Worker, scratch: Path, muts: Any) -> None:
    data = seeds["gguf"].read_bytes()
    fields = list(_gguf_fields(data).values())
    p = scratch / "m.gguf"
    p.write_bytes(_mutate(data, muts.draw(_mutations(len(fields))), fields))
    _note(worker.run("gguf", p), p)


def _edit(seed: Path, out: Path, edits: dict[str, int]) -> Path:
    data = bytearray(seed.read_bytes())
    fields = _gguf_fields(bytes(data))
    for label, v in edits.items():
        off, width = fields[label]
        data[off : off + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        # dims whose product overflows int64 (np.prod wrapped to 0: the tensor was accepted)
        ({"tensor[t.a].dim0": 2**32, "tensor[t.a].dim1": 2**32}, "past the end"),
        ({"tensor[t.a].dim0": 2**63, "tensor[t.a].dim1": 2}, "past the end"),
        ({"kv[general.alignment].value": 0}, "general.alignment.*positive power of two"),
        ({"kv[general.alignment].value": 48}, "general.alignment.*power of two"),
        # a negative alignment (INT32 -64) read tensor data from inside the header
        (
            {"kv[general.alignment].type": 5, "kv[general.alignment].value": -64},
            "general.alignment",
        ),
        ({"kv[general.alignment].type": 6, "kv[general.alignment].value": 0x42000000}, "integer"),
        ({"kv[t.ints].array_len": 2**40}, "t.ints' array length.*limit"),
        ({"kv[t.ints].array_len": 2**20}, "t.ints' array length.*do not fit"),
        ({"kv[t.words].array_len": 2**24}, "t.words' array length.*do not fit"),
        ({"kv[t.words][0].len": 2**62}, "string length.*limit"),
        ({"kv[t.name].len": 2**20}, "truncated"),
        ({"kv[t.ints].elem_type": 99}, "unknown array element type 99"),
        ({"kv[t.count].type": 13}, "unknown metadata value type 13"),
        ({"n_kv": 2**63}, "metadata count.*limit"),
        ({"n_kv": 2**19}, "cannot fit"),
        ({"n_tensors": 2**64 - 1}, "tensor count.*limit"),
        ({"tensor[t.b].type": 99}, "unknown ggml type id 99"),
        ({"tensor[t.b].n_dims": 9}, "n_dims"),
        ({"tensor[t.b].dim0": 16}, "multiple of the Q8_0 block"),
        ({"tensor[t.b].offset": 1}, "not a multiple of 64"),
        ({"tensor[t.b].offset": 0}, "overlap"),
        ({"tensor[t.d].offset": 2**40}, "past the end"),
        ({"tensor[t.d].offset": 2**64 - 64}, "past the end"),
    ],
)
def test_gguf_malformed_headers_raise_cleanly(
    seeds: dict[str, Path], tmp_path: Path, edits: dict[str, int], match: str
) -> None:
    from slimforge.quant.formats.gguf import read_gguf

    p = _edit(seeds["gguf"], tmp_path / "bad.gguf", edits)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=match) as e:
            read_gguf(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(p) in str(e.value)
    assert peak < 1 << 20, f"{peak} bytes allocated"  # nothing the header declares
    assert time.perf_counter() - t0 < 2


def test_gguf_duplicates_and_tiny_files(seeds: dict[str, Path], tmp_path: Path) -> None:
    from slimforge.quant.formats.gguf import read_gguf

    data = seeds["gguf"].read_bytes()
    p = tmp_path / "x.gguf"
    p.write_bytes(data.replace(b"t.b", b"t.a", 1))  # two tensors named t.a
    with pytest.raises(ValueError, match="duplicate tensor name"):
        read_gguf(p)
    p.write_bytes(data.replace(b"t.ratio", b"t.count", 1))
    with pytest.raises(ValueError, match="duplicate key"):
        read_gguf(p)
    for blob, match in [(b"", "bad magic"), (b"GGU", "truncated"), (b"GGUF\x03", "truncated")]:
        p.write_bytes(blob)
        with pytest.raises(ValueError, match=match):
            read_gguf(p)


def test_gguf_types_ggml_knows_but_we_do_not_decode(seeds: dict[str, Path], tmp_path: Path) -> None:
    from slimforge.quant.formats.gguf import read_gguf

    # t.d: one Q4_0 block of 18 bytes; IQ4_NL (20) has the same block layout size.
    p = _edit(seeds["gguf"], tmp_path / "iq.gguf", {"tensor[t.d].type": 20})
    t = read_gguf(p).tensors["t.d"]
    assert t.type_name == "IQ4_NL" and t.data.size == 18
    with pytest.raises(ValueError, match="not supported"):
        t.dequantize()


# ---------------------------------------------------------------- LSH index


@FUZZ
@given(muts=st.data(), str_keys=st.booleans(), fix_checksum=st.booleans())
def test_fuzz_lsh_index(
    seeds: dict[str, Path],
    worker: _Worker,
    scratch: Path,
    muts: Any,
    str_keys: bool,
    fix_checksum: bool,
) -> None:
    seed = seeds["lsh"] if str_keys else seeds["lsh"].with_name("seed_int.idx")
    data = seed.read_bytes()
    fields = list(_LSH_FIELDS.values())
    b = bytearray(_mutate(data, muts.draw(_mutations(len(fields))), fields))
    if fix_checksum:  # reach the parser behind the checksum
        _fix_lsh_checksum(b)
    p = scratch / "m.idx"
    p.write_bytes(bytes(b))
    _note(worker.run("lsh", p), p)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_perm", 2**32 - 1, "num_perm.*exceeds the limit"),
        ("n", 2**61, "do not fit"),
        ("n", 2**64 - 1, "do not fit"),
        ("kind", 2, "unknown key kind"),
        ("threshold", struct.unpack("<Q", struct.pack("<d", float("nan")))[0], "threshold"),
        ("offset0", 1, "first key offset"),
        ("offset3", 2**40, "offsets end at"),
        ("offset1", 2**63, "out of order"),
    ],
)
def test_lsh_index_malformed_headers(
    seeds: dict[str, Path], worker: _Worker, tmp_path: Path, field: str, value: int, match: str
) -> None:
    off, width = _LSH_FIELDS[field]
    b = bytearray(seeds["lsh"].read_bytes())
    b[off : off + width] = value.to_bytes(width, "little")
    _fix_lsh_checksum(b)
    p = tmp_path / "bad.idx"
    p.write_bytes(bytes(b))
    r = worker.run("lsh", p)
    assert r["outcome"] == "ValueError" and "not a valid LSH index" in r["detail"], r
    assert re.search(match, r["detail"]), r["detail"]


# ---------------------------------------------------------------- quantized checkpoints


def _json_value() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(_INTERESTING + [4, 8, 16, 128, 2**20, -(2**70), 2**70]),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4),
        st.booleans(),
        st.none(),
        st.lists(st.integers(0, 9), max_size=2),
        st.sampled_from(["QuantLinear", "QuantEmbedding", "InputTransformedLinear", "Linear"]),
    )


def _copy_ckpt(seed: Path, out: Path) -> tuple[Path, Path]:
    out.mkdir(exist_ok=True)
    for name in ("quant_config.json", "model.safetensors"):
        (out / name).write_bytes((seed / name).read_bytes())
    return out / "quant_config.json", out / "model.safetensors"


@FUZZ
@given(data=st.data())
def test_fuzz_quant_config(
    seeds: dict[str, Path], worker: _Worker, scratch: Path, data: Any
) -> None:
    cfg_path, _ = _copy_ckpt(seeds["quant"], scratch / "cfg")
    cfg = json.loads(cfg_path.read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "module", "inner"]))
        if where == "top":
            key = data.draw(st.sampled_from(["format", "version", "modules"]))
            cfg[key] = data.draw(_json_value())
            continue
        mods = cfg.get("modules")
        if not isinstance(mods, dict) or not mods:
            continue
        spec = mods[data.draw(st.sampled_from(sorted(mods)))]
        if where == "inner" and isinstance(spec, dict) and isinstance(spec.get("inner"), dict):
            spec = spec["inner"]
        if not isinstance(spec, dict):
            continue
        key = data.draw(st.sampled_from(sorted(spec) + ["type", "in_features"]))
        if data.draw(st.booleans()) and key in spec:
            del spec[key]
        else:
            spec[key] = data.draw(_json_value())
    text = json.dumps(cfg)
    if data.draw(st.booleans()):  # and raw bytes
        muts = data.draw(_mutations(1))
        text_b = _mutate(text.encode(), muts, [(0, 1)])
        cfg_path.write_bytes(text_b)
    else:
        cfg_path.write_text(text)
    _note(worker.run("quant", cfg_path.parent), cfg_path.parent)


def _st_split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _st_join(header: dict[str, Any], body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


@FUZZ
@given(data=st.data())
def test_fuzz_quant_safetensors_header(
    seeds: dict[str, Path], worker: _Worker, scratch: Path, data: Any
) -> None:
    _, st_path = _copy_ckpt(seeds["quant"], scratch / "hdr")
    raw = st_path.read_bytes()
    header, body = _st_split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    how = data.draw(st.sampled_from(["reshape", "retype", "swap", "field", "raw"]))
    entry = header[data.draw(st.sampled_from(names))]
    if how == "field":  # anything: mostly rejected by the safetensors library itself
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if key == "dtype":
            entry[key] = data.draw(st.sampled_from(["F32", "U8", "I64", "F16", "BOOL", "F64", "X"]))
        else:
            entry[key] = data.draw(st.lists(_values | st.integers(-9, 9), max_size=3))
    elif how == "reshape":  # same element count: a valid file whose shapes differ from the config
        n = int(np.prod(entry["shape"]))
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        d = data.draw(st.sampled_from(divisors))
        entry["shape"] = data.draw(st.sampled_from([[n], [d, n // d], [n // d, d, 1], []]))
    elif how == "retype":  # same item size: valid for safetensors, wrong for the module
        groups = [["U8", "I8", "BOOL"], ["F32", "I32", "U32"], ["I64", "F64", "U64"]]
        group = next((g for g in groups if entry["dtype"] in g), [entry["dtype"]])
        entry["dtype"] = data.draw(st.sampled_from(group))
    elif how == "swap":  # two names trade their tensors
        other = data.draw(st.sampled_from(names))
        a, b = [k for k in names if header[k] is entry][0], other
        header[a], header[b] = header[b], header[a]
    if how != "raw":
        raw = _st_join(header, body)
    else:  # raw mutations of the length prefix and the JSON header
        n = struct.unpack_from("<Q", raw, 0)[0]
        fields = [(0, 8)] + [(8 + i, 1) for i in range(0, n, 7)]
        raw = _mutate(raw, data.draw(_mutations(len(fields))), fields)
    st_path.write_bytes(raw)
    _note(worker.run("quant", st_path.parent), st_path.parent)


_BAD_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, -0.0, 0.5, 1e-45, 3e38, 15.0,
               16.0, 255.0, 256.0, 2.0**40]  # fmt: skip


@FUZZ
@given(data=st.data())
def test_fuzz_quant_tensor_values(
    seeds: dict[str, Path], worker: _Worker, scratch: Path, data: Any
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, st_path = _copy_ckpt(seeds["quant"], scratch / "val")
    with safe_open(str(st_path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(tensors)))
        t = tensors[name].reshape(-1)
        if t.numel() == 0:
            continue
        i = data.draw(st.integers(0, t.numel() - 1))
        if t.dtype.is_floating_point:
            t[i] = data.draw(st.sampled_from(_BAD_FLOATS) | st.floats(width=32))
        elif t.dtype == torch.int64:
            t[i] = data.draw(st.sampled_from([-1, 0, 31, 32, 2**40, -(2**63)]) | st.integers(0, 31))
        else:
            t[i] = data.draw(st.integers(0, 255))
    save_file(tensors, str(st_path), metadata=meta)
    _note(worker.run("quant", st_path.parent), st_path.parent)


def _rewrite_tensor(st_path: Path, name: str, fn: Any) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(st_path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(st_path), metadata=meta)


@pytest.mark.parametrize(
    ("name", "fn", "match"),
    [
        ("1.scales", lambda t: t.index_fill(1, torch.tensor([0]), float("nan")), "scales.*finite"),
        ("1.scales", lambda t: -t, "scales must be finite and > 0"),
        ("0.scales", lambda t: t * 0, "'0'.*scales"),
        ("1.zeros", lambda t: t + 16, r"zeros must be integers in \[0, 15\]"),
        ("1.zeros", lambda t: t + 0.5, "zeros must be integers"),
        ("0.zeros", lambda t: t - 200, r"integers in \[0, 255\]"),
        ("3.perm", lambda t: torch.zeros_like(t), "not a permutation"),
        ("3.perm", lambda t: t + 1, "not a permutation"),
        ("3.pre_scale", lambda t: t * 0, "pre_scale must be finite and > 0"),
        ("3.inner.bias", lambda t: t * float("inf"), "bias must be finite"),
        # stored dtype or shape differs from what the config declares (a float qweight was
        # silently cast to uint8 by load_state_dict)
        ("1.qweight", lambda t: t.float() * 1.5, "'1.qweight' is F32"),
        ("3.perm", lambda t: t.int(), "'3.perm' is I32"),
        ("1.scales", lambda t: t[:, :1], r"'1.scales' is F32 \[32, 1\]"),
    ],
)
def test_quant_bad_values_raise(
    seeds: dict[str, Path], tmp_path: Path, name: str, fn: Any, match: str
) -> None:
    from slimforge.quant import load_quantized

    _, st_path = _copy_ckpt(seeds["quant"], tmp_path / "c")
    _rewrite_tensor(st_path, name, fn)
    with pytest.raises(ValueError, match=match):
        load_quantized(_factory, tmp_path / "c")


@pytest.mark.parametrize(
    ("module", "key", "value", "match"),
    [
        ("1", "bits", 3, "bits must be 4 or 8"),
        ("1", "bits", True, "bits must be 4 or 8"),
        ("1", "group_size", 48, "group_size"),
        ("1", "in_features", 2**40, r"in_features = \d+ is outside"),
        ("1", "in_features", "64", "must be an integer"),
        ("1", "bias", 1, "true or false"),
        ("0", "padding_idx", 99, "padding_idx"),
        ("0", "embedding_dim", 65, "INT4|divisible"),
        ("3", "inner", {"type": "InputTransformedLinear"}, "nested too deeply|missing field"),
        ("3", "in_features", 64, "inner module takes 32"),
        ("1", "type", "Linear", "unknown module type 'Linear'"),
        # declared sizes the stored tensors do not have: caught before anything is allocated
        ("1", "out_features", 2**20, r"'1.qweight' is U8 \[32, 32\].*\[1048576, 32\]"),
        ("0", "num_embeddings", 2**31 - 1, "'0.qweight' is U8"),
    ],
)
def test_quant_bad_configs_raise(
    seeds: dict[str, Path],
    worker: _Worker,
    tmp_path: Path,
    module: str,
    key: str,
    value: Any,
    match: str,
) -> None:
    cfg_path, _ = _copy_ckpt(seeds["quant"], tmp_path / "c")
    cfg = json.loads(cfg_path.read_text())
    cfg["modules"][module][key] = value
    cfg_path.write_text(json.dumps(cfg))
    r = worker.run("quant", tmp_path / "c")  # in the worker: the memory bound applies
    assert r["outcome"] == "ValueError", r
    assert re.search(match, r["detail"]), r["detail"]
    assert str(cfg_path) in r["detail"] or "model.safetensors" in r["detail"]


def test_quant_config_file_limits(seeds: dict[str, Path], tmp_path: Path) -> None:
    from slimforge.quant import load_quantized

    cfg_path, st_path = _copy_ckpt(seeds["quant"], tmp_path / "c")
    cfg_path.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply|not valid"):
        load_quantized(_factory, tmp_path / "c")
    cfg_path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        load_quantized(_factory, tmp_path / "c")
    cfg_path.write_text('{"format": "slimforge-quant", "version": 1, "modules": []}')
    with pytest.raises(ValueError, match="'modules' must be an object"):
        load_quantized(_factory, tmp_path / "c")
    _copy_ckpt(seeds["quant"], tmp_path / "c")
    st_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_quantized(_factory, tmp_path / "c")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
