"""Examples that ship with flashtile: :mod:`flashtile.examples.engine`, a small serving engine on the
kernels (``python -m flashtile demo`` runs it, docs/serving.md walks through it)."""
