"""Formats: what preparation writes and every later stage reads, below both: the tokenizer, token shards and
their meta.json, and a prepared folder checked whole.

Imports from fasttrain: nothing.

Modules, in reading order: tokenizer (the byte-level BPE: learned or loaded from tokenizer.json), shards (the
prepared format: token shards and meta.json), prepared_folder (a prepared folder checked as a run reads it).
They import only system's errors and atomic writes. docs/architecture.md has the tour.
"""
