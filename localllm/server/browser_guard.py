"""Web pages may not drive the API: a Host check against DNS rebinding, an Origin check against CSRF.

A browser lets any page send simple requests (a `text/plain` POST needs no
preflight) to 127.0.0.1, and a page whose name is rebound to 127.0.0.1 even
reads the answers. Two checks stop both, before any route runs or any body is
read:

* **Host.** A server bound to loopback answers only requests addressed to
  `localhost`, `127.0.0.1`, `[::1]` (any port; any loopback address written
  out), its own bind address, or a name given with `--allowed-host`. A rebound page's requests carry the page's
  own name. A server bound elsewhere (which needs a key) checks only when
  `--allowed-host` names what it may be called.
* **Origin.** Browsers send `Origin` on every cross-site POST and on CORS
  requests, and `Sec-Fetch-Site` on all of them. A request from a page is
  served only when the page is a `--cors-origin` or the server itself.
  Programs (curl, the OpenAI, Ollama and Anthropic SDKs) send neither header
  and are unaffected.

Refusals are 403 in the route's own error shape.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from localllm.server.errors import APIError, error_bytes

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """`Host` without its port, lower-case, without a trailing dot: `[::1]:8080` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")


def is_loopback_address(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class BrowserGuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        check_host: bool,
        allowed_hosts: list[str] | tuple[str, ...] = (),
        cors_origins: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.check_host = check_host
        self.allowed_hosts = LOOPBACK_NAMES | {host_name(h) for h in allowed_hosts}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        host = headers.get(b"host", b"").decode("latin-1")
        refusal = self._refusal(host, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        error = APIError(403, refusal, code="forbidden")
        await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": error_bytes(scope["path"], error)})

    def _host_allowed(self, name: str) -> bool:
        # A loopback address written out (127.0.0.2, [0:0::1]) cannot be rebound: only names can.
        return name in self.allowed_hosts or is_loopback_address(name)

    def _refusal(self, host: str, headers: dict[bytes, bytes]) -> str | None:
        if self.check_host and host and not self._host_allowed(host_name(host)):
            shown = host_name(host)[:100]
            return (
                f"requests addressed to '{shown}' are refused (a web page may have rebound that name to this "
                f"machine); to serve it behind a proxy, start the server with --allowed-host {shown}"
            )
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1").strip().rstrip("/").lower()
            if text in self.cors_origins or (host and text in (f"http://{host.lower()}", f"https://{host.lower()}")):
                return None
            return (
                f"requests from web pages at '{text[:100]}' are refused; to allow that page, start the server "
                f"with --cors-origin {text[:100]}"
            )
        if headers.get(b"sec-fetch-site", b"").strip().lower() == b"cross-site":
            return "cross-site requests from web pages are refused; allow a page with --cors-origin ORIGIN"
        return None
