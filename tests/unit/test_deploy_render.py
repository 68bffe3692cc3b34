"""`autoglm deploy render`: the conversions and rules of shared/deploy.py, and the command itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from shared.cli import main
from shared.deploy import DeploySettings, compose_cpus, compose_memory, render_compose, render_k8s
from shared.settings import Resources


def settings_with(**overrides: object) -> DeploySettings:
    """The real deployment file with some values replaced."""
    return DeploySettings(**overrides)  # type: ignore[arg-type]


def test_units_convert_from_kubernetes_to_compose() -> None:
    assert [compose_memory(m) for m in ("512Mi", "4Gi", "1Ti")] == ["512m", "4g", "1t"]
    assert [compose_cpus(c) for c in ("2", "0.5", "500m", "1500m")] == [2.0, 0.5, 0.5, 1.5]


def test_bad_resources_are_refused_by_field() -> None:
    with pytest.raises(ValidationError, match="memory"):
        Resources(memory="4GB")
    with pytest.raises(ValidationError, match="cpu"):
        Resources(cpu="two")


def test_more_gateways_than_reply_partitions_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"services\.gateway\.replicas"):
        settings_with(services={"gateway": {"replicas": 9}})


def gpu_pools() -> dict[str, object]:
    """The two pools, heavy on one GPU, plus a third pool `code`."""
    pools = DeploySettings().model_dump(mode="json")["pools"]
    pools["heavy"]["resources"] = {"cpu": "8", "memory": "32Gi", "gpus": 1}
    pools["code"] = pools["light"] | {"replicas": 2}
    return pools


def test_a_gpu_pool_reserves_nvidia_devices_in_compose_and_k8s(tmp_path: Path) -> None:
    settings = settings_with(pools=gpu_pools())
    compose = yaml.safe_load(render_compose(settings)["compose.override.yaml"])["services"]
    heavy = compose["worker-heavy"]["deploy"]["resources"]
    assert heavy["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert heavy["limits"] == {"cpus": 8.0, "memory": "32g"}
    assert "reservations" not in compose["worker-light"]["deploy"]["resources"]
    workers = list(yaml.safe_load_all(render_k8s(settings, tmp_path, "kafka:9092", "")["workers.yaml"]))
    heavy_pod = next(w for w in workers if w["metadata"]["name"] == "worker-heavy" and w["kind"] == "Deployment")
    container = heavy_pod["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert heavy_pod["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_pool_compose_yaml_does_not_name_extends_the_light_worker() -> None:
    compose = yaml.safe_load(render_compose(settings_with(pools=gpu_pools()))["compose.override.yaml"])["services"]
    assert compose["worker-code"]["extends"] == {"file": "compose.yaml", "service": "worker-light"}
    assert compose["worker-code"]["environment"]["AUTOGLM_WORKER__POOL"] == "code"
    assert compose["worker-code"]["deploy"]["replicas"] == 2
    assert "extends" not in compose["worker-light"]


def test_the_command_writes_both_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "render", "--target", "compose", "-o", str(tmp_path / "compose")]) == 0
    assert (tmp_path / "compose" / "compose.override.yaml").exists()
    out = tmp_path / "k8s"
    assert main(["deploy", "render", "--target", "k8s", "-o", str(out), "--kafka-bootstrap", "kafka-0.kafka:9092"]) == 0
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    base = (out / kustomization["resources"][0]).resolve()
    assert (base / "kustomization.yaml").exists()
    assert "AUTOGLM_KAFKA_BOOTSTRAP=kafka-0.kafka:9092" in kustomization["configMapGenerator"][1]["literals"]
    assert "kafka-0.kafka:9092" in (out / "scaledobjects.yaml").read_text()
    assert "wrote" in capsys.readouterr().out


def test_the_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["deploy", "render", "--help"])
    assert stopped.value.code == 0
    assert "--target {compose,k8s}" in capsys.readouterr().out
