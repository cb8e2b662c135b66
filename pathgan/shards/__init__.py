"""``pathgan shards pack | merge | verify | show``, and the shard set's contract.

The stage: ``pack.py`` runs ``sources.py`` -> ``plan.py`` -> ``spool.py`` -> ``assemble.py``
(``table_embeddings.py`` for a table's embedding column); ``merge.py`` and ``inspect.py``.
What the other stages read: ``format.py`` (a shard set on disk), ``stream.py`` (the training
image stream), ``reading.py`` (random access to samples), ``embedding_files.py`` (the embeddings
``pathgan embed`` writes beside the shards)."""
