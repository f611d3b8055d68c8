"""A tabular regression, written against `lightning.pytorch` as Lightning's documentation writes modules."""

from tabular.data import SyntheticTabular
from tabular.model import TabularRegressor

__all__ = ["SyntheticTabular", "TabularRegressor"]
