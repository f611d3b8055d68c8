"""A tiny transformer encoder classifier, written against `lightning.pytorch`."""

from transformer.data import MarkovChains
from transformer.model import TinyTransformer

__all__ = ["MarkovChains", "TinyTransformer"]
