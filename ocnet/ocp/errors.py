"""Errors that name the cause and the fix."""

from __future__ import annotations


class OcnetError(Exception):
    """Base class of every error ocnet raises on purpose."""


class ShapeError(OcnetError, ValueError):
    """A state or control does not have the shape a stage expects."""


class ConfigError(OcnetError, ValueError):
    """An option, name or combination of options is not valid."""


class CapabilityError(ConfigError):
    """A solver asked a stage for a structure it does not describe (e.g. an affine part)."""


class DataError(OcnetError, ValueError):
    """A data set name, size, dtype or content (a batch) is not valid; the message says how
    to fix it."""


class CheckpointError(OcnetError, RuntimeError):
    """A checkpoint is missing, truncated, corrupted or of another run."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """The error for a name that is not in a registry: it lists the valid ones."""
    choices = ", ".join(sorted(valid))
    kinds = f"{kind}es" if kind.endswith(("s", "sh", "ch", "x")) else f"{kind}s"
    return ConfigError(f"unknown {kind} {name!r}; valid {kinds} are: {choices}")
