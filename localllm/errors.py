"""Errors are values until a front end turns them into a message.

Every failure a user can cause or meet has one class here. The CLI prints
`str(error)` on one line and exits 1; the HTTP server maps them to statuses.
"""


class LocalLLMError(Exception):
    """Base of every error a user should see as a one-line message."""


class ModelNotFound(LocalLLMError):
    """A model name or path that names nothing installed or on disk."""


class BadModelFile(LocalLLMError):
    """A model file that is truncated, corrupt or not in a format we read."""


class BadRequest(LocalLLMError):
    """Invalid values: sampling parameters, flags, request fields."""


class TemplateError(LocalLLMError):
    """A chat template that is missing, fails to render or tries to leave the sandbox."""


class DoesNotFit(LocalLLMError):
    """A model that cannot be loaded within the memory available."""


class DownloadFailed(LocalLLMError):
    """A pull that could not complete; nothing partial is left as installed."""


class BackendError(LocalLLMError):
    """An inference engine that failed to load or run."""
