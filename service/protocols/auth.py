"""Bearer-token access control, for HTTP (an ASGI middleware in front of every route) and for
gRPC (service/protocols/oip_grpc.py asks `AccessPolicy.check` before handling a call).

Two optional tokens: one for inference (and, by the `protect_metrics` / `protect_docs` settings,
for /metrics and the API docs), one for management (the repository endpoints that change what is
served). Probes stay open: /healthz, /readyz and the protocol's own health endpoints. A missing
or wrong token is answered 401 with `WWW-Authenticate: Bearer` before the route runs, so that no
byte of the body is read or decoded. Tokens are compared in constant time (hmac.compare_digest)
and never logged: the answer and the log line say only whether a token was missing or wrong.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from prometheus_client import Counter

from ..core.errors import clip
from ..core.metrics import Metrics
from ..core.settings import Settings
from .http_errors import OIP_PREFIX, error_body

log = logging.getLogger(__name__)

Scope = Literal["open", "inference", "management", "observe"]
REALM = "resnet-serve"
REPOSITORY_PREFIX = OIP_PREFIX + "/repository"
_OPEN = frozenset(
    {"/healthz", "/readyz", OIP_PREFIX + "/health/live", OIP_PREFIX + "/health/ready"}
)
_DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_ASSETS = "/docs/assets/"  # Swagger UI's and ReDoc's files (docs_assets.py)


@dataclass(frozen=True)
class AccessPolicy:
    inference: bytes | None
    management: bytes | None
    protect_metrics: bool
    protect_docs: bool
    failures: Counter

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> AccessPolicy:
        return cls(
            inference=settings.token("inference"),
            management=settings.token("management"),
            protect_metrics=settings.protect_metrics,
            protect_docs=settings.protect_docs,
            failures=metrics.unauthorized,
        )

    @property
    def enabled(self) -> bool:
        return self.inference is not None or self.management is not None

    def scope_of(self, path: str) -> Scope:
        if path in _OPEN:
            return "open"
        if path == REPOSITORY_PREFIX or path.startswith(REPOSITORY_PREFIX + "/"):
            return "management"
        if path == "/metrics":
            return "observe" if self.protect_metrics else "open"
        if path in _DOCS or path.startswith(DOCS_ASSETS):
            return "observe" if self.protect_docs else "open"
        return "inference"

    def tokens_for(self, scope: Scope) -> list[bytes]:
        """The tokens any of which grants `scope`; empty: no token needed."""
        if scope == "inference":
            return [self.inference] if self.inference is not None else []
        if scope == "management":
            # Never open: the repository endpoints exist only with a management token.
            return [self.management] if self.management is not None else [b"\0unset"]
        if scope == "observe":  # protected only where inference is: either token opens it
            if self.inference is None:
                return []
            return [t for t in (self.inference, self.management) if t is not None]
        return []

    def check(self, scope: Scope, authorization: bytes | None) -> str | None:
        """None when `authorization` (the header's value) grants `scope`, else why not."""
        expected = self.tokens_for(scope)
        if not expected:
            return None
        token = bearer_token(authorization)
        if token is None:
            return "missing"
        # Every expected token is compared (no early exit), each in constant time.
        matched = False
        for candidate in expected:
            matched |= hmac.compare_digest(token, candidate)
        return None if matched else "invalid"

    def refused(self, protocol: str, reason: str, where: str) -> None:
        self.failures.labels(protocol, reason).inc()
        log.info("%s -> unauthorized: %s bearer token", where, reason)

    def describe(self) -> str:
        """One line for the log at start: whether and how access is controlled."""
        if not self.enabled:
            return "off (no token configured: every endpoint is open)"
        parts = []
        if self.inference is not None:
            parts.append("inference token (HTTP and gRPC inference, /models, /v2 metadata)")
        if self.management is not None:
            parts.append("management token (repository endpoints)")
        return "on: " + "; ".join(parts)


def bearer_token(authorization: bytes | None) -> bytes | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class BearerAuth:
    """ASGI middleware: every HTTP request passes `AccessPolicy.check` before its route runs."""

    def __init__(self, app: Any, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        needed = self.policy.scope_of(path)
        if needed == "open":
            await self.app(scope, receive, send)
            return
        reason = self.policy.check(needed, _header(scope["headers"], b"authorization"))
        if reason is None:
            await self.app(scope, receive, send)
            return
        self.policy.refused("http", reason, f"{scope['method']} {clip(path)}")
        await _unauthorized(send, path, reason, needed)


async def _unauthorized(send: Any, path: str, reason: str, scope: Scope) -> None:
    message = f"{reason} bearer token: this endpoint needs the {scope} token"
    if scope == "observe":
        message = f"{reason} bearer token: this endpoint needs the inference or management token"
    body = orjson.dumps(error_body(path, "unauthorized", message))
    challenge = f'Bearer realm="{REALM}"'
    if reason == "invalid":
        challenge += ', error="invalid_token"'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge.encode()),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
