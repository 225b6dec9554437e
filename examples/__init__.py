"""Example models for autopar (plain JAX + optax)."""
