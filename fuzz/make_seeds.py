"""Writes the seed corpus of the `lsh_index` fuzz target (fuzz/corpus/lsh_index/) with the
library's own writer: `python fuzz/make_seeds.py`. Each seed is a mode byte (odd: the target
repairs the checksum after mutating) followed by a valid index file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from slimforge.dedup import LSHIndex, signatures

OUT = Path(__file__).parent / "corpus" / "lsh_index"


def index_bytes(keys: list[str] | list[int] | None, num_perm: int, bands: int, rows: int) -> bytes:
    idx = LSHIndex(threshold=0.5, num_perm=num_perm, bands=bands, rows=rows)
    if keys:
        texts = [f"doc {i} alpha beta gamma {i * i}" for i in range(len(keys))]
        idx.insert(signatures(texts, num_perm=num_perm), keys=keys)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "i.idx"
        idx.save(p)
        return p.read_bytes()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = {
        "str_keys": index_bytes(["a", "bc", "", "d\u20ac"], 8, 4, 2),
        "int_keys": index_bytes([5, -1, 7], 4, 2, 2),
        "empty": index_bytes(None, 16, 4, 4),
    }
    for name, data in seeds.items():
        for mode in (0, 1):
            (OUT / f"{name}_{mode}").write_bytes(bytes([mode]) + data)


if __name__ == "__main__":
    main()
