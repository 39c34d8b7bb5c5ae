"""Read GGUF files (llama.cpp) and dequantize F32 / F16 / BF16 / Q4_0 / Q4_1 / Q8_0 tensors.

The container (version 2 and 3): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count, metadata key/value pairs, tensor infos (name, dims in ggml order — fastest first —, type,
offset), then tensor data aligned to ``general.alignment`` (default 32). Little-endian only.

Block layouts (32 weights per block):

- Q4_0, 18 bytes: fp16 d, 16 bytes; byte j holds element j (low nibble) and j + 16 (high);
  w = (q - 8) * d.
- Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes as Q4_0; w = q * d + m.
- Q8_0, 34 bytes: fp16 d, 32 int8; w = q * d.

Data are memory-mapped; dequantization is vectorised NumPy in float32.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFTensor", "GGML_TYPES", "dequantize_gguf_tensor", "read_gguf"]

# ggml type id -> (name, block size in elements, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}

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


@dataclass
class GGUFTensor:
    """One tensor: ``shape`` in NumPy (row-major) order, ``ggml_type`` id, raw ``data`` bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data: np.ndarray = field(repr=False)

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type{self.ggml_type}", 0, 0))[0]

    def dequantize(self) -> np.ndarray:
        """float32 array of ``shape``."""
        return dequantize_gguf_tensor(self.data, self.ggml_type, self.shape)


@dataclass
class GGUFFile:
    """Parsed GGUF: ``metadata`` {key: value} and ``tensors`` {name: GGUFTensor}."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buf: np.ndarray, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF (needed {n} bytes at {self.pos})")
        b = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _ARRAY_NP:
                dt = np.dtype(_ARRAY_NP[etype])
                arr = np.frombuffer(self.take(dt.itemsize * n), dtype=dt)
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (memory-mapped; tensor data are not copied until dequantized)."""
    path = str(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    if cur.take(4) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} not supported (expected 2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(metadata.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        n = int(np.prod(dims)) if dims else 1
        if ttype in GGML_TYPES:
            _, block, nbytes = GGML_TYPES[ttype]
            if n % block:
                raise ValueError(
                    f"{path}: tensor {name} has {n} elements, not a multiple of {block}"
                )
            size = n // block * nbytes
        else:
            size = 0  # unsupported type: kept as an empty view, dequantize() raises
        lo = start + offset
        if lo + size > len(buf):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ttype, buf[lo : lo + size])
    return GGUFFile(version, metadata, tensors)


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
    name, _, nbytes = GGML_TYPES[ggml_type]
    if raw.size % nbytes:
        raise ValueError(f"{name} data of {raw.size} bytes is not a whole number of blocks")
    if name == "F32":
        out = raw.view("<f4").astype(np.float32)
    elif name == "F16":
        out = raw.view("<f2").astype(np.float32)
    elif name == "BF16":
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = raw.reshape(-1, nbytes)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        if name == "Q8_0":
            q = blocks[:, 2:].view(np.int8).astype(np.float32)
            out = (d * q).reshape(-1)
        else:
            qs = blocks[:, -16:]
            nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8)
            if name == "Q4_0":
                out = (d * (nib - np.int8(8)).astype(np.float32)).reshape(-1)
            else:
                m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
                out = (d * nib.astype(np.float32) + m).reshape(-1)
    if shape is not None:
        if int(np.prod(shape)) != out.size:
            raise ValueError(f"shape {shape} does not match {out.size} elements")
        out = out.reshape(shape)
    return out
