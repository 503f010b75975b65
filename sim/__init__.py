"""Deterministic simulator of hosts for lazycluster (being built)."""
