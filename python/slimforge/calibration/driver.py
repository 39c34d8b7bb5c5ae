"""The sequential calibration driver shared by GPTQ, AWQ, Wanda and SparseGPT.

``run_sequential`` walks the model block by block (the blocks its :class:`ModelSpec` names; a
model without a spec is one block) and, inside a block, group by group: linears that read the
same input tensor (q/k/v, gate/up) form a group, observed together and handed to the
algorithm's ``process_group``, which rewrites them in place. Each group sees the outputs of the
groups already processed before it, and each block sees the outputs of the processed blocks, so
errors are compensated in order. Only one block's activations are held at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from slimforge.calibration.observers import all_finite
from slimforge.models.spec import BlockSpec, ModelSpec, model_spec
from slimforge.nn.surgery import ModuleFilter

__all__ = [
    "Batch",
    "LinearGroup",
    "call_model",
    "prepare_calibration",
    "resolve_spec",
    "run_sequential",
]

logger = logging.getLogger(__name__)

#: One calibration batch: a Tensor (``model(batch)``), a dict of inputs (``model(**batch)``)
#: or a tuple/list of positional inputs (``model(*batch)``).
Batch = torch.Tensor | Mapping[str, Any] | Sequence[Any]
SpecArg = ModelSpec | None | Literal["auto"]


def prepare_calibration(calibration: Iterable[Batch] | torch.Tensor) -> list[Batch]:
    """Materialise and validate calibration batches (tensors, dicts of inputs, or tuples)."""
    if calibration is None:
        raise ValueError("calibration is None: give an iterable of batches")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor | Mapping | tuple | list):
            raise TypeError(
                f"calibration batch {i} is a {type(b).__name__}; expected a Tensor, a dict of "
                "model inputs or a tuple of positional inputs"
            )
    kinds = {type(b).__name__ for b in batches}
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


def call_model(module: nn.Module, batch: Batch) -> Any:
    """``module(batch)``, ``module(**batch)`` or ``module(*batch)`` by the batch's kind."""
    if isinstance(batch, torch.Tensor):
        return module(batch)
    if isinstance(batch, Mapping):
        return module(**batch)
    return module(*batch)


def resolve_spec(model: nn.Module, spec: SpecArg) -> ModelSpec | None:
    """``spec`` checked against ``model``; ``"auto"`` asks :func:`model_spec`."""
    if spec == "auto":
        return model_spec(model)
    if spec is not None and not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, None or 'auto', got {type(spec).__name__}")
    return None if spec is None else spec.check(model)


class _StopForward(Exception):
    pass


@dataclass
class LinearGroup:
    """Linears of one block that read the same input tensor, in execution order.

    names: dotted names from the model root; local_names: names inside the block (equal to
    ``names`` when the model has no spec); block: the block's spec, or None; producer: the norm
    whose output *is* the group's input (scales can be folded into it), or None.
    """

    names: list[str]
    modules: list[nn.Linear]
    local_names: list[str] = field(default_factory=list)
    observers: list[Any] = field(default_factory=list)
    block: BlockSpec | None = None
    producer: nn.Module | None = None


def _default_filter(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def run_sequential(
    model: nn.Module,
    calibration: Iterable[Batch],
    make_observer: Callable[[nn.Linear], Any],
    process_group: Callable[[LinearGroup], None],
    filter_fn: ModuleFilter | None = None,
    *,
    spec: SpecArg = "auto",
    progress: bool = True,
    desc: str = "calibrating",
    find_producers: bool = False,
) -> list[str]:
    """Calibrate and transform the selected linears block by block, group by group.

    ``make_observer(linear)`` returns an object with ``update(x)``; ``process_group(group)``
    rewrites the group in place (the float weights must be replaced by their quantized or
    pruned values so that later groups see them). ``find_producers``: record which of the
    block's norms (from the spec) produced each group's input. Selected linears outside the
    spec's blocks, and those the spec keeps in float (MoE routers), are left alone (the first
    logged). Returns the processed linears' names.
    """
    from tqdm.auto import tqdm

    batches = prepare_calibration(calibration)
    sp = resolve_spec(model, spec)
    user_filter = filter_fn or _default_filter

    def filt(m: nn.Module, n: str) -> bool:
        return user_filter(m, n) and not (sp is not None and sp.keeps_float(n))

    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    processed: list[str] = []
    try:
        with torch.no_grad():
            if sp is None:
                units: list[nn.Module] = [model]
                inputs: list[tuple[tuple, dict]] = [_as_call(b) for b in batches]
            else:
                units = list(sp.block_list(model))
                inputs = _capture_block_inputs(model, units[0], batches)
                inside = {id(m) for u in units for m in u.modules()}
                outside = [
                    n
                    for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and filt(m, n) and id(m) not in inside
                ]
                if outside:
                    logger.info("%s: left alone (outside the blocks): %s", desc, outside)
            bar = tqdm(units, desc=desc, disable=not progress, unit="block")
            for unit in bar:
                targets = [
                    m
                    for m in unit.modules()
                    if isinstance(m, nn.Linear) and filt(m, names.get(m, ""))
                ]
                if targets:
                    groups = _discover_groups(unit, targets, inputs, names, sp)
                    for group in groups:
                        _observe_group(unit, group, inputs, make_observer, find_producers)
                        process_group(group)
                        processed.extend(group.names)
                if sp is not None:
                    inputs = [_advance(unit, a, k) for a, k in inputs]
    finally:
        model.train(was_training)
    return processed


def _as_call(b: Batch) -> tuple[tuple, dict]:
    if isinstance(b, torch.Tensor):
        return (b,), {}
    if isinstance(b, Mapping):
        return (), dict(b)
    return tuple(b), {}


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
                call_model(model, b)
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


def _local_name(name: str, spec: ModelSpec | None) -> str:
    if spec is None:
        return name
    split = spec.split_name(name)
    return name if split is None else split[1]


def _discover_groups(
    unit: nn.Module,
    targets: list[nn.Linear],
    inputs: list[tuple[tuple, dict]],
    names: dict[nn.Module, str],
    spec: ModelSpec | None,
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
    last_input: torch.Tensor | None = None
    block = None if spec is None else spec.block
    for lin, x in order:
        name = names.get(lin, "")
        if groups and last_input is x:
            groups[-1].names.append(name)
            groups[-1].modules.append(lin)
            groups[-1].local_names.append(_local_name(name, spec))
        else:
            groups.append(LinearGroup([name], [lin], [_local_name(name, spec)], block=block))
        last_input = x
    missing = [names.get(t, "") for t in targets if id(t) not in seen]
    if missing:
        raise ValueError(f"linears {missing} were not called by the calibration forward pass")
    return groups


def _observe_group(
    unit: nn.Module,
    group: LinearGroup,
    inputs: list[tuple[tuple, dict]],
    make_observer: Callable[[nn.Linear], Any],
    find_producers: bool,
) -> None:
    group.observers = [make_observer(m) for m in group.modules]
    remaining = {id(m) for m in group.modules}
    done: set[int] = set()
    candidate: nn.Module | None = None
    if find_producers and group.block is not None:
        norms = {group.block.norm_feeding(n) for n in group.local_names}
        if len(norms) == 1 and (norm_name := norms.pop()) is not None:
            candidate = unit.get_submodule(norm_name)
    produced: list[torch.Tensor] = []
    confirmed: list[bool] = []
    handles = []

    def make_hook(lin: nn.Linear, obs: Any) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            obs.update(args[0])
            if produced and lin is group.modules[0]:
                confirmed.append(args[0] is produced[-1])
            done.add(id(lin))
            if done >= remaining:
                raise _StopForward

        return hook

    for lin, obs in zip(group.modules, group.observers, strict=True):
        handles.append(lin.register_forward_pre_hook(make_hook(lin, obs)))
    if candidate is not None:

        def out_hook(_mod: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced.append(out)

        handles.append(candidate.register_forward_hook(out_hook))
    try:
        for a, k in inputs:
            done.clear()
            produced.clear()
            _run_unit(unit, [(a, k)])
    finally:
        for h in handles:
            h.remove()
    # The norm is the producer only if its output reached the group unchanged on every batch.
    if candidate is not None and confirmed and all(confirmed) and len(confirmed) == len(inputs):
        group.producer = candidate
