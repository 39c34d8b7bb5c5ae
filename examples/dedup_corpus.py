"""Deduplicate the bundled corpus in memory, then one shard against another's index.

Shows `deduplicate` (exact and near duplicates, one keeper per cluster), `MinHasher` and
`LSHIndex` for deduplicating a new shard against documents kept earlier, and
`lm_splits(keep=...)`, which leaves the removed documents out of the training text.

    python examples/dedup_corpus.py           # the whole corpus (about a second)
    python examples/dedup_corpus.py --quick   # the same on the first 2,000 documents
"""

import argparse
from collections import Counter

from slimforge.data import lm_splits, load_corpus
from slimforge.dedup import LSHIndex, MinHasher, deduplicate

parser = argparse.ArgumentParser(description="Deduplicate the bundled corpus.")
parser.add_argument("--quick", action="store_true", help="only the first 2,000 documents")
quick = parser.parse_args().quick
records = load_corpus()[: 2000 if quick else None]
texts = [r["text"] for r in records]
result = deduplicate(texts, threshold=0.8)
s = result.stats
print(
    f"{s.documents} documents: {s.exact_duplicates} exact and {s.near_duplicates} near "
    f"duplicates removed, {s.clusters} clusters, {s.bands} bands x {s.rows} rows"
)
removed = Counter(r["collection"] for r, k in zip(records, result.keep, strict=True) if not k)
for collection, count in sorted(removed.items()):
    print(f"  removed from {collection}: {count}")

# Shards: dedup the even documents, index their keepers, then query the odd documents.
hasher = MinHasher(num_perm=128, ngram=5)
shard_a, shard_b = texts[0::2], texts[1::2]
keep_a = deduplicate(shard_a, threshold=0.8).keep
index = LSHIndex(threshold=0.8, num_perm=128)
index.insert(hasher.signatures([t for t, k in zip(shard_a, keep_a, strict=True) if k]))
matches = index.query_many(hasher.signatures(shard_b))
print(f"shard b: {sum(bool(m) for m in matches)} of {len(shard_b)} documents repeat shard a")

if not quick:  # lm_splits' keep mask covers the records of the collections it reads
    collections = ("shakespeare-modern", "milton")
    pairs = zip(records, result.keep, strict=True)
    keep = [k for r, k in pairs if r["collection"] in collections]
    train, _ = lm_splits(collections=collections)
    train_kept, _ = lm_splits(collections=collections, keep=keep)
    print(f"training text: {len(train):,} bytes, {len(train_kept):,} after dedup")
