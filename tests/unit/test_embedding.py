"""The router's embedding engines: the ONNX export is the checkpoint, the int8 encoder stays close to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.router.embedding import (
    INPUT_NAMES,
    Embedder,
    EmbeddingSpec,
    export_fp32_onnx,
    int8_onnx_model,
    packaged_model_dir,
)

# lengths from a word to well past the 32 tokens the default spec keeps
TEXTS = [
    "hi",
    "Which gas do plants take in from the air to make food?",
    "Let $f(x)=x^3-3x+1$. Find every real $c$ with $f(f(c))=c$ and prove there are no others. " * 4,
    "Write a Python function that merges overlapping intervals, then explain its complexity. " * 9,
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router-cache")


def embed(spec: EmbeddingSpec, cache_dir: Path) -> np.ndarray:
    return Embedder(spec, cache_size=0, cache_dir=cache_dir).embed(TEXTS)


def test_the_onnx_export_computes_what_the_checkpoint_computes(tmp_path: Path) -> None:
    import onnxruntime
    from transformers import AutoTokenizer

    from services.router.embedding import TorchEncoder

    model_dir = packaged_model_dir()
    export_fp32_onnx(model_dir, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    tokens = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, truncation=True, max_length=200,
                                                      return_tensors="np")  # fmt: skip
    inputs = {name: tokens[name].astype(np.int64) for name in INPUT_NAMES}
    exported, reference = session.run(None, inputs)[0], TorchEncoder(model_dir)(inputs)
    real = tokens["attention_mask"].astype(bool)  # padding positions carry no meaning
    assert np.allclose(exported[real], reference[real], atol=1e-4)


def test_int8_embeddings_stay_close_to_fp32_at_the_same_length(cache_dir: Path) -> None:
    fp32 = embed(EmbeddingSpec(engine="torch", max_tokens=64), cache_dir)
    int8 = embed(EmbeddingSpec(engine="onnx-int8", max_tokens=64), cache_dir)
    cosines = (fp32 * int8).sum(axis=1)
    assert cosines.min() > 0.97, cosines  # per-tensor scales gave 0.91 on MiniLM


def test_a_cut_encoder_runs_only_its_first_layers_in_both_engines(cache_dir: Path) -> None:
    fp32 = embed(EmbeddingSpec(engine="torch", layers=2), cache_dir)
    int8 = embed(EmbeddingSpec(engine="onnx-int8", layers=2), cache_dir)
    assert (fp32 * int8).sum(axis=1).min() > 0.97
    whole = embed(EmbeddingSpec(engine="torch"), cache_dir)
    assert (fp32 * whole).sum(axis=1).max() < 0.99, "two layers of six give other vectors than all six"


def test_an_artefact_from_before_layers_could_be_cut_runs_all_six() -> None:
    spec = EmbeddingSpec.from_json({"model": "sentence-transformers/all-MiniLM-L6-v2", "engine": "onnx-int8",
                                    "max_tokens": 32})  # fmt: skip
    assert spec.layers == 6


def test_the_int8_encoder_is_built_once_and_reused(cache_dir: Path) -> None:
    first = int8_onnx_model(packaged_model_dir(), cache_dir)
    built_at = first.stat().st_mtime_ns
    assert int8_onnx_model(packaged_model_dir(), cache_dir) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".building-")] == []  # no staging left


def test_embeddings_do_not_depend_on_batch_order(cache_dir: Path) -> None:
    embedder = Embedder(EmbeddingSpec(), cache_size=0, cache_dir=cache_dir, batch_size=2)
    forward, backward = embedder.embed(TEXTS), embedder.embed(TEXTS[::-1])[::-1]
    assert np.allclose(forward, backward, atol=1e-5)


@pytest.mark.parametrize(
    "document",
    [
        {"model": "some/other-model", "engine": "torch", "max_tokens": 64},
        {"model": "sentence-transformers/all-MiniLM-L6-v2", "engine": "tensorrt", "max_tokens": 64},
        {"model": "sentence-transformers/all-MiniLM-L6-v2", "engine": "torch", "max_tokens": 4096},
        {"model": "sentence-transformers/all-MiniLM-L6-v2", "engine": "torch", "max_tokens": 32, "layers": 7},
    ],
)
def test_an_artefact_asking_for_an_embedding_this_code_cannot_run_is_refused(document: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="embedding"):
        EmbeddingSpec.from_json(document)
