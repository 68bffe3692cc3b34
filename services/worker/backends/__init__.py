"""Inference backends: one small interface (`base.Backend`), one module per engine.

`load_backend` picks the module named by the pool's `backend` and imports it only then, so a
worker never imports an engine (torch, tritonclient, tensorrt) it does not use.
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
        return TorchBackend.load(model.id, checkpoint, device=pool.device, max_context_tokens=model.max_context_tokens)
    raise NotImplementedError(f"the {pool.backend} backend is not built yet")
