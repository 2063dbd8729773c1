"""Preparation: text corpora tokenized into the shards a run reads (`python -m fasttrain.prepare`).

Imports from fasttrain: nothing.

Modules, in reading order: corpus (where documents come from: files, JSONL, Parquet, the embedded corpus),
split (which text is validation, which the tokenizer learns from), encoder (the tokenizer at tiktoken's speed),
pipeline (reading, encoding and writing shards on every core), preparation (`prepare`: a corpus into a
prepared folder), parts (one corpus prepared on many machines, then merged), cache (where [data] settings'
prepared folder is, prepared once and reused).

They import the floors below: system, config and formats (the tokenizer, the shard format and prepared
folders they write). docs/architecture.md has the tour.
"""
