"""The generated Triton model repository: config.pbtxt parses as Triton's ModelConfig and mirrors the pool."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.worker.triton_repository import preferred_batch_sizes, write_repository
from shared.cli import main
from shared.settings import Batching, CommonSettings, ModelConfig, PoolConfig


def triton_settings(**pool_fields: object) -> CommonSettings:
    """Settings with a triton light pool and a torch heavy pool."""
    light = PoolConfig(
        backend="triton",
        models=[ModelConfig(id="glm-4-9b", endpoint="triton:8001", upstream_model="glm4", version="2")],
        **pool_fields,  # type: ignore[arg-type]
    )
    heavy = PoolConfig(models=[ModelConfig(id="tiny-heavy", path=Path("tiny-heavy"))])
    return CommonSettings(pools={"light": light, "heavy": heavy})


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_config_parses_and_carries_the_pool_batching(tmp_path: Path) -> None:
    settings = triton_settings(device="cuda", replicas=3, batching=Batching(max_batch_size=16, max_wait_ms=25))
    written = write_repository(settings, tmp_path)

    assert written == [tmp_path / "glm4" / "config.pbtxt"]  # only the triton pool, under the upstream name
    assert (tmp_path / "glm4" / "2").is_dir()
    config = parse(written[0])
    assert config.name == "glm4"
    assert config.backend == "python"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 25_000
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert [(group.count, group.kind) for group in config.instance_group] == [
        (3, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    ]
    inputs = {tensor.name: tensor for tensor in config.input}
    assert inputs["text_input"].data_type == model_config_pb2.TYPE_STRING
    assert not inputs["text_input"].optional
    assert inputs["max_tokens"].data_type == model_config_pb2.TYPE_INT32
    assert inputs["temperature"].optional
    assert list(inputs["stop_words"].dims) == [-1]
    assert [tensor.name for tensor in config.output] == [
        "text_output",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
    ]
    assert config.parameters["max_context_tokens"].string_value == "2048"


def test_cpu_pool_without_batching(tmp_path: Path) -> None:
    settings = triton_settings(device="cpu", batching=Batching(enabled=False))
    config = parse(write_repository(settings, tmp_path, backend="tensorrtllm")[0])

    assert config.backend == "tensorrtllm"
    assert config.max_batch_size == 1
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_named_pools_of_any_backend(tmp_path: Path) -> None:
    written = write_repository(triton_settings(), tmp_path, ["heavy"])
    config = parse(written[0])
    assert config.name == "tiny-heavy"
    assert (tmp_path / "tiny-heavy" / "1").is_dir()  # version "1" by default
    with pytest.raises(ValueError, match="unknown pools"):
        write_repository(triton_settings(), tmp_path, ["nope"])


def test_preferred_batch_sizes() -> None:
    assert preferred_batch_sizes(32) == [4, 8, 16, 32]
    assert preferred_batch_sizes(12) == [4, 8, 12]
    assert preferred_batch_sizes(2) == [2]


def test_cli_writes_the_named_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(
        "pools:\n"
        "  light: {backend: torch, batching: {max_batch_size: 12}, models: [{id: tiny-light, path: tiny-light}]}\n"
        "  heavy: {backend: torch, models: [{id: tiny-heavy, path: tiny-heavy}]}\n"
    )
    monkeypatch.setenv("AUTOGLM_CONFIG_FILE", str(deployment))
    assert main(["triton", "write-repo", "--output", str(tmp_path / "repo"), "--pool", "light"]) == 0
    assert parse(tmp_path / "repo" / "tiny-light" / "config.pbtxt").max_batch_size == 12
    assert not (tmp_path / "repo" / "tiny-heavy").exists()
    assert main(["triton", "write-repo", "--output", str(tmp_path / "none")]) == 1  # no triton pool: say so
    assert "no triton pools" in capsys.readouterr().err
