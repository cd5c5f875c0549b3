"""early_jax: the early phase of neural network training, as pure JAX functions over many seeds."""

__version__ = "0.1.0"
