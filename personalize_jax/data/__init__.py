"""Data: instance images, prompts, and the DreamBench tfds builder.

Submodules are imported directly (``from personalize_jax.data import
dreambench``) so that importing one does not pull in tensorflow-datasets.
"""
