"""fasttrain: a compact, performance-first trainer for transformer language models."""

__version__ = "0.1.0"
