"""Data: prepared token shards read as the batches a run trains on.

Imports from fasttrain: nothing.

Modules, in reading order: shards (the prepared format: token shards and meta.json), prepared_folder (a
prepared folder checked as a run reads it), documents (the rows a batch is made of, in each batching mode),
sampling (which rows a source's batches take, epoch after epoch), mixture (prepared sources mixed by weight),
reader (reading one batch of one rank's stream), prefetch (batches read ahead on a thread), resharding (a
saved position carried to another number of processes), loader (`TokenLoader`: the batches, exactly resumable).

They import the layers below (system, config) and, at the same layer, preparation's tokenizer and cache.
docs/architecture.md has the tour.
"""
