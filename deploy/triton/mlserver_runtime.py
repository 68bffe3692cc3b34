"""An MLServer runtime serving an HF causal LM with Triton's LLM input/output convention, on CPU.

It stands in for a Triton server (the KServe v2 / Open Inference Protocol is the same on the wire), so the
worker's `triton` backend can be tested against a real server. It runs inside MLServer's own virtualenv
(deploy/triton/mlserver.sh), not the project's: it imports nothing from the project.

Tensors, as the TensorRT-LLM ensemble names them (batch dimension first, one row per request):

| name | type | shape | |
|---|---|---|---|
| text_input | BYTES | [B, 1] | the prompt, already rendered (the chat template is the client's job) |
| max_tokens | INT32 | [B, 1] | |
| temperature | FP32 | [B, 1] | optional, default 1.0; <= 0 is greedy |
| top_p | FP32 | [B, 1] | optional, default 1.0 |
| random_seed | UINT64 | [B, 1] | optional: every row is seeded when it is present |
| stop_words | BYTES | [B, N] | optional; rows padded with empty strings |
| text_output | BYTES | [B, 1] | the completion only, without the prompt |
| prompt_tokens, completion_tokens | INT32 | [B, 1] | extra outputs: token counts (EOS counts) |
| finish_reason | BYTES | [B, 1] | extra output: `stop` or `length` |

`max_batch_size` (model-settings `parameters.extra.max_batch_size`): a bigger request is refused with an
invalid-argument error, as Triton refuses one. MLServer has no ModelConfig RPC to report it, and its
metadata `parameters` are not in Triton's protocol (tritonclient drops them), so clients must know it.

There is no streaming: MLServer's `ModelStreamInfer` answers with bare `ModelInferResponse` messages where
Triton's protocol has `ModelStreamInferResponse`, so tritonclient's `stream_infer` cannot read it anyway.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    RequestInput,
    ResponseOutput,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

DEFAULT_MAX_BATCH_SIZE = 8


class InvalidRequestError(MLServerError):
    """A request the model cannot run (gRPC INVALID_ARGUMENT, HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400)


@dataclass(frozen=True)
class Row:
    """One request of a batch."""

    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


INPUTS = [
    MetadataTensor(name="text_input", datatype="BYTES", shape=[-1, 1]),
    MetadataTensor(name="max_tokens", datatype="INT32", shape=[-1, 1]),
    MetadataTensor(name="temperature", datatype="FP32", shape=[-1, 1], parameters={"optional": True}),
    MetadataTensor(name="top_p", datatype="FP32", shape=[-1, 1], parameters={"optional": True}),
    MetadataTensor(name="random_seed", datatype="UINT64", shape=[-1, 1], parameters={"optional": True}),
    MetadataTensor(name="stop_words", datatype="BYTES", shape=[-1, -1], parameters={"optional": True}),
]
OUTPUTS = [
    MetadataTensor(name="text_output", datatype="BYTES", shape=[-1, 1]),
    MetadataTensor(name="prompt_tokens", datatype="INT32", shape=[-1, 1]),
    MetadataTensor(name="completion_tokens", datatype="INT32", shape=[-1, 1]),
    MetadataTensor(name="finish_reason", datatype="BYTES", shape=[-1, 1]),
]


class HFTextGenerationRuntime(MLModel):
    """A transformers causal LM; one batch at a time (generate is not re-entrant on one model)."""

    async def load(self) -> bool:
        path = self.settings.parameters.uri if self.settings.parameters else None
        if not path:
            raise MLServerError("model-settings parameters.uri must name the checkpoint directory")
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self.max_batch_size = int(extra.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # decoder-only: pads first, generation continues from the end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self._lock = threading.Lock()
        self.inputs = INPUTS
        self.outputs = OUTPUTS
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = decode_rows(payload)
        if len(rows) > self.max_batch_size:
            raise InvalidRequestError(f"batch of {len(rows)} exceeds max_batch_size {self.max_batch_size}")
        completions = await asyncio.to_thread(self.generate, rows)
        return InferenceResponse(
            id=payload.id, model_name=self.name, model_version=self.version, outputs=encode_outputs(completions)
        )

    # ------------------------------------------------------------- generation

    def generate(self, rows: Sequence[Row]) -> list[Completion]:
        """Rows with equal sampling settings share one `generate()` call; output order = input order."""
        with self._lock, torch.inference_mode():
            results: dict[int, Completion] = {}
            for group in group_rows(rows):
                for index, completion in zip(group, self._generate_group([rows[i] for i in group]), strict=True):
                    results[index] = completion
            return [results[index] for index in range(len(rows))]

    def _generate_group(self, rows: list[Row]) -> list[Completion]:
        prompt_ids = [self.tokenizer(row.prompt, add_special_tokens=False)["input_ids"] for row in rows]
        padded = self.tokenizer.pad(
            {"input_ids": prompt_ids}, padding=True, return_attention_mask=True, return_tensors="pt"
        )
        width = padded["input_ids"].shape[1]
        with seeded(rows[0].seed if rows[0].temperature > 0 else None):
            sequences = self.model.generate(**padded, generation_config=self._generation_config(rows))
        return [
            self._finish(row, len(ids), tokens)
            for row, ids, tokens in zip(rows, prompt_ids, sequences[:, width:].tolist(), strict=True)
        ]

    def _generation_config(self, rows: Sequence[Row]) -> GenerationConfig:
        first = rows[0]
        common: dict[str, Any] = {
            "max_new_tokens": max(row.max_tokens for row in rows),
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "eos_token_id": sorted(self.eos_token_ids) or None,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if first.temperature <= 0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0, **common)

    def _finish(self, row: Row, prompt_tokens: int, new_tokens: list[int]) -> Completion:
        """Cut at max_tokens, the first EOS (counted) and the first stop string."""
        tokens = new_tokens[: row.max_tokens]
        hit_eos = False
        for position, token in enumerate(tokens):
            if token in self.eos_token_ids:
                tokens, hit_eos = tokens[: position + 1], True
                break
        text = self.decode(tokens)
        stops = [stop for stop in row.stops if stop]
        cuts = [position for stop in stops if (position := text.find(stop)) >= 0]
        if cuts:
            kept = next(n for n in range(1, len(tokens) + 1) if any(s in self.decode(tokens[:n]) for s in stops))
            return Completion(text[: min(cuts)], prompt_tokens, kept, "stop")
        ran_out = len(tokens) >= row.max_tokens and not hit_eos
        return Completion(text, prompt_tokens, len(tokens), "length" if ran_out else "stop")

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {configured} if isinstance(configured, int) else set(configured)


def group_rows(rows: Sequence[Row]) -> list[list[int]]:
    """Indices of rows that can share a `generate()` call: greedy together, seeded alone."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, row in enumerate(rows):
        if row.temperature <= 0:
            key: tuple[Any, ...] = ("greedy",)
        elif row.seed is not None:
            key = ("seeded", index)
        else:
            key = ("sample", row.temperature, row.top_p)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------ tensors


def decode_rows(payload: InferenceRequest) -> list[Row]:
    """The batch's rows from the request's tensors; a missing or malformed tensor is an invalid request."""
    inputs = {tensor.name: tensor for tensor in payload.inputs}
    if "text_input" not in inputs or "max_tokens" not in inputs:
        raise InvalidRequestError("inputs text_input (BYTES) and max_tokens (INT32) are required")
    prompts = strings(inputs["text_input"])
    count = len(prompts)
    max_tokens = column(inputs["max_tokens"], count, int)
    temperature = column(inputs.get("temperature"), count, float, 1.0)
    top_p = column(inputs.get("top_p"), count, float, 1.0)
    seeds = column(inputs.get("random_seed"), count, int, 0)
    stops = stop_lists(inputs.get("stop_words"), count)
    rows = []
    for index in range(count):
        if max_tokens[index] < 1:
            raise InvalidRequestError(f"row {index}: max_tokens must be at least 1")
        if not 0 < top_p[index] <= 1:
            raise InvalidRequestError(f"row {index}: top_p must be in (0, 1]")
        seed = seeds[index] if "random_seed" in inputs else None
        rows.append(Row(prompts[index], max_tokens[index], temperature[index], top_p[index], seed, stops[index]))
    return rows


def strings(tensor: RequestInput) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else str(item) for item in StringCodec.decode_input(tensor)]


def column(tensor: RequestInput | None, count: int, kind: type, default: Any = None) -> list[Any]:
    """One value per row from a [B, 1] tensor (or the default for every row when the tensor is absent)."""
    if tensor is None:
        return [default] * count
    values = np.asarray(NumpyCodec.decode_input(tensor)).reshape(-1)
    if len(values) != count:
        raise InvalidRequestError(f"{tensor.name}: {len(values)} values for {count} rows")
    return [kind(value) for value in values.tolist()]


def stop_lists(tensor: RequestInput | None, count: int) -> list[list[str]]:
    if tensor is None:
        return [[] for _ in range(count)]
    flat = strings(tensor)
    if count == 0 or len(flat) % count:
        raise InvalidRequestError(f"stop_words: {len(flat)} strings do not fill {count} rows")
    width = len(flat) // count
    return [[stop for stop in flat[row * width : (row + 1) * width] if stop] for row in range(count)]


def encode_outputs(completions: Sequence[Completion]) -> list[ResponseOutput]:
    count = len(completions)

    def text(name: str, values: list[str]) -> ResponseOutput:
        return ResponseOutput(name=name, datatype="BYTES", shape=[count, 1], data=[v.encode() for v in values])

    def int32(name: str, values: list[int]) -> ResponseOutput:
        return ResponseOutput(name=name, datatype="INT32", shape=[count, 1], data=values)

    return [
        text("text_output", [c.text for c in completions]),
        int32("prompt_tokens", [c.prompt_tokens for c in completions]),
        int32("completion_tokens", [c.completion_tokens for c in completions]),
        text("finish_reason", [c.finish_reason for c in completions]),
    ]
