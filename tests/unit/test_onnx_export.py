"""ONNX export of the tiny checkpoints, checked with ONNX Runtime on the CPU against torch.

What a TensorRT engine is built from is checked here for real: the graph's interface, its logits against
the transformers model's, and the tensorrt backend's decode loop (`TensorRTBackend` with ONNX Runtime in
place of the engine) against the torch backend's `generate()`, token for token. What needs a GPU (building
and running the engine itself) is in test_tensorrt_backend.py.

Tolerances: fp32 logits within 1e-4. Both sides compute in fp32 with different kernels and summation
orders, so they differ by a few ulps per operation (measured: at most 4e-7 on logits of magnitude < 1);
1e-4 leaves a 200x margin and is still a hundred times tighter than what a real mistake costs (a row that
attends to its padding moves by more than 1e-2, asserted below). fp16 graphs within 5e-3 of the fp32 model:
fp16 keeps 11 significant bits (a rounding step of 5e-4 near 1.0); measured 3e-4 to 7e-4.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest.importorskip("onnxruntime", reason="the ONNX export is checked with onnxruntime: install the `onnx` extra")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript: install the `onnx` extra")

import onnx
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.worker.backends.base import GenerationInput
from services.worker.backends.decoding import load_chat_tokenizer, position_ids_for
from services.worker.backends.tensorrt_backend import TensorRTBackend
from services.worker.backends.torch_backend import TorchBackend
from services.worker.onnx_export import (
    INPUT_NAMES,
    ONNX_OPSET,
    OUTPUT_NAME,
    OnnxRuntimeEngine,
    checkpoint_digest,
    export_onnx,
)
from shared.messages import ChatMessage

CONTEXT = 512
FP32_ATOL = 1e-4
FP16_ATOL = 5e-3
# tiny-light keeps every position's logits (to check them all), tiny-heavy the last one (what the backend runs).
EXPORTS = {"tiny-light": "all", "tiny-heavy": "last"}
LONG_PROMPT = " ".join(["The lighthouse stood at the end of the long stone pier."] * 6)


@pytest.fixture(scope="module")
def exports(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny checkpoint exported afresh (fp32) for this module: ~15-40 s each on two cores."""
    directory = tmp_path_factory.mktemp("onnx")
    return {
        name: export_onnx(tiny_models_dir / name, directory / name, logits=logits)  # type: ignore[arg-type]
        for name, logits in EXPORTS.items()
    }


@pytest.fixture(scope="module", params=list(EXPORTS))
def model_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def onnx_engine(exports: dict[str, Path], model_name: str) -> Iterator[OnnxRuntimeEngine]:
    engine = OnnxRuntimeEngine(exports[model_name])
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_models_dir: Path, model_name: str) -> PreTrainedModel:
    """The model as the torch backend loads it (default attention), fp32 on the CPU."""
    return AutoModelForCausalLM.from_pretrained(tiny_models_dir / model_name, local_files_only=True).eval()


@pytest.fixture(scope="module")
def torch_backend(tiny_models_dir: Path, model_name: str) -> Iterator[TorchBackend]:
    loaded = TorchBackend.load(model_name, tiny_models_dir / model_name, device="cpu", max_context_tokens=CONTEXT)
    yield loaded
    loaded.close()


def onnx_backend(checkpoint: Path, engine: OnnxRuntimeEngine, max_batch_size: int = 8) -> TensorRTBackend:
    """The tensorrt backend's batching and decoding, with ONNX Runtime where the engine would be."""
    tokenizer, eos_token_ids = load_chat_tokenizer(checkpoint)
    return TensorRTBackend(
        checkpoint.name,
        engine,
        tokenizer,
        eos_token_ids,
        max_context_tokens=CONTEXT,
        max_batch_size=max_batch_size,
        framework=f"onnxruntime-{engine.version}",
        precision="fp32",
    )


class RowCountingEngine:
    """An engine that records how many rows each step runs."""

    def __init__(self, engine: OnnxRuntimeEngine) -> None:
        self.engine = engine
        self.device = engine.device
        self.rows: list[int] = []

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        self.rows.append(input_ids.shape[0])
        return self.engine(input_ids, attention_mask, position_ids)

    def close(self) -> None:
        self.engine.close()


def ask(request_id: str, content: str, **options: Any) -> GenerationInput:
    settings: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, **options}
    return GenerationInput(request_id, [ChatMessage(role="user", content=content)], **settings)


def left_padded_batch(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 and 4 tokens, the short one left-padded."""
    input_ids = torch.tensor([[5, 17, 33, 80, 120, 7, 300, 41, 9], [pad] * 5 + [12, 250, 6, 98]])
    attention_mask = torch.tensor([[1] * 9, [0] * 5 + [1] * 4])
    return input_ids, attention_mask


def reachable_stop(text: str) -> str:
    """Two printable characters from the middle third of a greedy answer: a stop string it is known to reach."""
    for start in range(len(text) // 3, 2 * len(text) // 3):
        candidate = text[start : start + 2]
        if candidate.isascii() and candidate.isprintable() and candidate.strip():
            return candidate
    raise AssertionError(f"no printable pair in the middle of {text!r}")


def torch_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        output = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        )
    return output.logits.float()


# ------------------------------------------------------------------------------------------ the graph


def test_graph_has_dynamic_int64_inputs_and_a_logits_output(exports: dict[str, Path], model_name: str) -> None:
    path = exports[model_name]
    graph = onnx.load(str(path), load_external_data=False)

    assert [item.version for item in graph.opset_import if item.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert [item.name for item in graph.graph.input] == list(INPUT_NAMES)
    for item in graph.graph.input:
        assert item.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [dim.dim_param for dim in item.type.tensor_type.shape.dim] == ["batch", "sequence"]
    (output,) = graph.graph.output
    assert output.name == OUTPUT_NAME
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, positions, vocab = output.type.tensor_type.shape.dim
    assert batch.dim_param == "batch"
    assert (positions.dim_param or positions.dim_value) == ("sequence" if EXPORTS[model_name] == "all" else 1)
    assert vocab.dim_value > 500  # the tiny tokenizer's vocabulary
    # The weights sit beside the graph (protobuf's 2 GB limit), and the graph checks as valid ONNX.
    assert (path.parent / "model.onnx.data").stat().st_size > path.stat().st_size
    onnx.checker.check_model(str(path))


def test_logits_match_torch_on_a_left_padded_batch(
    onnx_engine: OnnxRuntimeEngine, reference: PreTrainedModel, model_name: str
) -> None:
    input_ids, attention_mask = left_padded_batch(pad=int(reference.config.pad_token_id))

    got = onnx_engine.logits(input_ids, attention_mask, position_ids_for(attention_mask))
    want = torch_logits(reference, input_ids, attention_mask)

    if EXPORTS[model_name] == "all":
        assert got.shape == want.shape
        real = attention_mask.bool()  # padding positions' logits mean nothing: every real one is compared
        torch.testing.assert_close(got[real], want[real], atol=FP32_ATOL, rtol=0)
    else:
        assert got.shape == (2, 1, want.shape[-1])
        torch.testing.assert_close(got[:, -1], want[:, -1], atol=FP32_ATOL, rtol=0)
    # The padded row's next-token logits are those of its prompt alone.
    alone = onnx_engine(input_ids[1:, 5:], attention_mask[1:, 5:], position_ids_for(attention_mask[1:, 5:]))
    torch.testing.assert_close(onnx_engine(input_ids, attention_mask, position_ids_for(attention_mask))[1:], alone)


def test_the_tolerance_catches_attending_to_the_padding(
    onnx_engine: OnnxRuntimeEngine, reference: PreTrainedModel
) -> None:
    """A mask that lets the padded row see its padding: far outside the tolerance."""
    input_ids, attention_mask = left_padded_batch(pad=int(reference.config.pad_token_id))
    unmasked = torch.ones_like(attention_mask)

    got = onnx_engine(input_ids, unmasked, position_ids_for(attention_mask))
    want = torch_logits(reference, input_ids, attention_mask)[:, -1]

    torch.testing.assert_close(got[0], want[0], atol=FP32_ATOL, rtol=0)  # the unpadded row is unaffected
    assert (got[1] - want[1]).abs().max() > 100 * FP32_ATOL


def test_fp16_export_computes_in_half_precision(tiny_models_dir: Path, tmp_path: Path) -> None:
    checkpoint = tiny_models_dir / "tiny-light"
    path = export_onnx(checkpoint, tmp_path / "fp16", precision="fp16")
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert onnx.TensorProto.FLOAT16 in {tensor.data_type for tensor in graph.graph.initializer}

    engine = OnnxRuntimeEngine(path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    input_ids, attention_mask = left_padded_batch(pad=int(model.config.pad_token_id))
    got = engine(input_ids, attention_mask, position_ids_for(attention_mask))

    assert got.dtype == torch.float16
    want = torch_logits(model, input_ids, attention_mask)[:, -1]
    torch.testing.assert_close(got.float(), want, atol=FP16_ATOL, rtol=0)
    assert (got.float() - want).abs().max() > 0  # really half precision, not fp32 under another name


def test_export_replaces_an_older_export_whole(tiny_models_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.txt").write_text("from an older export")

    path = export_onnx(tiny_models_dir / "tiny-light", target)

    assert sorted(item.name for item in target.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert path == target / "model.onnx"
    assert [item.name for item in tmp_path.iterdir()] == ["export"]  # no staging directory left behind


# ---------------------------------------------------------------------------- decoding over the export


def test_onnx_greedy_decoding_equals_the_torch_backend(
    tiny_models_dir: Path, onnx_engine: OnnxRuntimeEngine, torch_backend: TorchBackend
) -> None:
    """The strong check: the same requests give the same outputs (text, token counts, finish reasons)."""
    story = torch_backend.generate([ask("probe", "Tell me about the train journey.", max_tokens=12)])[0]
    stop = reachable_stop(story.text)
    batch = [
        ask("hello", "Hello", max_tokens=5),
        ask("long", LONG_PROMPT, max_tokens=20),
        ask("stop", "Tell me about the train journey.", max_tokens=12, stop=[stop]),
        ask("too-long", " ".join(["Ships passing in the night looked for its beam."] * 60)),
        ask("water", "Why does water boil at a lower temperature on a mountain?", max_tokens=24),
    ]
    backend = onnx_backend(tiny_models_dir / torch_backend.model_id, onnx_engine)

    got = backend.generate(batch)
    want = torch_backend.generate(batch)

    assert got == want
    assert [output.finish_reason for output in got] == ["length", "length", "stop", "error", "length"]
    assert [output.completion_tokens for output in got][:2] == [5, 20]
    assert got[2].completion_tokens < 12
    assert got[3].error_code == "context_length_exceeded"


def test_onnx_seeded_sampling_equals_the_torch_backend(
    tiny_models_dir: Path, onnx_engine: OnnxRuntimeEngine, torch_backend: TorchBackend
) -> None:
    """A seeded request draws from its own generator: the torch backend's draws, whatever its companions."""
    batch = [
        ask("warm", "Write a short story.", temperature=0.8, top_p=0.9, seed=7, max_tokens=20),
        ask("greedy", "Hello"),
        ask("hot", "Write a short story.", temperature=1.3, seed=11, max_tokens=20),
    ]
    backend = onnx_backend(tiny_models_dir / torch_backend.model_id, onnx_engine)

    assert backend.generate(batch) == torch_backend.generate(batch)


async def test_batches_bigger_than_the_engine_run_in_chunks(
    tiny_models_dir: Path, onnx_engine: OnnxRuntimeEngine, torch_backend: TorchBackend
) -> None:
    prompts = ["Hello", "Good morning", LONG_PROMPT, "What is the boiling point?", "Thank you", "Monday"]
    batch = [ask(f"r{index}", prompt, max_tokens=6 + index) for index, prompt in enumerate(prompts)]
    backend = onnx_backend(tiny_models_dir / torch_backend.model_id, onnx_engine, max_batch_size=4)
    backend.engine = counting = RowCountingEngine(onnx_engine)

    got = await backend.agenerate(batch)

    assert got == torch_backend.generate(batch)
    assert max(counting.rows) == 4  # never more rows than the engine's profile allows
    assert counting.rows[-1] == 1  # finished rows leave the batch: the last steps run the longest answer alone


def test_closed_backend_refuses_to_generate(tiny_models_dir: Path, exports: dict[str, Path]) -> None:
    backend = onnx_backend(tiny_models_dir / "tiny-heavy", OnnxRuntimeEngine(exports["tiny-heavy"]))
    assert backend.info().max_batch_size == 8
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate([ask("r", "Hello")])


# ------------------------------------------------------------------------------------ checkpoint digest


def test_checkpoint_digest_follows_the_weights_not_the_path(tiny_models_dir: Path, tmp_path: Path) -> None:
    original = tiny_models_dir / "tiny-light"
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert checkpoint_digest(copy) == checkpoint_digest(original)

    (copy / "autoglm_build.json").write_text("{}")  # build notes, tokenizer: not part of the graph
    (copy / "tokenizer_config.json").write_text("{}")
    assert checkpoint_digest(copy) == checkpoint_digest(original)

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert checkpoint_digest(copy) != checkpoint_digest(original)
    assert checkpoint_digest(tiny_models_dir / "tiny-heavy") != checkpoint_digest(original)


def test_checkpoint_digest_needs_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoint_digest(tmp_path)
