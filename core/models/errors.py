"""What the model registry refuses, each with a message that says what to fix."""

from __future__ import annotations


class RegistryError(ValueError):
    """A request the registry refuses; the message says what to fix."""


class UnknownModel(RegistryError, LookupError):
    """A model, version or stage the registry does not hold."""


class CorruptArtefact(RegistryError):
    """An artefact's bytes do not match the sha256 recorded when it was registered."""
