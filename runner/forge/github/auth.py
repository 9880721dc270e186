"""Credentials for the GitHub REST API: a plain token, or a GitHub App installation.

An App signs a short JWT with its private key and trades it for an
installation token (valid one hour), cached and refreshed five minutes
before it expires. Tokens and keys never reach a log line or an exception.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from runner.errors import ConfigError, ForgeAuthError, ForgeError
from runner.forge.github._http import Clock, Transport
from runner.forge.github.types import FORGE
from runner.secret import Secret

JWT_BACKDATE_S = 60
"""GitHub's advice: ``iat`` 60 s in the past, to absorb clock drift."""
JWT_LIFETIME_S = 540
"""``exp`` at most 10 min after ``iat``; 9 min after now keeps ``exp - iat`` at 10 min."""
REFRESH_MARGIN_S = 300.0
"""Fetch a new installation token this long before the cached one expires."""


class Credentials(Protocol):
    """Supplies the ``Authorization`` header value for API requests."""

    async def authorization(self, transport: Transport) -> Secret:
        """The header value, fetching or refreshing a token through ``transport`` if needed."""

    def invalidate(self) -> None:
        """Forget any cached token (the API answered 401 with it)."""


class TokenCredentials:
    """A personal access token or any other fixed token."""

    def __init__(self, token: Secret) -> None:
        self._header = Secret(f"Bearer {token.reveal()}")

    async def authorization(self, transport: Transport) -> Secret:
        """The fixed ``Bearer`` header."""
        return self._header

    def invalidate(self) -> None:
        """Nothing to refresh: a fixed token stays what it is."""


def load_private_key(pem: bytes) -> RSAPrivateKey:
    """Parse a GitHub App's PEM private key; ``ConfigError`` if it is not an RSA key."""
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # The exception text may quote key material; do not chain or repeat it.
        raise ConfigError("github.private_key_path", "not a PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise ConfigError("github.private_key_path", "not an RSA private key")
    return key


def app_jwt(app_id: int | str, key: RSAPrivateKey, now: float) -> Secret:
    """The App's JWT (RS256): ``iat`` 60 s ago, ``exp`` 9 min ahead, ``iss`` the App id."""
    issued = int(now) - JWT_BACKDATE_S
    claims = {"iat": issued, "exp": int(now) + JWT_LIFETIME_S, "iss": str(app_id)}
    return Secret(jwt.encode(claims, key, algorithm="RS256"))


class AppCredentials:
    """A GitHub App installation: JWT → ``POST /app/installations/{id}/access_tokens``."""

    def __init__(
        self,
        app_id: int | str,
        installation_id: int,
        private_key: bytes,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.app_id = app_id
        self.installation_id = installation_id
        self._key = load_private_key(private_key)
        self._clock = clock
        self._token: Secret | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0
        """How many installation tokens were fetched (for metrics and tests)."""

    @classmethod
    def from_file(
        cls, app_id: int | str, installation_id: int, path: Path, *, clock: Clock = time.time
    ) -> AppCredentials:
        """Read the private key from ``path``."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError("github.private_key_path", f"cannot read {path}: {exc}") from exc
        return cls(app_id, installation_id, pem, clock=clock)

    async def authorization(self, transport: Transport) -> Secret:
        """``Bearer <installation token>``, fetched once and reused until near expiry."""
        # The lock makes concurrent callers share one fetch instead of racing N of them.
        async with self._lock:
            if self._token is None or self._clock() >= self._expires_at - REFRESH_MARGIN_S:
                self._token, self._expires_at = await self._fetch(transport)
            return Secret(f"Bearer {self._token.reveal()}")

    def invalidate(self) -> None:
        """Drop the cached installation token; the next request fetches a new one."""
        self._token = None

    async def _fetch(self, transport: Transport) -> tuple[Secret, float]:
        bearer = Secret(f"Bearer {app_jwt(self.app_id, self._key, self._clock()).reveal()}")
        try:
            resp = await transport.request(
                "POST",
                f"/app/installations/{self.installation_id}/access_tokens",
                authorization=bearer,
                ok=(201,),
            )
        except ForgeError as exc:
            if exc.status == 404 or isinstance(exc, ForgeAuthError):
                raise ForgeAuthError(
                    f"GitHub App {self.app_id} cannot get a token for installation "
                    f"{self.installation_id}: {exc}",
                    forge=FORGE,
                    status=exc.status,
                ) from exc
            raise
        self.fetches += 1
        try:
            token = resp.data["token"]
            expires = datetime.fromisoformat(resp.data["expires_at"]).timestamp()
        except (KeyError, TypeError, ValueError) as exc:
            raise ForgeError(
                "installation token response lacks token/expires_at", forge=FORGE
            ) from exc
        if not isinstance(token, str):
            raise ForgeError("installation token is not a string", forge=FORGE)
        return Secret(token), expires
