"""Webdataset shards in, batches of (images, texts, u-table rows) out; the tools that build and check shards.

manifest.py  Manifest: shards, counts, rows, fingerprint, verify
sources.py   find shards (dir, braces, `::`, wids, img2dataset stats); index_shards -> manifest.json
samples.py   the one tar reader and the one sample validator (skip reasons)
plan.py      who reads what in an epoch
reader.py    one worker slot's stream: shuffle buffer, seeded augmentation
batching.py  pieces, merging, exact batch cutting, positions
loader.py    ShardLoader: epoch(), num_batches(), state_dict() / load_state_dict()
skips.py     SkipReport: skipped samples counted, logged, written to the run's skip file
continuation.py  the rest of an epoch interrupted on another number of ranks (replayed, dealt anew)
resharding.py    ShardLoader's part in a world-size change: load_rank_states, the shared plan (LoaderPlan)
build.py     `shards build`;  check.py  `shards check`
"""

from engine.data.batching import Batch
from engine.data.loader import ShardLoader
from engine.data.manifest import Manifest, ShardEntry
from engine.data.resharding import LoaderPlan
from engine.data.samples import SkipRecord

__all__ = ["Batch", "LoaderPlan", "Manifest", "ShardEntry", "ShardLoader", "SkipRecord"]
