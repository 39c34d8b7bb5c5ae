"""Feature capture by module path: the hidden states distillation and probes compare.

    with FeatureCapture(model, ["blocks.1", "blocks.3.mlp"]) as feats:
        model(input_ids)
    h1 = feats["blocks.1"]        # that module's output from the last forward pass

Outputs (or inputs, ``what="input"``) are kept as the forward pass produced them, so a loss on
them backpropagates into the model; ``detach=True`` keeps detached copies (teacher features).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["FeatureCapture"]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class FeatureCapture(Mapping[str, torch.Tensor]):
    """Records the output (or input) tensor of each named submodule on every forward pass.

    A mapping from module name to the tensor of the latest pass; for modules returning a tuple
    (attention blocks often do), the first element. Hooks are removed on ``close()`` or when the
    ``with`` block ends.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        what: Literal["output", "input"] = "output",
        detach: bool = False,
    ) -> None:
        if what not in ("output", "input"):
            raise ValueError(f"what must be 'output' or 'input', got {what!r}")
        if isinstance(names, str):
            names = [names]
        self._features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.detach = detach
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"the model has no submodule {name!r}") from e
            if what == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))

    def _keep(self, name: str, value: Any) -> None:
        t = _first_tensor(value)
        if t is None:
            raise TypeError(f"{name} produced a {type(value).__name__}, not a tensor")
        self._features[name] = t.detach() if self.detach else t

    def _output_hook(self, name: str) -> Any:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            self._keep(name, out)

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: tuple) -> None:
            self._keep(name, args)

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._features:
            raise KeyError(f"{name!r} has not run since the capture started")
        return self._features[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)

    def clear(self) -> None:
        """Forget the captured tensors (the hooks stay)."""
        self._features.clear()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
