"""Errors raised while turning `--model` into a local directory.

Every failure a user can cause (a typo in the name, a repo that does not exist, no network,
a corrupted download) is one of these, with a message that says what was tried and what to
do next. Callers catch `ModelResolutionError` to print the message and exit cleanly.
"""

from __future__ import annotations


class ModelResolutionError(Exception):
    """Base class: `--model` could not be resolved to a local model directory."""


class InvalidModelError(ModelResolutionError, ValueError):
    """The name is neither an existing model directory nor a hub id `org/name`, the local
    directory is not a model (no config.json), or an option (source, revision) is invalid."""


class ModelNotFoundError(ModelResolutionError):
    """The hub answered, but has no such repo (or revision), or refuses access to it."""


class HubConnectionError(ModelResolutionError):
    """The hub could not be reached, or kept failing, after the retries were spent."""


class DownloadIntegrityError(ModelResolutionError):
    """A downloaded file's size or checksum differs from what the hub announced."""
