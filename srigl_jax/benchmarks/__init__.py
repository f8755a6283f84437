"""Benchmarks (run as modules, e.g. ``python -m srigl_jax.benchmarks.condensed``)."""
