"""Errors are values until a front end turns them into a message.

Every failure a user can cause or meet has one class here. The CLI prints
`str(error)` on one line and exits 1; the HTTP server maps them to statuses.
An error whose remedy a front end names in its own terms (a flag, a request
field) carries the facts as attributes and a neutral message: the CLI adds
its flag advice (cli/error_words.py), the HTTP layers name request fields
(server/errors.py).
"""


class LocalLLMError(Exception):
    """Base of every error a user should see as a one-line message."""


class ModelNotFound(LocalLLMError):
    """A model name or path that names nothing installed or on disk."""


class BadModelFile(LocalLLMError):
    """A model file that is truncated, corrupt or not in a format we read."""


class BadRequest(LocalLLMError):
    """Invalid values: sampling parameters, flags, request fields."""


class PromptTooLong(BadRequest):
    """A prompt that leaves no room in the context for even one generated token."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds {context}")
        self.prompt_tokens = prompt_tokens
        self.context = context


class NotSupported(BadRequest):
    """A feature (grammars, embeddings) the running backend lacks; `alternative` names a backend that has it."""

    def __init__(self, backend: str, feature: str, alternative: str | None = None) -> None:
        super().__init__(f"the {backend} backend does not support {feature}")
        self.backend = backend
        self.feature = feature
        self.alternative = alternative


class TemplateError(LocalLLMError):
    """A chat template that is missing, fails to render or tries to leave the sandbox."""


class NoChatTemplate(TemplateError):
    """A model with no chat template of its own and no built-in one for its architecture: only raw prompts work."""

    def __init__(self, model_name: str, architecture: str) -> None:
        super().__init__(f"model '{model_name}' (architecture '{architecture}') has no chat template and no built-in one")
        self.model_name = model_name
        self.architecture = architecture


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


class UpstreamRefused(BadRequest):
    """The remote backend's upstream refused a request (a client error); its status passes through."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
