"""The one training loop shared by both GANs, and what it needs around it."""
