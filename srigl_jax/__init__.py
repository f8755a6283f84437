"""SRigL: structured dynamic sparse training in JAX."""
