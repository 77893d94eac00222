"""Who may use the server: the API key (compared in constant time), the browser chat's proof
that it was given (a cookie), and the host names and origins requests may come from."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from .config import ServerConfig

# Proof that this browser gave the API key (when the key guards the chat): an HMAC of a fixed
# label under the key, so it needs no server-side state and a new key revokes it.
AUTH_COOKIE = "smolcandle_auth"
AUTH_COOKIE_SECONDS = 30 * 24 * 3600


class Auth:
    def __init__(self, config: ServerConfig) -> None:
        self.api_key = config.api_key or None
        self.guard_chat = bool(config.guard_chat and self.api_key)
        self.secure_cookies = config.secure_cookies
        self.allowed_hosts = None if config.allowed_hosts is None else frozenset(config.allowed_hosts)
        self.cors_origins = frozenset(config.cors_origins)

    def chat_token(self) -> str:
        """The value of the cookie that proves the key was given (only with a key)."""
        assert self.api_key is not None
        return hmac.new(self.api_key.encode(), b"smolcandle browser chat", hashlib.sha256).hexdigest()

    def key_matches(self, given: str) -> bool:
        """Whether ``given`` is the API key (compared in constant time); False without a key."""
        return self.api_key is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    def bearer_matches(self, authorization: str | None) -> bool:
        """Whether an ``Authorization: Bearer KEY`` header carries the API key."""
        auth = authorization or ""
        return self.key_matches(auth[7:] if auth.lower().startswith("bearer ") else "")

    def request_key_matches(self, authorization: str | None, x_api_key: str | None) -> bool:
        """Whether an API request carries the key: ``Authorization: Bearer KEY`` (OpenAI's
        clients) or ``x-api-key: KEY`` (Anthropic's)."""
        return self.bearer_matches(authorization) or (x_api_key is not None and self.key_matches(x_api_key))

    def cors_origin(self, origin: str | None) -> str | None:
        """What ``Access-Control-Allow-Origin`` tells a page at ``origin`` that calls the API:
        ``*`` when every origin may, the page's own origin when it is listed, else nothing."""
        if not origin or not self.cors_origins & {"*", origin}:
            return None
        return "*" if "*" in self.cors_origins else origin

    def chat_authorized(self, cookie: str | None, authorization: str | None) -> bool:
        """Whether a request may use the guarded chat: no key, the cookie /login sets, or the
        bearer key."""
        if self.api_key is None:
            return True
        if cookie and hmac.compare_digest(cookie.encode(), self.chat_token().encode()):
            return True
        return self.bearer_matches(authorization)

    def cookies_secure(self, scheme: str) -> bool:
        return self.secure_cookies or scheme == "https"

    def host_refused(self, host: str | None) -> str | None:
        """The host name a request names when it is not one this server answers to."""
        if self.allowed_hosts is None:
            return None
        name = (host or "").lower()
        name = name[: name.rindex("]") + 1] if name.startswith("[") else name.rsplit(":", 1)[0]
        return None if name in self.allowed_hosts else name

    @staticmethod
    def foreign_origin(origin: str | None, host: str | None) -> bool:
        """Whether a page of another origin (a browser names it on every POST) sent this."""
        if origin is None:
            return False
        return origin == "null" or urlsplit(origin).netloc.lower() != (host or "").lower()
