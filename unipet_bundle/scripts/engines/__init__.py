"""Ignite engines for two-stage UniPET training."""
