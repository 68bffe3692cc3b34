"""Export an HF causal LM checkpoint to ONNX: the graph the `tensorrt` backend builds its engines from.

The graph:
- inputs `input_ids`, `attention_mask` and `position_ids`, int64 `[batch, sequence]`, both axes dynamic;
  prompts are left-padded (as every backend here batches them) and `position_ids` are what transformers'
  `generate()` derives from the mask (`decoding.position_ids_for`), so a padded row sees the positions it
  would see alone (rotary embeddings, as in Llama, only feel position differences, but a model with learned
  absolute positions needs exactly these);
- output `logits` `[batch, 1, vocab]`: the last position only (`logits="last"`, what a decode step reads;
  the full `[batch, sequence, vocab]` with `logits="all"`, for checking the export). For a real vocabulary
  the full tensor would be the largest activation of the graph (32 x 2048 x 150k fp16 is 20 GB), and the
  LM head over every position would cost as much as the rest of a step.

This is a full-sequence forward without a KV cache: each decode step runs the whole sequence again
(quadratic in the answer's length). It is the first slice; a graph with past key/values in and out is the
next.

How it is exported: `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter (it needs
`onnxscript`). It traces the model symbolically, so the mask logic transformers writes with Python
conditionals holds for every shape; the TorchScript exporter (`dynamo=False`, deprecated since torch 2.9,
still working in 2.15 given `onnx`) replays one example and warns that such branches become constants.
Attention is exported with transformers' `eager` implementation: plain MatMul / Softmax (the softmax in
fp32 even in a half-precision graph) that TensorRT fuses into its own attention kernels, and no NaN for a
padding row that attends to nothing.

Opset 18: the dynamo exporter's own opset (no version conversion pass), parsed by TensorRT 10 and 11 and
run by onnxruntime 1.14 or later; opset 23 would add a fused `Attention` op that older parsers refuse.

Precision lives in the graph: the model is exported in the dtype the engine runs at (fp32, fp16, bf16);
TensorRT builds it strongly typed (its precision flags are gone in TensorRT 11). transformers' Llama-family
RMSNorm and softmax upcast to fp32 inside the graph, as they do in the torch backend.

Usage: `python -m services.worker.onnx_export CHECKPOINT OUTPUT_DIR [--precision fp16] [--logits all]`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from services.worker.backends.decoding import position_ids_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LogitPositions = Literal["last", "all"]

ONNX_OPSET = 18
EXPORT_FORMAT_VERSION = 1  # bump when the graph's interface or the way it is exported changes
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "logits"
ONNX_FILE = "model.onnx"
EXPORT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The files whose bytes define the graph: architecture and weights (not the tokenizer, not build notes).
WEIGHT_SUFFIXES = (".safetensors", ".bin")
GRAPH_FILES = ("config.json",)
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


class NextTokenLogits(torch.nn.Module):
    """The causal LM as a pure function of its three inputs: logits out, no cache kept or returned."""

    def __init__(self, model: PreTrainedModel, logits: LogitPositions = "last") -> None:
        super().__init__()
        self.model = model
        # transformers' `logits_to_keep`: 1 keeps the last position (the LM head runs on it alone), 0 keeps all.
        self.logits_to_keep = 1 if logits == "last" else 0

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=self.logits_to_keep,
        )
        return output.logits


def require_exporter() -> None:
    """Fail with what to install when the exporter's packages are missing (torch only says one of them)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"exporting to ONNX needs {' and '.join(missing)}: install the project's `onnx` extra "
            "(pip install -e '.[onnx]')"
        )


@contextmanager
def quiet_exporter_logs() -> Iterator[None]:
    """The exporter's optimizer logs every rewrite at INFO: hundreds of lines in a worker's log per export."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(max(item.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def load_for_export(checkpoint: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The checkpoint on the CPU at `dtype`, eval mode, eager attention (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from services.worker.backends.torch_backend import quiet_transformers_progress

    with quiet_transformers_progress():
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, local_files_only=True, dtype=dtype, attn_implementation="eager"
        )
    return model.eval()


def example_inputs(pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two left-padded rows of different lengths: the trace sees padding, and no axis is 0 or 1 (torch.export
    would specialise such a size into a constant)."""
    input_ids = torch.tensor([[3, 4, 5, 6, 7], [pad_token_id, pad_token_id, 3, 4, 5]], dtype=torch.long)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.long)
    return input_ids, attention_mask, position_ids_for(attention_mask)


def export_onnx(
    checkpoint: Path,
    directory: Path,
    *,
    precision: str = "fp32",
    logits: LogitPositions = "last",
    opset: int = ONNX_OPSET,
) -> Path:
    """Export `checkpoint` to `directory/model.onnx` (weights beside it in `model.onnx.data`); returns the path.

    The export is written to a staging directory and renamed into place, so `directory` never holds half a
    graph (a crash, or a concurrent export, leaves it absent or whole).
    """
    from services.worker.checkpoints import replace_directory

    if precision not in EXPORT_DTYPES:
        raise ValueError(f"cannot export at precision {precision!r} (choose from {sorted(EXPORT_DTYPES)})")
    require_exporter()
    model = load_for_export(Path(checkpoint), EXPORT_DTYPES[precision])
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    wrapper = NextTokenLogits(model, logits).eval()
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        with warnings.catch_warnings(), quiet_exporter_logs():
            # The three inputs share both axes on purpose; torch says so once per axis and input.
            warnings.filterwarnings("ignore", message=r".*shares the same shape constraints with another axis")
            torch.onnx.export(
                wrapper,
                example_inputs(int(pad_token_id)),
                str(staging / ONNX_FILE),
                dynamo=True,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes,
                opset_version=opset,
                external_data=True,  # protobuf caps a file at 2 GB: real weights go beside the graph
                verbose=False,
            )
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / ONNX_FILE


def checkpoint_digest(checkpoint: Path) -> str:
    """SHA-256 over the checkpoint's architecture and weight files (names and bytes, not paths or dates).

    Reads every weight byte: about a second per GB, paid once per worker start by the tensorrt backend.
    """
    checkpoint = Path(checkpoint)
    files = sorted(
        path
        for path in checkpoint.iterdir()
        if path.is_file() and (path.name in GRAPH_FILES or path.name.endswith(WEIGHT_SUFFIXES))
    )
    if not any(path.name.endswith(WEIGHT_SUFFIXES) for path in files):
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin) in {checkpoint}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def exporter_identity() -> str:
    """What besides the checkpoint shapes the graph: the exporter (torch), the modelling code (transformers)."""
    import transformers

    return f"torch-{torch.__version__}/transformers-{transformers.__version__}/format-{EXPORT_FORMAT_VERSION}"


class OnnxRuntimeEngine:
    """An exported graph run by ONNX Runtime on the CPU; a `decoding.LogitsEngine`.

    The reference the export is checked against (and a way to run the tensorrt backend's decode loop on a
    machine without a GPU); not a serving backend.
    """

    device = torch.device("cpu")

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise RuntimeError("running an exported model needs onnxruntime: install the `onnx` extra") from error
        self.session: Any = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.version = onnxruntime.__version__

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The graph's whole output: `[batch, 1 or sequence, vocab]`."""
        if self.session is None:
            raise RuntimeError("the ONNX Runtime session is closed")
        feeds = {
            name: tensor.to(torch.long).numpy()
            for name, tensor in zip(INPUT_NAMES, (input_ids, attention_mask, position_ids), strict=True)
        }
        (output,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(output)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.logits(input_ids, attention_mask, position_ids)[:, -1, :]

    def close(self) -> None:
        self.session = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.worker.onnx_export",
        description="Export an HF causal LM checkpoint to ONNX (input_ids, attention_mask, position_ids -> logits).",
    )
    parser.add_argument("checkpoint", type=Path, help="HF-format checkpoint directory")
    parser.add_argument("output", type=Path, help="directory to write model.onnx (+ model.onnx.data) into")
    parser.add_argument("--precision", choices=sorted(EXPORT_DTYPES), default="fp32")
    parser.add_argument("--logits", choices=["last", "all"], default="last", help="positions the output keeps")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    path = export_onnx(args.checkpoint, args.output, precision=args.precision, logits=args.logits)
    print(f"exported {args.checkpoint} ({args.precision}) to {path} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
