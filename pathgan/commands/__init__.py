"""One module per ``pathgan`` sub-command; each defines ``register(subparsers)``."""
