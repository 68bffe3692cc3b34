"""The Triton backend: a model served by a Triton Inference Server (or any server of the KServe v2 / Open
Inference Protocol over gRPC), called with `tritonclient.grpc.aio`.

What goes over the wire follows the TensorRT-LLM ensemble's conventions for LLMs (batch dimension first,
one row per request): `text_input` BYTES, `max_tokens` INT32, and when the model declares them
`temperature` FP32, `top_p` FP32, `random_seed` UINT64, `stop_words` BYTES [B, N] (rows padded with empty
strings) and `stream` BOOL; back comes `text_output` BYTES (the completion without the prompt) and, when
the model declares them, `prompt_tokens` / `completion_tokens` INT32 and `finish_reason` BYTES.

The prompt: Triton LLM models take raw text, so the chat template is applied here. With `path` set on the
model (an HF tokenizer directory, e.g. the checkpoint the engine was built from) the messages go through
that tokenizer's chat template, exactly as the torch backend renders them; a message holding one of the
tokenizer's control tokens (e.g. `<|user|>`) is refused with an error output, because the server would
read it as a real control token and a user could forge a turn. Without `path`, a plain documented format
is used: one `<|role|>\\ncontent\\n` block per message, then `<|assistant|>\\n`.

At load (blocking, in the worker's loading thread) the server must be live and ready and the model ready;
the model's metadata tells which inputs it takes and its configuration its `max_batch_size` and preferred
batch sizes (a server without Triton's ModelConfig RPC, such as MLServer, tells neither: the pool's
`max_batch_size` is used then). Batches bigger than that are split and the parts sent at once
(the server's dynamic batcher merges them again). Errors: an unreachable or unavailable server, a timeout
or any other server failure is a TransientBackendError (the worker retries the batch); an INVALID_ARGUMENT
answer is the request's own fault, so the part is retried row by row and each failing row gets an error
output.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException

from services.worker.backends.base import (
    BackendInfo,
    DeltaSink,
    GenerationInput,
    GenerationOutput,
    TransientBackendError,
)
from shared.messages import ChatMessage
from shared.settings import ModelConfig

logger = logging.getLogger(__name__)

REQUIRED_INPUTS = ("text_input", "max_tokens")
# gRPC codes that say the request itself is wrong: answered per request, never retried.
INVALID_REQUEST_CODES = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"}
# Rows per call when neither the server nor the caller gives a batch limit.
DEFAULT_CALL_SIZE = 8


class TritonModelNotReadyError(RuntimeError):
    """The server or the model is not ready at load: the worker must not start serving it."""


@dataclass(frozen=True)
class ModelSignature:
    """What the server says about the model: its inputs, outputs and how big a call may be."""

    inputs: dict[str, str]  # name -> datatype
    outputs: set[str]
    max_batch_size: int  # 0: the model has no batch dimension (one request per call)
    preferred_batch_sizes: tuple[int, ...] = ()
    platform: str = ""
    reported: bool = True  # False: the server has no ModelConfig, max_batch_size is the worker's own limit

    @property
    def call_size(self) -> int:
        """Rows per call: the largest preferred size, else the model's max batch size."""
        if self.max_batch_size == 0:
            return 1
        if self.preferred_batch_sizes:
            return min(max(self.preferred_batch_sizes), self.max_batch_size)
        return self.max_batch_size


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a streamed completion; the last one also carries the whole output (counts, finish reason)."""

    text: str
    output: GenerationOutput | None = None


class TritonBackend:
    """A model on a Triton (KServe v2 gRPC) server; implements `base.Backend`."""

    def __init__(
        self,
        config: ModelConfig,
        signature: ModelSignature,
        server_version: str,
        tokenizer: Any | None = None,
    ) -> None:
        self.model_id = config.id
        self.config = config
        self.url = cast(str, config.endpoint)
        self.model_name = config.upstream_model or config.id
        self.model_version = config.version
        self.signature = signature
        self.server_version = server_version
        self.tokenizer = tokenizer
        self.control_tokens = control_tokens_of(tokenizer)
        # grpc.aio channels belong to the event loop that made them: created on first use, in the worker's loop.
        self._client: aiogrpcclient.InferenceServerClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, config: ModelConfig, tokenizer_path: Path | None = None, max_batch_size: int = DEFAULT_CALL_SIZE
    ) -> TritonBackend:
        """Check the server and the model are ready and read the model's signature (blocking).

        `max_batch_size` (the pool's) is the call size when the server does not report the model's own.
        """
        if config.endpoint is None:
            raise ValueError(f"model {config.id!r}: the triton backend needs `endpoint` (host:port)")
        name, version = config.upstream_model or config.id, config.version
        client = grpcclient.InferenceServerClient(url=config.endpoint)
        try:
            server_version = check_ready(client, config.endpoint, name, version, config.timeout_s)
            signature = read_signature(client, name, version, config.timeout_s, max_batch_size)
        finally:
            client.close()
        missing = [tensor for tensor in REQUIRED_INPUTS if tensor not in signature.inputs]
        if missing or "text_output" not in signature.outputs:
            raise TritonModelNotReadyError(
                f"model {name!r} at {config.endpoint} does not follow the LLM convention: it needs inputs "
                f"{list(REQUIRED_INPUTS)} and output text_output (inputs: {sorted(signature.inputs)}, "
                f"outputs: {sorted(signature.outputs)})"
            )
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
        logger.info(
            "triton model %s: %s version %s at %s (server %s), max_batch_size %d, %d rows per call",
            config.id,
            name,
            version,
            config.endpoint,
            server_version,
            signature.max_batch_size,
            signature.call_size,
        )
        return cls(config, signature, server_version, tokenizer)

    def info(self) -> BackendInfo:
        """Registry metadata: the engine is remote, so device and precision are the server's business."""
        return BackendInfo(
            backend="triton",
            framework=f"triton-{self.server_version}".replace(" ", "-"),
            device="remote",
            precision=self.config.precision,
            version=self.model_version,
            max_batch_size=(self.signature.max_batch_size or 1) if self.signature.reported else None,
        )

    # --------------------------------------------------------------- prompts

    def render_prompt(self, request: GenerationInput) -> str:
        """The raw prompt Triton gets (see the module docstring for the two formats); a text prompt as it is."""
        if request.prompt_format == "text":
            return request.messages[0].content
        conversation = [{"role": message.role, "content": message.content} for message in request.messages]
        if self.tokenizer is None:
            return "".join(f"<|{turn['role']}|>\n{turn['content']}\n" for turn in conversation) + "<|assistant|>\n"
        return cast(str, self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))

    def forged_control_token(self, messages: Sequence[ChatMessage]) -> str | None:
        """A control token a message's text holds, if any (it would become a real one on the server)."""
        for message in messages:
            for token in self.control_tokens:
                if token in message.content:
                    return token
        return None

    # ------------------------------------------------------------ generation

    async def agenerate(
        self, batch: list[GenerationInput], on_delta: DeltaSink | None = None
    ) -> list[GenerationOutput]:
        """Split the batch into calls of the model's size, send them at once; output order = input order.

        Not streamed: each answer comes whole (`on_delta` is unused), and a streaming caller gets it in one piece.
        """
        outputs: dict[int, GenerationOutput] = {}
        runnable: list[tuple[int, GenerationInput, str]] = []
        for index, request in enumerate(batch):
            if token := self.forged_control_token(request.messages):
                outputs[index] = error_output(request, f"a message contains the control token {token!r}")
            else:
                runnable.append((index, request, self.render_prompt(request)))
        size = self.signature.call_size
        parts = [runnable[start : start + size] for start in range(0, len(runnable), size)]
        for part, results in zip(parts, await asyncio.gather(*(self._run_part(part) for part in parts)), strict=True):
            for (index, _, _), output in zip(part, results, strict=True):
                outputs[index] = output
        return [outputs[index] for index in range(len(batch))]

    async def _run_part(self, part: list[tuple[int, GenerationInput, str]]) -> list[GenerationOutput]:
        """One call; on INVALID_ARGUMENT each row alone, so only the bad rows get an error output."""
        requests = [request for _, request, _ in part]
        prompts = [prompt for _, _, prompt in part]
        try:
            return await self._infer(requests, prompts)
        except InferenceServerException as error:
            if error.status() not in INVALID_REQUEST_CODES:
                raise TransientBackendError(f"triton {self.url}: {error}") from error
            if len(part) == 1:
                return [error_output(requests[0], f"the model refused the request: {error.message()}")]
        return [output for row in part for output in await self._run_part([row])]

    async def _infer(self, requests: list[GenerationInput], prompts: list[str]) -> list[GenerationOutput]:
        client = self._aio_client()
        inputs = self._input_tensors(requests, prompts, stream=False)
        outputs = [grpcclient.InferRequestedOutput(name) for name in self._wanted_outputs()]
        result = await client.infer(
            self.model_name,
            inputs,
            model_version=self.model_version,
            outputs=outputs,
            client_timeout=self.config.timeout_s,
        )
        texts = strings_of(result.as_numpy("text_output"))
        if len(texts) != len(requests):
            raise TransientBackendError(f"triton {self.url}: {len(texts)} outputs for {len(requests)} requests")
        return [
            self._output(request, prompt, text, result, row)
            for row, (request, prompt, text) in enumerate(zip(requests, prompts, texts, strict=True))
        ]

    async def astream(self, request: GenerationInput) -> AsyncIterator[StreamChunk]:
        """Stream one request through the gRPC bidirectional stream (Triton's decoupled mode).

        Not part of `base.Backend` yet (streaming responses are an open issue). Pieces come as the
        server sends them; the last chunk carries the whole output.
        """
        if token := self.forged_control_token(request.messages):
            yield StreamChunk("", error_output(request, f"a message contains the control token {token!r}"))
            return
        prompt = self.render_prompt(request)
        inputs = self._input_tensors([request], [prompt], stream=True)
        outputs = [grpcclient.InferRequestedOutput(name) for name in self._wanted_outputs()]

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.model_name,
                "model_version": self.model_version,
                "inputs": inputs,
                "outputs": outputs,
                "request_id": request.request_id,
            }

        text, last = "", None
        try:
            responses = self._aio_client().stream_infer(one_request(), stream_timeout=self.config.timeout_s)
            async for result, error in responses:
                if error is not None:
                    yield StreamChunk("", error_output(request, f"the model refused the request: {error}"))
                    return
                piece = strings_of(result.as_numpy("text_output"))[0]
                text, last = text + piece, result
                if piece:
                    yield StreamChunk(piece)
                if optional_string(result, "finish_reason"):
                    break  # our convention's last response; Triton's own stream also ends here
        except InferenceServerException as error:
            raise TransientBackendError(f"triton {self.url}: {error}") from error
        yield StreamChunk("", self._output(request, prompt, text, last, 0))

    # -------------------------------------------------------------- tensors

    def _input_tensors(
        self, requests: list[GenerationInput], prompts: list[str], *, stream: bool
    ) -> list[grpcclient.InferInput]:
        """The request tensors the model declares, with a batch dimension when it has one."""
        declared = self.signature.inputs
        batched = self.signature.max_batch_size > 0
        columns: dict[str, np.ndarray] = {
            "text_input": np.array([prompt.encode() for prompt in prompts], dtype=np.object_),
            "max_tokens": np.array([request.max_tokens for request in requests], dtype=np.int32),
            "temperature": np.array([request.temperature for request in requests], dtype=np.float32),
            "top_p": np.array([request.top_p for request in requests], dtype=np.float32),
            "stream": np.array([stream] * len(requests), dtype=bool),
        }
        if any(request.seed is not None for request in requests):
            # One seed per row: rows without one get a fresh random seed, so they still sample freely.
            seeds = [request.seed if request.seed is not None else random.getrandbits(63) for request in requests]
            columns["random_seed"] = np.array(seeds, dtype=np.uint64)
        tensors = []
        for name, values in columns.items():
            if name in declared:
                tensors.append(make_input(name, values.reshape(-1, 1) if batched else values.reshape(-1)))
        if "stop_words" in declared and any(request.stop for request in requests):
            tensors.append(make_input("stop_words", stop_words_array(requests, batched)))
        return tensors

    def _wanted_outputs(self) -> list[str]:
        extras = ("prompt_tokens", "completion_tokens", "finish_reason")
        return ["text_output", *(name for name in extras if name in self.signature.outputs)]

    def _output(
        self, request: GenerationInput, prompt: str, text: str, result: Any | None, row: int
    ) -> GenerationOutput:
        """The output of one row: counts and finish reason from the server when it sends them, else estimated."""
        prompt_tokens = optional_int(result, "prompt_tokens", row)
        completion_tokens = optional_int(result, "completion_tokens", row)
        if prompt_tokens is None:
            prompt_tokens = self.count_tokens(prompt)
        if completion_tokens is None:
            completion_tokens = self.count_tokens(text)
        reason = optional_string(result, "finish_reason", row)
        finish: Literal["stop", "length"]
        if reason in ("stop", "length"):
            finish = cast(Literal["stop", "length"], reason)
        else:
            finish = "length" if completion_tokens >= request.max_tokens else "stop"
        return GenerationOutput(request.request_id, text, prompt_tokens, completion_tokens, finish)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with the local tokenizer; without one, a rough estimate (4 characters a token)."""
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return (len(text) + 3) // 4

    # ------------------------------------------------------------------ client

    def _aio_client(self) -> aiogrpcclient.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = aiogrpcclient.InferenceServerClient(url=self.url)
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the gRPC channel (from the loop that used it)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def close(self) -> None:
        """Close the channel: scheduled on the running loop if there is one, else left to garbage collection."""
        if self._client is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._client = None  # no loop: the channel dies with its loop
            return
        if loop is self._client_loop:
            self._close_task = loop.create_task(self.aclose())


# ---------------------------------------------------------------- load checks


def check_ready(client: grpcclient.InferenceServerClient, url: str, name: str, version: str, timeout: float) -> str:
    """The server's version, once server and model are ready; a clear error naming what is not."""
    try:
        if not client.is_server_live(client_timeout=timeout):
            raise TritonModelNotReadyError(f"triton server at {url} is not live")
        if not client.is_server_ready(client_timeout=timeout):
            raise TritonModelNotReadyError(f"triton server at {url} is live but not ready")
        metadata = client.get_server_metadata(client_timeout=timeout)
    except InferenceServerException as error:
        if error.status() == "StatusCode.UNAVAILABLE":
            raise TransientBackendError(f"triton server at {url} is unreachable: {error.message()}") from error
        raise TritonModelNotReadyError(f"triton server at {url}: {error}") from error
    if not model_ready(client, name, version, timeout):
        available = repository_models(client, timeout)
        raise TritonModelNotReadyError(
            f"model {name!r} version {version} is not ready on the triton server at {url} "
            f"(models there: {', '.join(available) or 'not listed'})"
        )
    return f"{metadata.name} {metadata.version}".strip()


def model_ready(client: grpcclient.InferenceServerClient, name: str, version: str, timeout: float) -> bool:
    """Triton answers false for a model it does not serve; other servers (MLServer) answer NOT_FOUND."""
    try:
        return bool(client.is_model_ready(name, version, client_timeout=timeout))
    except InferenceServerException as error:
        if error.status() == "StatusCode.UNAVAILABLE":
            raise TransientBackendError(f"triton server is unreachable: {error.message()}") from error
        logger.info("model %s version %s: readiness check failed: %s", name, version, error)
        return False


def repository_models(client: grpcclient.InferenceServerClient, timeout: float) -> list[str]:
    """Names in the server's model repository, when it lists them (not every server does)."""
    try:
        index = client.get_model_repository_index(client_timeout=timeout)
    except InferenceServerException:
        return []
    return sorted(model.name for model in index.models)


def read_signature(
    client: grpcclient.InferenceServerClient, name: str, version: str, timeout: float, fallback_batch_size: int
) -> ModelSignature:
    """Inputs and outputs from the metadata; batch sizes from the model config when the server has one."""
    metadata = client.get_model_metadata(name, version, client_timeout=timeout)
    inputs = {tensor.name: tensor.datatype for tensor in metadata.inputs}
    outputs = {tensor.name for tensor in metadata.outputs}
    try:
        config = client.get_model_config(name, version, client_timeout=timeout).config
    except InferenceServerException:
        # Triton always answers; other KServe v2 servers (MLServer) do not implement ModelConfig: the
        # worker's own batch limit is then the call size, and the model's batch dimension is assumed.
        return ModelSignature(inputs, outputs, fallback_batch_size, (), metadata.platform, reported=False)
    preferred = tuple(config.dynamic_batching.preferred_batch_size)
    return ModelSignature(inputs, outputs, config.max_batch_size, preferred, metadata.platform)


def load_tokenizer(path: Path) -> Any:
    """The HF tokenizer whose chat template renders prompts (local files only)."""
    from transformers import AutoTokenizer  # seconds to import: only when a tokenizer is configured

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def control_tokens_of(tokenizer: Any | None) -> list[str]:
    """The tokenizer's special tokens as text (what a user must not be able to type into a prompt)."""
    if tokenizer is None:
        return []
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]
    return sorted({*tokenizer.all_special_tokens, *added} - {""})


# ---------------------------------------------------------------- tensors


def make_input(name: str, values: np.ndarray) -> grpcclient.InferInput:
    datatype = "BYTES" if values.dtype == np.object_ else grpcclient.np_to_triton_dtype(values.dtype)
    tensor = grpcclient.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def stop_words_array(requests: Sequence[GenerationInput], batched: bool) -> np.ndarray:
    """[B, N] stop strings, rows padded with empty strings (which stop nothing)."""
    width = max(len(request.stop) for request in requests)
    rows = [[stop.encode() for stop in request.stop] + [b""] * (width - len(request.stop)) for request in requests]
    array = np.array(rows, dtype=np.object_)
    return array if batched else array.reshape(-1)


def strings_of(array: np.ndarray | None) -> list[str]:
    if array is None:
        return []
    return [item.decode() if isinstance(item, bytes) else str(item) for item in array.reshape(-1).tolist()]


def optional_int(result: Any | None, name: str, row: int = 0) -> int | None:
    array = result.as_numpy(name) if result is not None else None
    if array is None or array.size <= row:
        return None
    return int(array.reshape(-1)[row])


def optional_string(result: Any | None, name: str, row: int = 0) -> str | None:
    values = strings_of(result.as_numpy(name)) if result is not None else []
    return values[row] if len(values) > row else None


def error_output(request: GenerationInput, message: str) -> GenerationOutput:
    return GenerationOutput(request.request_id, "", 0, 0, "error", error=message, error_code="rejected_by_backend")
