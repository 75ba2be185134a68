"""webconfig: exporter-toolkit TLS and basic auth, against a real HTTPS client."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tele_exporter import Telemetry, serve
from tele_exporter.server import Server
from tele_exporter.webconfig import WebConfigError, load_web_config

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    assert shutil.which("openssl"), "openssl is needed to make a test certificate"
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "server.key"), "-out", str(d / "server.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


def _write_config(directory: Path, text: str) -> Path:
    path = directory / "web.yml"
    path.write_text(text)
    return path


@pytest.fixture
def secure(tele: Telemetry, cert: Path) -> Iterator[Server]:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = _write_config(
        cert,
        f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  alice: {hashed}\n",
    )
    srv = serve(tele, port=0, web_config=config)
    yield srv
    srv.close()


def _get(url: str, cafile: Path | None, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_https_with_the_right_password_serves_metrics(secure: Server, cert: Path) -> None:
    assert secure.url.startswith("https://127.0.0.1:")
    assert _get(secure.url, cert / "server.crt", "alice", PASSWORD) == 200
    assert _get(secure.url, cert / "server.crt", "alice", PASSWORD) == 200  # the cached path


def test_wrong_password_unknown_user_and_no_credentials_get_401(secure: Server, cert: Path) -> None:
    assert _get(secure.url, cert / "server.crt", "alice", "wrong") == 401
    assert _get(secure.url, cert / "server.crt", "mallory", PASSWORD) == 401
    assert _get(secure.url, cert / "server.crt") == 401


def test_plain_http_client_is_refused_by_a_tls_server(secure: Server) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(secure.url.replace("https://", "http://"), timeout=5)


def test_a_client_that_does_not_trust_the_certificate_fails(secure: Server) -> None:
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(secure.url, timeout=5, context=ssl.create_default_context())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("basic_auth_users:\n  bob: hunter2\n", r"basic_auth_users\.bob: expected a bcrypt hash"),
        ("tls_server_config:\n  key_file: k\n", r"tls_server_config\.cert_file: is required"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: SSL3\n", r"min_version: 'SSL3'"),
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", r"cannot load certificate"),
        ("tls_config: {}\n", r"tls_config: unknown field"),
        ("[1, 2\n", r"not valid YAML"),
    ],
)
def test_malformed_web_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(WebConfigError, match=message):
        load_web_config(_write_config(tmp_path, text))


def test_missing_web_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="web.yml: cannot read"):
        load_web_config(tmp_path / "web.yml")
