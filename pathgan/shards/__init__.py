"""Data: packing slides and patch folders into WebDataset shards, and reading them back."""
