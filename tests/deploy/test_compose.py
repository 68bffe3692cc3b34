"""The Docker Compose stack: accepted by Compose itself, wired in order, documented, rendered from deployment.yaml."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.deploy import COMPOSE_DIR, DeploySettings, render_compose
from shared.settings import REPO_ROOT

SECRETS = {
    "AUTOGLM_ADMIN_KEY": "sk-test-0123456789abcdefghij",
    "POSTGRES_PASSWORD": "test-password",
    "GRAFANA_ADMIN_PASSWORD": "test-password",
    "TRITON_IMAGE": "nvidia/tritonserver:25.10-trtllm-python-py3",  # users give its full name in NVIDIA's registry
}
PROFILES = ("observability", "gpu")
AUTOGLM_SERVICES = ("gateway", "router", "worker-light", "worker-heavy", "exporter")
JOBS = ("topics", "migrate")


def env_file(tmp_path: Path) -> Path:
    """.env.example with its three secrets and the Triton image filled in, as a user is told to do."""
    lines = []
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={SECRETS[name]}" if name in SECRETS else line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_config(
    docker_compose: Path, *args: str, files: tuple[str, ...] = ("compose.yaml",), env_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` in deploy/compose, with no AUTOGLM_* or secrets inherited from this process."""
    command = [str(docker_compose)]
    for name in files:
        command += ["-f", name]
    if env_path is not None:
        command += ["--env-file", str(env_path)]
    clean = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "TMPDIR")}
    return subprocess.run(
        [*command, *args], cwd=COMPOSE_DIR, env=clean, capture_output=True, text=True, timeout=60, check=False
    )


def loaded(docker_compose: Path, env_path: Path, *args: str, files: tuple[str, ...] = ("compose.yaml",)) -> Any:
    """The project as Compose resolved it (every profile on), as JSON."""
    profiles = [arg for profile in PROFILES for arg in ("--profile", profile)]
    result = compose_config(
        docker_compose, *profiles, "config", "--format", "json", *args, files=files, env_path=env_path
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("profiles", [(), ("observability",), ("gpu",), PROFILES])
def test_compose_accepts_the_file_with_each_profile(
    docker_compose: Path, tmp_path: Path, profiles: tuple[str, ...]
) -> None:
    """`docker compose config` (schema validation, interpolation, references) passes with the documented .env."""
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose_config(docker_compose, *flags, "config", "--quiet", env_path=env_file(tmp_path))
    assert result.returncode == 0, result.stderr


def test_compose_accepts_the_rendered_override(docker_compose: Path, tmp_path: Path) -> None:
    """compose.yaml + compose.override.yaml: the deployment file's replicas, limits and batching reach the workers."""
    project = loaded(docker_compose, env_file(tmp_path), files=("compose.yaml", "compose.override.yaml"))
    settings = DeploySettings()
    for name, pool in settings.pools.items():
        worker = project["services"][f"worker-{name}"]
        assert worker["deploy"]["replicas"] == pool.replicas
        assert worker["environment"]["AUTOGLM_WORKER__POOL"] == name
        assert worker["environment"][f"AUTOGLM_POOLS__{name.upper()}__BATCHING__MAX_BATCH_SIZE"] == str(
            pool.batching.max_batch_size
        )
        assert worker["command"] == ["python", "-m", "services.worker"]
    assert project["services"]["router"]["deploy"]["replicas"] == settings.services.router.replicas


def test_a_missing_secret_is_refused_by_name(docker_compose: Path) -> None:
    """Without .env the admin key and passwords are required: Compose stops and names the variable."""
    result = compose_config(docker_compose, "config", "--quiet")
    assert result.returncode != 0
    assert "required variable" in result.stderr
    assert re.search(r"(AUTOGLM_ADMIN_KEY|POSTGRES_PASSWORD|GRAFANA_ADMIN_PASSWORD)", result.stderr)


def test_env_example_lists_every_variable_the_file_reads() -> None:
    """Every ${VAR...} of compose.yaml is in .env.example, and the required ones are left for the user to fill."""
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (COMPOSE_DIR / "compose.yaml").read_text()))
    example = dict(
        line.split("=", 1) for line in (COMPOSE_DIR / ".env.example").read_text().splitlines() if "=" in line
    )
    assert used - set(example) == set()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (COMPOSE_DIR / "compose.yaml").read_text()))
    assert required == set(SECRETS) - {"TRITON_IMAGE"}  # needed by profile gpu only: an empty default
    assert all(example[name] == "" for name in (*required, "TRITON_IMAGE"))


def test_services_start_in_order_and_restart(docker_compose: Path, tmp_path: Path) -> None:
    """Jobs wait for healthy Kafka / PostgreSQL; services wait for the jobs; long-running ones are health-checked."""
    services = loaded(docker_compose, env_file(tmp_path))["services"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["topics"]["command"] == ["autoglm", "topics", "create"]
    assert services["migrate"]["command"] == ["autoglm", "db", "migrate"]
    for name in AUTOGLM_SERVICES:
        for job in JOBS:
            assert services[name]["depends_on"][job]["condition"] == "service_completed_successfully", name
    assert services["gateway"]["depends_on"]["router"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name in (*JOBS, "triton-repository"):
            assert service["restart"].startswith("on-failure"), name
            continue
        assert service["restart"] == "unless-stopped", name
        if name != "jaeger":  # its image has no shell or HTTP client to probe with
            assert service["healthcheck"]["test"], name


def test_one_image_for_every_service_and_job(docker_compose: Path, tmp_path: Path) -> None:
    """Gateway, router, workers, exporter and the jobs run the image of deploy/docker/Dockerfile, bound to 0.0.0.0."""
    services = loaded(docker_compose, env_file(tmp_path))["services"]
    ours = [*AUTOGLM_SERVICES, *JOBS, "triton-repository"]
    assert {services[name]["image"] for name in ours} == {"open-autoglm:latest"}
    assert {services[name]["build"]["dockerfile"] for name in ours} == {"deploy/docker/Dockerfile"}
    for name in AUTOGLM_SERVICES:
        environment = services[name]["environment"]
        assert environment["AUTOGLM_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert environment["AUTOGLM_DATABASE_URL"].startswith("postgresql+asyncpg://autoglm:test-password@postgres:")
        section = name.split("-")[0].upper()
        assert environment[f"AUTOGLM_{section}__HOST"] == "0.0.0.0", name
    assert services["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def readme_deploy_section() -> str:
    """The README's Deploy section."""
    text = (REPO_ROOT / "README.md").read_text()
    return text.split("\n## Deploy", 1)[1].split("\n## ", 1)[0]


def test_every_image_and_published_port_is_in_the_readme(docker_compose: Path, tmp_path: Path) -> None:
    """What the README's Deploy section lists is what Compose runs and publishes."""
    services = loaded(docker_compose, env_file(tmp_path))["services"]
    section = readme_deploy_section()
    for name, service in services.items():
        assert f"`{service['image']}`" in section, f"{name}: image {service['image']} is not in the README"
        for port in service.get("ports", []):
            assert f":{port['published']}" in section, f"{name}: port {port['published']} is not in the README"


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    """prometheus.yml names each Open-AutoGLM service (every pool's workers) on the port it listens on."""
    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    settings = DeploySettings()
    wanted = {
        ("gateway", settings.gateway.port),
        ("router", settings.router.port),
        ("exporter", settings.exporter.port),
        *((f"worker-{pool}", settings.worker.port) for pool in settings.pools),
    }
    assert wanted <= scraped


def exported_metrics() -> set[str]:
    """Names of the prometheus_client metrics registered in services/ and shared/ (custom collectors' too)."""
    pattern = re.compile(r"(?:Counter|Gauge|Histogram|Summary)(?:MetricFamily)?\(\s*\"(autoglm_\w+)\"")
    names = set()
    for folder in ("services", "shared"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def test_dashboard_charts_the_metrics_the_services_export() -> None:
    """Every metric a panel queries exists, and every exported metric is on a panel."""
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "open-autoglm.json").read_text())
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"autoglm_\w+", target["expr"])
    }
    exported = exported_metrics()
    assert len(exported) >= 10
    assert queried - exported == set(), "panels query metrics no service exports"
    assert exported - queried == set(), "exported metrics missing from the dashboard"
    provisioning = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/open-autoglm.yaml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_committed_override_is_the_rendering_of_the_deployment_file() -> None:
    """compose.override.yaml is up to date: `autoglm deploy render --target compose` would write the same."""
    rendered = render_compose(DeploySettings())
    for name, text in rendered.items():
        assert (COMPOSE_DIR / name).read_text() == text, f"run: autoglm deploy render --target compose ({name})"
