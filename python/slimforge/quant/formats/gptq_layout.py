"""GPTQ checkpoint tensors in the AutoGPTQ / GPTQModel layout, bit-exact.

Per linear (``bits`` in 2, 4, 8; ``pack = 32 // bits`` values per int32 word):

- ``qweight`` int32 ``[in / pack, out]``: word ``[r, n]`` holds input rows ``pack*r + j`` of output
  column n, element j at bits ``bits*j`` (AutoGPTQ ``qlinear_cuda_old.pack``).
- ``qzeros`` int32 ``[n_groups, out / pack]``: packed along the output dimension the same way.
  Version 1 (AutoGPTQ, the default) stores ``zero - 1`` (masked to ``bits`` bits, so a zero of 0 is
  stored as 2^bits - 1; AutoGPTQ's own v1 kernels then read it as 2^bits, the known v1 asymmetric
  overflow); version 2 (GPTQModel) stores ``zero``.
- ``scales`` float16 ``[n_groups, out]``; ``g_idx`` int32 ``[in]``; optional ``bias`` float16
  ``[out]``.

Dequantization: ``w[n, k] = scales[g_idx[k], n] * (q[n, k] - zero[g_idx[k], n])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["export_gptq", "import_gptq"]


def _check_bits(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"GPTQ packing supports bits 2, 4 or 8; got {bits}")
    return 32 // bits


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) ints in [0, 2^bits) -> (rows / pack, cols) int32, pack consecutive rows/word."""
    pack = 32 // bits
    rows, cols = values.shape
    if rows % pack != 0:
        raise ValueError(f"{rows} rows cannot be packed {pack} per int32 word")
    v = values.to(torch.int64).reshape(rows // pack, pack, cols)
    shifts = (torch.arange(pack, dtype=torch.int64) * bits).reshape(1, pack, 1)
    words = (v << shifts).sum(dim=1)
    # Reinterpret the unsigned 32-bit words as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``_pack_rows``: (rows / pack, cols) int32 -> (rows, cols) int64."""
    pack = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(pack, dtype=torch.int64) * bits).reshape(1, pack, 1)
    vals = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
    return vals.reshape(-1, words.shape[1])


def export_gptq(qlinear_state: Mapping[str, Any], version: int = 1) -> dict[str, torch.Tensor]:
    """Pack one quantized linear into GPTQ checkpoint tensors.

    qlinear_state keys: ``q`` (out, in) integer codes; ``scales``, ``zeros`` (out, n_groups)
    float; ``bits`` (default 4); optional ``g_idx`` (in,) (default ``k // group_size``, then
    ``group_size`` is required), optional ``bias`` (out,). Returns ``qweight``, ``qzeros``,
    ``scales``, ``g_idx`` (+ ``bias``).
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (AutoGPTQ) or 2 (GPTQModel); got {version}")
    bits = int(qlinear_state.get("bits", 4))
    pack = _check_bits(bits)
    q = torch.as_tensor(qlinear_state["q"])
    scales = torch.as_tensor(qlinear_state["scales"])
    zeros = torch.as_tensor(qlinear_state["zeros"])
    if q.dim() != 2:
        raise ValueError(f"q must be (out, in); got shape {tuple(q.shape)}")
    out_f, in_f = q.shape
    if scales.shape != zeros.shape or scales.dim() != 2 or scales.shape[0] != out_f:
        raise ValueError(
            f"scales and zeros must both be (out={out_f}, n_groups); got "
            f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    n_groups = scales.shape[1]
    g_idx = qlinear_state.get("g_idx")
    if g_idx is None:
        gs = qlinear_state.get("group_size")
        if gs is None:
            raise ValueError("give g_idx or group_size")
        g_idx = torch.arange(in_f) // int(gs)
    g_idx = torch.as_tensor(g_idx).to(torch.int64)
    if g_idx.shape != (in_f,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise ValueError(f"g_idx must be ({in_f},) with values in [0, {n_groups})")
    maxq = 2**bits - 1
    qi = q.to(torch.int64)
    if int(qi.min()) < 0 or int(qi.max()) > maxq:
        raise ValueError(f"codes must lie in [0, {maxq}] for {bits} bits")
    zi = torch.round(zeros.double()).to(torch.int64)
    if not torch.equal(zi.double(), zeros.double()) or int(zi.min()) < 0 or int(zi.max()) > maxq:
        raise ValueError(f"zeros must be integers in [0, {maxq}]")
    if out_f % pack != 0 or in_f % pack != 0:
        raise ValueError(f"in ({in_f}) and out ({out_f}) features must be multiples of {pack}")
    stored_zeros = (zi - 1) & maxq if version == 1 else zi
    tensors = {
        "qweight": _pack_rows(qi.T.contiguous(), bits),
        "qzeros": _pack_rows(stored_zeros.contiguous(), bits).T.contiguous(),
        "scales": scales.T.contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }
    bias = qlinear_state.get("bias")
    if bias is not None:
        tensors["bias"] = torch.as_tensor(bias).to(torch.float16)
    return tensors


def import_gptq(
    tensors: Mapping[str, torch.Tensor], bits: int = 4, version: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack GPTQ checkpoint tensors of one linear.

    Returns ``(q (out, in) uint8, scales (out, n_groups) float32, zeros (out, n_groups) float32,
    g_idx (in,) int32)``; ``g_idx`` defaults to contiguous groups when absent.
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (AutoGPTQ) or 2 (GPTQModel); got {version}")
    pack = _check_bits(bits)
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise ValueError(f"GPTQ tensors lack '{key}' (have {sorted(tensors)})")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(
            f"qweight and qzeros must be int32; got {qweight.dtype} and {qzeros.dtype}"
        )
    in_f, out_f = qweight.shape[0] * pack, qweight.shape[1]
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, out_f) or qzeros.shape != (n_groups, out_f // pack):
        raise ValueError(
            f"inconsistent shapes: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} for {bits} bits"
        )
    q = _unpack_rows(qweight, bits).T.contiguous().to(torch.uint8)
    stored = _unpack_rows(qzeros.T.contiguous(), bits).T
    maxq = 2**bits - 1
    zeros = (stored + 1) & maxq if version == 1 else stored
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = (torch.arange(in_f) * n_groups // in_f).to(torch.int32)
    elif g_idx.shape != (in_f,):
        raise ValueError(f"g_idx must have {in_f} entries; got {tuple(g_idx.shape)}")
    elif int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise ValueError(f"g_idx values must lie in [0, {n_groups})")
    return q, scales.T.float().contiguous(), zeros.T.float().contiguous(), g_idx.to(torch.int32)
