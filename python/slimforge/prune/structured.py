"""Structured pruning: remove whole MLP neurons, attention heads or blocks and rewire the model
into a smaller dense one that runs faster in plain PyTorch.

    result = prune_structured(model, MLPNeurons(0.3), calibration=batches)
    result = prune_structured(model, AttentionHeads(0.25), calibration=batches)
    result = prune_structured(model, Blocks(2), calibration=batches)
    result = prune_structured(cnn, ExpansionChannels(0.3), calibration=images)

The model's :class:`~slimforge.models.spec.ModelSpec` says where the MLP and attention
projections are; a model without one is a ValueError. Every block loses the same number of
neurons (heads), so the model keeps one width per kind.

Importance (``importance="auto"``: ``"activation"`` with calibration batches, else
``"magnitude"``):

- ``"magnitude"``: the L2 norm of everything the unit owns, as Torch-Pruning's
  ``GroupMagnitudeImportance(p=2)`` groups it: a neuron's rows of the input projections (gate and
  up, or fc) and its column of the output projection; a head's ``head_dim`` rows of q (and of k
  and v when it owns them) and columns of the output projection.
- ``"activation"``: the output projection's input columns weighted by the calibration
  activations' norms (Wanda's ``|W| * ||X||`` per channel, as in Wanda-sp / FLAP):
  ``||W_out[:, j]||_2 * ||X_j||_2``, summed in squares over a head's columns.
- blocks: ``1 - cos(x_in, x_out)`` averaged over calibration tokens (ShortGPT's Block
  Influence); the blocks that change their input least go.

CNNs of inverted residuals (``slimforge.models.vision``; their ``conv_spec()`` or a
``ConvNetSpec`` passed as ``spec``): :class:`ExpansionChannels` removes channels of each block's
expansion, BatchNorm-aware: the expansion convolution's output channels, its BatchNorm, the
depthwise convolution's channels and BatchNorm and the projection's input channels go together.
``"magnitude"`` scores a channel by the L2 norm of that whole group with each BatchNorm folded
into its convolution (``gamma / sqrt(var + eps)`` scales the rows), so a channel the BatchNorm
silences scores low; ``"activation"`` by ``||W_proj[:, j]||_2 * ||X_j||_2`` over the calibration
images' projection inputs.

Heads are GQA-aware: with ``num_kv_heads == num_heads`` whole heads (q, k, v and output
columns) go; with grouped queries every KV group loses the same number of query heads (its shared
K/V head stays), ``round(amount * queries per group)`` of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, cast

import torch
from torch import nn

from slimforge.calibration import Batch, InputStats, call_model, prepare_calibration, resolve_spec
from slimforge.config import Config
from slimforge.models.spec import ModelSpec
from slimforge.prune.masks import attach_mask
from slimforge.prune.primitives import check_amount, group_norms

__all__ = [
    "AttentionHeads",
    "AttentionShape",
    "Blocks",
    "ExpansionChannels",
    "MLPNeurons",
    "StructuredResult",
    "prune_structured",
]

_IMPORTANCE = ("auto", "magnitude", "activation")


def _check_importance(value: str) -> None:
    if value not in _IMPORTANCE:
        raise ValueError(f"importance must be one of {_IMPORTANCE}, got {value!r}")


@dataclass(frozen=True)
class MLPNeurons(Config):
    """Remove ``round(amount * width)`` neurons of every block's MLP (rounded so the kept
    width is a multiple of ``round_to``)."""

    amount: float = 0.3
    importance: str = "auto"
    round_to: int = 1

    def __post_init__(self) -> None:
        check_amount(self.amount)
        _check_importance(self.importance)
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


@dataclass(frozen=True)
class AttentionHeads(Config):
    """Remove ``round(amount * heads)`` query heads per block (per KV group with GQA)."""

    amount: float = 0.25
    importance: str = "auto"

    def __post_init__(self) -> None:
        check_amount(self.amount)
        _check_importance(self.importance)


@dataclass(frozen=True)
class Blocks(Config):
    """Remove ``count`` whole blocks (depth pruning), scored on calibration batches."""

    count: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be a positive int, got {self.count!r}")


@dataclass(frozen=True)
class ExpansionChannels(Config):
    """Remove ``round(amount * hidden)`` channels of every inverted residual's expansion (the
    kept width rounded up to a multiple of ``round_to``) in a CNN with a ``ConvNetSpec``."""

    amount: float = 0.3
    importance: str = "auto"
    round_to: int = 1

    def __post_init__(self) -> None:
        check_amount(self.amount)
        _check_importance(self.importance)
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


@dataclass(frozen=True)
class AttentionShape:
    """The head layout an attention module reads from its ``cfg`` after head pruning
    (`LlamaAttention` takes ``head_dim``, ``num_heads``, ``num_kv_heads`` and ``attn_impl`` from
    ``self.cfg``)."""

    head_dim: int
    num_heads: int
    num_kv_heads: int
    attn_impl: str = "flash"


@dataclass
class StructuredResult:
    """kept: per pruned unit (``"blocks.3.mlp"``, ``"blocks.3.attn"``, or ``"blocks"``), the
    indices kept (neurons, query heads, blocks), in order; removed: units removed per pruned
    place; parameters before and after."""

    kind: str
    kept: dict[str, list[int]] = field(default_factory=dict)
    removed: int = 0
    total: int = 0
    params_before: int = 0
    params_after: int = 0

    @property
    def fraction_removed(self) -> float:
        """Units removed over units there were (neurons, heads or blocks)."""
        return self.removed / self.total if self.total else 0.0


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sliced_linear(
    lin: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Linear:
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"structured pruning rewires nn.Linear layers, got {type(lin).__name__}")
    w = lin.weight.detach()
    mask = getattr(lin, "weight_mask", None)
    if rows is not None:
        w = w[rows]
        mask = None if mask is None else mask[rows]
    if cols is not None:
        w = w[:, cols]
        mask = None if mask is None else mask[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            b = lin.bias.detach()
            new.bias.copy_(b if rows is None else b[rows])
    new.train(lin.training)
    if mask is not None:
        attach_mask(new, mask.clone())
    return new


def _set(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, ascending (ties: the lower index stays)."""
    order = torch.sort(-scores.double(), stable=True).indices
    return torch.sort(order[:keep]).values


@torch.no_grad()
def _input_norms(
    model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input channel of each module over every calibration batch."""
    stats = {
        n: InputStats(int(getattr(m, "in_features", 0) or getattr(m, "in_channels", 0)), max_rows=1)
        for n, m in modules.items()
    }
    handles = []
    for n, m in modules.items():
        # convolutions see (batch, channels, h, w): channels last makes rows of channels
        cl = isinstance(m, nn.Conv2d)
        handles.append(
            m.register_forward_pre_hook(
                lambda _m, a, s=stats[n], cl=cl: s.update(a[0].movedim(1, -1) if cl else a[0])
            )
        )
    was = model.training
    model.eval()
    try:
        for b in batches:
            call_model(model, b)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: s.sq_norm.sqrt() for n, s in stats.items()}


def _update_config(model: nn.Module, **changes: Any) -> None:
    for attr in ("config", "cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Config) and is_dataclass(cfg):
            names = {f.name for f in fields(cfg)}
            if all(k in names for k in changes):
                object.__setattr__(model, attr, cfg.replace(**changes))


def prune_structured(
    model: nn.Module,
    config: MLPNeurons | AttentionHeads | Blocks | ExpansionChannels,
    calibration: Iterable[Batch] | None = None,
    *,
    spec: Any = "auto",
) -> StructuredResult:
    """Removes MLP neurons, attention heads, blocks or CNN expansion channels of ``model`` in
    place (see the module docs) and returns what was kept. ValueError for a model without a
    spec, an MoE MLP, or an amount that removes nothing or everything."""
    if isinstance(config, ExpansionChannels):
        batches = None if calibration is None else prepare_calibration(calibration)
        before = _params(model)
        res = _prune_expansions(model, spec, config, batches)
        res.params_before, res.params_after = before, _params(model)
        return res
    sp = resolve_spec(model, spec)
    if sp is None:
        raise ValueError(
            "prune_structured needs a model spec (where the blocks, MLP and attention "
            "projections are): give the model a spec() method or pass spec=ModelSpec(...)"
        )
    batches = None if calibration is None else prepare_calibration(calibration)
    before = _params(model)
    if isinstance(config, MLPNeurons):
        res = _prune_neurons(model, sp, config, batches)
    elif isinstance(config, AttentionHeads):
        res = _prune_heads(model, sp, config, batches)
    elif isinstance(config, Blocks):
        if batches is None:
            raise ValueError("Blocks needs calibration batches to score the blocks")
        res = _prune_blocks(model, sp, config, batches)
    else:
        raise TypeError(
            "config must be MLPNeurons, AttentionHeads, Blocks or ExpansionChannels, got "
            f"{type(config).__name__}"
        )
    res.params_before, res.params_after = before, _params(model)
    return res


def _importance(
    cfg: MLPNeurons | AttentionHeads | ExpansionChannels, batches: list[Batch] | None
) -> str:
    if cfg.importance == "auto":
        return "magnitude" if batches is None else "activation"
    if cfg.importance == "activation" and batches is None:
        raise ValueError("importance='activation' needs calibration batches")
    return cfg.importance


def _prune_neurons(
    model: nn.Module, sp: ModelSpec, cfg: MLPNeurons, batches: list[Batch] | None
) -> StructuredResult:
    b = sp.block
    if b.moe or not b.mlp_in or b.mlp_out is None:
        raise ValueError("MLPNeurons needs dense MLPs (mlp_in and mlp_out in the spec), not MoE")
    blocks = sp.block_list(model)
    how = _importance(cfg, batches)
    outs = {
        f"{sp.blocks}.{i}.{b.mlp_out}": blk.get_submodule(b.mlp_out) for i, blk in enumerate(blocks)
    }
    norms = _input_norms(model, outs, batches) if how == "activation" and batches else {}
    res = StructuredResult("mlp_neurons")
    for i, blk in enumerate(blocks):
        out = cast(nn.Linear, blk.get_submodule(b.mlp_out))
        ins = [cast(nn.Linear, blk.get_submodule(n)) for n in b.mlp_in]
        width = out.in_features
        fused = len(ins) == 1 and ins[0].out_features == 2 * width  # [gate; up] in one fc
        if not fused and any(m.out_features != width for m in ins):
            raise ValueError(f"block {i}: MLP input widths do not match the output's {width}")
        keep = width - round(cfg.amount * width)
        keep = min(width, max(cfg.round_to, -(-keep // cfg.round_to) * cfg.round_to))
        if keep >= width:
            raise ValueError(f"MLPNeurons({cfg.amount}) removes no neuron of {width}")
        if how == "activation":
            scores = group_norms(out.weight, 1, scale=norms[f"{sp.blocks}.{i}.{b.mlp_out}"])
        else:
            sq = group_norms(out.weight, 1).double() ** 2
            for m in ins:
                r = group_norms(m.weight, 0).double() ** 2
                sq = sq + (r[:width] + r[width:] if fused else r)
            scores = sq.sqrt().float()
        idx = _top(scores, keep)
        rows = torch.cat([idx, idx + width]) if fused else idx
        for name, m in zip(b.mlp_in, ins, strict=True):
            _set(blk, name, _sliced_linear(m, rows, None))
        _set(blk, b.mlp_out, _sliced_linear(out, None, idx))
        res.kept[f"{sp.blocks}.{i}.{b.mlp_out.rpartition('.')[0] or b.mlp_out}"] = idx.tolist()
        res.removed += width - keep
        res.total += width
    if len({len(v) for v in res.kept.values()}) == 1:
        _update_config(model, intermediate_size=len(next(iter(res.kept.values()))))
    return res


def _head_layout(attn: nn.Module) -> tuple[int, int, int]:
    if all(hasattr(attn, a) for a in ("num_heads", "num_kv_heads", "head_dim")):
        heads, kv, hd = (getattr(attn, a) for a in ("num_heads", "num_kv_heads", "head_dim"))
        return int(heads), int(kv), int(hd)
    cfg = getattr(attn, "cfg", None)
    if cfg is not None and all(hasattr(cfg, a) for a in ("num_heads", "num_kv_heads", "head_dim")):
        return int(cfg.num_heads), int(cfg.num_kv_heads), int(cfg.head_dim)
    raise ValueError(
        f"{type(attn).__name__} has no num_heads / num_kv_heads / head_dim (nor a cfg with them)"
    )


def _set_head_layout(attn: nn.Module, heads: int, kv: int, hd: int) -> None:
    if hasattr(attn, "num_heads") and hasattr(attn, "num_kv_heads"):
        setattr(attn, "num_heads", heads)  # noqa: B010 (attributes of a user's module)
        setattr(attn, "num_kv_heads", kv)  # noqa: B010
        return
    impl = getattr(attn.cfg, "attn_impl", "flash")
    object.__setattr__(attn, "cfg", AttentionShape(hd, heads, kv, impl))


def _head_rows(heads: torch.Tensor, hd: int, offset: int = 0) -> torch.Tensor:
    return (offset + heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def _prune_heads(
    model: nn.Module, sp: ModelSpec, cfg: AttentionHeads, batches: list[Batch] | None
) -> StructuredResult:
    b = sp.block
    if b.attn_out is None or not b.attn_in:
        raise ValueError("AttentionHeads needs attn_in and attn_out in the spec")
    fused = b.fused_qkv is not None
    if not fused and len(b.attn_in) != 3:
        raise ValueError(f"attn_in must be (q, k, v) or one fused projection, got {b.attn_in}")
    blocks = sp.block_list(model)
    how = _importance(cfg, batches)
    outs = {
        f"{sp.blocks}.{i}.{b.attn_out}": blk.get_submodule(b.attn_out)
        for i, blk in enumerate(blocks)
    }
    norms = _input_norms(model, outs, batches) if how == "activation" and batches else {}
    res = StructuredResult("attention_heads")
    for i, blk in enumerate(blocks):
        out = cast(nn.Linear, blk.get_submodule(b.attn_out))
        attn_name = b.attn_out.rpartition(".")[0]
        attn = blk.get_submodule(attn_name) if attn_name else blk
        nh, nkv, hd = _head_layout(attn)
        per = nh // nkv
        if how == "activation":
            sq = (
                group_norms(
                    out.weight, 1, hd, scale=norms[f"{sp.blocks}.{i}.{b.attn_out}"]
                ).double()
                ** 2
            )
        else:
            sq = group_norms(out.weight, 1, hd).double() ** 2
            qkv = cast(nn.Linear, blk.get_submodule(b.attn_in[0]))
            rows = group_norms(qkv.weight, 0, hd).double() ** 2  # per head of q (then k, v)
            sq = sq + rows[:nh]
            if per == 1:  # MHA: a head owns its k and v rows too
                kv_rows = rows[nh:] if fused else None
                if fused and kv_rows is not None:
                    sq = sq + kv_rows[:nkv] + kv_rows[nkv:]
                else:
                    for n in b.attn_in[1:]:
                        w = cast(torch.Tensor, blk.get_submodule(n).weight)
                        sq = sq + group_norms(w, 0, hd).double() ** 2
        scores = sq.sqrt()
        if per == 1:
            drop = round(cfg.amount * nh)
            if drop < 1 or drop >= nh:
                raise ValueError(f"AttentionHeads({cfg.amount}) removes {drop} of {nh} heads")
            heads = _top(scores, nh - drop)
            kv_heads = heads
        else:
            drop = round(cfg.amount * per)
            if drop < 1 or drop >= per:
                raise ValueError(
                    f"AttentionHeads({cfg.amount}) removes {drop} of the {per} query heads of "
                    f"each of the {nkv} KV groups (GQA: every group loses the same number)"
                )
            heads = torch.cat(
                [g * per + _top(scores[g * per : (g + 1) * per], per - drop) for g in range(nkv)]
            )
            kv_heads = torch.arange(nkv)
        new_nh, new_nkv = heads.numel(), kv_heads.numel()
        if fused:
            rows = torch.cat(
                [
                    _head_rows(heads, hd),
                    _head_rows(kv_heads, hd, nh * hd),
                    _head_rows(kv_heads, hd, (nh + nkv) * hd),
                ]
            )
            _set(blk, b.attn_in[0], _sliced_linear(blk.get_submodule(b.attn_in[0]), rows, None))
        else:
            q, k, v = b.attn_in
            _set(blk, q, _sliced_linear(blk.get_submodule(q), _head_rows(heads, hd), None))
            if per == 1:
                for n in (k, v):
                    _set(
                        blk, n, _sliced_linear(blk.get_submodule(n), _head_rows(kv_heads, hd), None)
                    )
        _set(blk, b.attn_out, _sliced_linear(out, None, _head_rows(heads, hd)))
        _set_head_layout(attn, new_nh, new_nkv, hd)
        res.kept[f"{sp.blocks}.{i}.{attn_name}"] = heads.tolist()
        res.removed += nh - new_nh
        res.total += nh
    return res


@torch.no_grad()
def _block_influence(blocks: nn.ModuleList, model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Per block: 1 - cos(input, output) averaged over every calibration token."""
    total = torch.zeros(len(blocks), dtype=torch.float64)
    count = torch.zeros(len(blocks), dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, blk in enumerate(blocks):

        def pre(_m: nn.Module, args: tuple, i: int = i) -> None:
            seen[i] = args[0]

        def post(_m: nn.Module, _args: tuple, out: Any, i: int = i) -> None:
            y = out[0] if isinstance(out, tuple | list) else out
            x = seen.pop(i)
            cos = torch.nn.functional.cosine_similarity(
                x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1]), dim=-1
            )
            total[i] += float((1 - cos).double().sum())
            count[i] += cos.numel()

        handles.append(blk.register_forward_pre_hook(pre))
        handles.append(blk.register_forward_hook(post))
    was = model.training
    model.eval()
    try:
        for b in batches:
            call_model(model, b)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total / count.clamp_min(1)


def _prune_blocks(
    model: nn.Module, sp: ModelSpec, cfg: Blocks, batches: list[Batch]
) -> StructuredResult:
    blocks = sp.block_list(model)
    n = len(blocks)
    if cfg.count >= n:
        raise ValueError(f"Blocks({cfg.count}) would remove every one of the {n} blocks")
    influence = _block_influence(blocks, model, batches)
    kept = _top(influence.float(), n - cfg.count)
    new = nn.ModuleList(blocks[int(i)] for i in kept)
    parent, _, child = sp.blocks.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    _update_config(model, num_layers=len(new))
    res = StructuredResult("blocks", {sp.blocks: kept.tolist()}, cfg.count, n)
    return res


# ---------------------------------------------------------------------- CNN expansion channels


def _bn_scale(bn: nn.Module, channels: int) -> torch.Tensor:
    """Per-channel scale a BatchNorm applies (``gamma / sqrt(var + eps)``); ones once folded."""
    if isinstance(bn, nn.BatchNorm2d):
        assert bn.running_var is not None
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().float()
    return torch.ones(channels)


def _sliced_conv(
    conv: nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Conv2d:
    """``conv`` keeping output channels ``rows`` and input channels ``cols`` (a depthwise
    convolution keeps ``rows`` of both: its groups follow its channels)."""
    w = conv.weight.detach()
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    if rows is not None:
        w = w[rows]
    if cols is not None and not depthwise:
        w = w[:, cols]
    out_ch = w.shape[0]
    in_ch = out_ch if depthwise else w.shape[1] * conv.groups
    new = nn.Conv2d(
        in_ch,
        out_ch,
        cast(tuple[int, int], conv.kernel_size),
        cast(tuple[int, int], conv.stride),
        cast("str | tuple[int, int]", conv.padding),
        dilation=cast(tuple[int, int], conv.dilation),
        groups=out_ch if depthwise else conv.groups,
        bias=conv.bias is not None,
    ).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None and new.bias is not None:
            b = conv.bias.detach()
            new.bias.copy_(b if rows is None else b[rows])
    new.train(conv.training)
    return new


def _sliced_bn(bn: nn.Module, idx: torch.Tensor) -> nn.Module:
    if not isinstance(bn, nn.BatchNorm2d):
        return bn  # folded: an Identity
    assert bn.running_mean is not None and bn.running_var is not None
    new = nn.BatchNorm2d(idx.numel(), eps=bn.eps, momentum=bn.momentum)
    new = new.to(device=bn.weight.device, dtype=bn.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(bn.weight.detach()[idx])
        new.bias.copy_(bn.bias.detach()[idx])
        assert new.running_mean is not None and new.running_var is not None
        new.running_mean.copy_(bn.running_mean[idx])
        new.running_var.copy_(bn.running_var[idx])
        if bn.num_batches_tracked is not None and new.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _prune_expansions(
    model: nn.Module, spec: Any, cfg: ExpansionChannels, batches: list[Batch] | None
) -> StructuredResult:
    if spec == "auto":
        own = getattr(model, "conv_spec", None)
        if not callable(own):
            raise ValueError(
                "ExpansionChannels needs a CNN spec: a model with conv_spec() (the models of "
                "slimforge.models.vision) or spec=ConvNetSpec(...)"
            )
        spec = own()
    if not hasattr(spec, "expansions"):
        raise TypeError(f"spec must be a ConvNetSpec for ExpansionChannels, got {type(spec)}")
    groups = spec.expansions(model)
    if not groups:
        raise ValueError("the model has no inverted residual with an expansion to prune")
    how = _importance(cfg, batches)
    names = {f"{spec.blocks}.{i}.{spec.project}": p.conv for i, _, _, p in groups}
    norms = _input_norms(model, names, batches) if how == "activation" and batches else {}
    res = StructuredResult("expansion_channels")
    for i, e, d, p in groups:
        hidden = e.conv.out_channels
        keep = hidden - round(cfg.amount * hidden)
        keep = min(hidden, max(cfg.round_to, -(-keep // cfg.round_to) * cfg.round_to))
        if keep >= hidden:
            raise ValueError(f"ExpansionChannels({cfg.amount}) removes no channel of {hidden}")
        pw = p.conv.weight.detach().float().flatten(1)  # (out, hidden)
        if how == "activation":
            scores = group_norms(pw, 1, scale=norms[f"{spec.blocks}.{i}.{spec.project}"])
        else:
            ew = e.conv.weight.detach().float().flatten(1) * _bn_scale(e.bn, hidden)[:, None]
            dw = d.conv.weight.detach().float().flatten(1) * _bn_scale(d.bn, hidden)[:, None]
            sq = group_norms(ew, 0).double() ** 2 + group_norms(dw, 0).double() ** 2
            scores = (sq + group_norms(pw, 1).double() ** 2).sqrt().float()
        idx = _top(scores, keep)
        e.conv, e.bn = _sliced_conv(e.conv, idx, None), _sliced_bn(e.bn, idx)
        d.conv, d.bn = _sliced_conv(d.conv, idx, idx), _sliced_bn(d.bn, idx)
        p.conv = _sliced_conv(p.conv, None, idx)
        res.kept[f"{spec.blocks}.{i}.{spec.expand}"] = idx.tolist()
        res.removed += hidden - keep
        res.total += hidden
    widths = getattr(model, "hidden_widths", None)
    if callable(widths):
        _update_config(model, hidden=widths())
    return res
