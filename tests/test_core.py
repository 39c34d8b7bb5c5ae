"""The shared core: module surgery, the config base, feature capture, the calibration driver."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from slimforge.calibration import (
    FeatureCapture,
    HessianObserver,
    InputStats,
    run_sequential,
)
from slimforge.config import Config
from slimforge.models import GPT, GPTConfig
from slimforge.nn import all_of, module_filter, replace_modules, select_modules, set_submodule


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "up": nn.Linear(8, 16)}) for _ in range(2)
        )
        self.head = nn.Linear(8, 10)


def test_module_filter_types_and_patterns() -> None:
    net = _Net()
    names = lambda f: [n for n, _ in select_modules(net, f)]  # noqa: E731
    assert names(module_filter(types=nn.Linear)) == [
        "layers.0.q_proj",
        "layers.0.up",
        "layers.1.q_proj",
        "layers.1.up",
        "head",
    ]
    # A bare word matches the last component (as peft's target_modules); globs the whole name.
    assert names(module_filter(include="q_proj")) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert names(module_filter(include="layers.1.*", types=nn.Linear)) == [
        "layers.1.q_proj",
        "layers.1.up",
    ]
    assert names(module_filter(nn.Linear, exclude=["head", "layers.0.*"])) == [
        "layers.1.q_proj",
        "layers.1.up",
    ]
    both = all_of(module_filter(types=nn.Linear), None, lambda m, n: m.out_features == 16)
    assert names(both) == ["layers.0.up", "layers.1.up"]
    with pytest.raises(TypeError, match="types"):
        module_filter(types="Linear")  # type: ignore[arg-type]


def test_replace_modules_walks_once_and_keeps_sharing() -> None:
    net = _Net()
    shared = nn.Linear(8, 8)
    net.layers[0]["q_proj"] = shared
    net.layers[1]["q_proj"] = shared  # one module at two paths
    calls = []

    def to_seq(m: nn.Module, name: str) -> nn.Module:
        calls.append(name)
        return nn.Sequential(m)  # contains the original: must not be visited again

    out = replace_modules(net, to_seq, module_filter(include="q_proj"))
    assert out is net and calls == ["layers.0.q_proj"]
    assert net.layers[0]["q_proj"] is net.layers[1]["q_proj"]
    assert isinstance(net.layers[1]["q_proj"], nn.Sequential)
    # Errors name the module; the root can be replaced (returned).
    with pytest.raises(ValueError, match="^head: boom"):

        def boom(m: nn.Module, n: str) -> nn.Module:
            raise ValueError("boom")

        replace_modules(net, boom, module_filter(include="head"))
    root = replace_modules(nn.Linear(2, 2), lambda m, n: nn.Identity(), lambda m, n: n == "")
    assert isinstance(root, nn.Identity)
    with pytest.raises(ValueError, match="not selected"):
        replace_modules(net, to_seq, module_filter(include="head"), names=["emb"])
    set_submodule(net, "head", nn.Identity())
    assert isinstance(net.head, nn.Identity)
    with pytest.raises(AttributeError):
        set_submodule(net, "layers.0.missing", nn.Identity())
    with pytest.raises(ValueError, match="root"):
        set_submodule(net, "", nn.Identity())


def test_config_base_is_frozen_validated_and_round_trips() -> None:
    @dataclass(frozen=True)
    class Cfg(Config):
        width: int = 4
        shape: tuple[int, int] = (1, 2)

        def __post_init__(self) -> None:
            if self.width < 1:
                raise ValueError("width must be >= 1")

    c = Cfg()
    with pytest.raises(AttributeError):
        c.width = 3  # type: ignore[misc]
    assert c.replace(width=8).width == 8
    with pytest.raises(ValueError, match="width"):
        c.replace(width=0)
    d = c.to_dict()
    assert d == {"type": "Cfg", "width": 4, "shape": [1, 2]}
    assert Cfg.from_dict(d) == c
    with pytest.raises(ValueError, match="no fields"):
        Cfg.from_dict({"width": 2, "depth": 3})
    with pytest.raises(ValueError, match="of type"):
        Cfg.from_dict({"type": "Other"})


def test_feature_capture_by_module_path_keeps_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16))
    ids = torch.randint(0, 256, (2, 16))
    with FeatureCapture(model, ["blocks.0", "blocks.1.mlp"]) as feats:
        out = model(ids)
        assert set(feats) == {"blocks.0", "blocks.1.mlp"}
        assert feats["blocks.0"].shape == (2, 16, 32)
        feats["blocks.1.mlp"].pow(2).mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    with FeatureCapture(model, "blocks.0.attn.proj", what="input", detach=True) as feats:
        model(ids)
        assert feats["blocks.0.attn.proj"].shape == (2, 16, 32)
        assert not feats["blocks.0.attn.proj"].requires_grad
    model(ids)  # hooks removed: nothing captured after the block
    assert len(feats) == 1
    with pytest.raises(ValueError, match="no submodule"):
        FeatureCapture(model, ["blocks.9"])
    assert out.logits.shape == (2, 16, 256)


def test_sequential_driver_sees_quantized_predecessors_one_block_at_a_time() -> None:
    """Each group is observed on the outputs of the groups processed before it: zeroing a block's
    weights in process_group must change what the next block's observers see."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16)).eval()
    ids = [torch.randint(0, 256, (2, 16)) for _ in range(2)]
    seen: dict[str, torch.Tensor] = {}
    order: list[list[str]] = []

    def process(group) -> None:  # type: ignore[no-untyped-def]
        order.append(group.local_names)
        for name, obs in zip(group.names, group.observers, strict=True):
            seen[name] = obs.hessian.clone()
        if group.names[0] == "blocks.0.mlp.fc":
            for lin in group.modules:
                lin.weight.data.zero_()

    done = run_sequential(
        model, ids, lambda lin: HessianObserver(lin.in_features), process, progress=False
    )
    assert order == [["attn.qkv"], ["attn.proj"], ["mlp.fc"], ["mlp.proj"]] * 2
    assert len(done) == 8
    # mlp.proj of block 0 read GELU(0) = 0 after fc was zeroed: its Hessian is all zeros.
    assert torch.count_nonzero(seen["blocks.0.mlp.proj"]) == 0
    assert torch.count_nonzero(seen["blocks.1.mlp.proj"]) > 0


def test_input_stats_keep_bounded_samples_and_channel_norms() -> None:
    stats = InputStats(4, max_rows=10)
    x = torch.arange(200, dtype=torch.float32).reshape(50, 4)
    for chunk in x.split(7):
        stats.update(chunk)
    assert stats.samples().shape[0] <= 10
    torch.testing.assert_close(stats.mean_abs, x.abs().mean(0))
    torch.testing.assert_close(stats.sq_norm, x.double().square().sum(0).float())
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.full((2, 4), float("nan")))
