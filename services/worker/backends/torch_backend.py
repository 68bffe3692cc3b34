"""The PyTorch / transformers backend: any local HF-format causal LM, batched with left padding.

How a batch runs:
1. Each request's messages go through the model's chat template (control tokens inside user text are
   encoded as plain text, so a user cannot forge a `<|system|>` turn). A prompt that leaves no room for
   `max_tokens` gets an error output of its own; the rest of the batch still runs.
2. The remaining requests are grouped by sampling settings, because `generate()` takes one setting per
   call: all greedy requests together, unseeded sampling requests by (temperature, top_p), and every
   seeded request alone. A seeded request runs by itself under its own seed, so the same seed and
   prompt give the same text whatever else was in the batch (batch companions would otherwise draw
   from the same random stream and shift it).
3. Each group runs with the largest `max_tokens` of the group; a per-row stopping criterion ends each
   row at its own `max_tokens` or stop string, and the output is cut again afterwards, exactly.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from jinja2.exceptions import TemplateError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as transformers_logging

from services.worker.backends.base import (
    BackendInfo,
    BatchTooLargeError,
    DeltaSink,
    GenerationInput,
    GenerationOutput,
    PermanentBackendError,
)

logger = logging.getLogger(__name__)


@contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' tqdm bars (loading/saving weights): noise in service logs."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA on a machine without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(device)


def dtype_for(device: torch.device) -> torch.dtype:
    # Half precision halves memory and is fast on GPUs; on CPUs fp16 matmuls are slow, so keep fp32.
    return torch.float16 if device.type == "cuda" else torch.float32


FLOAT_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is fp16 on CUDA and fp32 on CPU; int8 (dynamic quantization) exists on CPU only."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision int8 is dynamic quantization of Linear layers, which runs on CPU only")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision bf16 needs a GPU that supports bfloat16 (compute capability 8.0+)")
    return precision


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Dynamic int8 quantization of every Linear layer: weights int8, activations quantized on the fly."""
    return cast(PreTrainedModel, torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8))


@dataclass(frozen=True)
class EncodedRequest:
    """A request whose prompt fits: its position in the batch and its prompt token ids."""

    index: int
    request: GenerationInput
    prompt_ids: list[int]


def sampling_group_key(index: int, request: GenerationInput) -> tuple[Any, ...]:
    """Requests with equal keys can share one `generate()` call."""
    if request.greedy:
        return ("greedy",)  # top_p and seed do not change an argmax
    if request.seed is not None:
        return ("seeded", index)  # alone: see the module docstring
    return ("sample", request.temperature, request.top_p)


def group_by_sampling(encoded: Sequence[EncodedRequest]) -> list[list[EncodedRequest]]:
    groups: dict[tuple[Any, ...], list[EncodedRequest]] = {}
    for item in encoded:
        groups.setdefault(sampling_group_key(item.index, item.request), []).append(item)
    return list(groups.values())


def effective_stops(request: GenerationInput) -> list[str]:
    return [stop for stop in request.stop if stop]  # an empty stop string would cut everything


def first_stop_position(text: str, stops: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string starts, or None."""
    positions = [position for stop in stops if (position := text.find(stop)) >= 0]
    return min(positions) if positions else None


class PerRowStoppingCriteria(StoppingCriteria):
    """Ends each row at its own `max_tokens` or stop string, or when its request is cancelled: a finished row
    is padded from then on, and the whole call returns as soon as every row is done instead of running to
    the group's largest max_tokens.

    Stop strings are searched in the decoded tail only (enough tokens to hold the longest stop string);
    this is an early exit, not the final word: outputs are cut exactly after generation.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, requests: Sequence[GenerationInput]
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.requests = requests
        self.max_tokens = [request.max_tokens for request in requests]
        self.stops = [effective_stops(request) for request in requests]
        # Each token holds at least one byte (or character), so this many tokens cover any stop string.
        self.tail_tokens = [max((len(s.encode()) for s in stops), default=0) + 2 for stops in self.stops]
        self.cancelled_at: dict[int, int] = {}  # row -> tokens it had when its request was cancelled

    def kept_tokens(self, generated: int) -> list[int]:
        """How many generated tokens each row keeps: a cancelled row only what it had (then it got pads)."""
        return [self.cancelled_at.get(row, generated) for row in range(len(self.requests))]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width :]
        done = [self.row_done(row, generated[row]) for row in range(generated.shape[0])]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))

    def row_done(self, row: int, generated: torch.Tensor) -> bool:
        """Whether row `row` (of the requests given at construction) is done after its `generated` tokens."""
        if row in self.cancelled_at or generated.shape[0] >= self.max_tokens[row]:
            return True
        if self.requests[row].is_cancelled():
            self.cancelled_at[row] = generated.shape[0]
            return True
        if not self.stops[row]:
            return False
        tail = decode_text(self.tokenizer, generated[-self.tail_tokens[row] :].tolist())
        return first_stop_position(tail, self.stops[row]) is not None


class StepStreamer(BaseStreamer):
    """Hands each decoding step of one `generate()` call (a token per row) from its thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, steps: StepQueue, rows: list[int]) -> None:
        self.loop = loop
        self.steps = steps
        self.rows = rows  # batch index of each row of this call
        self._prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_skipped:  # generate() first hands over the prompt itself
            self._prompt_skipped = True
            return
        self.loop.call_soon_threadsafe(self.steps.put_nowait, (self.rows, value.view(-1).tolist()))

    def end(self) -> None:
        """Nothing to do: the end of the whole batch is signalled once, after its last call."""


StepQueue = asyncio.Queue[tuple[list[int], list[int]] | None]


class VisibleText:
    """One streamed row's answer, released as it grows: never part of a stop string, never half a character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], request: GenerationInput) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_tokens = request.max_tokens
        self.stops = effective_stops(request)
        # Text that could still turn out to be the start of a stop string is held back until it cannot.
        self.holdback = max((len(stop) for stop in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.shown = ""

    def add(self, token: int) -> str:
        """Take the row's next token; the text it makes safe to show ("" when none yet)."""
        if len(self.tokens) >= self.max_tokens:
            return ""  # a finished row keeps getting pad tokens while the others run
        self.tokens.append(token)
        text = decode_text(self.tokenizer, cut_at_eos(self.tokens, self.eos_token_ids)[0])
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character split across tokens: wait for the rest
        cut = first_stop_position(text, self.stops)
        visible = text[:cut] if cut is not None else text[: len(text) - self.holdback]
        return self._show(visible)

    def finish(self, final_text: str) -> str:
        """What of the final text was not shown yet."""
        if not final_text.startswith(self.shown):
            logger.warning("streamed text diverged from the final text; the result holds the final one")
            return ""
        return self._show(final_text)

    def _show(self, visible: str) -> str:
        if len(visible) <= len(self.shown) or not visible.startswith(self.shown):
            return ""
        delta, self.shown = visible[len(self.shown) :], visible
        return delta


class TorchBackend:
    """A causal LM loaded with transformers; implements `base.Backend`. `generate` is serialised by a lock."""

    def __init__(
        self,
        model_id: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        max_context_tokens: int,
        *,
        precision: str = "fp32",
    ) -> None:
        self.model_id = model_id
        self.precision = precision
        self.model: PreTrainedModel | None = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_context_tokens = max_context_tokens
        self.eos_token_ids = self._eos_token_ids()
        # One batch at a time: seeded runs reseed torch's global RNG, and the GPU has room for one batch.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, model_id: str, path: Path, *, device: str = "auto", max_context_tokens: int, precision: str = "auto"
    ) -> TorchBackend:
        """Load a checkpoint directory (never the network) onto `device` (`auto`, `cpu` or `cuda`)."""
        started = time.perf_counter()
        target = resolve_device(device)
        chosen = resolve_precision(precision, target)
        with quiet_transformers_progress():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            dtype = FLOAT_PRECISIONS.get(chosen, torch.float32)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        prepare_tokenizer_for_batching(tokenizer)
        model.to(target).eval()  # type: ignore[arg-type]  # transformers' wrapped .to() confuses mypy
        if chosen == "int8":
            model = quantize_int8(model)  # type: ignore[assignment]  # still a PreTrainedModel
        warn_if_context_exceeds_model(model_id, model, max_context_tokens)
        logger.info(
            "loaded model %s from %s on %s (%s): %d parameters in %.2f s",
            model_id,
            path,
            target,
            chosen,
            sum(parameter.numel() for parameter in model.parameters()),
            time.perf_counter() - started,
        )
        return cls(model_id, model, tokenizer, target, max_context_tokens, precision=chosen)

    def require_model(self) -> PreTrainedModel:
        if self.model is None:
            raise RuntimeError(f"backend for {self.model_id} is closed")
        return self.model

    def _eos_token_ids(self) -> set[int]:
        return eos_token_ids_of(self.require_model().generation_config, self.tokenizer)

    # --------------------------------------------------------------- generation

    async def agenerate(
        self, batch: list[GenerationInput], on_delta: DeltaSink | None = None
    ) -> list[GenerationOutput]:
        """`generate` in a thread, so the event loop keeps serving Kafka; OOM becomes BatchTooLargeError.

        Streamed requests run in the same batch as the others: every decoding step's tokens come back
        to the event loop, and each streamed row's new text goes to `on_delta`.
        """
        try:
            if on_delta is None or not any(request.stream for request in batch):
                return await asyncio.to_thread(self.generate, batch)
            return await self._generate_streaming(batch, on_delta)
        except torch.OutOfMemoryError as error:
            raise BatchTooLargeError(f"batch of {len(batch)} did not fit on {self.device}") from error

    async def _generate_streaming(self, batch: list[GenerationInput], on_delta: DeltaSink) -> list[GenerationOutput]:
        loop = asyncio.get_running_loop()
        steps: StepQueue = asyncio.Queue()

        def run() -> list[GenerationOutput]:
            try:
                return self.generate(batch, lambda rows: StepStreamer(loop, steps, rows))
            finally:
                loop.call_soon_threadsafe(steps.put_nowait, None)  # also on failure, so the reader ends

        finished = asyncio.ensure_future(asyncio.to_thread(run))
        rows = {index: VisibleText(self.tokenizer, self.eos_token_ids, r) for index, r in enumerate(batch) if r.stream}
        while (step := await steps.get()) is not None:
            for index, token in zip(*step, strict=True):
                if (row := rows.get(index)) is not None and (delta := row.add(token)):
                    on_delta(batch[index].request_id, delta)
        outputs = await finished
        for index, row in rows.items():
            if outputs[index].error is None and (rest := row.finish(outputs[index].text)):
                on_delta(batch[index].request_id, rest)
        return outputs

    def info(self) -> BackendInfo:
        """Registry metadata: transformers on this device, at the precision it loaded with."""
        framework = f"transformers-{transformers.__version__}"
        return BackendInfo(backend="torch", framework=framework, device=str(self.device), precision=self.precision)

    async def astream(self, request: GenerationInput) -> AsyncIterator[str]:
        """One request's text as it is generated; the pieces join to exactly what `generate` returns.

        A prompt that cannot run raises PermanentBackendError.
        """
        encoded = self._encode(0, request)
        if isinstance(encoded, GenerationOutput):
            raise PermanentBackendError(encoded.error or "the request cannot run")
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def run() -> None:
            try:
                await self.agenerate([replace(request, stream=True)], lambda _, delta: pieces.put_nowait(delta))
            finally:
                pieces.put_nowait(None)

        finished = asyncio.ensure_future(run())
        while (piece := await pieces.get()) is not None:
            yield piece
        await finished

    def generate(
        self, batch: list[GenerationInput], streamer_for: Callable[[list[int]], BaseStreamer] | None = None
    ) -> list[GenerationOutput]:
        """Run one batch; output order = input order. Bad requests get an error output of their own.

        `streamer_for(rows)` gives the streamer of each `generate()` call, told the batch index of its rows.
        """
        self.require_model()
        with self._lock, torch.inference_mode():
            outputs: dict[int, GenerationOutput] = {}
            runnable: list[EncodedRequest] = []
            for index, request in enumerate(batch):
                encoded_or_error = self._encode(index, request)
                if isinstance(encoded_or_error, GenerationOutput):
                    outputs[index] = encoded_or_error
                else:
                    runnable.append(encoded_or_error)
            for group in group_by_sampling(runnable):
                streamer = streamer_for([item.index for item in group]) if streamer_for else None
                for item, output in zip(group, self._generate_group(group, streamer), strict=True):
                    outputs[item.index] = output
            return [outputs[index] for index in range(len(batch))]

    def _encode(self, index: int, request: GenerationInput) -> EncodedRequest | GenerationOutput:
        return encode_request(self.tokenizer, index, request, self.max_context_tokens)

    def encode_prompt(self, request: GenerationInput) -> list[int]:
        """The prompt's token ids: the messages through the chat template, ready for the assistant's turn."""
        return encode_chat_prompt(self.tokenizer, request)

    def _generate_group(
        self, group: list[EncodedRequest], streamer: BaseStreamer | None = None
    ) -> list[GenerationOutput]:
        """One `generate()` call for requests with identical sampling settings."""
        requests = [item.request for item in group]
        padded = self.tokenizer.pad(
            {"input_ids": [item.prompt_ids for item in group]},
            padding=True,
            padding_side="left",
            return_attention_mask=True,
            return_tensors="pt",
        ).to(self.device)
        prompt_width = padded["input_ids"].shape[1]
        per_row = PerRowStoppingCriteria(self.tokenizer, prompt_width, requests)
        stopping = StoppingCriteriaList([per_row])
        with self._seeded(None if requests[0].greedy else requests[0].seed):  # seeded groups hold one
            sequences = generate_tokens(
                self.require_model(),
                **padded,
                generation_config=self._generation_config(requests),
                stopping_criteria=stopping,
                streamer=streamer,
            )
        new_tokens = sequences[:, prompt_width:].tolist()
        return [
            finish_output(self.tokenizer, self.eos_token_ids, item.request, len(item.prompt_ids), tokens[:kept])
            for item, tokens, kept in zip(group, new_tokens, per_row.kept_tokens(len(new_tokens[0])), strict=True)
        ]

    def _generation_config(self, requests: Sequence[GenerationInput]) -> GenerationConfig:
        """Every sampling knob explicit, so a checkpoint's own defaults (e.g. top_k) do not leak in."""
        first = requests[0]  # the group shares sampling settings
        common: dict[str, Any] = {
            "max_new_tokens": max(request.max_tokens for request in requests),
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "eos_token_id": sorted(self.eos_token_ids) or None,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if first.greedy:
            return GenerationConfig(do_sample=False, **common)
        # The API has no top_k: 0 turns off transformers' default of 50, leaving nucleus sampling over
        # the whole vocabulary as OpenAI's API does.
        return GenerationConfig(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0, **common)

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Run with torch's RNG seeded, then restore it so later unseeded requests stay random."""
        if seed is None:
            yield
            return
        devices = [self._cuda_index()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _cuda_index(self) -> int:
        return torch.cuda.current_device() if self.device.index is None else self.device.index

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Free the model's memory; the backend cannot generate afterwards."""
        if self.model is None:
            return
        with self._lock:
            self.model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        logger.info("closed model %s", self.model_id)


def prepare_tokenizer_for_batching(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding: a decoder-only model continues from the last position, so pads must come first."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Many checkpoints ship without a pad token; padded positions are masked, so EOS is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token


def eos_token_ids_of(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a turn: the generation config may list several (e.g. EOS and end-of-turn)."""
    configured = generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {configured} if isinstance(configured, int) else set(configured)


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, request: GenerationInput) -> list[int]:
    """The prompt's token ids: the messages through the chat template, ready for the assistant's turn.

    A `text` prompt (`/v1/completions`) is the one message's content as it is: the model continues it.
    """
    if request.prompt_format == "text":
        return cast(list[int], tokenizer(request.messages[0].content)["input_ids"])
    conversation = [{"role": message.role, "content": message.content} for message in request.messages]
    # sanitize_control_tokens: special tokens typed by the user are encoded as text, not as control
    # tokens, so user content cannot open a fake system or assistant turn.
    return tokenizer.apply_chat_template(  # type: ignore[return-value]  # list[int] for one chat
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )


def encode_request(
    tokenizer: PreTrainedTokenizerBase, index: int, request: GenerationInput, max_context_tokens: int
) -> EncodedRequest | GenerationOutput:
    """The request's prompt ids, or an error output when the prompt cannot run."""
    try:
        prompt_ids = encode_chat_prompt(tokenizer, request)
    except TemplateError as error:
        return error_output(
            request, 0, f"the conversation does not fit the model's chat template: {error}", "invalid_chat"
        )
    if len(prompt_ids) > max_context_tokens - request.max_tokens:
        message = f"prompt too long: {len(prompt_ids)} tokens, the model's context is {max_context_tokens}"
        if request.max_tokens >= max_context_tokens:
            message += f" (max_tokens {request.max_tokens} alone fills it)"
        return error_output(request, len(prompt_ids), message, "context_length_exceeded")
    return EncodedRequest(index, request, prompt_ids)


def warn_if_context_exceeds_model(model_id: str, model: PreTrainedModel, max_context_tokens: int) -> None:
    trained = getattr(model.config, "max_position_embeddings", None)
    if trained is not None and max_context_tokens > trained:
        logger.warning(
            "model %s: max_context_tokens %d exceeds the model's max_position_embeddings %d",
            model_id,
            max_context_tokens,
            trained,
        )


def error_output(request: GenerationInput, prompt_tokens: int, message: str, code: str) -> GenerationOutput:
    return GenerationOutput(
        request_id=request.request_id,
        text="",
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        finish_reason="error",
        error=message,
        error_code=code,
    )


def generate_tokens(model: PreTrainedModel, **kwargs: Any) -> torch.Tensor:
    """`model.generate()` returning the token tensor (transformers' annotations do not type-check here)."""
    return cast(torch.Tensor, cast(Any, model).generate(**kwargs))


def decode_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """The text of generated tokens; control tokens (EOS, role markers) are not part of an answer."""
    return cast(str, tokenizer.decode(token_ids, skip_special_tokens=True))


def finish_output(
    tokenizer: PreTrainedTokenizerBase,
    eos_token_ids: set[int],
    request: GenerationInput,
    prompt_tokens: int,
    new_tokens: list[int],
) -> GenerationOutput:
    """Cut one row's tokens at max_tokens / EOS / the first stop string, and count what is kept."""
    tokens, hit_eos = cut_at_eos(new_tokens[: request.max_tokens], eos_token_ids)
    text = decode_text(tokenizer, tokens)
    stops = effective_stops(request)
    if (position := first_stop_position(text, stops)) is not None:
        kept = tokens_until_stop(tokenizer, tokens, stops)
        return GenerationOutput(request.request_id, text[:position], prompt_tokens, kept, "stop")
    # EOS means the model ended its turn, even on the last allowed token. (Short of max_tokens with
    # neither EOS nor a stop string only happens if the early tail check matched what the exact check
    # does not, e.g. a stop string with U+FFFD; the row did stop, so "stop".)
    ran_out = len(tokens) >= request.max_tokens and not hit_eos
    return GenerationOutput(request.request_id, text, prompt_tokens, len(tokens), "length" if ran_out else "stop")


def cut_at_eos(tokens: list[int], eos_token_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS (it was generated, so it counts), and whether one came."""
    for position, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: position + 1], True
    return tokens, False


def tokens_until_stop(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stops: Sequence[str]) -> int:
    """Fewest leading tokens whose text contains a stop string (binary search: text grows with tokens)."""
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if first_stop_position(decode_text(tokenizer, tokens[:middle]), stops) is None:
            low = middle + 1
        else:
            high = middle
    return high
