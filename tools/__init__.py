"""Helpers for tests and the demo (not installed with the daemon)."""
