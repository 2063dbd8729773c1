"""Data: prepared token shards read as the batches a run trains on.

Imports from fasttrain: nothing.

Modules, in reading order: documents (the rows a batch is made of, in each batching mode), sampling (which rows
a source's batches take, epoch after epoch), mixture (prepared sources mixed by weight), reader (reading one
batch of one rank's stream), prefetch (batches read ahead on a thread), resharding (a saved position carried to
another number of processes), loader (`TokenLoader`: the batches, exactly resumable). How often a run reads
its corpus, and what follows, is the plan's (fasttrain/planning/repeats.py).

They import the floors below: system, config, formats (the shard format, prepared folders, the tokenizer) and
preparation's cache (where a [data] setting's prepared folder is). docs/architecture.md has the tour.
"""
