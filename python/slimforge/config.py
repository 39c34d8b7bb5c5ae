"""The frozen base of every area's configuration.

Configs are frozen dataclasses validated at construction (``__post_init__``), so a bad value
fails where it is written, not minutes later inside a long job. ``to_dict`` / ``from_dict``
give the JSON form saved next to checkpoints and run folders.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["Config"]

C = TypeVar("C", bound="Config")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are ``@dataclass(frozen=True)`` and validate in ``__post_init__``."""

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``"type"`` (the class name)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.repr:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict` (unknown keys are an error; ``"type"`` must match)."""
        data = dict(data)
        kind = data.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config of type {kind!r} given to {cls.__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}")
        for k, v in data.items():
            if isinstance(v, list) and "tuple" in str(names[k].type):
                data[k] = tuple(v)
        return cls(**data)
