"""The data path, in the order data flows: where documents come from (corpus), the byte-level BPE
(tokenizer), a corpus tokenized into shards and the cache of prepared data (preparation), the shard
format and meta.json (shards), the rows a batch is made of in each batching mode (documents), and the
batches a run trains on (loader; its row order over epochs in sampling, the reading of a batch in reader,
the read-ahead thread in prefetch, a saved position carried to another world size in resharding)."""
