"""Fakes for running the host engine without jax or a model."""
