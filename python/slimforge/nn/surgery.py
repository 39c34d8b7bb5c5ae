"""Module surgery: select submodules by type and name, and swap them in place.

Every area that rewrites a model (quantization, QAT, pruning, LoRA injection) goes through
:func:`replace_modules`: it picks the targets once, before any replacement (so a replacement's
own children are never visited), hands each to a callback, and puts the result at every path
where the original was reachable (a module shared by two parents stays shared). An error raised
by the callback names the module it was working on.

Filters are ``filter_fn(module, name) -> bool`` callables; :func:`module_filter` builds one from
types and name patterns, and filters combine with :func:`all_of`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

from torch import nn

__all__ = [
    "ModuleFilter",
    "all_of",
    "module_filter",
    "replace_modules",
    "select_modules",
    "set_submodule",
]

#: ``filter_fn(module, dotted_name) -> bool``; the root module's name is ``""``.
ModuleFilter = Callable[[nn.Module, str], bool]


def _patterns(p: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if p is None:
        return None
    if isinstance(p, str):
        return (p,)
    out = tuple(p)
    if not all(isinstance(x, str) for x in out):
        raise TypeError(f"name patterns must be strings, got {p!r}")
    return out


def _name_matches(name: str, pattern: str) -> bool:
    """Glob match on the whole dotted name; a pattern with no dot and no wildcard matches the
    last component only (``"q_proj"`` matches ``"layers.3.self_attn.q_proj"``, as peft's
    ``target_modules`` does)."""
    if "." not in pattern and not any(c in pattern for c in "*?["):
        return name.rsplit(".", 1)[-1] == pattern
    return fnmatch.fnmatchcase(name, pattern)


def module_filter(
    types: type | tuple[type, ...] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> ModuleFilter:
    """A filter selecting modules that are instances of ``types`` (any type when None), whose
    name matches one of ``include`` (every name when None) and none of ``exclude``.

    Patterns are globs on the dotted name (``"blocks.*.attn.*"``); a bare word matches the last
    name component (``"q_proj"``).
    """
    if types is not None and not (
        isinstance(types, type)
        or (isinstance(types, tuple) and all(isinstance(t, type) for t in types))
    ):
        raise TypeError(f"types must be a type or a tuple of types, got {types!r}")
    inc, exc = _patterns(include), _patterns(exclude)

    def keep(module: nn.Module, name: str) -> bool:
        if types is not None and not isinstance(module, types):
            return False
        if inc is not None and not any(_name_matches(name, p) for p in inc):
            return False
        return not (exc is not None and any(_name_matches(name, p) for p in exc))

    return keep


def all_of(*filters: ModuleFilter | None) -> ModuleFilter:
    """A filter that keeps a module when every given filter (Nones ignored) keeps it."""
    fs = [f for f in filters if f is not None]

    def keep(module: nn.Module, name: str) -> bool:
        return all(f(module, name) for f in fs)

    return keep


def select_modules(model: nn.Module, filter_fn: ModuleFilter) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule ``filter_fn`` keeps, in ``named_modules`` order
    (a module reachable by several paths is listed once, under its first name)."""
    return [(n, m) for n, m in model.named_modules() if filter_fn(m, n)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at the dotted path ``name`` of ``model`` (which must exist)."""
    if not name:
        raise ValueError("cannot replace the root module in place; use the returned module")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise AttributeError(f"{type(parent).__name__} has no submodule {child!r} ({name!r})")
    setattr(parent, child, new)


def _paths(model: nn.Module) -> dict[int, list[str]]:
    """Every dotted path of every submodule, keyed by the module's id."""
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    return paths


def replace_modules(
    model: nn.Module,
    replace: Callable[[nn.Module, str], nn.Module],
    filter_fn: ModuleFilter,
    *,
    names: Iterable[str] | None = None,
) -> nn.Module:
    """Swaps, in place, each submodule selected by ``filter_fn`` for ``replace(module, name)``.

    Targets are chosen before any replacement. A callback that returns its argument leaves the
    module where it is. A replaced module is put at every path that reached it. Errors from the
    callback are re-raised with the module's name. ``names`` restricts the walk to those dotted
    names (an unknown name is a ValueError). Returns ``model``, or the replacement of the root
    when the root itself was selected.
    """
    targets = select_modules(model, filter_fn)
    if names is not None:
        wanted = list(names)
        known = {n for n, _ in targets}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ValueError(f"modules {missing} are not selected by the filter or do not exist")
        keep = set(wanted)
        targets = [(n, m) for n, m in targets if n in keep]
    paths = _paths(model) if targets else {}
    root = model
    for name, module in targets:
        try:
            new = replace(module, name)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name or 'the model'}: {e}") from e
        if new is module:
            continue
        if not isinstance(new, nn.Module):
            raise TypeError(f"{name or 'the model'}: the replacement is a {type(new).__name__}")
        for path in paths.get(id(module), [name]):
            if path == "":
                root = new
            else:
                set_submodule(model, path, new)
    return root
