"""A sequence classifier (a small GRU), written against `pytorch_lightning`."""

from sequence.data import MajorityTokens
from sequence.model import GRUClassifier

__all__ = ["GRUClassifier", "MajorityTokens"]
