"""webconfig: exporter-toolkit TLS and basic auth, against a real HTTPS client."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import numpy as np
import pytest

from tele_exporter import Telemetry, serve
from tele_exporter.server.http import Server
from tele_exporter.server.web_config import AUTH_CACHE_SIZE, WebConfig, WebConfigError, _rate_limit, load_web_config

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
        ("basic_auth_users:\n  bob: $2y$10$tooshort\n", r"basic_auth_users\.bob: malformed bcrypt hash"),
        (f"basic_auth_users:\n  bob: $2y$99${'a' * 53}\n", r"basic_auth_users\.bob: malformed bcrypt hash"),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: [x]\n",
            r"tls_server_config\.client_auth_type: expected a string, got list",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: {a: 1}\n",
            r"tls_server_config\.min_version: expected a string, got dict",
        ),
        ("http_server_config:\n  headers:\n    Server: x\n", r"http_server_config\.headers\.Server: cannot be"),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
            r"headers\.X-Frame-Options: 'allow' is not one of deny, sameorigin",
        ),
        ("http_server_config:\n  http2: maybe\n", r"http_server_config\.http2: expected true or false"),
        ("rate_limit:\n  interval: fast\n  burst: 1\n", r"rate_limit\.interval: 'fast' is not a duration"),
        ("rate_limit:\n  interval: 1s\n  burst: -1\n", r"rate_limit\.burst: expected a whole number"),
        ("rate_limit:\n  interval: 1s\n", r"rate_limit\.burst: must be at least 1"),
        ("a: &x 1\nb: *x\n", r"aliases are not allowed"),
        ("rate_limit: {}\nrate_limit: {}\n", r"found duplicate key 'rate_limit'"),
    ],
)
def test_malformed_web_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(WebConfigError, match=message):
        load_web_config(_write_config(tmp_path, text))


def test_missing_web_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="web.yml: cannot read"):
        load_web_config(tmp_path / "web.yml")


def _header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hashes bcrypt.checkpw is called with, in order."""
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return bool(real(password, hashed))

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def _users_config(tmp_path: Path) -> WebConfig:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    return load_web_config(_write_config(tmp_path, f"basic_auth_users:\n  alice: {hashed}\n"))


def test_failed_checks_are_cached_like_successes(tmp_path: Path, checks: list[bytes]) -> None:
    config = _users_config(tmp_path)
    assert not config.check_authorization(_header("alice", "wrong"))
    assert not config.check_authorization(_header("alice", "wrong"))
    assert config.check_authorization(_header("alice", PASSWORD))
    assert config.check_authorization(_header("alice", PASSWORD))
    assert len(checks) == 2


def test_the_auth_cache_is_bounded(tmp_path: Path, checks: list[bytes]) -> None:
    config = _users_config(tmp_path)
    for n in range(3 * AUTH_CACHE_SIZE):
        assert not config.check_authorization(_header("alice", f"guess {n}"))
    assert len(config._cache._results) <= AUTH_CACHE_SIZE
    assert config.check_authorization(_header("alice", PASSWORD))


def test_a_flood_of_wrong_passwords_cannot_evict_a_cached_success(tmp_path: Path, checks: list[bytes]) -> None:
    """Failures are evicted among themselves: the scraper's right password is checked by bcrypt once, not again."""
    config = _users_config(tmp_path)
    assert config.check_authorization(_header("alice", PASSWORD))
    for n in range(5 * AUTH_CACHE_SIZE):
        assert not config.check_authorization(_header("alice", f"guess {n}"))
    checked = len(checks)
    assert config.cached_authorization(_header("alice", PASSWORD)) is True
    assert config.check_authorization(_header("alice", PASSWORD)) and len(checks) == checked


def test_cached_authorization_needs_no_bcrypt(tmp_path: Path, checks: list[bytes]) -> None:
    config = _users_config(tmp_path)
    assert config.cached_authorization(None) is False and config.cached_authorization("Bearer x") is False
    assert config.cached_authorization("Basic !!!") is False
    assert config.cached_authorization(_header("alice", PASSWORD)) is None and checks == []
    assert WebConfig().cached_authorization(None) is True


def test_unknown_users_are_checked_against_a_dummy_hash(tmp_path: Path, checks: list[bytes]) -> None:
    """Same bcrypt work for an unknown user as for a known one: timing does not tell who exists."""
    config = _users_config(tmp_path)
    assert not config.check_authorization(_header("mallory", PASSWORD))
    assert not config.check_authorization(_header("mallory", "fakepassword"))  # the dummy's own password
    assert len(checks) == 2 and checks[0] not in config.users.values()
    assert checks[0].startswith(b"$2y$10$")  # the cost of a typical real hash


def test_bcrypt_runs_one_check_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _users_config(tmp_path)
    running, most = 0, 0
    lock = threading.Lock()
    real = bcrypt.checkpw

    def slow(password: bytes, hashed: bytes) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        ok = bool(real(password, hashed))
        with lock:
            running -= 1
        return ok

    monkeypatch.setattr(bcrypt, "checkpw", slow)
    threads = [threading.Thread(target=config.check_authorization, args=(_header("alice", f"g{n}"),)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_an_over_long_password_gets_401_not_500(secure: Server, cert: Path, capfd: pytest.CaptureFixture[str]) -> None:
    long = "x" * 73  # bcrypt >= 5 refuses passwords over 72 bytes
    assert _get(secure.url, cert / "server.crt", "alice", long) == 401
    assert _get(secure.url, cert / "server.crt", "mallory", long) == 401
    assert "Traceback" not in capfd.readouterr().err


def test_configured_headers_are_on_every_response(tele: Telemetry, tmp_path: Path) -> None:
    config = _write_config(
        tmp_path,
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n    Content-Security-Policy: default-src 'self'\n",
    )
    with serve(tele, port=0, web_config=config) as srv:
        for path in ("/metrics", "/", "/api/snapshot", "/nope"):
            req = urllib.request.Request(srv.base_url + path)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    headers = resp.headers
            except urllib.error.HTTPError as err:
                headers = err.headers
            assert headers["X-Frame-Options"] == "deny", path
            assert headers["Content-Security-Policy"] == "default-src 'self'", path


def test_rate_limit_answers_429_beyond_the_burst(tele: Telemetry, tmp_path: Path) -> None:
    config = _write_config(tmp_path, "rate_limit:\n  interval: 1h\n  burst: 3\n")
    with serve(tele, port=0, web_config=config) as srv:
        assert [_get(srv.url, None) for _ in range(5)] == [200, 200, 200, 429, 429]


def test_a_rate_limit_burst_may_be_a_numpy_integer_but_not_a_bool() -> None:
    limiter = _rate_limit(Path("web.yml"), {"interval": "1s", "burst": np.int64(3)})
    assert limiter is not None and limiter.burst == 3 and type(limiter.burst) is int
    with pytest.raises(WebConfigError, match="burst: expected a whole number >= 0, got True"):
        _rate_limit(Path("web.yml"), {"interval": "1s", "burst": True})


def test_a_zero_interval_disables_the_rate_limit(tmp_path: Path) -> None:
    assert load_web_config(_write_config(tmp_path, "rate_limit:\n  interval: 0s\n  burst: 0\n")).rate_limit is None
    limiter = load_web_config(_write_config(tmp_path, "rate_limit:\n  interval: 1m30s\n  burst: 2\n")).rate_limit
    assert limiter is not None and limiter.interval == 90.0
