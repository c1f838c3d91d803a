"""API keys and admission control: who may open a session, and how many.

`Admission.authenticate` takes the keys a request offers (header `Authorization: Bearer
KEY`, header `X-API-Key`, query parameter `api_key`: any of them, e.g. a proxy's own Bearer
token beside the client's `X-API-Key`) and admits it under the first of them (in that order)
that is a configured key, compared in constant time per key.  `Admission.acquire` admits
one session against the global limit (`max_sessions`) and the key's own limit, returning a
`Lease` to release when the session ends.  Without configured keys every request is
admitted under the key `None` (only the global limit applies).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from server.codes import CloseCode, SessionError
from server.metrics import Metrics
from server.settings import Settings

__all__ = ["Admission", "AuthError", "Lease"]


class AuthError(Exception):
    """No usable API key: `reason` is `"missing"` or `"unknown"` (metrics label)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def message(self) -> str:
        """Human explanation for the close reason / HTTP body."""
        if self.reason == "missing":
            return (
                "missing API key: send 'Authorization: Bearer KEY', 'X-API-Key: KEY' "
                "or ?api_key=KEY"
            )
        return "unknown API key"


class Lease:
    """One admitted session; `release()` (idempotent) frees its slot."""

    def __init__(self, admission: Admission, key: str | None, endpoint: str) -> None:
        self._admission = admission
        self.key = key
        self.endpoint = endpoint
        self._released = False

    def release(self) -> None:
        """Give the slot back (only the first call counts)."""
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    """Key check and session limits (loop-only, not thread-safe)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.limits = settings.key_limits()
        self.max_sessions = settings.max_sessions
        self.metrics = metrics
        self.active = 0
        self._per_key: dict[str | None, int] = {}

    @property
    def enabled(self) -> bool:
        """True when API keys are configured."""
        return bool(self.limits)

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The request's valid key (None when auth is disabled); AuthError otherwise."""
        if not self.limits:
            return None
        offered = _offered_keys(headers, query)
        if not offered:
            self.metrics.auth_failures.labels("missing").inc()
            raise AuthError("missing")
        found = None
        for given in offered:  # the first valid one, in the order of `_offered_keys`
            for key in self.limits:  # compare with every key: no early exit
                if hmac.compare_digest(key.encode(), given.encode()):
                    found = key
            if found is not None:
                break
        if found is None:
            self.metrics.auth_failures.labels("unknown").inc()
            raise AuthError("unknown")
        return found

    def acquire(self, key: str | None, endpoint: str) -> Lease:
        """Admit one session; SessionError 4429 when the server or the key is full."""
        if self.active >= self.max_sessions:
            raise SessionError(
                CloseCode.TOO_MANY_SESSIONS,
                f"server full: {self.max_sessions} sessions active, retry later",
            )
        if key is not None:
            limit = self.limits[key]
            if self._per_key.get(key, 0) >= limit:
                raise SessionError(
                    CloseCode.TOO_MANY_SESSIONS,
                    f"too many sessions for this API key (limit {limit})",
                )
        self.active += 1
        self._per_key[key] = self._per_key.get(key, 0) + 1
        self.metrics.sessions_active.labels(endpoint).inc()
        self.metrics.sessions_total.labels(endpoint).inc()
        return Lease(self, key, endpoint)

    def _release(self, lease: Lease) -> None:
        self.active -= 1
        left = self._per_key.get(lease.key, 1) - 1
        if left:
            self._per_key[lease.key] = left
        else:
            self._per_key.pop(lease.key, None)
        self.metrics.sessions_active.labels(lease.endpoint).dec()


def _offered_keys(headers: Mapping[str, str], query: Mapping[str, str]) -> list[str]:
    """The non-empty keys a request offers: Bearer token, `X-API-Key`, `api_key` query."""
    offered: list[str] = []
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            offered.append(token.strip())
    key = headers.get("x-api-key")
    if key and key.strip():
        offered.append(key.strip())
    key = query.get("api_key")
    if key:
        offered.append(key)
    return offered
