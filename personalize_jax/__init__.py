"""personalize_jax: JAX/Flax training for personalized text-to-image generation."""

__version__ = "0.1.0"
