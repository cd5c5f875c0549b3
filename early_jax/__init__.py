"""early_jax: the early phase of neural network training, as pure JAX functions over many seeds."""

from early_jax import runtime as _runtime  # noqa: F401  CPU XLA flags + compilation cache; before any backend starts

__version__ = "0.1.0"
