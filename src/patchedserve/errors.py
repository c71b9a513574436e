"""Error types shared by every layer; the CLI and server turn them into one-line messages."""


class PatchedServeError(Exception):
    """Base class of errors that are reported to the user without a traceback."""


class InvalidRequestError(PatchedServeError, ValueError):
    """A request or argument is out of range; the message names the field and what is allowed."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelLoadError(PatchedServeError):
    """A model name is unknown, or a model folder is missing or malformed."""


class ReplicaLostError(PatchedServeError):
    """An engine replica failed or could not be reached; its open requests are lost (retry them)."""
