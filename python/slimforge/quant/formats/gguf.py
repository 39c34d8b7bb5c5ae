"""Read GGUF files (llama.cpp) and dequantize F32 / F16 / BF16, Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0
and the k-quants Q2_K / Q3_K / Q4_K / Q5_K / Q6_K (what Q4_K_M / Q5_K_M / Q6_K files hold).

The container (version 2 and 3): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count, metadata key/value pairs, tensor infos (name, dims in ggml order — fastest first —, type,
offset), then tensor data aligned to ``general.alignment`` (default 32). Little-endian only.

Block layouts (32 weights per block):

- Q4_0, 18 bytes: fp16 d, 16 bytes; byte j holds element j (low nibble) and j + 16 (high);
  w = (q - 8) * d.
- Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes as Q4_0; w = q * d + m.
- Q5_0, 22 bytes: fp16 d, u32 qh, 16 bytes as Q4_0; bit j of qh is bit 4 of element j;
  w = (q - 16) * d.
- Q5_1, 24 bytes: fp16 d, fp16 m, u32 qh, 16 bytes; w = q * d + m.
- Q8_0, 34 bytes: fp16 d, 32 int8; w = q * d.

k-quants (super-blocks of 256 weights in sub-blocks of 16 or 32, each with its own scale):

- Q2_K, 84 bytes: 16 bytes of 4-bit scale / 4-bit min pairs, 64 bytes of 2-bit codes, fp16 d,
  fp16 dmin; w = d * sc * q - dmin * m per sub-block of 16.
- Q3_K, 110 bytes: 32-byte high-bit mask, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales,
  fp16 d; w = d * (sc - 32) * (q - 4 * (1 - hbit)).
- Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
  w = d * sc * q - dmin * m per sub-block of 32.
- Q5_K, 176 bytes: as Q4_K plus a 32-byte fifth-bit plane before the nibbles.
- Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d;
  w = d * sc * (q - 32) per sub-block of 16.

Within a block, codes are laid out as llama.cpp's ``dequantize_row_*`` reads them; the results
equal the ``gguf`` package's dequantization bit for bit (tests). Data are memory-mapped;
dequantization is vectorised NumPy in float32.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFTensor", "GGML_TYPES", "dequantize_gguf_tensor", "read_gguf"]

# ggml type id -> (name, block size in elements, bytes per block): the types this module decodes.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}

# Every type ggml knows (gguf 0.19's GGML_QUANT_SIZES): a file may hold types that are not
# decoded here; their data ranges are still checked, and ``dequantize`` raises.
_GGML_LAYOUTS: dict[int, tuple[str, int, int]] = {
    **GGML_TYPES,
    9: ("Q8_1", 32, 40),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# Limits on what a header may declare (module attributes: raise them for unusual files). Every
# count is also checked against the bytes left in the file before anything is allocated, so
# the parsed header never holds more objects than the file has bytes.
#: Longest string (metadata key or value, tensor name) in bytes.
MAX_STRING_BYTES = 1 << 26
#: Most elements in one metadata array (the largest vocabularies have ~256k tokens).
MAX_ARRAY_LEN = 1 << 24
#: Deepest nesting of metadata arrays (arrays of arrays).
MAX_ARRAY_DEPTH = 4
#: Most metadata key/value pairs, and most tensors.
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
#: Most dimensions of a tensor (ggml's GGML_MAX_DIMS).
MAX_DIMS = 4

_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_ARRAY_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
             10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
# Fewest bytes a value of each metadata type takes (a string: its u64 length; an array: its
# u32 element type and u64 count).
_MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALAR.items()}, _STRING: 8, _ARRAY: 12}
# Fewest bytes of a key/value pair (empty key, u32 type, a one-byte value) and of a tensor info
# (empty name, u32 n_dims = 0, u32 type, u64 offset).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, metadata count


@dataclass
class GGUFTensor:
    """One tensor: ``shape`` in NumPy (row-major) order, ``ggml_type`` id, raw ``data`` bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data: np.ndarray = field(repr=False)

    @property
    def type_name(self) -> str:
        return _GGML_LAYOUTS.get(self.ggml_type, (f"type{self.ggml_type}", 0, 0))[0]

    def dequantize(self) -> np.ndarray:
        """float32 array of ``shape``."""
        return dequantize_gguf_tensor(self.data, self.ggml_type, self.shape)


@dataclass
class GGUFFile:
    """Parsed GGUF: ``metadata`` {key: value} and ``tensors`` {name: GGUFTensor};
    ``metadata_types`` {key: GGUF value type id, or ``(9, element type id)`` for an array}, so
    a writer can reproduce the file's types."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    metadata_types: dict[str, int | tuple[int, int]] = field(default_factory=dict)


class _Cursor:
    """Reads the header; every length is checked against the bytes left before it is used."""

    def __init__(self, buf: np.ndarray, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str, msg: str) -> ValueError:
        return ValueError(f"{self.path}: invalid GGUF (corrupt or truncated): {what}: {msg}")

    def take(self, n: int, what: str = "header") -> bytes:
        if n > self.left:
            raise ValueError(
                f"{self.path}: truncated GGUF: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.left} left"
            )
        b = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return b

    def scalar(self, fmt: str, what: str = "header") -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, per_item: int, limit: int) -> int:
        """A u64 count of items of at least ``per_item`` bytes each, checked against ``limit``
        and against the bytes left in the file."""
        n = self.scalar("<Q", what)
        if n > limit:
            raise self.fail(what, f"{n} exceeds the limit of {limit}")
        if n * per_item > self.left:
            raise self.fail(
                what,
                f"{n} items of at least {per_item} bytes each do not fit in the "
                f"{self.left} bytes left in the file",
            )
        return n

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"{what} length")
        if n > MAX_STRING_BYTES:
            raise self.fail(what, f"string length {n} exceeds the limit of {MAX_STRING_BYTES}")
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(what, f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
            etype = self.scalar("<I", f"{what} element type")
            if etype not in _MIN_VALUE_BYTES:
                raise self.fail(what, f"unknown array element type {etype}")
            n = self.count(f"{what} array length", _MIN_VALUE_BYTES[etype], MAX_ARRAY_LEN)
            if etype in _ARRAY_NP:
                dt = np.dtype(_ARRAY_NP[etype])
                return np.frombuffer(self.take(dt.itemsize * n, what), dtype=dt).tolist()
            return [self.value(etype, what, depth + 1) for _ in range(n)]
        raise self.fail(what, f"unknown metadata value type {vtype}")


def _alignment(metadata: dict[str, Any], cur: _Cursor) -> int:
    align = metadata.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int):
        raise cur.fail("general.alignment", f"must be an integer, got {align!r}")
    if align <= 0 or align & (align - 1):
        raise cur.fail("general.alignment", f"must be a positive power of two, got {align}")
    return align


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (memory-mapped; tensor data are not copied until dequantized).

    The file may be untrusted: a malformed one raises ``ValueError`` naming the file and the
    field, before anything the header declares is allocated. Checked: magic and version; every
    count, string length and array length against the module limits (``MAX_*``) and against
    the bytes left in the file; metadata value types and array nesting; duplicate keys and
    tensor names; ``general.alignment`` (a positive power of two); each tensor's dimension
    count, its type id (one ggml knows), that its first dimension is a whole number of blocks,
    that its offset is aligned, and that its data lie inside the file after the header without
    overlapping another tensor's. Memory: the metadata objects (bounded by the header's size)
    plus the memory map; tensor data are views of the map.
    """
    path = str(path)
    size = os.path.getsize(path)
    if size < _HEADER_BYTES:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head != b"GGUF"[: len(head)] or not head:
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        raise ValueError(
            f"{path}: truncated GGUF: {size} bytes, the fixed header alone needs {_HEADER_BYTES}"
        )
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    if cur.take(4, "magic") != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} not supported (expected 2 or 3)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    for what, n, limit in (
        ("tensor count", n_tensors, MAX_TENSORS),
        ("metadata count", n_kv, MAX_KV),
    ):
        if n > limit:
            raise cur.fail(what, f"{n} exceeds the limit of {limit}")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise cur.fail(
            "tensor count / metadata count",
            f"{n_tensors} tensors and {n_kv} key/value pairs cannot fit in {size} bytes",
        )
    metadata: dict[str, Any] = {}
    metadata_types: dict[str, int | tuple[int, int]] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r}", "duplicate key")
        vtype = cur.scalar("<I", f"metadata {key!r} type")
        if vtype == _ARRAY and cur.left >= 4:  # the element type, read again by value()
            elem = int.from_bytes(cur.buf[cur.pos : cur.pos + 4].tobytes(), "little")
            metadata_types[key] = (vtype, elem)
        else:
            metadata_types[key] = vtype
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise cur.fail(
            "tensor count", f"{n_tensors} tensor infos do not fit in the {cur.left} bytes left"
        )
    infos: list[tuple[str, list[int], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor {i} name")
        if name in seen:
            raise cur.fail(f"tensor {name!r}", "duplicate tensor name")
        seen.add(name)
        n_dims = cur.scalar("<I", f"tensor {name!r} n_dims")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} n_dims", f"{n_dims} exceeds {MAX_DIMS}")
        dims = [cur.scalar("<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
        ttype = cur.scalar("<I", f"tensor {name!r} type")
        offset = cur.scalar("<Q", f"tensor {name!r} offset")
        infos.append((name, dims, ttype, offset))
    align = _alignment(metadata, cur)
    start = (cur.pos + align - 1) // align * align
    tensors = {}
    ranges: list[tuple[int, int, str]] = []
    for name, dims, ttype, offset in infos:
        if ttype not in _GGML_LAYOUTS:
            raise cur.fail(f"tensor {name!r} type", f"unknown ggml type id {ttype}")
        tname, block, nbytes = _GGML_LAYOUTS[ttype]
        n = math.prod(dims)  # Python ints: no overflow
        if dims and dims[0] % block:
            raise cur.fail(
                f"tensor {name!r} dims",
                f"first dimension {dims[0]} is not a multiple of the {tname} block of {block}",
            )
        if n % block:
            raise cur.fail(
                f"tensor {name!r} dims", f"{n} elements are not a multiple of {block} ({tname})"
            )
        nbytes_total = n // block * nbytes
        if offset % align:
            raise cur.fail(f"tensor {name!r} offset", f"{offset} is not a multiple of {align}")
        lo = start + offset
        if lo + nbytes_total > size:
            raise cur.fail(
                f"tensor {name!r} offset/dims",
                f"data [{lo}, {lo + nbytes_total}) run past the end of the file ({size} bytes)",
            )
        ranges.append((lo, lo + nbytes_total, name))
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ttype, buf[lo : lo + nbytes_total])
    reach, last = start, ""  # the furthest end of the data seen so far, and whose it is
    for lo, hi, name in sorted(r for r in ranges if r[1] > r[0]):
        if lo < reach:
            raise cur.fail(f"tensor {name!r} offset", f"its data overlap those of tensor {last!r}")
        reach, last = hi, name
    return GGUFFile(version, metadata, tensors, metadata_types)


def dequantize_gguf_tensor(
    data: np.ndarray, ggml_type: int, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Dequantize raw GGUF tensor bytes (uint8) of a supported type to float32.

    Returns a flat array, or one of ``shape`` when given.
    """
    raw = np.ascontiguousarray(np.asarray(data).view(np.uint8).reshape(-1))
    if ggml_type not in GGML_TYPES:
        raise ValueError(
            f"GGML type {ggml_type} is not supported; supported: "
            + ", ".join(v[0] for v in GGML_TYPES.values())
        )
    name, block, nbytes = GGML_TYPES[ggml_type]
    if raw.size % nbytes:
        raise ValueError(f"{name} data of {raw.size} bytes is not a whole number of blocks")
    n = raw.size // nbytes * block
    if shape is not None:
        shape = tuple(shape)
        if not all(isinstance(d, int | np.integer) and d >= 0 for d in shape):
            raise ValueError(f"shape {shape} must hold non-negative integers")
        if math.prod(int(d) for d in shape) != n:
            raise ValueError(f"shape {shape} does not match {n} elements")
    if raw.size == 0:
        out = np.zeros(0, np.float32)
    elif name == "F32":
        out = raw.view("<f4").astype(np.float32)
    elif name == "F16":
        out = raw.view("<f2").astype(np.float32)
    elif name == "BF16":
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        out = _DECODERS[name](raw.reshape(-1, nbytes)).reshape(-1)
    return out if shape is None else out.reshape(shape)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """(n_blocks, 1) float32 from the fp16 at byte ``at`` of each block."""
    return blocks[:, at : at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: element j is the low nibble of byte j, j + 16 the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bits, bit j for element j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).astype(np.int8) - np.int8(16)
    return _f16(b, 0) * q.astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes per block -> 8 six-bit scales and 8 six-bit mins (Q4_K / Q5_K packing): the first
    four of each in the low 6 bits of bytes 0-3 / 4-7, the last four in the nibbles of bytes
    8-11 with their top two bits in the top bits of bytes 0-3 / 4-7."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _sub_blocks(d: np.ndarray, sc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, 1) d, (n, k) per-sub-block multipliers, (n, k * m) codes -> (n, k, m) d * sc * q
    with d * sc rounded to float32 first, as llama.cpp does."""
    return (d * sc)[:, :, None] * q.reshape(q.shape[0], sc.shape[1], -1)


def _q2_k(b: np.ndarray) -> np.ndarray:
    scales, qs = b[:, 0:16], b[:, 16:80].reshape(-1, 2, 1, 32)
    shifts = np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(-1, 256).astype(np.float32)  # half, shift, 32 codes
    y = _sub_blocks(_f16(b, 80), (scales & 0x0F).astype(np.float32), q)
    return y - (_f16(b, 82) * (scales >> 4).astype(np.float32))[:, :, None]


def _q3_k(b: np.ndarray) -> np.ndarray:
    hmask, qs, s = b[:, 0:32], b[:, 32:96].reshape(-1, 2, 1, 32), b[:, 96:108]
    lo = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)  # scales 0-7, 8-15
    hi = np.concatenate([(s[:, 8:12] >> k) & 3 for k in (0, 2, 4, 6)], axis=1)
    sc = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    shifts = np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1)
    low = (qs >> shifts) & 3  # (n, half, shift, 32)
    bits = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)  # hmask bit 4 * half + shift
    high = (hmask[:, None, None, :] >> bits) & 1
    q = (low.astype(np.int8) - np.int8(4) * (np.int8(1) - high.astype(np.int8))).reshape(-1, 256)
    return _sub_blocks(_f16(b, 108), sc.astype(np.float32), q.astype(np.float32))


def _q4_k(b: np.ndarray) -> np.ndarray:
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 256).astype(np.float32)
    return _sub_blocks(_f16(b, 0), sc, q) - (_f16(b, 2) * mn)[:, :, None]


def _q5_k(b: np.ndarray) -> np.ndarray:
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # (n, 4, 2, 32): sub-block 2c + h
    bits = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    q = (low | (((qh[:, None, None, :] >> bits) & 1) << 4)).reshape(-1, 256).astype(np.float32)
    return _sub_blocks(_f16(b, 0), sc, q) - (_f16(b, 2) * mn)[:, :, None]


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32)  # half, -, first / second 32 bytes, 32
    qh = b[:, 128:192].reshape(-1, 2, 1, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, half, nibble, 32-byte run, 32)
    shifts = np.array([[0, 2], [4, 6]], dtype=np.uint8).reshape(1, 1, 2, 2, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).astype(np.int8) - np.int8(32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    return _sub_blocks(_f16(b, 208), sc, q.reshape(-1, 256).astype(np.float32))


_DECODERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
