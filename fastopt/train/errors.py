"""The trainer's error for bad input, in a module of its own so that every layer of
``fastopt.train`` may raise it without importing any other part."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad input: an unknown key, a wrong type or value, a missing file, a run folder that holds
    another run. The CLI reports it and exits with code 2."""
