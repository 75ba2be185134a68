"""`--web.config.file`: TLS and basic auth, in the Prometheus exporter-toolkit format.

The same YAML that node_exporter and Prometheus itself accept:

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                          # with client auth
      min_version: TLS12                              # optional
    basic_auth_users:
      alice: $2y$10$...              # bcrypt hashes only, never plain passwords
    http_server_config:
      headers:                       # added to every response
        X-Content-Type-Options: nosniff
    rate_limit:                      # a token bucket over all requests; 429 beyond it
      interval: 100ms
      burst: 20
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import numbers
import random
import re
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import safe_yaml

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# The headers exporter-toolkit lets a config set, and the values it allows (None: any).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
AUTH_CACHE_SIZE = 100
# bcrypt of "fakepassword": unknown users cost as much as known ones, so timing cannot enumerate users.
_DUMMY_HASH = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_GO_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WebConfigError(ValueError):
    """The web config file is missing or malformed; the message names the file and field."""


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"

    def context(self) -> ssl.SSLContext:
        """A server-side SSLContext with the certificate loaded and client auth as configured."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            ctx.load_verify_locations(self.client_ca_file)
        return ctx


class RateLimiter:
    """A token bucket: one request per `interval` seconds on average, bursts of `burst`."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = interval, burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Take a token if there is one."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) / self.interval)
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class _AuthCache:
    """Results of bcrypt checks, at most AUTH_CACHE_SIZE failures (random eviction) and as many successes.

    Successes are kept apart, so a flood of wrong passwords cannot evict the scraper's own
    cached success and make it pay for bcrypt again; only right passwords can fill that half.
    """

    def __init__(self) -> None:
        self._results: dict[bytes, bool] = {}  # failures
        self._good: dict[bytes, bool] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bool | None:
        with self._lock:
            return True if key in self._good else self._results.get(key)

    def put(self, key: bytes, ok: bool) -> None:
        with self._lock:
            results = self._good if ok else self._results
            if len(results) >= AUTH_CACHE_SIZE:
                for old in random.sample(list(results), max(len(results) // 10, 1)):
                    del results[old]
            results[key] = ok


@dataclass
class WebConfig:
    """A parsed web config: optional TLS, bcrypt basic-auth users, extra headers, a rate limit."""

    tls: TLSConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    rate_limit: RateLimiter | None = None
    _cache: _AuthCache = field(default_factory=_AuthCache, repr=False)
    # One bcrypt at a time, as exporter-toolkit does: a flood of guesses costs one core at most.
    _bcrypt_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check_authorization(self, header: str | None) -> bool:
        """True when no users are configured or the Basic credentials match a bcrypt hash.

        Like exporter-toolkit: unknown users are checked against a dummy hash, and
        results (failures too) are cached, keyed by a digest of user, hash and password.
        """
        ok = self.cached_authorization(header)
        credentials = self._credentials(header) if ok is None else None
        if credentials is None:
            return bool(ok)
        user, password, hashed, key = credentials
        ok = self._bcrypt(password, hashed) and user in self.users
        self._cache.put(key, ok)
        return ok

    def cached_authorization(self, header: str | None) -> bool | None:
        """check_authorization's answer when it needs no bcrypt check; None when it does.

        The serving loop answers from this at once and hands only the None cases to
        its bcrypt thread, so a slow check never holds up other clients.
        """
        if not self.users:
            return True
        credentials = self._credentials(header)
        return False if credentials is None else self._cache.get(credentials[3])

    def _credentials(self, header: str | None) -> tuple[str, bytes, bytes, bytes] | None:
        """(user, password, hash to check, cache key), or None for a header that is not Basic credentials."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        hashed = self.users.get(user, _DUMMY_HASH)
        key = hashlib.sha256(b"\0".join((user.encode(), hashed, password.encode()))).digest()
        return user, password.encode(), hashed, key

    def portable(self) -> dict[str, Any]:
        """The settings as plain data, for the serving process to rebuild with from_portable."""
        limit = self.rate_limit
        return {
            "tls": self.tls,
            "users": dict(self.users),
            "headers": dict(self.headers),
            "rate_limit": None if limit is None else (limit.interval, limit.burst),
        }

    @classmethod
    def from_portable(cls, data: dict[str, Any]) -> WebConfig:
        """The WebConfig that portable() describes, with its own auth cache and rate limiter."""
        limit = data["rate_limit"]
        limiter = None if limit is None else RateLimiter(*limit)
        return cls(tls=data["tls"], users=data["users"], headers=data["headers"], rate_limit=limiter)

    def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        import bcrypt

        with self._bcrypt_lock:
            try:
                return bool(bcrypt.checkpw(password, hashed))
            except ValueError:
                return False  # bcrypt >= 5 refuses passwords over 72 bytes: a wrong password, not a 500


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web config file; raises WebConfigError naming the field."""
    file = Path(path)
    raw = safe_yaml.load_file(file, WebConfigError, "the web config") or {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{file}: expected a mapping at the top level")
    unknown = sorted(set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config", "rate_limit"}, key=str)
    if unknown:
        raise WebConfigError(f"{file}: {unknown[0]}: unknown field")
    tls = _tls(file, raw.get("tls_server_config"))
    users = _users(file, raw.get("basic_auth_users"))
    headers = _headers(file, raw.get("http_server_config"))
    limiter = _rate_limit(file, raw.get("rate_limit"))
    if tls is not None:
        try:
            tls.context()
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"{file}: tls_server_config: cannot load certificate or key: {exc}") from None
    return WebConfig(tls=tls, users=users, headers=headers, rate_limit=limiter)


def _tls(file: Path, raw: Any) -> TLSConfig | None:
    if raw is None:
        return None
    where = f"{file}: tls_server_config"
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: expected a mapping")
    allowed = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}
    unknown = sorted(set(raw) - allowed, key=str)
    if unknown:
        raise WebConfigError(f"{where}.{unknown[0]}: unknown or unsupported field")
    for key in ("cert_file", "key_file"):
        if not raw.get(key):
            raise WebConfigError(f"{where}.{key}: is required")
    for key in allowed:
        if key in raw and not isinstance(raw[key], str):
            raise WebConfigError(f"{where}.{key}: expected a string, got {type(raw[key]).__name__}")
    auth = raw.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{where}.client_auth_type: {auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    version = raw.get("min_version", "TLS12")
    if version not in _TLS_VERSIONS:
        raise WebConfigError(f"{where}.min_version: {version!r} is not one of {', '.join(_TLS_VERSIONS)}")
    ca = raw.get("client_ca_file")
    if auth == "RequireAndVerifyClientCert" and not ca:
        raise WebConfigError(f"{where}.client_ca_file: is required with {auth}")

    def resolve(p: str) -> Path:
        return (file.parent / p).resolve()

    return TLSConfig(resolve(raw["cert_file"]), resolve(raw["key_file"]), auth, resolve(ca) if ca else None, version)


def _users(file: Path, raw: Any) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{file}: basic_auth_users: expected a mapping of user to bcrypt hash")
    users = {}
    for user, hashed in raw.items():
        where = f"{file}: basic_auth_users.{user}"
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"{where}: expected a bcrypt hash ($2y$...), not a password")
        match = _BCRYPT_RE.fullmatch(hashed)
        if match is None or not 4 <= int(match.group(1)) <= 31:
            raise WebConfigError(f"{where}: malformed bcrypt hash ($2y$<cost 04-31>$<53 characters>)")
        users[str(user)] = hashed.encode()
    return users


def _headers(file: Path, raw: Any) -> dict[str, str]:
    where = f"{file}: http_server_config"
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - {"headers", "http2"}, key=str)
    if unknown:
        raise WebConfigError(f"{where}.{unknown[0]}: unknown or unsupported field")
    if not isinstance(raw.get("http2", True), bool):
        raise WebConfigError(f"{where}.http2: expected true or false")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{where}.headers: expected a mapping of header to value")
    out = {}
    for name, value in headers.items():
        if name not in HEADERS:
            raise WebConfigError(f"{where}.headers.{name}: cannot be configured (allowed: {', '.join(HEADERS)})")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise WebConfigError(f"{where}.headers.{name}: expected a one-line string")
        allowed = HEADERS[name]
        if allowed is not None and value not in allowed:
            raise WebConfigError(f"{where}.headers.{name}: {value!r} is not one of {', '.join(allowed)}")
        if value:
            out[name] = value
    return out


def _rate_limit(file: Path, raw: Any) -> RateLimiter | None:
    where = f"{file}: rate_limit"
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: expected a mapping with interval and burst")
    unknown = sorted(set(raw) - {"interval", "burst"}, key=str)
    if unknown:
        raise WebConfigError(f"{where}.{unknown[0]}: unknown field")
    interval = _go_duration(f"{where}.interval", raw.get("interval", "0s"))
    burst = raw.get("burst", 0)
    # Any integer type (numpy's too, from a mapping built in Python) but bool.
    if isinstance(burst, bool) or not isinstance(burst, numbers.Integral) or burst < 0:
        raise WebConfigError(f"{where}.burst: expected a whole number >= 0, got {burst!r}")
    burst = int(burst)
    if interval == 0:
        return None
    if burst == 0:
        raise WebConfigError(f"{where}.burst: must be at least 1 when interval is set, or every request is refused")
    return RateLimiter(interval, burst)


def _go_duration(where: str, value: Any) -> float:
    """Seconds in a Go duration such as 100ms or 1m30s (what exporter-toolkit takes)."""
    if value in (0, "0") and not isinstance(value, bool):
        return 0.0
    text = value if isinstance(value, str) else ""
    if not text or _GO_DURATION_RE.sub("", text) != "":
        raise WebConfigError(f"{where}: {value!r} is not a duration like 100ms, 1s or 1m30s")
    return sum(float(n) * _GO_UNITS[unit] for n, unit in _GO_DURATION_RE.findall(text))
