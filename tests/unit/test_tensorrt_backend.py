"""The tensorrt backend: what runs anywhere (the error without TensorRT, cache keys, precision), and what needs
TensorRT and a CUDA GPU (engine build, cache hit, a batch, fp16), which skips elsewhere.

The backend's batching and decoding run here too, over ONNX Runtime: see test_onnx_export.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch

from services.worker.backends import load_backend
from services.worker.backends.base import GenerationInput
from services.worker.backends.tensorrt_backend import (
    TENSORRT_MISSING,
    EngineSpec,
    GpuIdentity,
    TensorRTBackend,
    TensorRTUnavailableError,
    cuda_device,
    engine_cache_key,
    engine_precision,
    onnx_cache_key,
)
from shared.messages import ChatMessage
from shared.settings import Batching, ModelConfig, PoolConfig

CONTEXT = 512
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

CHECKPOINT = "0" * 64
EXPORTER = "torch-2.15.0/transformers-5.23.0/format-1"
A100 = GpuIdentity("NVIDIA A100-SXM4-80GB", (8, 0))
SPEC = EngineSpec.for_model("fp16", max_batch_size=32, max_context_tokens=2048)


def ask(request_id: str, content: str, **options: Any) -> GenerationInput:
    settings: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, **options}
    return GenerationInput(request_id, [ChatMessage(role="user", content=content)], **settings)


def tensorrt_pool(model: ModelConfig, max_batch_size: int = 4) -> PoolConfig:
    return PoolConfig(models=[model], backend="tensorrt", batching=Batching(max_batch_size=max_batch_size))


# ----------------------------------------------------------------------------------- without TensorRT


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the error for its absence cannot show")
def test_loading_without_tensorrt_says_what_to_install(tiny_models_dir: Path) -> None:
    model = ModelConfig(id="tiny-light", path=Path("tiny-light"))

    with pytest.raises(TensorRTUnavailableError) as raised:
        load_backend(model, tensorrt_pool(model), tiny_models_dir / "tiny-light")

    assert str(raised.value) == (
        "the tensorrt backend needs NVIDIA TensorRT and a CUDA GPU: install the `tensorrt` wheel from NVIDIA's "
        "package index (it is in the CUDA image)"
    )
    assert str(raised.value) == TENSORRT_MISSING


def test_the_tensorrt_backend_refuses_the_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA GPU only"):
        cuda_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_tensorrt_backend_needs_a_visible_gpu() -> None:
    with pytest.raises(TensorRTUnavailableError, match="no CUDA device is visible"):
        cuda_device("auto")


# ----------------------------------------------------------------------------------------- precision


def test_precision_goes_into_the_engine() -> None:
    assert engine_precision("auto") == "fp16"  # as the torch backend on a GPU
    assert [engine_precision(name) for name in ("fp16", "bf16", "fp32")] == ["fp16", "bf16", "fp32"]
    with pytest.raises(ValueError, match=r"explicitly quantized graph \(Q/DQ nodes"):
        engine_precision("int8")


def test_int8_models_are_refused_at_load_not_at_the_first_request() -> None:
    with pytest.raises(ValueError, match="int8"):
        EngineSpec.for_model("int8", max_batch_size=8, max_context_tokens=512)


def test_the_profile_spans_the_pool_batch_and_the_model_context() -> None:
    spec = EngineSpec.for_model("auto", max_batch_size=16, max_context_tokens=4096)
    assert (spec.max_batch_size, spec.max_sequence) == (16, 4096)
    assert (spec.opt_batch_size, spec.opt_sequence) == (16, 256)
    assert spec.strongly_typed
    assert EngineSpec.for_model("auto", max_batch_size=1, max_context_tokens=64).opt_sequence == 64


# ---------------------------------------------------------------------------------------- cache keys


def test_engine_cache_key_is_a_stable_hex_digest() -> None:
    key = engine_cache_key(CHECKPOINT, EXPORTER, A100, "10.13.3.9", SPEC)
    assert key == engine_cache_key(CHECKPOINT, EXPORTER, GpuIdentity(A100.name, (8, 0)), "10.13.3.9", replace(SPEC))
    assert len(key) == 64
    int(key, 16)


@pytest.mark.parametrize(
    "change",
    [
        {"checkpoint": "1" * 64},
        {"exporter": "torch-2.16.0/transformers-5.23.0/format-1"},
        {"gpu": GpuIdentity("NVIDIA H100 80GB HBM3", (8, 0))},
        {"gpu": GpuIdentity(A100.name, (9, 0))},
        {"tensorrt_version": "11.4.0.106"},
        {"spec": replace(SPEC, precision="fp32")},
        {"spec": replace(SPEC, precision="bf16")},
        {"spec": replace(SPEC, max_batch_size=8, opt_batch_size=8)},
        {"spec": replace(SPEC, max_sequence=4096)},
        {"spec": replace(SPEC, opt_sequence=512)},
        {"spec": replace(SPEC, strongly_typed=False)},
        {"spec": replace(SPEC, opset=17)},
    ],
    ids=lambda change: f"{next(iter(change))}",
)
def test_engine_cache_key_changes_with_everything_an_engine_depends_on(change: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "checkpoint": CHECKPOINT,
        "exporter": EXPORTER,
        "gpu": A100,
        "tensorrt_version": "10.13.3.9",
        "spec": SPEC,
    }

    def key(fields: dict[str, Any]) -> str:
        return engine_cache_key(
            fields["checkpoint"], fields["exporter"], fields["gpu"], fields["tensorrt_version"], fields["spec"]
        )

    assert key({**base, **change}) != key(base)


def test_the_exported_graph_is_shared_by_gpus_and_profiles() -> None:
    key = onnx_cache_key(CHECKPOINT, EXPORTER, SPEC)
    assert onnx_cache_key(CHECKPOINT, EXPORTER, replace(SPEC, max_batch_size=4, max_sequence=128)) == key
    assert onnx_cache_key(CHECKPOINT, EXPORTER, replace(SPEC, precision="fp32")) != key
    assert onnx_cache_key("1" * 64, EXPORTER, SPEC) != key


# --------------------------------------------------------------------------- with TensorRT and a GPU


@pytest.fixture(scope="module")
def gpu_tensorrt() -> Any:
    """TensorRT and a CUDA GPU, or the test skips saying which is missing."""
    trt = pytest.importorskip(
        "tensorrt", reason="needs NVIDIA TensorRT (the `tensorrt` wheel from NVIDIA's package index, in the CUDA image)"
    )
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: TensorRT builds and runs engines on one")
    return trt


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tensorrt")


def load(tiny_models_dir: Path, cache: Path, precision: str = "fp32", name: str = "tiny-light") -> TensorRTBackend:
    model = ModelConfig(id=name, path=Path(name), precision=precision, max_context_tokens=CONTEXT)
    return TensorRTBackend.load(model, tiny_models_dir / name, device="cuda", max_batch_size=4, cache_dir=cache)


@pytest.fixture(scope="module")
def fp32_backend(gpu_tensorrt: Any, tiny_models_dir: Path, engine_cache: Path) -> Iterator[TensorRTBackend]:
    backend = load(tiny_models_dir, engine_cache)
    yield backend
    backend.close()


@pytest.mark.gpu
def test_the_engine_is_built_once_then_loaded_from_the_cache(
    fp32_backend: TensorRTBackend, tiny_models_dir: Path, engine_cache: Path
) -> None:
    assert fp32_backend.engine_built
    assert fp32_backend.engine_path is not None and fp32_backend.engine_path.is_file()
    manifest = json.loads((fp32_backend.engine_path.parent / "engine.json").read_text())
    assert manifest["gpu"] == torch.cuda.get_device_name()
    assert manifest["flags"]["precision"] == "fp32"
    assert (manifest["flags"]["max_batch_size"], manifest["flags"]["max_sequence"]) == (4, CONTEXT)
    built_at = fp32_backend.engine_path.stat().st_mtime_ns

    again = load(tiny_models_dir, engine_cache)
    try:
        assert not again.engine_built
        assert again.engine_path == fp32_backend.engine_path
        assert again.engine_path.stat().st_mtime_ns == built_at  # read, not rewritten
        request = ask("r", "Tell me about the train journey.")
        assert again.generate([request]) == fp32_backend.generate([request])
    finally:
        again.close()


@pytest.mark.gpu
def test_the_engine_generates_a_batch(fp32_backend: TensorRTBackend) -> None:
    too_long = " ".join(["Ships passing in the night looked for its beam."] * 60)
    batch = [
        ask("r0", "Hello", max_tokens=4),
        ask("r1", "What is the boiling point of water on a high mountain?"),
        ask("r2", too_long),
        ask("r3", "Sort these: 3, 1, 2", temperature=0.9, seed=5, max_tokens=9),
        ask("r4", "Good morning", max_tokens=7),  # a fifth row: two chunks for an engine of batch 4
    ]

    outputs = fp32_backend.generate(batch)

    assert [output.request_id for output in outputs] == ["r0", "r1", "r2", "r3", "r4"]
    assert outputs[2].finish_reason == "error" and outputs[2].error_code == "context_length_exceeded"
    for request, output in zip(batch, outputs, strict=True):
        if request.request_id != "r2":
            assert output.error is None
            assert 0 < output.completion_tokens <= request.max_tokens
    assert outputs[0].completion_tokens == 4 or outputs[0].finish_reason == "stop"
    info = fp32_backend.info()
    assert (info.backend, info.precision, info.max_batch_size) == ("tensorrt", "fp32", 4)
    assert info.framework.startswith("tensorrt-") and info.device.startswith("cuda")


@pytest.mark.gpu
def test_the_engine_matches_onnxruntime(fp32_backend: TensorRTBackend, tiny_models_dir: Path, tmp_path: Path) -> None:
    """TensorRT's fp32 logits against ONNX Runtime's on the same export: 1e-2 leaves room for TF32 matmuls."""
    from services.worker.backends.decoding import position_ids_for
    from services.worker.onnx_export import OnnxRuntimeEngine, export_onnx

    reference = OnnxRuntimeEngine(export_onnx(tiny_models_dir / "tiny-light", tmp_path / "onnx"))
    input_ids = torch.tensor([[5, 17, 33, 80, 120, 7], [0, 0, 0, 12, 250, 6]])
    attention_mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    positions = position_ids_for(attention_mask)

    got = fp32_backend.require_engine()(input_ids.cuda(), attention_mask.cuda(), positions.cuda())

    torch.testing.assert_close(got.float().cpu(), reference(input_ids, attention_mask, positions), atol=1e-2, rtol=0)


@pytest.mark.gpu
def test_fp16_builds_a_half_precision_engine_of_its_own(
    fp32_backend: TensorRTBackend, tiny_models_dir: Path, engine_cache: Path
) -> None:
    half = load(tiny_models_dir, engine_cache, precision="auto")
    try:
        assert half.info().precision == "fp16"
        assert half.engine_built and half.engine_path != fp32_backend.engine_path
        engine = half.require_engine()
        assert engine.logits_dtype == torch.float16  # type: ignore[attr-defined]
        input_ids = torch.tensor([[5, 17, 33, 80, 120, 7]], device="cuda")
        mask = torch.ones_like(input_ids)
        positions = torch.arange(6, device="cuda").unsqueeze(0)
        torch.testing.assert_close(
            engine(input_ids, mask, positions).float(),
            fp32_backend.require_engine()(input_ids, mask, positions).float(),
            atol=5e-2,
            rtol=0,
        )
        outputs = half.generate([ask("a", "Hello"), ask("b", "Good morning", max_tokens=3)])
        assert [output.error for output in outputs] == [None, None]
    finally:
        half.close()
