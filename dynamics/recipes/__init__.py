"""Reproducible experiments, each returning a measured Dataset in traindyn's data model.

Each recipe pairs with a theory module or a probe: ``linear_teacher`` with
``theory.linear``, ``digits`` with the representation probes.
"""

from dynamics.recipes.digits import DigitsMLP, load_digits_split, train_digits_mlp
from dynamics.recipes.linear_teacher import simulate_linear_teacher

__all__ = ["DigitsMLP", "load_digits_split", "simulate_linear_teacher", "train_digits_mlp"]
