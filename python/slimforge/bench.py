"""Timing helpers for side-by-side benchmarks (``benches/python/``).

    best = best_times({"ours": lambda: f(x), "peer": lambda: g(x)}, reps=5)
    print(f"{best['peer'] / best['ours']:.2f}x")

Every helper calls its functions without arguments and measures wall time by default
(``clock=WALL``, :func:`time.perf_counter`); pass ``clock=CPU`` (:func:`time.process_time`) to
count only the CPU time of this process, which time spent waiting for a core on a busy machine
does not inflate. Which statistic to use:

- :func:`best_times`: several engines on the same input, taking turns, best of each: a burst of
  load on a shared machine then hits every engine alike (the default for comparisons);
- :func:`best_time` / :func:`best_of`: one function, best of ``reps`` (``best_of`` also returns
  the function's result);
- :func:`median_time`: one function, median of ``reps`` (steadier than the best when a call's
  own time varies, e.g. allocation-heavy forward + backward passes);
- :func:`cycle_time`: best mean time per call over passes through a list of functions, e.g.
  layers whose weights together exceed the last-level cache (cold-weight timing);
- :func:`timed`: one call, with its result;
- :func:`cuda_time`: median of CUDA-event timings (GPU kernels; imports torch when called).

Standard library only; no helper touches thread counts or devices.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "CPU",
    "WALL",
    "best_of",
    "best_time",
    "best_times",
    "cuda_time",
    "cycle_time",
    "median_time",
    "timed",
]

T = TypeVar("T")
Clock = Callable[[], float]

#: Wall-clock time (the default clock).
WALL: Clock = time.perf_counter
#: CPU time of this process (all its threads): not inflated by waiting for a core.
CPU: Clock = time.process_time


def _check_reps(reps: int, name: str = "reps") -> None:
    if reps < 1:
        raise ValueError(f"{name} must be >= 1, got {reps}")


def timed(fn: Callable[[], T], *, clock: Clock = WALL) -> tuple[T, float]:
    """One call of ``fn``: ``(its result, seconds)``."""
    start = clock()
    out = fn()
    return out, clock() - start


def best_of(
    fn: Callable[[], T], reps: int, *, warmup: bool = False, clock: Clock = WALL
) -> tuple[float, T]:
    """Best seconds over ``reps`` calls of ``fn`` and the last call's result; ``warmup`` adds
    one untimed call first."""
    _check_reps(reps)
    if warmup:
        fn()
    best = float("inf")
    for _ in range(reps):
        out, secs = timed(fn, clock=clock)
        best = min(best, secs)
    return best, out


def best_time(
    fn: Callable[[], object], reps: int, *, warmup: bool = True, clock: Clock = WALL
) -> float:
    """Best seconds over ``reps`` calls of ``fn``, after one untimed warm-up call (unless
    ``warmup=False``)."""
    return best_of(fn, reps, warmup=warmup, clock=clock)[0]


def best_times(
    fns: Mapping[str, Callable[[], object]],
    reps: int,
    *,
    warmup: bool = True,
    clock: Clock = WALL,
) -> dict[str, float]:
    """Best seconds of each function, the functions taking turns ``reps`` times (after one
    warm-up call of each unless ``warmup=False``).

    Taking turns spreads load on a shared machine over every engine alike instead of whichever
    ran during a burst. Returns ``{name: best seconds}`` in the order of ``fns``."""
    _check_reps(reps)
    if warmup:
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            _, secs = timed(fn, clock=clock)
            best[name] = min(best[name], secs)
    return best


def median_time(
    fn: Callable[[], object], reps: int, *, warmup: int = 1, clock: Clock = WALL
) -> float:
    """Median seconds over ``reps`` calls of ``fn``, after ``warmup`` untimed calls."""
    _check_reps(reps)
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, clock=clock)[1] for _ in range(reps))


def cycle_time(
    fns: Sequence[Callable[[], object]], passes: int, *, warmup: bool = True, clock: Clock = WALL
) -> float:
    """Best mean seconds per call over ``passes`` passes through all of ``fns`` (after one
    untimed pass unless ``warmup=False``).

    For cold-cache timing: make ``fns`` the same operation on enough different weights that
    they do not stay in the cache between two calls of one of them."""
    _check_reps(passes, "passes")
    if not fns:
        raise ValueError("fns is empty")
    if warmup:
        for f in fns:
            f()
    best = float("inf")
    for _ in range(passes):
        start = clock()
        for f in fns:
            f()
        best = min(best, (clock() - start) / len(fns))
    return best


def cuda_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds per call of a GPU function, by CUDA events (``warmup`` untimed calls,
    then ``iters`` timed ones, each waited for; the upper median for an even ``iters``).
    Imports torch."""
    import torch

    _check_reps(iters, "iters")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median_high(times)
