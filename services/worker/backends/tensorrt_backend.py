"""The TensorRT backend: an HF causal LM compiled to a TensorRT engine, run with TensorRT's Python runtime.

How a model becomes an engine (at load, in the worker's loading thread):
1. The checkpoint is exported to ONNX (`services/worker/onnx_export.py`: input_ids, attention_mask,
   position_ids -> last-position logits, batch and sequence dynamic, no KV cache) in the engine's precision.
2. TensorRT parses it and builds a strongly typed engine with one optimization profile: batch
   1..`max_batch_size` (the pool's), sequence 1..`max_context_tokens` (the model's), tuned for a full batch
   of `OPT_SEQUENCE` tokens.
3. Both are cached under `var/tensorrt/` (`onnx/`, `engines/`): an engine is keyed by the checkpoint's
   content hash, the exporter (torch, transformers), the GPU's name and compute capability, the TensorRT
   version and the build flags (`EngineSpec`), so a new checkpoint, GPU, TensorRT or profile builds anew and
   anything else loads in seconds. Builds are serialised by a file lock (replicas on one host build once) and
   renamed into place whole.

Precision (`ModelConfig.precision`): `auto` and `fp16` build in fp16 (what the torch backend runs on a
GPU), `bf16` in bf16 (compute capability 8.0 or later), `fp32` in fp32. The precision is in the ONNX graph
(the model is exported in that dtype) and the network is strongly typed: TensorRT 11 removed the builder's
precision flags (`BuilderFlag.FP16`, `INT8`, ...), and TensorRT 10.x builds such a graph the same way.
`int8` is refused at load: TensorRT takes it only as an explicitly quantized graph (Q/DQ nodes, e.g. from
NVIDIA ModelOpt) and this backend does not quantize.

How a batch runs: prompts are encoded as the torch backend encodes them (the same helpers), split into
engine-sized chunks, and each chunk is decoded step by step by `decoding.decode_batch` over the engine:
inputs and outputs are torch CUDA tensors whose addresses are bound by tensor name, executed on the
current CUDA stream (no pycuda). Out of device memory becomes BatchTooLargeError (the worker splits).

`import tensorrt` happens only when a model loads, so this module imports (and its pure parts are tested)
without TensorRT.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from services.worker.backends.base import (
    BackendInfo,
    BatchTooLargeError,
    DeltaSink,
    GenerationInput,
    GenerationOutput,
)
from services.worker.backends.decoding import LogitsEngine, decode_batch, load_chat_tokenizer
from services.worker.backends.torch_backend import encode_request
from services.worker.onnx_export import (
    INPUT_NAMES,
    ONNX_FILE,
    ONNX_OPSET,
    OUTPUT_NAME,
    checkpoint_digest,
    export_onnx,
    exporter_identity,
)
from shared.settings import ModelConfig, var_dir

logger = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "the tensorrt backend needs NVIDIA TensorRT and a CUDA GPU: install the `tensorrt` wheel from NVIDIA's "
    "package index (it is in the CUDA image)"
)
INT8_UNSUPPORTED = (
    "precision int8: TensorRT builds int8 only from an explicitly quantized graph (Q/DQ nodes, e.g. from "
    "NVIDIA ModelOpt; TensorRT 11 removed implicit int8 calibration) and the tensorrt backend does not "
    "quantize; use fp16, bf16 or fp32"
)
EnginePrecision = Literal["fp32", "fp16", "bf16"]
OPT_SEQUENCE = 256  # the profile's tuning point: a chat prompt and its answer, most of the time
ENGINE_KEY_VERSION = 1  # bump when what goes into an engine changes in a way the key does not show
ENGINE_FILE = "engine.plan"
MANIFEST_FILE = "engine.json"


class TensorRTUnavailableError(RuntimeError):
    """TensorRT or a CUDA GPU is missing: the worker cannot serve this pool here."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build (or run) the engine."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or TensorRTUnavailableError saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailableError(TENSORRT_MISSING) from error
    return tensorrt


def cuda_device(device: str) -> torch.device:
    """The GPU to build and run on; TensorRT has no CPU mode, so `cpu` (or no GPU) is an error."""
    if device == "cpu":
        raise ValueError("the tensorrt backend runs on a CUDA GPU only: set the pool's device to cuda or auto")
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"{TENSORRT_MISSING}; no CUDA device is visible here")
    return torch.device("cuda", torch.cuda.current_device())


def engine_precision(precision: str) -> EnginePrecision:
    """The precision an engine is built at for a model's configured `precision` (see the module docstring)."""
    if precision == "int8":
        raise ValueError(INT8_UNSUPPORTED)
    if precision in ("auto", "fp16"):
        return "fp16"
    if precision in ("fp32", "bf16"):
        return precision  # type: ignore[return-value]  # narrowed by the test above
    raise ValueError(f"unknown precision {precision!r}")


# ------------------------------------------------------------------------------------------ cache keys


@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is specific to on the hardware side: TensorRT tunes kernels for one GPU model."""

    name: str
    compute_capability: tuple[int, int]

    @classmethod
    def of(cls, device: torch.device) -> GpuIdentity:
        major, minor = torch.cuda.get_device_capability(device)
        return cls(torch.cuda.get_device_name(device), (major, minor))


@dataclass(frozen=True)
class EngineSpec:
    """The build flags: precision and optimization profile (min is always batch 1, sequence 1)."""

    precision: EnginePrecision
    max_batch_size: int
    max_sequence: int
    opt_batch_size: int
    opt_sequence: int
    strongly_typed: bool = True
    opset: int = ONNX_OPSET

    @classmethod
    def for_model(cls, precision: str, max_batch_size: int, max_context_tokens: int) -> EngineSpec:
        """Tuned for a full batch (the batcher fills batches under load, when speed matters most)."""
        return cls(
            precision=engine_precision(precision),
            max_batch_size=max_batch_size,
            max_sequence=max_context_tokens,
            opt_batch_size=max_batch_size,
            opt_sequence=min(OPT_SEQUENCE, max_context_tokens),
        )


def digest_of(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def onnx_cache_key(checkpoint_sha256: str, exporter: str, spec: EngineSpec) -> str:
    """The exported graph depends on the weights, the exporter, the precision and the opset; not the GPU."""
    return digest_of(
        {"checkpoint": checkpoint_sha256, "exporter": exporter, "precision": spec.precision, "opset": spec.opset}
    )


def engine_cache_key(
    checkpoint_sha256: str, exporter: str, gpu: GpuIdentity, tensorrt_version: str, spec: EngineSpec
) -> str:
    """Hex SHA-256 of everything an engine depends on: equal keys, interchangeable engines (pure function)."""
    return digest_of(
        {
            "key_version": ENGINE_KEY_VERSION,
            "checkpoint": checkpoint_sha256,
            "exporter": exporter,
            "gpu": gpu.name,
            "compute_capability": list(gpu.compute_capability),
            "tensorrt": tensorrt_version,
            "flags": asdict(spec),
        }
    )


def tensorrt_cache_dir() -> Path:
    return var_dir() / "tensorrt"


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path`: one process at a time builds a given engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ TensorRT


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that writes to this module's logger (JSON lines in services), warnings and up."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
    }

    class ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in levels:
                logger.log(levels[severity], "tensorrt: %s", msg)

    return ForwardingLogger()


@dataclass(frozen=True)
class TensorRT:
    """The `tensorrt` module, and the runtime and logger that load engines (kept while any engine lives)."""

    module: Any
    runtime: Any
    logger: Any

    @classmethod
    def start(cls, trt: Any) -> TensorRT:
        trt_logger = make_logger(trt)
        return cls(trt, trt.Runtime(trt_logger), trt_logger)

    @property
    def version(self) -> str:
        return str(self.module.__version__)


def network_flags(trt: Any) -> int:
    """Strongly typed: layer precisions follow the graph's types (the only mode TensorRT 11 has)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_serialized_engine(trt: Any, trt_logger: Any, onnx_path: Path, spec: EngineSpec) -> Any:
    """Parse the ONNX file (external weights beside it) and build the engine; returns its serialized bytes."""
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt) if spec.strongly_typed else 0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        profile.set_shape(
            name,
            (1, 1),
            (spec.opt_batch_size, spec.opt_sequence),
            (spec.max_batch_size, spec.max_sequence),
        )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the tensorrt log lines)")
    return serialized


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type."""
    dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    if dtype not in dtypes:
        raise EngineBuildError(f"engine tensor of unsupported type {dtype}")
    return dtypes[dtype]


class TensorRTEngine:
    """A deserialized engine and its execution context; a `decoding.LogitsEngine` on one GPU.

    Holds the runtime and the logger too (`tensorrt`): TensorRT points to both for as long as the engine lives.
    """

    def __init__(self, tensorrt: TensorRT, engine: Any, device: torch.device) -> None:
        trt = tensorrt.module
        self.device = device
        self.tensorrt: TensorRT | None = tensorrt
        self.engine = engine
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        missing = sorted({*INPUT_NAMES, OUTPUT_NAME} - set(names))
        if missing:
            raise EngineBuildError(f"the engine lacks tensors {missing} (it has {names})")
        self.dtypes = {name: torch_dtype(trt, engine.get_tensor_dtype(name)) for name in names}
        with torch.cuda.device(device):
            self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError(
                "TensorRT could not create an execution context: the GPU lacks the memory for the largest batch "
                "and context (lower the pool's max_batch_size or the model's max_context_tokens)"
            )

    @property
    def logits_dtype(self) -> torch.dtype:
        return self.dtypes[OUTPUT_NAME]

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Bind the inputs and a fresh output by name, run on the current stream, return the last logits."""
        if self.context is None:
            raise RuntimeError("the TensorRT engine is closed")
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            inputs = {}
            for name, tensor in zip(INPUT_NAMES, (input_ids, attention_mask, position_ids), strict=True):
                # Kept referenced until the run ends: TensorRT only holds the address.
                inputs[name] = tensor.to(device=self.device, dtype=self.dtypes[name]).contiguous()
                self.context.set_input_shape(name, tuple(inputs[name].shape))
                self.context.set_tensor_address(name, inputs[name].data_ptr())
            shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
            logits = torch.empty(shape, dtype=self.logits_dtype, device=self.device)
            self.context.set_tensor_address(OUTPUT_NAME, logits.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineBuildError(f"TensorRT refused to run a batch of shape {tuple(input_ids.shape)}")
            stream.synchronize()
        return logits[:, -1, :]

    def close(self) -> None:
        # Context before engine before runtime: the order TensorRT requires them released in.
        self.context = None
        self.engine = None
        self.tensorrt = None


@dataclass(frozen=True)
class EngineFiles:
    """Where a model's exported graph and engine live in the cache."""

    onnx_dir: Path
    engine_dir: Path
    lock: Path

    @classmethod
    def in_cache(cls, cache_dir: Path, model_id: str, onnx_key: str, engine_key: str) -> EngineFiles:
        return cls(
            onnx_dir=cache_dir / "onnx" / f"{model_id}-{onnx_key[:16]}",
            engine_dir=cache_dir / "engines" / f"{model_id}-{engine_key[:16]}",
            lock=cache_dir / "locks" / f"{model_id}-{engine_key[:16]}.lock",
        )

    @property
    def engine(self) -> Path:
        return self.engine_dir / ENGINE_FILE


def write_engine(files: EngineFiles, serialized: Any, manifest: dict[str, Any]) -> None:
    """Write the engine and its manifest, each renamed into place whole."""
    files.engine_dir.mkdir(parents=True, exist_ok=True)
    for name, data in ((ENGINE_FILE, serialized), (MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())):
        staging = files.engine_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        with staging.open("wb") as handle:
            handle.write(data)
        os.replace(staging, files.engine_dir / name)


def ensure_engine(
    tensorrt: TensorRT, model_id: str, checkpoint: Path, *, spec: EngineSpec, device: torch.device, cache_dir: Path
) -> tuple[Any, Path, bool]:
    """The deserialized engine for this model, spec and GPU: from the cache, else exported and built.

    Returns (engine, engine file, whether it was built now). A cached engine TensorRT cannot deserialize
    (corrupt, or written by an incompatible build) is rebuilt.
    """
    checkpoint_sha256 = checkpoint_digest(checkpoint)
    exporter = exporter_identity()
    gpu = GpuIdentity.of(device)
    onnx_key = onnx_cache_key(checkpoint_sha256, exporter, spec)
    engine_key = engine_cache_key(checkpoint_sha256, exporter, gpu, tensorrt.version, spec)
    files = EngineFiles.in_cache(cache_dir, model_id, onnx_key, engine_key)
    with exclusive_lock(files.lock), torch.cuda.device(device):
        if files.engine.is_file():
            engine = tensorrt.runtime.deserialize_cuda_engine(files.engine.read_bytes())
            if engine is not None:
                return engine, files.engine, False
            logger.warning("model %s: cached engine %s does not load; rebuilding it", model_id, files.engine)
        started = time.perf_counter()
        onnx_path = files.onnx_dir / ONNX_FILE
        if not onnx_path.is_file():
            logger.info("model %s: exporting %s to ONNX (%s) ...", model_id, checkpoint, spec.precision)
            export_onnx(checkpoint, files.onnx_dir, precision=spec.precision, opset=spec.opset)
        logger.info("model %s: building a TensorRT %s engine for %s ...", model_id, tensorrt.version, gpu.name)
        serialized = build_serialized_engine(tensorrt.module, tensorrt.logger, onnx_path, spec)
        manifest = {
            "model_id": model_id,
            "key": engine_key,
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_sha256,
            "exporter": exporter,
            "gpu": gpu.name,
            "compute_capability": list(gpu.compute_capability),
            "tensorrt": tensorrt.version,
            "flags": asdict(spec),
            "build_seconds": round(time.perf_counter() - started, 1),
            "built_at": datetime.now(UTC).isoformat(),
        }
        write_engine(files, serialized, manifest)
        engine = tensorrt.runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise EngineBuildError(f"TensorRT cannot load the engine it has just built ({files.engine})")
        return engine, files.engine, True


# ------------------------------------------------------------------------------------------ the backend


class TensorRTBackend:
    """A causal LM run as a TensorRT engine; implements `base.Backend`. Batches run one at a time (a lock).

    `load` builds the TensorRT engine; the constructor takes any `decoding.LogitsEngine`, which is how the
    decoding and batching are tested on machines without a GPU (with ONNX Runtime in its place).
    """

    def __init__(
        self,
        model_id: str,
        engine: LogitsEngine,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: set[int],
        *,
        max_context_tokens: int,
        max_batch_size: int,
        framework: str,
        precision: str,
        engine_path: Path | None = None,
        engine_built: bool = False,
    ) -> None:
        self.model_id = model_id
        self.engine: LogitsEngine | None = engine
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_context_tokens = max_context_tokens
        self.max_batch_size = max_batch_size
        self.framework = framework
        self.precision = precision
        self.device = engine.device
        self.engine_path = engine_path
        self.engine_built = engine_built
        # One batch at a time: an execution context runs one inference at once, and the GPU has room for one.
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: ModelConfig,
        checkpoint: Path,
        *,
        device: str = "auto",
        max_batch_size: int,
        cache_dir: Path | None = None,
    ) -> TensorRTBackend:
        """Build (or load from the cache) the model's engine on the GPU (blocking: call it from a thread)."""
        trt = import_tensorrt()  # first: without TensorRT nothing else matters
        target = cuda_device(device)
        spec = EngineSpec.for_model(model.precision, max_batch_size, model.max_context_tokens)
        if spec.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"model {model.id!r}: precision bf16 needs compute capability 8.0 or later")
        tensorrt = TensorRT.start(trt)
        started = time.perf_counter()
        tokenizer, eos_token_ids = load_chat_tokenizer(checkpoint)
        engine, path, built = ensure_engine(
            tensorrt, model.id, checkpoint, spec=spec, device=target, cache_dir=cache_dir or tensorrt_cache_dir()
        )
        logger.info(
            "loaded model %s as a TensorRT %s engine (%s, batch <= %d, context %d) from %s, %s in %.1f s",
            model.id,
            tensorrt.version,
            spec.precision,
            spec.max_batch_size,
            spec.max_sequence,
            path,
            "built" if built else "cached",
            time.perf_counter() - started,
        )
        return cls(
            model.id,
            TensorRTEngine(tensorrt, engine, target),
            tokenizer,
            eos_token_ids,
            max_context_tokens=model.max_context_tokens,
            max_batch_size=spec.max_batch_size,
            framework=f"tensorrt-{tensorrt.version}",
            precision=spec.precision,
            engine_path=path,
            engine_built=built,
        )

    def require_engine(self) -> LogitsEngine:
        if self.engine is None:
            raise RuntimeError(f"backend for {self.model_id} is closed")
        return self.engine

    # --------------------------------------------------------------- generation

    async def agenerate(
        self, batch: list[GenerationInput], on_delta: DeltaSink | None = None
    ) -> list[GenerationOutput]:
        """`generate` in a thread, so the event loop keeps serving Kafka; OOM becomes BatchTooLargeError.

        Not streamed yet: each answer comes whole (`on_delta` is unused), and a streaming caller gets it in one piece.
        """
        try:
            return await asyncio.to_thread(self.generate, batch)
        except torch.OutOfMemoryError as error:
            raise BatchTooLargeError(f"batch of {len(batch)} did not fit on {self.device}") from error

    def generate(self, batch: list[GenerationInput]) -> list[GenerationOutput]:
        """Run one batch; output order = input order. Bad requests get an error output of their own."""
        engine = self.require_engine()
        with self._lock, torch.inference_mode():
            outputs: dict[int, GenerationOutput] = {}
            runnable: list[tuple[int, GenerationInput, list[int]]] = []
            for index, request in enumerate(batch):
                encoded = encode_request(self.tokenizer, index, request, self.max_context_tokens)
                if isinstance(encoded, GenerationOutput):
                    outputs[index] = encoded
                else:
                    runnable.append((encoded.index, encoded.request, encoded.prompt_ids))
            for start in range(0, len(runnable), self.max_batch_size):  # the engine's profile caps the batch
                chunk = runnable[start : start + self.max_batch_size]
                results = decode_batch(
                    engine, self.tokenizer, self.eos_token_ids, [(request, ids) for _, request, ids in chunk]
                )
                for (index, _, _), output in zip(chunk, results, strict=True):
                    outputs[index] = output
            return [outputs[index] for index in range(len(batch))]

    # ------------------------------------------------------------ registry, closing

    def info(self) -> BackendInfo:
        """Registry metadata: the engine's runtime, GPU, precision and batch limit."""
        return BackendInfo(
            backend="tensorrt",
            framework=self.framework,
            device=str(self.device),
            precision=self.precision,
            max_batch_size=self.max_batch_size,
        )

    def close(self) -> None:
        """Free the engine; the backend cannot generate afterwards."""
        if self.engine is None:
            return
        with self._lock:
            self.engine.close()
            self.engine = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        logger.info("closed model %s", self.model_id)
