"""Tiny HF-format checkpoints, built fully offline, so the platform runs without downloading a model.

Each checkpoint is a directory `AutoTokenizer` / `AutoModelForCausalLM` load as-is:
- a byte-level BPE tokenizer trained here on a small embedded English text, with a chat template;
- a small `LlamaForCausalLM` with seeded random weights (it writes gibberish, fast and reproducibly).

Usage: `python -m services.worker.checkpoints --models-dir var/models [--force]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # transformers takes seconds to import; `--help` and `ensure` of present checkpoints skip it
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

CheckpointSize = Literal["light", "heavy"]

# Name of each checkpoint the deployment file refers to (pool models `tiny-light`, `tiny-heavy`).
TINY_CHECKPOINTS: dict[str, CheckpointSize] = {"tiny-light": "light", "tiny-heavy": "heavy"}
BUILD_INFO_FILE = "autoglm_build.json"
BUILD_FORMAT_VERSION = 1

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)
TOKENIZER_VOCAB_SIZE = 768

# The end of a turn is the EOS token, so a model trained on this format stops after answering.
# Roles are spelled out literally (never built from the role string) so that
# `apply_chat_template(..., sanitize_control_tokens=True)` can tell template tokens from user text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Training text for the tokenizer: a few KB of plain English, so common words become single tokens.
CORPUS = """\
The lighthouse stood at the end of the long stone pier, and every evening the keeper climbed the
narrow stairs to light the lamp. Ships passing in the night looked for its beam, counted the
seconds between the flashes, and knew where they were. In winter the wind came from the north and
the waves broke over the pier, but the light never failed.

A good question deserves a clear answer. When you ask how something works, start with what it does,
then explain why it was built that way, and only then describe the details. Short sentences help.
Examples help more. If you are not sure, say so, and explain what you would need to find out.

Water boils at one hundred degrees Celsius at sea level. On a high mountain it boils at a lower
temperature, because the air pressure is lower. That is why cooking pasta takes longer in the
mountains. Ice floats on water because it is less dense than the liquid around it.

The market opened early on Saturday. Farmers brought apples, pears, bread, cheese and honey, and the
square filled with people before nine o'clock. A child asked her father why the honey was darker in
autumn than in spring. He said the bees visit different flowers as the seasons change.

To sort a list of numbers, compare pairs of numbers and swap them when they are in the wrong order.
Repeat until no swap is needed. This simple method is slow for long lists; faster methods split the
list into parts, sort each part, and then merge the sorted parts together.

Hello! How can I help you today? I can answer questions, summarize a text, translate a sentence, or
write a short story. Please tell me what you need, and I will do my best to help you.

The train left the station at ten past eight. Through the window we saw fields, rivers, small towns
and forests. The journey took three hours, and we arrived in the city just before noon. We walked
along the river, visited the old library, and ate lunch in a small cafe near the bridge.

Good software is easy to read, easy to test, and easy to change. Name things for what they mean.
Keep functions small. Write tests that fail when the code is wrong. Measure before you optimize, and
log enough to understand what happened when something goes wrong in production.

The moon moves around the earth about once a month, and the earth moves around the sun once a year.
The seasons change because the axis of the earth is tilted, so each half of the planet receives
more sunlight for part of the year. Summer days are long and winter days are short.

Thank you for your message. I have read your question carefully. The short answer is yes, but there
are a few things to keep in mind. First, check the settings. Second, restart the service. Third, if
the problem remains, send me the log file and I will take a closer look at it.

Numbers: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty,
forty, fifty, hundred, thousand. Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Colors: red, orange, yellow, green, blue, purple, black, white, gray, brown.
"""


@dataclass(frozen=True)
class ModelShape:
    """Architecture of one checkpoint size (Llama, with grouped-query attention)."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048


# Both stay well under 5 MB in fp32 and generate a batch in milliseconds on a CPU.
MODEL_SHAPES: dict[CheckpointSize, ModelShape] = {
    "light": ModelShape(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "heavy": ModelShape(
        num_hidden_layers=4,
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `CORPUS`, wrapped for transformers, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level: every string (any language, any emoji) is encodable, so no unknown token is needed.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # No post-processor: the chat template writes BOS itself, so encoding never adds a second one.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPES["heavy"].max_position_embeddings,
    )


def build_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A Llama model of `shape` whose random weights depend only on `seed`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
        **asdict(shape),
    )
    # A private RNG stream: building a checkpoint must not shift the caller's random numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


def build_info(
    size: CheckpointSize, seed: int, shape: ModelShape, tokenizer: PreTrainedTokenizerFast, parameters: int
) -> dict[str, Any]:
    """What `autoglm_build.json` records: enough to rebuild the same checkpoint and to recognise it."""
    import tokenizers
    import torch
    import transformers

    return {
        "format_version": BUILD_FORMAT_VERSION,
        "builder": "services.worker.checkpoints",
        "size": size,
        "seed": seed,
        "architecture": "LlamaForCausalLM",
        "shape": asdict(shape),
        "parameters": parameters,
        "tokenizer": {
            "type": "byte-level BPE",
            "vocab_size": len(tokenizer),
            "special_tokens": list(SPECIAL_TOKENS),
            "corpus_sha256": hashlib.sha256(CORPUS.encode()).hexdigest(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "built_at": datetime.now(UTC).isoformat(),
    }


def write_checkpoint(directory: Path, size: CheckpointSize, seed: int) -> dict[str, Any]:
    """Write tokenizer, model and build info into `directory`; returns the build info."""
    from services.worker.backends.torch_backend import quiet_transformers_progress

    shape = MODEL_SHAPES[size]
    tokenizer = build_tokenizer()
    model = build_model(shape, tokenizer, seed)
    tokenizer.save_pretrained(directory)
    with quiet_transformers_progress():
        model.save_pretrained(directory)  # safetensors, the default format
    info = build_info(size, seed, shape, tokenizer, sum(p.numel() for p in model.parameters()))
    (directory / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    make_world_readable(directory)
    return info


def make_world_readable(directory: Path) -> None:
    """The weights are written owner-only; a worker container may run as another user, so open them up.

    Nothing in a tiny checkpoint is secret: it is random weights and a public tokenizer.
    """
    directory.chmod(0o755)
    for file in directory.iterdir():
        file.chmod(0o644)


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished `source` to `target`, replacing what is there without a half-written moment."""
    if not target.exists():
        source.rename(target)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first. Between the two
    # renames `target` is briefly absent (never half-written); a crash there leaves the old one aside.
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def build_tiny_checkpoint(path: Path, *, size: CheckpointSize, seed: int = 0) -> Path:
    """Build (or rebuild) a tiny checkpoint at `path`, offline. A crash never leaves a half checkpoint.

    The checkpoint is written to a temporary directory beside `path` and renamed into place at the end.
    """
    if size not in MODEL_SHAPES:
        raise ValueError(f"unknown checkpoint size {size!r} (sizes: {sorted(MODEL_SHAPES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, beside the target (same filesystem, so the final rename is atomic), unique per build.
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        write_checkpoint(staging, size, seed)
        replace_directory(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return path


def is_checkpoint(path: Path) -> bool:
    """True when `path` holds a checkpoint; builds appear whole (renamed into place), never half."""
    return (path / "config.json").is_file()


def ensure_tiny_checkpoints(models_dir: Path, *, force: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Build `tiny-light` and `tiny-heavy` under `models_dir` unless already there; returns their paths."""
    paths = []
    for name, size in TINY_CHECKPOINTS.items():
        path = Path(models_dir) / name
        paths.append(path)
        if is_checkpoint(path) and not force:
            log(f"{name}: present at {path}")
            continue
        started = time.perf_counter()
        log(f"{name}: building ({size}) at {path} ...")
        build_tiny_checkpoint(path, size=size)
        info = json.loads((path / BUILD_INFO_FILE).read_text())
        log(f"{name}: built in {time.perf_counter() - started:.1f} s, {info['parameters']:,} parameters")
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from shared.settings import var_dir

    parser = argparse.ArgumentParser(
        prog="python -m services.worker.checkpoints",
        description="Build the tiny offline checkpoints (tiny-light, tiny-heavy) the default deployment serves.",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=var_dir() / "models",
        help="directory that holds the checkpoints (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when a checkpoint is present")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tiny_checkpoints(args.models_dir, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
