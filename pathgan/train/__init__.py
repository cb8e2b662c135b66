"""``pathgan train``: the one training loop shared by both GANs, and what it needs around it;
``pathgan arch`` (``architecture.py``) draws a config's networks."""
