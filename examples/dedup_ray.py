"""Deduplicate a sharded corpus on a local Ray cluster and check it against the local engine.

Writes the bundled corpus as four JSONL shards, runs `dedup_files` with the local engine and
then with the Ray engine on a 2-CPU local cluster (two workers), and compares the outputs byte
for byte. On a real cluster, pass `address="auto"` (or run `slimforge dedup --engine ray
--address auto`) with the inputs and the run folder on shared storage: docs/scale-out.md.

    python examples/dedup_ray.py           # the whole corpus
    python examples/dedup_ray.py --quick   # the first 2,000 documents
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from slimforge.data import load_texts
from slimforge.dedup.files import dedup_files

parser = argparse.ArgumentParser(description="Dedup shards locally and on Ray.")
parser.add_argument("--quick", action="store_true", help="only the first 2,000 documents")
texts = load_texts()[: 2000 if parser.parse_args().quick else None]
try:
    import ray
except ImportError:
    print("Ray is not installed: pip install 'slimforge[ray]'")
    sys.exit(0)

folder = Path(tempfile.mkdtemp(prefix="dedup-ray-"))
shards = []
for s in range(4):
    shards.append(folder / f"shard{s}.jsonl")
    shards[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[s::4]))

results = {}
for engine in ("local", "ray"):
    if engine == "ray":
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = folder / engine / "clean.jsonl"
    t0 = time.perf_counter()
    report = dedup_files(shards, out, engine=engine, partitions=4, progress=False)
    seconds = time.perf_counter() - t0
    results[engine] = out.read_bytes() + out.with_name("clean.clusters.tsv").read_bytes()
    print(
        f"{engine:>5}: {report.documents} documents, kept {report.kept} "
        f"({report.exact_duplicates} exact, {report.near_duplicates} near duplicates) "
        f"in {seconds:.1f} s"
    )
ray.shutdown()
print(f"identical outputs: {results['local'] == results['ray']}")
