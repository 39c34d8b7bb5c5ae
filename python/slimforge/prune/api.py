"""``prune_(model, config)``: unstructured and N:M pruning with masks, torchao-style.

    prune_(model, Magnitude(0.5))                          # global magnitude, 50 %
    prune_(model, Magnitude(0.5, scope="layer"))           # 50 % of every layer
    prune_(model, NM(2, 4))                                # 2:4 by magnitude
    prune_(model, Wanda(0.5), calibration=batches)         # |W| * ||X||, per output row
    prune_(model, SparseGPT(n=2, m=4), calibration=batches)

Selected modules (``nn.Linear`` inside the model spec's blocks by default, every ``nn.Linear``
without a spec; linears the spec keeps in float, such as MoE routers, are left alone) get a mask
(:mod:`slimforge.prune.masks`): pruned weights are zeroed and stay zero through training until
:func:`~slimforge.prune.masks.make_permanent`. Wanda and SparseGPT run on the shared
calibration driver (:func:`slimforge.calibration.run_sequential`): block by block, each block
calibrated on the outputs of the already pruned blocks before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from slimforge.calibration import (
    Batch,
    HessianObserver,
    InputStats,
    LinearGroup,
    resolve_spec,
    run_sequential,
)
from slimforge.config import Config
from slimforge.nn.surgery import ModuleFilter, all_of, select_modules
from slimforge.prune.masks import attach_mask
from slimforge.prune.primitives import (
    check_amount,
    check_nm,
    global_masks,
    nm_masks,
    row_masks,
)

__all__ = [
    "NM",
    "Magnitude",
    "PruneConfig",
    "SparseGPT",
    "Wanda",
    "prune_",
    "register_prune_handler",
]


@dataclass(frozen=True)
class PruneConfig(Config):
    """Base of the ``prune_`` configs. ``needs_calibration`` (class attribute): whether
    ``prune_`` needs calibration batches."""

    needs_calibration: ClassVar[bool] = False


def _amount_or_nm(cfg: Any) -> None:
    """Validates ``amount`` xor ``(n, m)``; fills the default ``amount = 0.5``."""
    if (cfg.n is None) != (cfg.m is None):
        raise ValueError(f"give both n and m for N:M sparsity, got n = {cfg.n}, m = {cfg.m}")
    if cfg.n is not None:
        if cfg.amount is not None:
            raise ValueError("give either amount (unstructured) or n and m (N:M), not both")
        check_nm(cfg.n, cfg.m)
    else:
        object.__setattr__(cfg, "amount", check_amount(0.5 if cfg.amount is None else cfg.amount))


@dataclass(frozen=True)
class Magnitude(PruneConfig):
    """Unstructured magnitude pruning: the ``round(amount * n)`` smallest ``|w|``.

    amount: fraction pruned, in [0, 1). scope: ``"global"`` (one threshold over every selected
    weight, as ``torch.nn.utils.prune.global_unstructured``) or ``"layer"`` (``amount`` of each
    weight). Ties: the earlier element is pruned first.
    """

    amount: float = 0.5
    scope: str = "global"

    def __post_init__(self) -> None:
        check_amount(self.amount)
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")


@dataclass(frozen=True)
class NM(PruneConfig):
    """N:M magnitude pruning: in every ``m`` consecutive inputs of each output row, the ``n``
    largest ``|w|`` are kept (2:4 by default). ``in_features`` must be divisible by ``m``."""

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)


@dataclass(frozen=True)
class Wanda(PruneConfig):
    """Wanda (Sun et al., 2023): score ``|W_ij| * ||X_j||_2`` over the calibration tokens,
    compared within each output row; no weight update.

    ``Wanda(amount)`` prunes ``round(amount * in)`` per row (default 0.5); ``Wanda(n=2, m=4)``
    keeps the ``n`` best of every ``m`` inputs.
    """

    amount: float | None = None
    n: int | None = None
    m: int | None = None

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _amount_or_nm(self)


@dataclass(frozen=True)
class SparseGPT(PruneConfig):
    """SparseGPT (Frantar & Alistarh, 2023): GPTQ's column loop with a mask step; pruned
    weights' errors are compensated in the later columns through the inverse Hessian.

    ``SparseGPT(amount)`` (default 0.5): per block of ``block_size`` columns, the
    ``round(amount * out * block_size)`` smallest ``w^2 / Hinv_jj^2``; ``SparseGPT(n=2, m=4)``:
    N:M chosen as the loop reaches each window. damp: fraction of mean(diag H) added to the
    diagonal (GPTQ's rule, retried +0.01 on Cholesky failure). ``bits`` (4 or 8): quantize the
    kept weights in the same pass (groups of ``group_size`` columns, which must divide
    ``block_size``); the layers then become ``QuantLinear`` whose pruned weights are exactly 0.
    """

    amount: float | None = None
    n: int | None = None
    m: int | None = None
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None
    group_size: int = 128
    symmetric: bool = False
    max_damp_retries: int = 10

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _amount_or_nm(self)
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.m is not None and self.block_size % self.m:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of M = {self.m}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.bits is not None:
            if self.bits not in (4, 8):
                raise ValueError(f"bits must be 4, 8 or None, got {self.bits}")
            if self.group_size <= 0 or self.block_size % self.group_size:
                raise ValueError(
                    f"group_size ({self.group_size}) must divide block_size ({self.block_size})"
                )


Handler = Callable[..., None]
_HANDLERS: dict[type, Handler] = {}


def register_prune_handler(config_cls: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(model, config, calibration, names, spec, progress)`` prunes the
    selected linears (``names``) of ``model`` in place for configs of ``config_cls``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, PruneConfig)):
        raise TypeError(f"{config_cls!r} is not a PruneConfig subclass")

    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_cls] = fn
        return fn

    return deco


def _default_filter(spec: Any) -> ModuleFilter:
    if spec is None:
        return lambda m, n: isinstance(m, nn.Linear)
    prefix = spec.blocks + "."
    return lambda m, n: isinstance(m, nn.Linear) and n.startswith(prefix)


def prune_(
    model: nn.Module,
    config: PruneConfig,
    calibration: Iterable[Batch] | None = None,
    filter_fn: ModuleFilter | None = None,
    *,
    spec: Any = "auto",
    progress: bool = True,
) -> nn.Module:
    """Prunes ``model`` in place with ``config`` (:class:`Magnitude`, :class:`NM`,
    :class:`Wanda`, :class:`SparseGPT`); returns it.

    calibration: batches for Wanda and SparseGPT (Tensors ``model(batch)``, dicts or tuples, as
    for ``quantize_``); an error for the others. filter_fn: further restricts the selected
    linears (default: the ``nn.Linear`` modules inside the spec's blocks, or every
    ``nn.Linear`` without a spec). spec: the model's ``ModelSpec`` ("auto" finds it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    name = type(config).__name__
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{name} needs calibration data: prune_(model, cfg, calibration=batches)")
    if not config.needs_calibration and calibration is not None:
        raise ValueError(f"{name} takes no calibration data")
    handler = next((_HANDLERS[c] for c in type(config).__mro__ if c in _HANDLERS), None)
    if handler is None:
        raise TypeError(f"no prune handler for {name}")
    sp = resolve_spec(model, spec)
    keep = all_of(
        _default_filter(sp),
        None if sp is None else (lambda m, n: not sp.keeps_float(n)),
        filter_fn,
    )
    names = [n for n, _ in select_modules(model, keep)]
    if not names:
        raise ValueError(f"{name}: no module selected (no nn.Linear matches the filter)")
    handler(model, config, calibration, names, sp, progress)
    return model


def _linears(model: nn.Module, names: list[str]) -> list[nn.Linear]:
    return [model.get_submodule(n) for n in names]  # type: ignore[misc]


@register_prune_handler(Magnitude)
def _magnitude(
    model: nn.Module, cfg: Magnitude, _cal: Any, names: list[str], _sp: Any, _pr: bool
) -> None:
    mods = _linears(model, names)
    if cfg.scope == "global":
        masks = global_masks([m.weight for m in mods], cfg.amount)
    else:
        masks = [global_masks([m.weight], cfg.amount)[0] for m in mods]
    for m, k in zip(mods, masks, strict=True):
        attach_mask(m, k)


def _check_divisible(name: str, lin: nn.Linear, m: int) -> None:
    if lin.in_features % m:
        raise ValueError(
            f"{name}: in_features ({lin.in_features}) must be divisible by M = {m} for N:M "
            "sparsity (exclude it with filter_fn)"
        )


@register_prune_handler(NM)
def _nm(model: nn.Module, cfg: NM, _cal: Any, names: list[str], _sp: Any, _pr: bool) -> None:
    mods = _linears(model, names)
    for n, m in zip(names, mods, strict=True):
        _check_divisible(n, m, cfg.m)
    for m in mods:
        attach_mask(m, nm_masks(m.weight, cfg.n, cfg.m))


def _group_filter(names: list[str]) -> ModuleFilter:
    wanted = set(names)
    return lambda m, n: n in wanted


@register_prune_handler(Wanda)
def _wanda(
    model: nn.Module, cfg: Wanda, calibration: Any, names: list[str], sp: Any, progress: bool
) -> None:
    if cfg.m is not None:
        for n in names:
            _check_divisible(n, model.get_submodule(n), cfg.m)  # type: ignore[arg-type]

    def process(group: LinearGroup) -> None:
        for lin, stats in zip(group.modules, group.observers, strict=True):
            norm = stats.sq_norm.sqrt()
            if cfg.n is not None and cfg.m is not None:
                keep = nm_masks(lin.weight, cfg.n, cfg.m, scale=norm)
            else:
                keep = row_masks(lin.weight, float(cfg.amount or 0.0), scale=norm)
            attach_mask(lin, keep)

    run_sequential(
        model,
        calibration,
        lambda lin: InputStats(lin.in_features, max_rows=1),
        process,
        _group_filter(names),
        spec=sp,
        progress=progress,
        desc="Wanda",
    )


@register_prune_handler(SparseGPT)
def _sparsegpt(
    model: nn.Module,
    cfg: SparseGPT,
    calibration: Any,
    names: list[str],
    sp: Any,
    progress: bool,
) -> None:
    from slimforge.nn.surgery import set_submodule
    from slimforge.prune.sparsegpt import sparsegpt_prune_weight

    if cfg.m is not None:
        for n in names:
            _check_divisible(n, model.get_submodule(n), cfg.m)  # type: ignore[arg-type]
    quantized: dict[str, nn.Module] = {}

    def process(group: LinearGroup) -> None:
        h = group.observers[0].hessian
        for name, lin in zip(group.names, group.modules, strict=True):
            res = sparsegpt_prune_weight(lin.weight, h, cfg)
            if res.quant is not None:
                lin.weight.data.copy_(res.weight.to(lin.weight.dtype))
                quantized[name] = res.quant.to_module(lin.bias)
            else:
                attach_mask(lin, res.keep)
                lin.weight.data.copy_(res.weight.to(lin.weight.dtype))

    run_sequential(
        model,
        calibration,
        lambda lin: HessianObserver(lin.in_features),
        process,
        _group_filter(names),
        spec=sp,
        progress=progress,
        desc="SparseGPT",
    )
    for name, module in quantized.items():
        set_submodule(model, name, module)
