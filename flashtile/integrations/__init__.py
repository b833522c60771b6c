"""Integrations with other libraries: :mod:`flashtile.integrations.transformers` (a Hugging Face attention
backend)."""
