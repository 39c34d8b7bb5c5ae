"""Write GGUF files (llama.cpp) and export Llama-architecture models to them.

- `write_gguf(path, metadata, tensors)`: the container (version 3) with typed metadata and raw
  tensor data, written atomically. Any tensor type the reader knows passes through byte for byte,
  so reading a file and writing it back reproduces its tensors exactly.
- `quantize_gguf(w, type_name)`: llama.cpp's round-to-nearest quantizers for F32, F16, BF16,
  Q4_0, Q4_1 and Q8_0 in NumPy (bit-identical to the ``gguf`` package's, which follow
  ``ggml-quants.c``'s reference code).
- `export_gguf(model, path, type)`: a `LlamaForCausalLM` (float, or quantized by slimforge)
  with its tokenizer, in the tensor names and q/k row order llama.cpp's converter produces. A
  quantized linear whose codes fit the target blocks is written code for code: INT4 with
  asymmetric codes and groups of 32 (or a multiple of 32) maps onto Q4_1 blocks (``d = scale``,
  ``m = -zero * scale``, both rounded to fp16), symmetric INT4 (zero 8) onto Q4_0, and any
  codes whose ``q - zero`` fits int8 onto Q8_0. Everything else is quantized again from the
  layer's effective float weight, and the returned `ExportReport` says which and by how much the
  written weights differ from the model's.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimforge.quant.formats.gguf import _GGML_LAYOUTS, GGUFTensor

__all__ = [
    "EXPORT_TYPES",
    "ExportReport",
    "TensorExport",
    "export_gguf",
    "quantize_gguf",
    "write_gguf",
]

# GGUF metadata value types.
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64, _I64, _F64 = range(13)
_SCALAR_FMT = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i",
               _F32: "<f", _BOOL: "<?", _U64: "<Q", _I64: "<q", _F64: "<d"}  # fmt: skip
_TYPE_IDS = {v[0]: k for k, v in _GGML_LAYOUTS.items()}

#: ``export_gguf`` types -> (ggml type of the linears, llama.cpp's ``general.file_type``).
EXPORT_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3),
                "q8_0": ("Q8_0", 7)}  # fmt: skip


# ------------------------------------------------------------------------------ container


def _infer_type(value: Any) -> int | tuple[int, int]:
    # What llama.cpp's converter writes for the llama keys: ints as u32, floats as f32, and
    # int arrays (token types) as i32.
    if isinstance(value, (bool, np.bool_)):
        return _BOOL
    if isinstance(value, (int, np.integer)):
        return _U32 if 0 <= int(value) < 2**32 else _I64
    if isinstance(value, (float, np.floating)):
        return _F32
    if isinstance(value, str):
        return _STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if items and all(isinstance(x, str) for x in items):
            return (_ARRAY, _STRING)
        if items and all(isinstance(x, (float, np.floating)) for x in items):
            return (_ARRAY, _F32)
        if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
            return (_ARRAY, _I32)
        if all(isinstance(x, (bool, np.bool_)) for x in items):
            return (_ARRAY, _BOOL)
    raise TypeError(f"cannot store {type(value).__name__} as GGUF metadata")


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_value(value: Any, vtype: int | tuple[int, int]) -> bytes:
    if isinstance(vtype, tuple):
        _, etype = vtype
        items = list(value)
        head = struct.pack("<IQ", etype, len(items))
        if etype == _STRING:
            return head + b"".join(_encode_string(str(x)) for x in items)
        if etype in _SCALAR_FMT:
            fmt = _SCALAR_FMT[etype]
            return head + np.asarray(items, dtype=np.dtype(fmt)).tobytes()
        if etype == _ARRAY:
            return head + b"".join(_encode_value(x, _infer_type(x)) for x in items)
        raise ValueError(f"unknown GGUF array element type {etype}")
    if vtype == _STRING:
        return _encode_string(str(value))
    if vtype in _SCALAR_FMT:
        return struct.pack(_SCALAR_FMT[vtype], value)
    raise ValueError(f"unknown GGUF metadata type {vtype}")


def write_gguf(
    path: str | Path,
    metadata: Mapping[str, Any],
    tensors: Iterable[GGUFTensor],
    types: Mapping[str, int | tuple[int, int]] | None = None,
    alignment: int = 32,
) -> None:
    """Write a GGUF v3 file atomically (a temporary file renamed into place).

    ``metadata`` values are typed by ``types`` (GGUF value type ids, ``(9, element id)`` for
    arrays, as `GGUFFile.metadata_types` holds them) or else inferred: bool, int as u32 (i64
    outside its range), float as f32, str, lists of str / float / int (i32). ``tensors``: each
    with its NumPy-order ``shape``, ``ggml_type`` and raw ``data`` bytes (a whole number of
    blocks); they are written in order, each at an offset aligned to ``alignment``.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment}")
    types = dict(types or {})
    meta = dict(metadata)
    alignment = int(meta.get("general.alignment", alignment))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment must be a positive power of two, got {alignment}")
    if alignment != 32 and "general.alignment" not in meta:
        meta["general.alignment"] = alignment
        types["general.alignment"] = _U32
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    kv = bytearray()
    for key, value in meta.items():
        vtype = types[key] if key in types else _infer_type(value)
        kv += _encode_string(key)
        kv += struct.pack("<I", vtype[0] if isinstance(vtype, tuple) else vtype)
        kv += _encode_value(value, vtype)
    infos = bytearray()
    offsets, offset = [], 0
    for t in tensors:
        if t.ggml_type not in _GGML_LAYOUTS:
            raise ValueError(f"tensor {t.name}: unknown ggml type {t.ggml_type}")
        tname, block, nbytes = _GGML_LAYOUTS[t.ggml_type]
        n = math.prod(t.shape)
        if t.shape and t.shape[-1] % block:
            raise ValueError(
                f"tensor {t.name}: its last dimension {t.shape[-1]} is not a whole number of "
                f"{tname} blocks of {block}"
            )
        want = n // block * nbytes
        if np.asarray(t.data).nbytes != want:
            raise ValueError(
                f"tensor {t.name}: {tname} {t.shape} needs {want} bytes, got "
                f"{np.asarray(t.data).nbytes}"
            )
        infos += _encode_string(t.name)
        infos += struct.pack("<I", len(t.shape))
        infos += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
        infos += struct.pack("<IQ", t.ggml_type, offset)
        offsets.append(offset)
        offset += (want + alignment - 1) // alignment * alignment
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + bytes(kv) + bytes(infos)
    from slimforge.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header)
        pad = (-len(header)) % alignment
        fh.write(b"\0" * pad)
        written = 0
        for t, off in zip(tensors, offsets, strict=False):
            fh.write(b"\0" * (off - written))
            raw = np.ascontiguousarray(np.asarray(t.data)).view(np.uint8).reshape(-1)
            fh.write(raw.tobytes())
            written = off + raw.size


# ----------------------------------------------------------------------------- quantizers


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape[-1] % block:
        raise ValueError(
            f"rows of {w.shape[-1]} values are not a whole number of blocks of {block}"
        )
    return w.reshape(-1, block)


def _np_roundf(n: np.ndarray) -> np.ndarray:
    # C's roundf: half away from zero.
    a = np.abs(n)
    floored = np.floor(a)
    return np.sign(n) * (floored + np.floor(2 * (a - floored)))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes: element j in the low nibble of byte j, j + 16 high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def quantize_gguf(w: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's reference quantization of float32 ``w`` ``(..., n)`` (``n`` a multiple of
    the block) to raw bytes ``(..., bytes per row)``: F32, F16, BF16 (round to nearest even),
    Q8_0 (``d = absmax / 127``), Q4_0 (``d = -max / 8`` of the value of largest magnitude),
    Q4_1 (``d = (max - min) / 15``, ``m = min``)."""
    w = np.asarray(w, dtype=np.float32)
    lead = w.shape[:-1]
    if type_name == "F32":
        out = np.ascontiguousarray(w).view(np.uint8)
    elif type_name == "F16":
        out = w.astype(np.float16).view(np.uint8)
    elif type_name == "BF16":
        bits = np.ascontiguousarray(w).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = np.where(np.isnan(w), (bits >> 16) | 64, rounded)  # keep NaNs quiet NaNs
        out = rounded.astype(np.uint16).view(np.uint8)
    elif type_name == "Q8_0":
        b = _blocks(w, 32)
        d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
        qs = _np_roundf(b * _inverse(d)).astype(np.int8).view(np.uint8)
        out = np.concatenate([_f16_bytes(d), qs], axis=1)
    elif type_name == "Q4_0":
        b = _blocks(w, 32)
        imax = np.abs(b).argmax(axis=-1, keepdims=True)
        d = np.take_along_axis(b, imax, axis=-1) / np.float32(-8)
        q = np.trunc(b * _inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        out = np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)
    elif type_name == "Q4_1":
        b = _blocks(w, 32)
        hi, lo = b.max(axis=-1, keepdims=True), b.min(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((b - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        out = np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)
    else:
        raise ValueError(f"cannot quantize to {type_name}: F32, F16, BF16, Q8_0, Q4_0 or Q4_1")
    return np.ascontiguousarray(out).reshape(*lead, -1)


# -------------------------------------------------------------------------- model export


@dataclass
class TensorExport:
    """How one tensor was written: ``mapping`` is "codes" (the layer's integer codes copied
    into the blocks, scales rounded to fp16), "requantized" (quantized again from the layer's
    float weight) or "converted" (float written as F32/F16); errors compare the written
    weight, dequantized, with the model's effective weight."""

    name: str
    type_name: str
    mapping: str
    max_abs_error: float
    rel_rms_error: float


@dataclass
class ExportReport:
    """What `export_gguf` wrote: the file, its type and one `TensorExport` per tensor."""

    path: Path
    type: str
    tensors: list[TensorExport] = field(default_factory=list)

    def requantized(self) -> list[TensorExport]:
        return [t for t in self.tensors if t.mapping == "requantized"]

    def summary(self) -> str:
        n_codes = sum(t.mapping == "codes" for t in self.tensors)
        req = self.requantized()
        worst = max((t.rel_rms_error for t in self.tensors), default=0.0)
        line = (
            f"{self.path}: {len(self.tensors)} tensors as {self.type}; {n_codes} copied code "
            f"for code, {len(req)} re-quantized; largest relative RMS error {worst:.2e}"
        )
        if req:
            err = max(t.rel_rms_error for t in req)
            line += f" (re-quantized: up to {err:.2e})"
        return line


@dataclass
class _Weight:
    """A 2-D weight: its effective float value and, when it is a plain quantized layer, the
    codes ``q`` (uint8, (out, in)), ``scales`` and ``zeros`` ((out, in // group)) behind it."""

    w: np.ndarray
    q: np.ndarray | None = None
    scales: np.ndarray | None = None
    zeros: np.ndarray | None = None
    group: int = 0

    def rows(self, order: np.ndarray) -> _Weight:
        take = lambda a: None if a is None else a[order]  # noqa: E731
        return _Weight(self.w[order], take(self.q), take(self.scales), take(self.zeros), self.group)


def _weight_of(module: Any, name: str) -> _Weight:
    import torch
    from torch import nn

    from slimforge.quant.linear import QuantEmbedding, QuantLinear
    from slimforge.quant.primitives import unpack_int4
    from slimforge.quant.transformed import InputTransformedLinear

    def codes(m: QuantLinear | QuantEmbedding) -> _Weight:
        q = unpack_int4(m.qweight) if m.bits == 4 else m.qweight
        return _Weight(
            m.dequantize().numpy(),
            q.cpu().numpy(),
            m.scales.cpu().numpy(),
            m.zeros.cpu().numpy(),
            m.group_size,
        )

    if isinstance(module, (nn.Linear, nn.Embedding)):
        return _Weight(module.weight.detach().float().cpu().numpy())
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return codes(module)
    if isinstance(module, InputTransformedLinear) and isinstance(module.inner, QuantLinear):
        inner = codes(module.inner)
        w = torch.from_numpy(inner.w)
        identity = module.perm is None or torch.equal(module.perm.cpu(), torch.arange(w.shape[1]))
        if identity and module.pre_scale is None:
            return inner
        if module.pre_scale is not None:
            w = w / module.pre_scale.cpu()
        if module.perm is not None:
            w = torch.empty_like(w).index_copy_(1, module.perm.cpu(), w)
        return _Weight(w.numpy())
    raise TypeError(
        f"{name}: cannot export a {type(module).__name__} (merge adapters and unwrap custom "
        "layers first)"
    )


def _llama_permute(n_rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's converter for q/k (Hugging Face halves -> adjacent pairs):
    output row r is input row ``order[r]``."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def _from_codes(src: _Weight, type_name: str) -> np.ndarray | None:
    """The blocks of ``type_name`` holding ``src``'s codes, or None when they do not fit."""
    if src.q is None or src.scales is None or src.zeros is None or src.group % 32:
        return None
    out_f, in_f = src.q.shape
    s = np.repeat(src.scales, src.group // 32, axis=1).reshape(-1, 1).astype(np.float32)
    z = np.repeat(src.zeros, src.group // 32, axis=1).reshape(-1, 1).astype(np.float32)
    q = src.q.reshape(-1, 32).astype(np.int16)
    if type_name == "Q4_1":
        if int(q.max(initial=0)) > 15:
            return None
        blocks = np.concatenate([_f16_bytes(s), _f16_bytes(-z * s), _pack_nibbles(q)], axis=1)
    elif type_name == "Q4_0":
        if int(q.max(initial=0)) > 15 or not np.all(z == 8):
            return None
        blocks = np.concatenate([_f16_bytes(s), _pack_nibbles(q)], axis=1)
    elif type_name == "Q8_0":
        signed = q - z.astype(np.int16)
        if int(signed.min(initial=0)) < -128 or int(signed.max(initial=0)) > 127:
            return None
        blocks = np.concatenate([_f16_bytes(s), signed.astype(np.int8).view(np.uint8)], axis=1)
    else:
        return None
    return np.ascontiguousarray(blocks).reshape(out_f, -1)


def _errors(w: np.ndarray, raw: np.ndarray, ggml_type: int) -> tuple[float, float]:
    from slimforge.quant.formats.gguf import dequantize_gguf_tensor

    back = dequantize_gguf_tensor(raw, ggml_type, w.shape).astype(np.float64)
    diff = back - w.astype(np.float64)
    rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) if w.size else 0.0
    err = float(np.sqrt(np.mean(diff**2))) if w.size else 0.0
    return float(np.abs(diff).max(initial=0.0)), err / rms if rms else err


def _encode_weight(name: str, src: _Weight, type_name: str) -> tuple[GGUFTensor, TensorExport]:
    w = src.w
    if w.shape[-1] % _GGML_LAYOUTS[_TYPE_IDS[type_name]][1]:
        type_name = "F32"  # rows that are no whole number of blocks stay float, as in llama.cpp
    raw = _from_codes(src, type_name)
    mapping = "codes"
    if raw is None:
        raw = quantize_gguf(w, type_name)
        mapping = "converted" if type_name in ("F32", "F16", "BF16") else "requantized"
    tid = _TYPE_IDS[type_name]
    max_err, rel = _errors(w, raw, tid)
    return GGUFTensor(name, tuple(w.shape), tid, raw), TensorExport(
        name, type_name, mapping, max_err, rel
    )


def _tokenizer_metadata(
    tokenizer: Any, vocab_size: int
) -> tuple[dict[str, Any], dict[str, int | tuple[int, int]]]:
    from slimforge.models.tokenizer import ByteLevelBPETokenizer
    from slimforge.quant.formats.gguf import read_gguf

    if tokenizer is None:
        return {}, {}
    if isinstance(tokenizer, (str, Path)):
        f = read_gguf(tokenizer)
        keys = [k for k in f.metadata if k.startswith("tokenizer.")]
        return {k: f.metadata[k] for k in keys}, {
            k: f.metadata_types[k] for k in keys if k in f.metadata_types
        }
    if not isinstance(tokenizer, ByteLevelBPETokenizer):
        raise TypeError(
            "tokenizer must be a ByteLevelBPETokenizer or the path of a GGUF file to copy "
            f"tokenizer metadata from, got {type(tokenizer).__name__}"
        )
    tokens = list(tokenizer.tokens)
    if len(tokens) != vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, the model {vocab_size}")
    special = {
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    } - {None}
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm" if tokenizer.split_digits else "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": [
            f"{a} {b}" for (a, b), _ in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])
        ],
    }
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = int(value)
    return meta, {}


def export_gguf(
    model: Any,
    path: str | Path,
    type: str = "q8_0",
    tokenizer: Any = None,
    name: str | None = None,
    head_type: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Write a `LlamaForCausalLM` as a GGUF file llama.cpp loads.

    Args:
        model: a ``LlamaForCausalLM``, float or quantized by slimforge (``QuantLinear``,
            GPTQ/AWQ's ``InputTransformedLinear``, ``QuantEmbedding``).
        type: "q4_0", "q4_1", "q8_0", "f16" or "f32": the type of the linear weights (norms
            stay F32; rows that are no whole number of 32-blocks stay F32).
        tokenizer: a ``ByteLevelBPETokenizer`` (its vocabulary, merges and BOS/EOS ids), or the
            path of a GGUF file whose ``tokenizer.*`` metadata is copied as it is (chat template
            and token types included). Without one the file has no vocabulary, and llama.cpp
            refuses to load it.
        name: ``general.name``.
        head_type: the type of the output head (``output.weight``, or ``token_embd`` when the
            embeddings are tied); default Q8_0 for the 4-bit types (as llama.cpp's quantizer
            does for this model's shapes), else ``type``.
        metadata: extra keys (win over the generated ones).

    Returns:
        An `ExportReport`: per tensor, whether codes were copied or the weight re-quantized,
        and the error of the written weight against the model's.
    """
    from slimforge.models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"export_gguf writes Llama-architecture models (LlamaForCausalLM), got "
            f"{model.__class__.__name__}"
        )
    key = str(type).lower()
    if key not in EXPORT_TYPES:
        raise ValueError(f"type must be one of {sorted(EXPORT_TYPES)}, got {type!r}")
    tname, file_type = EXPORT_TYPES[key]
    if head_type is None:
        head_name = "Q8_0" if tname in ("Q4_0", "Q4_1") else tname
    elif head_type.lower() in EXPORT_TYPES:
        head_name = EXPORT_TYPES[head_type.lower()][0]
    else:
        raise ValueError(f"head_type must be one of {sorted(EXPORT_TYPES)}, got {head_type!r}")
    c = model.cfg
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": name or "slimforge-llama",
        "general.file_type": file_type,
        "general.quantization_version": 2,
        "llama.vocab_size": c.vocab_size,
        "llama.context_length": c.max_seq_len,
        "llama.embedding_length": c.hidden_size,
        "llama.block_count": c.num_layers,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.rope.dimension_count": c.head_dim,
        "llama.rope.freq_base": float(c.rope_theta),
        "llama.attention.head_count": c.num_heads,
        "llama.attention.head_count_kv": c.num_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(c.norm_eps),
    }
    tok_meta, tok_types = _tokenizer_metadata(tokenizer, c.vocab_size)
    meta.update(tok_meta)
    meta.update(metadata or {})
    tensors: list[GGUFTensor] = []
    report = ExportReport(Path(path), key)

    def add(gname: str, src: _Weight, type_name: str) -> None:
        t, info = _encode_weight(gname, src, type_name)
        tensors.append(t)
        report.tensors.append(info)

    def norm(gname: str, weight: Any) -> None:
        w = weight.detach().float().cpu().numpy()
        tensors.append(GGUFTensor(gname, tuple(w.shape), 0, np.ascontiguousarray(w)))
        report.tensors.append(TensorExport(gname, "F32", "converted", 0.0, 0.0))

    tied = model.lm_head is None
    add("token_embd.weight", _weight_of(model.embed_tokens, "embed_tokens"),
        head_name if tied else tname)  # fmt: skip
    for i, layer in enumerate(model.layers):
        p, at, mlp = f"blk.{i}.", layer.self_attn, layer.mlp
        norm(p + "attn_norm.weight", layer.input_layernorm.weight)
        q = _weight_of(at.q_proj, f"layers.{i}.self_attn.q_proj")
        k = _weight_of(at.k_proj, f"layers.{i}.self_attn.k_proj")
        add(p + "attn_q.weight", q.rows(_llama_permute(q.w.shape[0], c.num_heads)), tname)
        add(p + "attn_k.weight", k.rows(_llama_permute(k.w.shape[0], c.num_kv_heads)), tname)
        add(p + "attn_v.weight", _weight_of(at.v_proj, f"layers.{i}.self_attn.v_proj"), tname)
        add(p + "attn_output.weight", _weight_of(at.o_proj, f"layers.{i}.self_attn.o_proj"), tname)
        norm(p + "ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(p + "ffn_gate.weight", _weight_of(mlp.gate_proj, f"layers.{i}.mlp.gate_proj"), tname)
        add(p + "ffn_up.weight", _weight_of(mlp.up_proj, f"layers.{i}.mlp.up_proj"), tname)
        add(p + "ffn_down.weight", _weight_of(mlp.down_proj, f"layers.{i}.mlp.down_proj"), tname)
    norm("output_norm.weight", model.norm.weight)
    if not tied:
        add("output.weight", _weight_of(model.lm_head, "lm_head"), head_name)
    write_gguf(path, meta, tensors, types=tok_types)
    return report
