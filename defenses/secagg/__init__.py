"""Secure aggregation primitives (work in progress; see the package docstring once written)."""
