"""The Hugging Face hub, through huggingface-hub: file lists, URLs, auth headers, errors.

What comes from huggingface-hub: the repository's commit and its files with
sizes and LFS sha256 (`/api/models/{repo}/revision/{rev}?blobs=true`), file
URLs pinned to that commit, request headers with the token (`HF_TOKEN` or a
saved login), and its HTTP client (proxies, certificates). The transfer itself
is ours (download.py) because huggingface-hub deletes its partial file when a
download fails.

`HF_ENDPOINT` is read on every call, not only at import, so a process can
point at a mirror (or a test at its emulator) after huggingface-hub loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from localllm.core.env_vars import check_header_value, check_proxy_settings, env_url

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
env_url("HF_ENDPOINT")  # huggingface-hub parses it as it is imported: a bad one is our line, not its traceback

import httpx2  # noqa: E402  (huggingface-hub's HTTP client; imported after the telemetry switch)
from huggingface_hub import HfApi, constants, hf_hub_url  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session  # noqa: E402

from localllm import __version__  # noqa: E402
from localllm.core.errors import (  # noqa: E402
    AccessDenied,
    DownloadFailed,
    HubUnreachable,
    LocalLLMError,
    ModelNotFound,
)

API_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository
    size: int
    sha256: str | None  # LFS files: the content's sha256
    blob_id: str | None  # the git blob id (sha1 of "blob <size>\0" + content)


@dataclass(frozen=True)
class RepoListing:
    repo: str
    commit: str  # the revision resolved to a commit, so every file comes from one snapshot
    files: list[RemoteFile]
    gated: bool


def endpoint() -> str:
    return (env_url("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def repo_page(repo: str) -> str:
    return f"{endpoint()}/{repo}"


def list_files(repo: str, revision: str = "main") -> RepoListing:
    """Every file of a repository at a revision, with sizes and hashes."""
    request_headers()  # a token unfit for a header is one line naming it, before any request
    check_proxy_settings()
    api = HfApi(endpoint=endpoint(), library_name="localllm", library_version=__version__)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=API_TIMEOUT_S)
    except Exception as exc:  # mapped to one of ours, or re-raised
        raise hub_error(exc, repo) from None
    files = [
        RemoteFile(
            path=s.rfilename,
            size=s.size if s.size is not None else (s.lfs.size if s.lfs else 0),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    ]
    return RepoListing(repo=repo, commit=info.sha or revision, files=files, gated=bool(info.gated))


def file_url(repo: str, path: str, commit: str) -> str:
    return hf_hub_url(repo, path, revision=commit, endpoint=endpoint())


def request_headers() -> dict[str, str]:
    """Headers for a file request: user agent and the token, no compression (we hash raw bytes)."""
    headers = build_hf_headers(library_name="localllm", library_version=__version__)
    if "authorization" in {k.lower() for k in headers}:
        value = next(v for k, v in headers.items() if k.lower() == "authorization")
        scheme, _, token = value.partition(" ")
        check_header_value(token if scheme.lower() == "bearer" else value, "HF_TOKEN (or the saved Hugging Face token)")
    headers["Accept-Encoding"] = "identity"
    return headers


def http_client() -> httpx2.Client:
    """huggingface-hub's shared client: its proxy and certificate settings, redirects followed."""
    check_proxy_settings()
    return get_session()


def hub_error(exc: BaseException, repo: str, path: str | None = None) -> BaseException:
    """Our one-line error for a failure of a hub call (or the exception itself if unknown)."""
    if isinstance(exc, LocalLLMError):
        return exc
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnreachable("HF_HUB_OFFLINE is set, so the model hub is not contacted")
    if isinstance(exc, GatedRepoError):
        return gated_error(repo)
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFound(f"repository {repo} was not found on the hub (a private one needs HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(f"repository {repo} has no such revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return ModelNotFound(f"{path or 'the file'} was not found in {repo}")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return status_error(exc.response.status_code, repo, path)
    if isinstance(exc, (httpx2.TransportError, OSError)):
        return unreachable_error(exc)
    return exc


def gated_error(repo: str) -> AccessDenied:
    return AccessDenied(
        f"{repo} is gated: accept its licence at {repo_page(repo)} with your account, "
        "then set HF_TOKEN to an access token of that account"
    )


def status_error(status: int, repo: str, path: str | None) -> LocalLLMError:
    what = f"{path} in {repo}" if path else repo
    if status in (401, 403):
        return AccessDenied(
            f"the hub refused {what} (HTTP {status}): if it is gated or private, accept its licence at "
            f"{repo_page(repo)} and set HF_TOKEN to an access token of that account"
        )
    if status == 404:
        return ModelNotFound(f"{what} was not found on the hub")
    return DownloadFailed(f"the hub answered HTTP {status} for {what}")


def unreachable_error(exc: BaseException) -> HubUnreachable:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HubUnreachable(f"cannot reach the model hub at {endpoint()} ({reason})")
