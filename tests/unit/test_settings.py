"""Deployment file + environment overrides, and the message a bad value gives."""

from __future__ import annotations

import pytest

from services.gateway.config import GatewaySettings
from services.worker.config import WorkerSettings
from shared.settings import ConfigError, load_settings


def test_the_deployment_file_is_read() -> None:
    settings = load_settings(WorkerSettings)
    assert set(settings.pools) == {"light", "heavy"}
    assert settings.pools["light"].models[0].id == "tiny-light"
    assert settings.routing.threshold == 0.5


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_ROUTING__THRESHOLD", "0.7")
    monkeypatch.setenv("AUTOGLM_POOLS__LIGHT__BATCHING__MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("AUTOGLM_GATEWAY__PORT", "8123")
    settings = load_settings(GatewaySettings)
    assert settings.routing.threshold == 0.7
    assert settings.pools["light"].batching.max_batch_size == 8
    assert settings.pools["light"].models[0].id == "tiny-light"  # the rest of the pool still comes from the file
    assert settings.gateway.port == 8123


def test_a_bad_value_stops_with_a_message_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTOGLM_POOLS__HEAVY__BATCHING__MAX_WAIT_MS", "-5")
    with pytest.raises(ConfigError):
        load_settings(WorkerSettings)
    err = capsys.readouterr().err
    assert "pools.heavy.batching.max_wait_ms" in err
    assert "AUTOGLM_POOLS__HEAVY__BATCHING__MAX_WAIT_MS" in err


def test_an_unknown_pool_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AUTOGLM_WORKER__POOL", "medium")
    with pytest.raises(ConfigError):
        load_settings(WorkerSettings)
    assert "unknown pool 'medium'" in capsys.readouterr().err


def test_another_deployment_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "deployment.yaml"
    config.write_text(
        "pools:\n  only:\n    models: [{id: m1, path: /models/m1}]\n"
        "routing: {light_pool: only, heavy_pool: only, threshold: 0.3}\n"
    )
    monkeypatch.setenv("AUTOGLM_CONFIG_FILE", str(config))
    settings = load_settings(WorkerSettings, worker={"pool": "only"})
    assert settings.find_model("m1") == ("only", settings.pools["only"].models[0])
    assert str(settings.model_path(settings.pools["only"].models[0])) == "/models/m1"


def test_a_gateway_instance_needs_its_reply_partition(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTOGLM_GATEWAY__INSTANCE", "8")
    with pytest.raises(ConfigError):
        load_settings(GatewaySettings)
    assert "gateway.instance: 8 needs a reply partition" in capsys.readouterr().err
