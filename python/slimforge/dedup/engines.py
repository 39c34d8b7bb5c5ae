"""Engines that run the dedup stages (`slimforge.dedup.stages`): in this process, or as Ray
tasks on a cluster. Both call the same stage functions on the same run folder, so they give
the same files; an engine only decides where each unit runs.

An engine has one method, ``map(stage, fn, run_dir, units, progress)``, which runs
``fn(run_dir, unit)`` for every unit and returns when all have finished, and two dicts filled
as stages run: ``peak_rss`` (stage name -> the largest peak resident memory of one unit, in
bytes, where the platform reports it), ``seconds`` (stage name -> wall time of its map) and
``unit_seconds`` (stage name -> the wall time of each unit, where it ran).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from slimforge._optional import require

__all__ = ["LocalEngine", "RayEngine", "make_engine"]

ENGINES = ("local", "ray")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count of this process (Linux ``clear_refs``)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss() -> int | None:
    """Peak resident memory of this process since `_reset_peak_rss`, in bytes (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _portable(e: Exception) -> Exception:
    """`e`, or an exception of its nearest built-in class with the same message when `e` does
    not survive pickling (e.g. `InputError`, whose constructor takes three arguments), so the
    driver receives the unit's error rather than a deserialization failure."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        pass
    for base in (FileNotFoundError, OSError, ValueError, TypeError, MemoryError, RuntimeError):
        if isinstance(e, base):
            return base(str(e))
    return RuntimeError(f"{type(e).__name__}: {e}")


def run_unit(
    fn: Callable[..., dict[str, Any]], run_dir: str, unit: int, threads: int
) -> dict[str, Any]:
    """Run one unit with `threads` kernel threads; its manifest entry plus ``peak_rss`` and
    ``seconds`` (its wall time in the worker)."""
    from slimforge import _native

    if threads > 0:
        _native.set_num_threads(threads)
    _reset_peak_rss()
    t0 = time.perf_counter()
    try:
        entry = dict(fn(run_dir, unit))
    except Exception as e:
        raise _portable(e) from None
    entry["seconds"] = time.perf_counter() - t0
    entry["peak_rss"] = _peak_rss()
    return entry


class _Engine:
    def __init__(self) -> None:
        self.peak_rss: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.unit_seconds: dict[str, list[float]] = {}

    def _record(self, stage: str, entries: Sequence[dict[str, Any]], t0: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.unit_seconds.setdefault(stage, []).extend(float(e["seconds"]) for e in entries)
        peaks = [int(e["peak_rss"]) for e in entries if e.get("peak_rss")]
        if peaks:
            self.peak_rss[stage] = max(self.peak_rss.get(stage, 0), *peaks)


class LocalEngine(_Engine):
    """Runs the units one after another in this process, each on the library's thread pool."""

    def workers(self) -> int:
        return 1

    def map(
        self,
        stage: str,
        fn: Callable[..., dict[str, Any]],
        run_dir: str,
        units: Sequence[int],
        progress: bool,
    ) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        entries = []
        for u in units:
            _reset_peak_rss()
            t1 = time.perf_counter()
            entry = dict(fn(run_dir, u, progress=progress))
            entry["seconds"] = time.perf_counter() - t1
            entry["peak_rss"] = _peak_rss()
            entries.append(entry)
        self._record(stage, entries, t0)
        return entries


class RayEngine(_Engine):
    """Runs every unit of a stage as a Ray task (``num_cpus`` each, so a node runs as many units
    at once as it has CPUs / ``num_cpus``), retried up to ``max_retries`` times when its worker
    dies. Connects to the cluster at ``address`` (``"auto"``, ``"HOST:PORT"`` or
    ``"ray://HOST:PORT"``), or starts a local one with ``ray.init()`` when ``address`` is None;
    an already initialised Ray is used as it is. The run folder and the inputs must be on
    storage every node sees at the same path, and slimforge installed on every node."""

    def __init__(self, address: str | None = None, num_cpus: int = 1, max_retries: int = 3) -> None:
        super().__init__()
        require("ray", "the Ray dedup engine")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str, got {type(address).__name__}")
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1:
            raise ValueError(f"num_cpus must be an int >= 1, got {num_cpus!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.address, self.num_cpus, self.max_retries = address, num_cpus, max_retries

    def workers(self) -> int:
        """Units of one stage that the cluster runs at once (its CPUs / ``num_cpus``)."""
        ray = self._connect()
        return max(1, int(ray.cluster_resources().get("CPU", 1)) // self.num_cpus)

    def _connect(self) -> Any:
        import ray

        if not ray.is_initialized():
            if self.address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        return ray

    def map(
        self,
        stage: str,
        fn: Callable[..., dict[str, Any]],
        run_dir: str,
        units: Sequence[int],
        progress: bool,
    ) -> list[dict[str, Any]]:
        ray = self._connect()
        t0 = time.perf_counter()
        task = ray.remote(num_cpus=self.num_cpus, max_retries=self.max_retries)(run_unit)
        refs = [task.remote(fn, run_dir, u, self.num_cpus) for u in units]
        pending = list(refs)
        with tqdm(
            total=len(refs), desc=f"dedup: {stage}", unit="task", disable=not progress
        ) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        try:
            entries = ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            # The stage's own exception (ValueError for bad input ...), re-raised as itself.
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"dedup stage {stage!r} failed on the Ray cluster: {e}") from e
        self._record(stage, entries, t0)
        return list(entries)


def make_engine(engine: Any, address: str | None = None) -> Any:
    """An engine from its name (``"local"``, ``"ray"``) or an engine object (returned as is)."""
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise ValueError(
                f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}"
            )
        if engine == "local":
            if address is not None:
                raise ValueError("address is only used by engine='ray'")
            return LocalEngine()
        return RayEngine(address)
    if not callable(getattr(engine, "map", None)):
        raise TypeError(
            f"engine must be 'local', 'ray' or an engine object, got {type(engine).__name__}"
        )
    if address is not None:
        raise ValueError("address is only used with engine='ray'")
    return engine
