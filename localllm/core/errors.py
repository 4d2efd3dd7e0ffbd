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


class BadSetting(LocalLLMError):
    """An environment variable whose value cannot be used; the message names the variable."""


class DoesNotFit(LocalLLMError):
    """A model that cannot be loaded within the memory available."""


class ModelNotInstalled(ModelNotFound):
    """A catalog name or hf: reference that exists to pull but is not in the store."""


class UnsafeStorePath(LocalLLMError):
    """A file or folder in the store that the store did not make (a symbolic link): refused, never followed."""


class DownloadFailed(LocalLLMError):
    """A pull that could not complete; nothing partial is left as installed."""


class HubUnreachable(DownloadFailed):
    """The model hub cannot be reached: no network, DNS, proxy or offline mode."""


class AccessDenied(DownloadFailed):
    """The hub refused a file: a gated or private repository without the right token."""


class ChecksumMismatch(DownloadFailed):
    """Downloaded bytes whose hash differs from the hub's; they are discarded."""


class NotEnoughDisk(DownloadFailed):
    """Too little free space for a pull; refused before the first byte."""


class DownloadCancelled(DownloadFailed):
    """A pull stopped on request; its partial file is kept for a later resume."""


class BackendError(LocalLLMError):
    """An inference engine that failed to load or run."""


class QueueFull(LocalLLMError):
    """More requests are waiting than the server accepts; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamUnavailable(BackendError):
    """The remote backend's upstream server cannot be reached, times out or breaks off."""


class UpstreamRefused(LocalLLMError):
    """The remote backend's upstream answered a request with a client error; its status passes through."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
