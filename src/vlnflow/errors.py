"""Errors a user can act on: printed as one clear line by the CLI, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or settings; the message names the file, sample or setting."""


class DatasetError(UserError):
    """A data set problem tied to one file or episode (missing image, bad JSON, unknown action...)."""

    def __init__(self, message: str, *, episode: str | None = None, path: str | None = None):
        super().__init__(message)
        self.episode = episode
        self.path = path
