"""Reproducible experiments, each returning a measured Dataset in traindyn's data model.

Each recipe pairs with a theory module or a probe:

====================  ============================================================
recipe                pairs with
====================  ============================================================
``linear_teacher``    ``theory.linear`` (Advani & Saxe 2017)
``kernel_regression`` ``theory.kernels``, ``theory.random_features``, ``theory.scaling``
``deep_linear``       ``theory.deep_linear`` (Saxe et al. 2014)
``collapse_training`` ``theory.neural_collapse``, ``probes.collapse``
``digits``            representation probes (RankMe, alpha-ReQ)
``tiny_lm``           instability proxies and checkpoint-series geometry
``two_layer``         ``theory.dmft`` (mean-field two-layer network, Bordelon & Pehlevan 2022)
``grokking``          lazy → rich grokking (Kumar, Bordelon, Gershman & Pehlevan 2024)
``eigenlearning``     ``theory.krr_learning_curve`` from a network's measured NTK on digits
====================  ============================================================
"""

from traindyn.dynamics.recipes.collapse_training import (
    collapse_digits,
    train_deep_linear_collapse,
    train_mlp_collapse,
)
from traindyn.dynamics.recipes.deep_linear import svd_task, train_deep_linear
from traindyn.dynamics.recipes.digits import DigitsMLP, load_digits_split, train_digits_mlp
from traindyn.dynamics.recipes.eigenlearning import digits_eigenlearning
from traindyn.dynamics.recipes.grokking import train_grokking
from traindyn.dynamics.recipes.kernel_regression import (
    digits_kernel,
    simulate_digits_krr,
    simulate_krr,
    simulate_rf,
    simulate_rf_infinite_data,
)
from traindyn.dynamics.recipes.linear_teacher import simulate_linear_teacher
from traindyn.dynamics.recipes.tiny_lm import TinyLM, TinyLMConfig, load_corpus, train_tiny_lm
from traindyn.dynamics.recipes.two_layer import train_two_layer, two_layer_task

__all__ = [
    "train_grokking",
    "train_two_layer",
    "two_layer_task",
    "DigitsMLP",
    "TinyLM",
    "TinyLMConfig",
    "collapse_digits",
    "digits_eigenlearning",
    "digits_kernel",
    "load_corpus",
    "load_digits_split",
    "simulate_digits_krr",
    "simulate_krr",
    "simulate_linear_teacher",
    "simulate_rf",
    "simulate_rf_infinite_data",
    "svd_task",
    "train_deep_linear",
    "train_deep_linear_collapse",
    "train_digits_mlp",
    "train_mlp_collapse",
    "train_tiny_lm",
]
