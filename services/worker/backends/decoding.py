"""Token-by-token decoding over an engine that only computes next-token logits (TensorRT, ONNX Runtime).

A `LogitsEngine` maps `input_ids`, `attention_mask` and `position_ids` (left-padded, `[batch, sequence]`) to
the logits of the last position (`[batch, vocab]`) and keeps no state: there is no KV cache, so every step
runs the whole sequence again (quadratic in the answer's length; a cached graph is the next slice).

The loop reproduces what the torch backend's `generate()` call does, so both backends answer alike:
- prompts are the torch backend's (`encode_request`: chat template, control tokens sanitised, length
  checked), left-padded by the tokenizer; position ids are derived from the mask as transformers does;
- greedy is the argmax of the float32 logits; sampling applies transformers' own temperature and top-p
  warpers, then softmax and a multinomial draw. A seeded request draws from a generator of its own seeded
  with its seed, so its text does not depend on its batch companions (the torch backend gets the same by
  running it alone) and equals the torch backend's for the same logits;
- a row ends at EOS, at its `max_tokens` or at a stop string (the torch backend's `PerRowStoppingCriteria`)
  and is cut and counted by the same `finish_output`.
Unlike `generate()`, a finished row leaves the batch at once, and padding columns that no remaining row
needs are dropped with it, so the steps after a short answer only pay for the long ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from services.worker.backends.base import GenerationInput, GenerationOutput
from services.worker.backends.torch_backend import (
    PerRowStoppingCriteria,
    eos_token_ids_of,
    finish_output,
    prepare_tokenizer_for_batching,
)


class LogitsEngine(Protocol):
    """A stateless forward pass: (input_ids, attention_mask, position_ids) -> last-position logits."""

    device: torch.device

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the last position, `[batch, vocab]`, for left-padded `[batch, sequence]` inputs on `device`."""
        ...

    def close(self) -> None:
        """Free what the engine holds."""
        ...


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted from its row's first real token (padding gets 0), as `generate()` does."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def load_chat_tokenizer(checkpoint: Path) -> tuple[PreTrainedTokenizerBase, set[int]]:
    """The checkpoint's tokenizer, ready for left-padded batches, and the tokens that end a turn.

    The end-of-turn tokens come from the generation config as the torch backend reads them (its file, else
    the one transformers derives from `config.json`).
    """
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    prepare_tokenizer_for_batching(tokenizer)
    try:
        generation_config = GenerationConfig.from_pretrained(checkpoint, local_files_only=True)
    except OSError:  # no generation_config.json
        generation_config = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        )
    return tokenizer, eos_token_ids_of(generation_config, tokenizer)


@dataclass(frozen=True)
class TokenChooser:
    """How one row picks its next token: argmax (no warpers), or sampling from its own generator if seeded."""

    warpers: LogitsProcessorList | None
    generator: torch.Generator | None = None

    @classmethod
    def for_request(cls, request: GenerationInput, device: torch.device) -> TokenChooser:
        if request.greedy:
            return cls(None)  # top_p and seed do not change an argmax
        warpers = LogitsProcessorList()
        # The same warpers, under the same conditions, as `generate()` with the torch backend's config.
        if request.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(request.temperature))
        if request.top_p < 1.0:
            warpers.append(TopPLogitsWarper(request.top_p))
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(request.seed)
        return cls(warpers, generator)

    def sample(self, input_ids: torch.Tensor, logits: torch.Tensor) -> int:
        """One draw for a row: `input_ids` `[1, sequence]`, float32 `logits` `[1, vocab]`."""
        assert self.warpers is not None
        probabilities = torch.softmax(self.warpers(cast(torch.LongTensor, input_ids), logits), dim=-1)
        return int(torch.multinomial(probabilities, num_samples=1, generator=self.generator))


def choose_next_tokens(input_ids: torch.Tensor, logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> list[int]:
    """Every row's next token; the argmax of the whole batch is one call, sampled rows are drawn one by one."""
    logits = logits.float()  # as `generate()`: warpers and softmax in float32, whatever the engine's precision
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    for row, chooser in enumerate(choosers):
        if chooser.warpers is not None:
            tokens[row] = chooser.sample(input_ids[row : row + 1], logits[row : row + 1])
    return tokens


def drop_finished_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the `keep` rows, without the leading columns that are padding in all of them."""
    index = torch.tensor(keep, dtype=torch.long, device=input_ids.device)
    input_ids, attention_mask = input_ids.index_select(0, index), attention_mask.index_select(0, index)
    first_needed = int(attention_mask.bool().any(dim=0).nonzero()[0])
    return input_ids[:, first_needed:], attention_mask[:, first_needed:]


def decode_batch(
    engine: LogitsEngine,
    tokenizer: PreTrainedTokenizerBase,
    eos_token_ids: set[int],
    prompts: Sequence[tuple[GenerationInput, list[int]]],
) -> list[GenerationOutput]:
    """Generate for each (request, prompt ids) until every row is done; output order = input order.

    The caller keeps the batch within the engine's limits: at most its batch size of rows, and each prompt
    plus its `max_tokens` within its sequence length (rows are right-aligned, so the widest step is the
    longest remaining row's).
    """
    if not prompts:
        return []
    requests = [request for request, _ in prompts]
    padded = tokenizer.pad(
        {"input_ids": [prompt_ids for _, prompt_ids in prompts]},
        padding=True,
        padding_side="left",
        return_attention_mask=True,
        return_tensors="pt",
    )
    input_ids = padded["input_ids"].to(engine.device)
    attention_mask = padded["attention_mask"].to(engine.device)
    stopping = PerRowStoppingCriteria(tokenizer, 0, requests)
    choosers = [TokenChooser.for_request(request, engine.device) for request in requests]
    generated: list[list[int]] = [[] for _ in requests]
    rows = list(range(len(requests)))  # the request each row of the running batch belongs to
    while rows:
        logits = engine(input_ids, attention_mask, position_ids_for(attention_mask))
        next_tokens = choose_next_tokens(input_ids, logits, [choosers[row] for row in rows])
        keep = []
        for position, (row, token) in enumerate(zip(rows, next_tokens, strict=True)):
            generated[row].append(token)
            if token not in eos_token_ids and not stopping.row_done(row, torch.tensor(generated[row])):
                keep.append(position)
        input_ids = torch.cat([input_ids, torch.tensor(next_tokens, device=input_ids.device).unsqueeze(1)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        if keep and len(keep) < len(rows):
            input_ids, attention_mask = drop_finished_rows(input_ids, attention_mask, keep)
        rows = [rows[position] for position in keep]
    return [
        finish_output(tokenizer, eos_token_ids, request, len(prompt_ids), tokens)
        for (request, prompt_ids), tokens in zip(prompts, generated, strict=True)
    ]
