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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


@dataclass
class WebConfig:
    """A parsed web config: optional TLS, optional bcrypt basic-auth users."""

    tls: TLSConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    _verified: set[bytes] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check_authorization(self, header: str | None) -> bool:
        """True when no users are configured or the Basic credentials match a bcrypt hash."""
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        # bcrypt costs ~50-100 ms by design; remember verified pairs (as a salted digest).
        key = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        with self._lock:
            if key in self._verified:
                return True
        import bcrypt

        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._verified.add(key)
        return True


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web config file; raises WebConfigError naming the field."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise WebConfigError(f"{file}: cannot read the web config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise WebConfigError(f"{file}: expected a mapping at the top level")
    unknown = sorted(set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config"})
    if unknown:
        raise WebConfigError(f"{file}: {unknown[0]}: unknown field")
    tls = _tls(file, raw.get("tls_server_config"))
    users = _users(file, raw.get("basic_auth_users"))
    if tls is not None:
        try:
            tls.context()
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"{file}: tls_server_config: cannot load certificate or key: {exc}") from None
    return WebConfig(tls=tls, users=users)


def _tls(file: Path, raw: Any) -> TLSConfig | None:
    if raw is None:
        return None
    where = f"{file}: tls_server_config"
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: expected a mapping")
    allowed = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise WebConfigError(f"{where}.{unknown[0]}: unknown or unsupported field")
    for key in ("cert_file", "key_file"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise WebConfigError(f"{where}.{key}: is required")
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
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"{file}: basic_auth_users.{user}: expected a bcrypt hash ($2y$...), not a password")
        users[str(user)] = hashed.encode()
    return users
