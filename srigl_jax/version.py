"""The version of srigl_jax (also recorded in every exported artefact)."""

__version__ = "0.1.0"
