"""File dedup as stages: the same results on any engine, any sharding and any number of
partitions, and after a killed worker or an interrupted driver.

Ray runs on one local 2-CPU cluster for the whole module (tasks take one CPU: two workers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

from slimforge.cli import main
from slimforge.dedup import deduplicate, stages
from slimforge.dedup.engines import LocalEngine, RayEngine
from slimforge.dedup.files import dedup_files
from slimforge.dedup.synthetic import near_duplicate_corpus

ROOT = Path(__file__).resolve().parents[1]


def corpus() -> list[str]:
    """Near duplicates of real text, exact duplicates, empty documents and one template shared
    by 90 documents (a bucket above MAX_BUCKET, verified through leaders)."""
    docs = near_duplicate_corpus(120, seed=11)
    docs += docs[:15] + ["", "  "]
    template = " ".join(f"field{i} value{i}" for i in range(40))
    docs += [f"{template} record {i} of {i % 7}" for i in range(90)]
    rng = np.random.default_rng(3)
    return [docs[i] for i in rng.permutation(len(docs))]


DOCS = corpus()


def write_shards(folder: Path, docs: list[str], bounds: list[int]) -> list[Path]:
    """`docs` split at `bounds` into JSONL shards (one malformed line in the first)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    edges = [0, *bounds, len(docs)]
    for s in range(len(edges) - 1):
        p = folder / f"shard{s}.jsonl"
        lines = [
            json.dumps({"id": i, "text": docs[i]}) + "\n" for i in range(edges[s], edges[s + 1])
        ]
        if s == 0:
            lines.insert(min(3, len(lines)), "{not json\n")
        p.write_text("".join(lines))
        paths.append(p)
    return paths


def outputs(out: Path) -> dict[str, bytes]:
    names = [out.name, "o.clusters.tsv", "o.rejects.jsonl"]
    return {n: (out.parent / n).read_bytes() for n in names if (out.parent / n).exists()}


def tsv(out: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [r.split("\t") for r in out.with_name("o.clusters.tsv").read_text().splitlines()[1:]]
    return np.array([int(r[3]) for r in rows]), np.array([r[4] == "1" for r in rows])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    n = len(DOCS)
    return write_shards(tmp_path_factory.mktemp("in"), DOCS, [n // 4, n // 4, n // 2])


@pytest.fixture(scope="module")
def local_run(shards: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "o.jsonl"
    report = dedup_files(shards, out, on_error="skip", partitions=5, progress=False)
    assert report.documents == len(DOCS) and report.rejected == 1
    return outputs(out)


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_local_engine_matches_in_memory_dedup(shards: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    dedup_files(shards, out, on_error="skip", partitions=5, progress=False)
    ref = deduplicate(DOCS)
    cluster_ids, keep = tsv(out)
    np.testing.assert_array_equal(cluster_ids, ref.cluster)
    np.testing.assert_array_equal(keep, ref.keep)
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == np.flatnonzero(ref.keep).tolist()
    assert ref.stats.exact_duplicates > 10 and ref.stats.near_duplicates > 50


@settings(max_examples=12)
@given(
    cuts=st.lists(st.integers(0, len(DOCS)), max_size=4).map(sorted),
    partitions=st.integers(1, 9),
    verify=st.sampled_from(["estimate", "exact"]),
)
def test_any_sharding_and_partitions_give_the_in_memory_result(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[int], partitions: int, verify: str
) -> None:
    folder = tmp_path_factory.mktemp("prop")
    paths = write_shards(folder / "in", DOCS, cuts)
    out = folder / "o.jsonl"
    report = dedup_files(
        paths, out, on_error="skip", partitions=partitions, verify=verify, progress=False
    )
    ref = deduplicate(DOCS, verify=verify)
    cluster_ids, keep = tsv(out)
    np.testing.assert_array_equal(cluster_ids, ref.cluster)
    np.testing.assert_array_equal(keep, ref.keep)
    assert report.kept == int(ref.keep.sum())
    assert report.exact_duplicates == ref.stats.exact_duplicates


def test_two_ray_workers_match_the_local_engine(
    cluster: Any, shards: list[Path], local_run: dict[str, bytes], tmp_path: Path
) -> None:
    assert cluster.cluster_resources()["CPU"] == 2
    out = tmp_path / "o.jsonl"
    engine = RayEngine()
    dedup_files(shards, out, on_error="skip", partitions=5, engine=engine, progress=False)
    assert outputs(out) == local_run
    assert set(engine.peak_rss) == {"hash", "exact", "buckets", "components", "filter"}


def test_ray_matches_local_with_exact_verification_and_indexes(
    cluster: Any, shards: list[Path], tmp_path: Path
) -> None:
    earlier = tmp_path / "earlier.lsh"
    dedup_files(
        shards[:1], tmp_path / "a.jsonl", save_index=earlier, on_error="skip", progress=False
    )
    results = []
    for engine in ("local", "ray"):
        out = tmp_path / engine / "o.jsonl"
        report = dedup_files(
            shards[1:],
            out,
            engine=engine,
            verify="exact",
            against=[earlier],
            save_index=out.with_name("kept.lsh"),
            partitions=3,
            progress=False,
        )
        assert report.external_duplicates > 0
        results.append({**outputs(out), "index": out.with_name("kept.lsh").read_bytes()})
    assert results[0] == results[1]


def test_cli_engine_ray(
    cluster: Any, shards: list[Path], local_run: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "o.jsonl"
    argv = [*map(str, shards), "-o", str(out), "--on-error", "skip", "--partitions", "5", "-q"]
    assert main(["dedup", *argv, "--engine", "ray"]) == 0
    assert outputs(out) == local_run


def test_a_stage_error_on_ray_is_the_stage_s_own(
    cluster: Any, shards: list[Path], tmp_path: Path
) -> None:
    # InputError does not survive pickling: it arrives as a ValueError with its message.
    with pytest.raises(ValueError, match=r"shard0\.jsonl:4: invalid JSON"):
        dedup_files(shards, tmp_path / "o.jsonl", engine="ray", progress=False)
    assert (
        main(["dedup", *map(str, shards), "-o", str(tmp_path / "o.jsonl"), "--engine", "ray"]) == 2
    )
    assert not (tmp_path / "o.jsonl").exists()


class KillOnce(RayEngine):
    """Kills the worker of one unit of `stage` once (a marker file remembers it), either before
    the unit starts or after it wrote its files but not its manifest entry."""

    def __init__(self, stage: str, unit: int, marker: Path, after_files: bool) -> None:
        super().__init__(max_retries=2)
        self.kill = (stage, unit, str(marker), after_files)

    def map(self, stage: str, fn: Any, run_dir: str, units: Any, progress: bool) -> Any:
        kill_stage, kill_unit, marker, after_files = self.kill
        if stage != kill_stage:
            return super().map(stage, fn, run_dir, units, progress)

        def unit_or_die(run_dir: str, unit: int, progress: bool = False) -> Any:
            first = unit == kill_unit and not os.path.exists(marker)
            if first and not after_files:
                Path(marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            entry = fn(run_dir, unit)
            if first:
                Path(marker).touch()
                (Path(run_dir) / stage / f"{unit:05d}.done.json").unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        return super().map(stage, unit_or_die, run_dir, units, progress)


@pytest.mark.parametrize(
    ("stage", "unit", "after_files"), [("hash", 1, False), ("buckets", 2, True)]
)
def test_a_killed_worker_is_retried_with_the_same_result(
    cluster: Any,
    shards: list[Path],
    local_run: dict[str, bytes],
    tmp_path: Path,
    stage: str,
    unit: int,
    after_files: bool,
) -> None:
    marker = tmp_path / "killed"
    out = tmp_path / "o.jsonl"
    engine = KillOnce(stage, unit, marker, after_files)
    dedup_files(shards, out, on_error="skip", partitions=5, engine=engine, progress=False)
    assert marker.exists()
    assert outputs(out) == local_run


class Counting(LocalEngine):
    def __init__(self) -> None:
        super().__init__()
        self.ran: dict[str, list[int]] = {}

    def map(self, stage: str, fn: Any, run_dir: str, units: Any, progress: bool) -> Any:
        self.ran.setdefault(stage, []).extend(units)
        return super().map(stage, fn, run_dir, units, progress)


_INTERRUPTED = """
import os, sys
from slimforge.dedup import files, stages
real, calls = stages.bucket_partition, []
def bucket_partition(run_dir, part, progress=False):
    calls.append(part)
    if len(calls) == 3:
        os._exit(9)  # the driver dies in the middle of stage 2
    return real(run_dir, part, progress)
stages.bucket_partition = bucket_partition
files.dedup_files(sys.argv[3:], sys.argv[1], run_dir=sys.argv[2], on_error="skip",
                  partitions=5, progress=False)
"""


def test_an_interrupted_driver_resumes_without_redoing_work(
    shards: list[Path], local_run: dict[str, bytes], tmp_path: Path
) -> None:
    out, run = tmp_path / "o.jsonl", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), *sys.path])}
    argv = [str(out), str(run), *map(str, shards)]
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED, *argv], env=env, timeout=120)
    assert proc.returncode == 9 and not out.exists()
    done = sorted(p.name for p in (run / "buckets").glob("*.done.json"))
    assert done == ["00000.done.json", "00001.done.json"]
    engine = Counting()
    dedup_files(
        shards, out, run_dir=run, on_error="skip", partitions=5, engine=engine, progress=False
    )
    assert engine.ran == {"buckets": [2, 3, 4], "components": [0], "filter": [0, 1, 2, 3]}
    assert outputs(out) == local_run
    # Finished: a second run only joins the shards' outputs again.
    engine = Counting()
    dedup_files(
        shards, out, run_dir=run, on_error="skip", partitions=5, engine=engine, progress=False
    )
    assert engine.ran == {} and outputs(out) == local_run


_RAY_DRIVER = """
import sys, time
from slimforge.dedup import files, stages
from slimforge.dedup.engines import RayEngine
real = stages.bucket_partition
def bucket_partition(run_dir, part, progress=False):
    time.sleep(1.0)  # slow units, so that the driver dies in the middle of the stage
    return real(run_dir, part, progress)
stages.bucket_partition = bucket_partition
files.dedup_files(sys.argv[4:], sys.argv[1], run_dir=sys.argv[2], on_error="skip",
                  partitions=5, engine=RayEngine(address=sys.argv[3]), progress=False)
"""


class CountingRay(RayEngine):
    def __init__(self) -> None:
        super().__init__()
        self.ran: dict[str, list[int]] = {}

    def map(self, stage: str, fn: Any, run_dir: str, units: Any, progress: bool) -> Any:
        self.ran.setdefault(stage, []).extend(units)
        return super().map(stage, fn, run_dir, units, progress)


def test_a_killed_ray_driver_resumes_on_the_cluster(
    cluster: Any, shards: list[Path], local_run: dict[str, bytes], tmp_path: Path
) -> None:
    out, run = tmp_path / "o.jsonl", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), *sys.path])}
    address = cluster.get_runtime_context().gcs_address
    argv = [str(out), str(run), address, *map(str, shards)]
    proc = subprocess.Popen([sys.executable, "-c", _RAY_DRIVER, *argv], env=env)
    try:
        deadline = time.monotonic() + 90
        while not list((run / "buckets").glob("*.done.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: the driver dies with stage 2b under way
        proc.wait()
    before = {int(p.name[:5]) for p in (run / "buckets").glob("*.done.json")}
    assert before and len(before) < 5 and not out.exists()
    engine = CountingRay()
    dedup_files(
        shards, out, run_dir=run, on_error="skip", partitions=5, engine=engine, progress=False
    )
    assert "hash" not in engine.ran and not before & set(engine.ran["buckets"])
    assert outputs(out) == local_run


def test_a_run_folder_serves_only_its_own_job(shards: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    dedup_files(shards, tmp_path / "o.jsonl", run_dir=run, on_error="skip", progress=False)
    with pytest.raises(ValueError, match="belongs to another job.*threshold"):
        dedup_files(
            shards,
            tmp_path / "o.jsonl",
            run_dir=run,
            on_error="skip",
            threshold=0.7,
            progress=False,
        )
    assert stages.load_plan(run).threshold == 0.8
    # Memory and batch sizes never change a result: a resumed run may change them.
    dedup_files(
        shards, tmp_path / "o.jsonl", run_dir=run, on_error="skip", memory_mb=64, progress=False
    )
    assert stages.load_plan(run).memory_mb == 64


def test_engine_arguments_are_checked(shards: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with pytest.raises(ValueError, match="engine must be one of"):
        dedup_files(shards, out, engine="spark", progress=False)
    with pytest.raises(ValueError, match="address is only used"):
        dedup_files(shards, out, address="auto", progress=False)
    with pytest.raises(ValueError, match="partitions must lie in"):
        dedup_files(shards, out, partitions=0, progress=False)
    with pytest.raises(TypeError, match="engine must be"):
        dedup_files(shards, out, engine=3, progress=False)
    assert main(["dedup", str(shards[0]), "-o", str(out), "--address", "auto", "-q"]) == 2
    assert not out.exists()


def test_the_ray_engine_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'slimforge\[ray\]'"):
        RayEngine()


def test_the_ray_example_without_ray_says_what_it_needs(tmp_path: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'dedup_ray.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", code, "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'slimforge[ray]'" in proc.stdout
