"""Inference backends: one small interface (`base.Backend`), one module per engine.

`load_backend` picks the module named by the pool's `backend` and imports it only then, so a
worker never imports an engine (torch, tritonclient, tensorrt) it does not use. The `openai` backend
fronts an OpenAI-compatible server over HTTP and loads nothing locally.
"""

from __future__ import annotations

from pathlib import Path

from services.worker.backends.base import Backend
from shared.settings import ModelConfig, PoolConfig


def load_backend(model: ModelConfig, pool: PoolConfig, checkpoint: Path | None) -> Backend:
    """Load `model` with the pool's backend (blocking: call it from a thread)."""
    if pool.backend == "torch":
        from services.worker.backends.torch_backend import TorchBackend

        assert checkpoint is not None
        return TorchBackend.load(
            model.id,
            checkpoint,
            device=pool.device,
            max_context_tokens=model.max_context_tokens,
            precision=model.precision,
        )
    if pool.backend == "openai":
        from services.worker.backends.openai_backend import OpenAIBackend

        # One connection per request of a full batch: the batch's calls all run at once.
        return OpenAIBackend.from_config(model, max_connections=pool.batching.max_batch_size)
    if pool.backend == "triton":
        from services.worker.backends.triton_backend import TritonBackend

        # `path`, when set, is the tokenizer whose chat template renders the prompt (see triton_backend).
        return TritonBackend.load(model, tokenizer_path=checkpoint, max_batch_size=pool.batching.max_batch_size)
    if pool.backend == "tensorrt":
        from services.worker.backends.tensorrt_backend import TensorRTBackend

        assert checkpoint is not None
        # The engine's profile is built for the pool's largest batch; the worker never sends a bigger one.
        max_batch_size = pool.batching.max_batch_size if pool.batching.enabled else 1
        return TensorRTBackend.load(model, checkpoint, device=pool.device, max_batch_size=max_batch_size)
    raise NotImplementedError(f"the {pool.backend} backend is not built yet")
