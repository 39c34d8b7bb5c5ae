"""Calibration plumbing shared by GPTQ and AWQ.

- ``group_qparams`` / ``quantize_codes`` / ``fake_quantize``: the min-max group quantizer both
  algorithms use (IST-DASLab ``quant.py`` semantics: the range always contains 0, so the integer
  zero lies in ``[0, 2^bits - 1]``; symmetric uses zero = 2^(bits-1)).
- ``HessianObserver``: running mean of H = 2 X X^T / n over every token fed to a linear.
- ``run_sequential``: drives calibration block by block (the largest ``nn.ModuleList`` of
  repeated blocks, else the whole model as one block), and inside a block group by group (linears
  that read the same input tensor, e.g. q/k/v), each group seeing the outputs of the already
  quantized groups before it. Only one block's activations are held at a time.
- ``InputTransformedLinear``: a wrapper applying an input permutation (GPTQ act-order) and/or a
  per-input-channel division (AWQ scales that could not be folded into a norm) before its inner
  linear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "CalibrationStats",
    "HessianObserver",
    "InputSampler",
    "InputTransformedLinear",
    "LinearGroup",
    "attach_calibration",
    "fake_quantize",
    "group_qparams",
    "prepare_calibration",
    "quantize_codes",
    "run_sequential",
]


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or +-Inf.

    min and max propagate NaN, so one ``aminmax`` pass answers it; ``torch.isfinite(t).all()``
    builds a bool tensor first and is about 10x slower on the CPU (150 ms for 16M floats).
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_bits_group(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8; got {bits}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive; got {group_size}")
    if in_features is not None and in_features % group_size != 0:
        raise ValueError(
            f"group_size {group_size} must divide in_features {in_features} "
            "(use group_size=in_features for per-channel)"
        )


def group_qparams(
    w: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero of each row of ``w`` (rows, cols) -> two (rows,) tensors.

    The range is widened to contain 0; an all-zero row gets range [-1, 1].
    """
    maxq = 2**bits - 1
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(dim=1), zero_t)
    xmax = torch.maximum(w.amax(dim=1), zero_t)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes clamp(round(w / scale) + zero, 0, 2^bits - 1), in ``w``'s float dtype.

    ``scale``/``zero`` broadcast against ``w`` (e.g. (rows, 1) for one column group).
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of ``w`` (out, in).

    Returns ``(dequantized (out, in), codes (out, in) float, scales (out, in//gs),
    zeros (out, in//gs))``.
    """
    out_f, in_f = w.shape
    _check_bits_group(bits, group_size, in_f)
    wg = w.reshape(out_f * (in_f // group_size), group_size)
    scale, zero = group_qparams(wg, bits, symmetric)
    q = quantize_codes(wg, scale[:, None], zero[:, None], bits)
    deq = (q - zero[:, None]) * scale[:, None]
    ng = in_f // group_size
    return (
        deq.reshape(out_f, in_f),
        q.reshape(out_f, in_f),
        scale.reshape(out_f, ng),
        zero.reshape(out_f, ng),
    )


class HessianObserver:
    """Accumulates H = 2 X X^T / n (in, in) as a running mean over the rows of every input."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype)
        self.n_samples = 0

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"calibration input has {x.shape[-1]} features, the linear expects {self.in_features}"
            )
        x = x.detach().reshape(-1, self.in_features).to(self.hessian.dtype)
        if not all_finite(x):
            raise ValueError("calibration activations contain NaN or Inf")
        if self.hessian.device != x.device:
            self.hessian = self.hessian.to(x.device)
        n = x.shape[0]
        if n == 0:
            return
        total = self.n_samples + n
        # H <- H * n_old / total + 2 X^T X / total, in one GEMM.
        self.hessian.addmm_(x.T, x, beta=self.n_samples / total, alpha=2.0 / total)
        self.n_samples = total


class InputSampler:
    """Keeps up to ``max_rows`` input rows (evenly strided across batches) for AWQ's searches."""

    def __init__(self, in_features: int, max_rows: int = 4096) -> None:
        self.in_features = in_features
        self.max_rows = max_rows
        self.rows: list[torch.Tensor] = []
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.n_seen = 0

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"calibration input has {x.shape[-1]} features, the linear expects {self.in_features}"
            )
        x = x.detach().reshape(-1, self.in_features).float()
        if not all_finite(x):
            raise ValueError("calibration activations contain NaN or Inf")
        self.abs_sum = self.abs_sum.to(x.device) + x.abs().sum(0, dtype=torch.float64)
        self.n_seen += x.shape[0]
        self.rows.append(x)
        kept = sum(r.shape[0] for r in self.rows)
        if kept > 2 * self.max_rows:
            all_rows = torch.cat(self.rows)
            stride = max(1, all_rows.shape[0] // self.max_rows)
            self.rows = [all_rows[::stride][: self.max_rows]]

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel over every row seen, (in,) float32."""
        return (self.abs_sum / max(self.n_seen, 1)).float()

    def samples(self) -> torch.Tensor:
        """Kept rows, (n, in) float32, at most ``max_rows``."""
        x = torch.cat(self.rows)
        if x.shape[0] > self.max_rows:
            x = x[:: x.shape[0] // self.max_rows][: self.max_rows]
        return x


@dataclass
class CalibrationStats:
    """Per-linear calibration statistics attached by ``attach_calibration``."""

    hessian: torch.Tensor
    n_samples: int
    mean_abs: torch.Tensor
    samples: torch.Tensor


Batch = torch.Tensor | Mapping[str, Any] | Sequence[Any]


def prepare_calibration(calibration: Iterable[Batch]) -> list[Batch]:
    """Materialise and validate calibration batches (tensors, dicts of inputs, or tuples)."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch")
    kinds = {type(b).__name__ for b in batches}
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor | Mapping | tuple | list):
            raise TypeError(
                f"calibration batch {i} is a {type(b).__name__}; expected a Tensor, a dict of "
                "model inputs or a tuple of positional inputs"
            )
    if len(kinds) > 1:
        raise ValueError(f"calibration batches mix kinds {sorted(kinds)}; use one kind")
    tensors = [b for b in batches if isinstance(b, torch.Tensor)]
    if tensors:
        ref = tensors[0]
        for i, t in enumerate(tensors):
            if t.dim() != ref.dim() or (t.dim() > 1 and t.shape[-1] != ref.shape[-1]):
                raise ValueError(
                    f"calibration batch {i} has shape {tuple(t.shape)}, batch 0 has "
                    f"{tuple(ref.shape)}: batches must agree in rank and last dimension"
                )
            if t.is_floating_point() and not all_finite(t):
                raise ValueError(f"calibration batch {i} contains NaN or Inf")
    return batches


def _call(module: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, torch.Tensor):
        return module(batch)
    if isinstance(batch, Mapping):
        return module(**batch)
    return module(*batch)


class _StopForward(Exception):
    pass


def _find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The ``nn.ModuleList`` holding the most linears (a transformer's layer stack), if any."""
    best, best_count = None, 0
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            count = sum(isinstance(m, nn.Linear) for m in mod.modules())
            if count > best_count:
                best, best_count = mod, count
    return best


@dataclass
class LinearGroup:
    """Linears of one block that read the same input tensor, in execution order."""

    names: list[str]
    modules: list[nn.Linear]
    observers: list[Any] = field(default_factory=list)
    # Module whose output tensor *is* the group's input (a norm AWQ can fold into), if any.
    producer: nn.Module | None = None


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def run_sequential(
    model: nn.Module,
    calibration: Iterable[Batch],
    make_observer: Callable[[nn.Linear], Any],
    process_group: Callable[[LinearGroup], None],
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    progress: bool = True,
    desc: str = "calibrating",
    track_producers: bool = False,
) -> list[str]:
    """Calibrate and transform the selected linears block by block, group by group.

    ``make_observer(linear)`` returns an object with ``update(x)``; ``process_group(group)``
    quantizes the group in place (the float weights must be replaced by their dequantized values
    so later groups see quantized predecessors). Returns the processed linears' names.
    """
    from tqdm.auto import tqdm

    batches = prepare_calibration(calibration)
    filt = filter_fn or _default_filter
    names = {m: n for n, m in model.named_modules()}
    blocks = _find_blocks(model)
    was_training = model.training
    model.eval()
    processed: list[str] = []
    try:
        with torch.no_grad():
            if blocks is None:
                units: list[nn.Module] = [model]
                inputs: list[tuple[tuple, dict]] = [
                    ((b,), {})
                    if isinstance(b, torch.Tensor)
                    else (((), dict(b)) if isinstance(b, Mapping) else (tuple(b), {}))
                    for b in batches
                ]
            else:
                units = list(blocks)
                inputs = _capture_block_inputs(model, units[0], batches)
            bar = tqdm(units, desc=desc, disable=not progress, unit="block")
            for unit in bar:
                targets = [
                    m
                    for m in unit.modules()
                    if isinstance(m, nn.Linear) and filt(m, names.get(m, ""))
                ]
                if targets:
                    groups = _discover_groups(unit, targets, inputs, names)
                    for group in groups:
                        _observe_group(unit, group, inputs, make_observer, track_producers)
                        process_group(group)
                        processed.extend(group.names)
                if blocks is not None:
                    inputs = [_advance(unit, a, k) for a, k in inputs]
    finally:
        model.train(was_training)
    return processed


def _capture_block_inputs(
    model: nn.Module, first: nn.Module, batches: list[Batch]
) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i, b in enumerate(batches):
            try:
                _call(model, b)
            except _StopForward:
                continue
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise ValueError(
                    f"calibration batch {i} could not be run through the model: {e}"
                ) from e
            raise ValueError(f"calibration batch {i} never reached the first block")
    finally:
        handle.remove()
    return captured


def _advance(unit: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    out = unit(*args, **kwargs)
    first = out[0] if isinstance(out, tuple | list) else out
    return (first, *args[1:]), kwargs


def _run_unit(unit: nn.Module, inputs: list[tuple[tuple, dict]]) -> None:
    for i, (a, k) in enumerate(inputs):
        try:
            unit(*a, **k)
        except _StopForward:
            continue
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise ValueError(
                f"calibration batch {i} could not be run through the model: {e}"
            ) from e


def _discover_groups(
    unit: nn.Module, targets: list[nn.Linear], inputs: list[tuple[tuple, dict]], names: dict
) -> list[LinearGroup]:
    """Run the first batch once to learn execution order and which linears share an input."""
    order: list[tuple[nn.Linear, torch.Tensor]] = []
    seen: set[int] = set()
    handles = []

    def make_hook(lin: nn.Linear) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            if id(lin) not in seen:
                seen.add(id(lin))
                order.append((lin, args[0]))

        return hook

    for lin in targets:
        handles.append(lin.register_forward_pre_hook(make_hook(lin)))
    try:
        _run_unit(unit, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[LinearGroup] = []
    for lin, x in order:
        if groups and groups[-1]._input is x:  # type: ignore[attr-defined]
            groups[-1].names.append(names.get(lin, ""))
            groups[-1].modules.append(lin)
        else:
            g = LinearGroup([names.get(lin, "")], [lin])
            g._input = x  # type: ignore[attr-defined]
            groups.append(g)
    for g in groups:
        del g._input  # type: ignore[attr-defined]
    missing = [names.get(t, "") for t in targets if id(t) not in seen]
    if missing:
        raise ValueError(f"linears {missing} were not called by the calibration forward pass")
    return groups


def _observe_group(
    unit: nn.Module,
    group: LinearGroup,
    inputs: list[tuple[tuple, dict]],
    make_observer: Callable[[nn.Linear], Any],
    track_producers: bool,
) -> None:
    group.observers = [make_observer(m) for m in group.modules]
    remaining = {id(m) for m in group.modules}
    done: set[int] = set()
    produced: dict[int, nn.Module] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []

    def make_hook(lin: nn.Linear, obs: Any) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            obs.update(args[0])
            if track_producers and group.producer is None and id(args[0]) in produced:
                group.producer = produced[id(args[0])]
            done.add(id(lin))
            if done >= remaining:
                raise _StopForward

        return hook

    for lin, obs in zip(group.modules, group.observers, strict=True):
        handles.append(lin.register_forward_pre_hook(make_hook(lin, obs)))
    if track_producers:

        def out_hook(mod: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced[id(out)] = mod
                keep_alive.append(out)

        for mod in unit.modules():
            if _is_norm(mod):
                handles.append(mod.register_forward_hook(out_hook))
    try:
        for a, k in inputs:
            done.clear()
            produced.clear()
            keep_alive.clear()
            _run_unit(unit, [(a, k)])
    finally:
        for h in handles:
            h.remove()


def _is_norm(mod: nn.Module) -> bool:
    """A LayerNorm/RMSNorm-like module: output = normalised(x) * weight (+ bias)."""
    if isinstance(mod, nn.LayerNorm | nn.RMSNorm):
        return mod.weight is not None
    w = getattr(mod, "weight", None)
    return (
        type(mod).__name__.endswith(("RMSNorm", "LayerNorm"))
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
    )


def attach_calibration(
    model: nn.Module,
    calibration: Iterable[Batch],
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    max_rows: int = 2048,
) -> int:
    """Run the float model once and attach ``CalibrationStats`` to each selected linear as
    ``module.slimforge_calibration`` (non-sequential: every input comes from the float model).

    This is what lets the per-module handlers (``quantize_(model, GPTQ())``) work; the sequential
    ``quantize_gptq`` / ``quantize_awq`` functions are more accurate. Returns the count attached.
    """
    batches = prepare_calibration(calibration)
    filt = filter_fn or _default_filter
    observers: dict[nn.Linear, tuple[HessianObserver, InputSampler]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and filt(m, name):
            obs = (HessianObserver(m.in_features), InputSampler(m.in_features, max_rows))
            observers[m] = obs

            def hook(_m: nn.Module, args: tuple, obs: tuple = obs) -> None:
                obs[0].update(args[0])
                obs[1].update(args[0])

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                try:
                    _call(model, b)
                except (RuntimeError, IndexError, TypeError) as e:
                    raise ValueError(
                        f"calibration batch {i} could not be run through the model: {e}"
                    ) from e
    finally:
        for h in handles:
            h.remove()
    for m, (h, s) in observers.items():
        if h.n_samples:
            m.slimforge_calibration = CalibrationStats(  # type: ignore[assignment]
                h.hessian, h.n_samples, s.mean_abs, s.samples()
            )
    return sum(1 for h, _ in observers.values() if h.n_samples)


class InputTransformedLinear(nn.Module):
    """``inner(x[..., perm] / pre_scale)``: act-order permutation and/or AWQ input scales.

    ``perm``: (in,) int64 or None — the inner linear's column j reads input feature ``perm[j]``.
    ``pre_scale``: (in,) float32 or None — applied after the permutation (in inner order).
    """

    def __init__(
        self,
        inner: nn.Module,
        perm: torch.Tensor | None = None,
        pre_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", None if perm is None else perm.long())
        self.register_buffer("pre_scale", None if pre_scale is None else pre_scale.float())

    def quant_spec(self) -> dict[str, Any]:
        """Constructor arguments, for :mod:`slimforge.quant.serialization`."""
        inner_spec = getattr(self.inner, "quant_spec", None)
        if inner_spec is None:
            raise TypeError(f"cannot save a wrapped {type(self.inner).__name__}")
        return {
            "inner": {"type": type(self.inner).__name__, **inner_spec()},
            "in_features": int(self.inner.in_features),
            "perm": self.perm is not None,
            "pre_scale": self.pre_scale is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputTransformedLinear:
        from slimforge.quant.serialization import module_from_spec

        n = int(spec["in_features"])
        return cls(
            module_from_spec(spec["inner"]),
            perm=torch.zeros(n, dtype=torch.long) if spec["perm"] else None,
            pre_scale=torch.ones(n) if spec["pre_scale"] else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.pre_scale is not None:
            x = x / self.pre_scale.to(x.dtype)
        return self.inner(x)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``""`` is not allowed)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
