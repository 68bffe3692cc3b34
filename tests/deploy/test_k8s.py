"""The Kubernetes manifests: rendered from the deployment file, built by kustomize, valid against the API's schemas."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared import topics
from shared.deploy import K8S_OVERLAY, DeploySettings, k8s_resources, render_k8s
from shared.settings import DEFAULT_CONFIG_FILE, REPO_ROOT

OVERLAYS = ("deployment", "production")
KUBERNETES_VERSION = "1.30"  # the oldest we claim (pod-index label: 1.28+); the schemas ship in kubernetes-validate
SERVICES = {"gateway": "StatefulSet", "router": "Deployment", "exporter": "Deployment"}


def build(kustomize: Path, overlay: str) -> list[dict[str, Any]]:
    """`kustomize build` of an overlay, as a list of objects."""
    result = subprocess.run(
        [str(kustomize), "build", str(REPO_ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind, by name."""
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def test_committed_overlay_is_the_rendering_of_the_deployment_file() -> None:
    """overlays/deployment is up to date: `autoglm deploy render --target k8s` would write the same."""
    files = render_k8s(DeploySettings(), K8S_OVERLAY, "kafka:9092", DEFAULT_CONFIG_FILE.read_text())
    for name, text in files.items():
        assert (K8S_OVERLAY / name).read_text() == text, f"run: autoglm deploy render --target k8s ({name})"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(kustomize: Path, overlay: str) -> None:
    """Every built object (KEDA's aside) is valid, strictly (no unknown fields), for Kubernetes 1.30."""
    objects = build(kustomize, overlay)
    checked = 0
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: its fields are checked in test_each_pool_scales_on_its_consumer_lag
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 15


def test_the_validator_catches_a_misspelt_field(kustomize: Path) -> None:
    """The schema check is real: a typo in a probe is refused."""
    deployment = by_kind(build(kustomize, "deployment"), "Deployment")["router"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The main containers of a workload."""
    return list(obj["spec"]["template"]["spec"]["containers"])


def test_replicas_resources_and_probes_come_from_the_deployment_file(kustomize: Path) -> None:
    """Each service and pool has the replicas and resources of deployment.yaml, probes on /readyz and /healthz."""
    objects = build(kustomize, "deployment")
    settings = DeploySettings()
    workloads = by_kind(objects, "Deployment") | by_kind(objects, "StatefulSet")
    wanted = {
        name: (getattr(settings.services, name).replicas, getattr(settings.services, name).resources)
        for name in SERVICES
    }
    wanted |= {f"worker-{name}": (pool.replicas, pool.resources) for name, pool in settings.pools.items()}
    assert set(workloads) == set(wanted)
    for name, (replicas, resources) in wanted.items():
        workload = workloads[name]
        assert workload["spec"]["replicas"] == replicas, name
        (container,) = containers(workload)
        assert container["resources"] == k8s_resources(resources), name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert [init["command"] for init in workload["spec"]["template"]["spec"]["initContainers"]] == [
            ["autoglm", "topics", "create"]
        ]
    budgets = by_kind(objects, "PodDisruptionBudget")
    assert set(budgets) == set(wanted)


def test_pods_read_the_deployment_file_and_kafka_from_config_maps(kustomize: Path) -> None:
    """The deployment file is mounted from a generated ConfigMap; the Kafka address, the file path and where the
    exporter forwards spans come by env."""
    objects = build(kustomize, "deployment")
    config_maps = by_kind(objects, "ConfigMap")
    (deployment_map,) = [cm for name, cm in config_maps.items() if name.startswith("autoglm-deployment-")]
    assert deployment_map["data"]["deployment.yaml"] == DEFAULT_CONFIG_FILE.read_text()
    (env_map,) = [cm for name, cm in config_maps.items() if name.startswith("autoglm-env-")]
    assert env_map["data"]["AUTOGLM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env_map["data"]["AUTOGLM_CONFIG_FILE"] == "/etc/autoglm/deployment.yaml"
    assert env_map["data"]["AUTOGLM_TELEMETRY__OTLP_ENDPOINT"] == "http://jaeger-collector:4318"  # spans leave
    for workload in [*by_kind(objects, "Deployment").values(), *by_kind(objects, "StatefulSet").values()]:
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        assert volumes[0]["configMap"]["name"] == deployment_map["metadata"]["name"]
        (container,) = containers(workload)
        assert container["envFrom"][0]["configMapRef"]["name"] == env_map["metadata"]["name"]
        host = {env["name"]: env.get("value") for env in container.get("env", [])}
        assert "0.0.0.0" in host.values(), workload["metadata"]["name"]


def test_each_gateway_owns_the_reply_partition_of_its_pod_index(kustomize: Path) -> None:
    """Gateway pod N reads reply partition N (the StatefulSet's pod-index label)."""
    gateway = by_kind(build(kustomize, "deployment"), "StatefulSet")["gateway"]
    (container,) = containers(gateway)
    instance = next(env for env in container["env"] if env["name"] == "AUTOGLM_GATEWAY__INSTANCE")
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"


def test_each_pool_scales_on_its_consumer_lag(kustomize: Path) -> None:
    """A KEDA ScaledObject per pool: kafka triggers on the workers' groups and jobs / priority / retry topics."""
    objects = build(kustomize, "deployment")
    scalers = by_kind(objects, "ScaledObject")
    settings = DeploySettings()
    assert set(scalers) == {f"worker-{name}" for name in settings.pools}
    for name, pool in settings.pools.items():
        spec = scalers[f"worker-{name}"]["spec"]
        assert spec["scaleTargetRef"] == {"name": f"worker-{name}"}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (pool.replicas, pool.partitions)
        watched = {(t["metadata"]["consumerGroup"], t["metadata"]["topic"]) for t in spec["triggers"]}
        assert watched == {
            (topics.worker_group(name), topics.jobs_topic(name)),
            (topics.worker_group(name), topics.priority_topic(name)),
            (topics.worker_retry_group(name), topics.retry_topic(name)),
        }
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka"
            assert set(trigger["metadata"]) == {
                "bootstrapServers", "consumerGroup", "topic", "lagThreshold", "offsetResetPolicy",
            }  # fmt: skip
            assert trigger["metadata"]["lagThreshold"] == str(pool.batching.max_batch_size)
            assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA metadata: strings


def test_production_overlay_sets_namespace_and_image(kustomize: Path) -> None:
    """The example cluster overlay moves everything to its namespace and registry."""
    objects = build(kustomize, "production")
    assert {obj["metadata"].get("namespace") for obj in objects} == {"autoglm"}
    images = {
        container["image"]
        for obj in objects
        if obj["kind"] in ("Deployment", "StatefulSet")
        for container in [*containers(obj), *obj["spec"]["template"]["spec"]["initContainers"]]
    }
    assert images == {"registry.example.com/open-autoglm:0.1.0-cuda"}
