"""The learned complexity scorer: a cascade of two calibrated logistic regressions.

Stage 1 sees only cheap features of the conversation and decides the clear cases. A request whose
stage-1 score lands within `band` of the routing threshold pays for a sentence embedding, and stage 2
(features + embedding) decides it. Both stages are Platt-calibrated on a validation split, so a score
is a probability that the prompt is hard. The weights live in a versioned JSON artefact written by
`autoglm router train` (services/router/training.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from services.router.embedding import EmbeddingSpec
from services.router.scoring import CODE_MARKERS, MATH_MARKERS, REASONING_MARKERS, Score
from shared.messages import ChatRequest

if TYPE_CHECKING:
    from services.router.config import ScorerOptions
    from services.router.embedding import Embedder

logger = logging.getLogger(__name__)

ARTEFACT_FORMAT = "autoglm-router-scorer"
ARTEFACT_VERSION = 2  # 2: the embedding spec (engine, max_tokens) is part of the artefact

LATEX = re.compile(r"\$|\\[a-zA-Z]+")
CHOICE_LINE = re.compile(r"^\s*\(?[A-E][.)]\s", re.M)
QUESTION_WORDS = re.compile(r"\b(how many|what|which|find|compute|determine|show that|if)\b", re.I)

FEATURE_NAMES = [
    "length",  # log2 of the user's characters over 64, as in the heuristic
    "words",  # log of the user's words
    "turns",
    "code",
    "math",
    "reasoning",
    "long_answer",  # max_tokens above 512
    "max_tokens",  # log of the requested max_tokens (0 when unset)
    "system_prompt",  # log of the system prompt's characters
    "non_ascii",  # share of non-ASCII characters: a crude language signal
    "digits",  # share of digits
    "latex",  # log of LaTeX commands and $ signs
    "choices",  # lines that look like multiple-choice options
    "question_words",
]


def user_text(request: ChatRequest) -> str:
    """The user's turns, which is what the scorer reads and what the embedding cache is keyed by."""
    return "\n".join(m.content for m in request.messages if m.role == "user")


def extract_features(request: ChatRequest) -> list[float]:
    """The cheap features, in FEATURE_NAMES order."""
    text = user_text(request)
    chars = max(len(text), 1)
    system = sum(len(m.content) for m in request.messages if m.role == "system")
    values = {
        "length": min(max(math.log2(chars / 64), 0.0), 6.0),
        "words": math.log1p(len(text.split())),
        "turns": float(min(sum(1 for m in request.messages if m.role == "user") - 1, 5)),
        "code": float(bool(CODE_MARKERS.search(text))),
        "math": float(bool(MATH_MARKERS.search(text))),
        "reasoning": float(bool(REASONING_MARKERS.search(text))),
        "long_answer": float((request.max_tokens or 0) > 512),
        "max_tokens": math.log1p(request.max_tokens or 0),
        "system_prompt": math.log1p(system),
        "non_ascii": sum(1 for c in text if ord(c) > 127) / chars,
        "digits": sum(1 for c in text if c.isdigit()) / chars,
        "latex": math.log1p(len(LATEX.findall(text))),
        "choices": float(min(len(CHOICE_LINE.findall(text)), 6)),
        "question_words": float(min(len(QUESTION_WORDS.findall(text)), 6)),
    }
    return [values[name] for name in FEATURE_NAMES]


def sigmoid(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -40.0, 40.0)))


@dataclass
class Stage:
    """Standardise, a linear logit, then Platt scaling: p = sigmoid(a * logit + b)."""

    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    bias: float
    platt_a: float = 1.0
    platt_b: float = 0.0

    def terms(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Each input's calibrated share of the logit (rows x inputs)."""
        return self.platt_a * ((x - self.mean) / self.std) * self.weights

    def raw_logit(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return ((x - self.mean) / self.std) @ self.weights + self.bias  # type: ignore[no-any-return]

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return sigmoid(self.platt_a * self.raw_logit(x) + self.platt_b)

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(), "std": self.std.tolist(), "weights": self.weights.tolist(),
            "bias": self.bias, "platt_a": self.platt_a, "platt_b": self.platt_b,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stage:
        arrays = {key: np.asarray(data[key], dtype=np.float64) for key in ("mean", "std", "weights")}
        return cls(**arrays, bias=float(data["bias"]), platt_a=float(data["platt_a"]), platt_b=float(data["platt_b"]))


@dataclass
class Artefact:
    """What `autoglm router train` writes: both stages plus where they came from and how they did."""

    cheap: Stage
    full: Stage
    feature_names: list[str]
    embedding: EmbeddingSpec
    training_data_sha256: str
    metrics: dict[str, Any]
    version: int = ARTEFACT_VERSION

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "format": ARTEFACT_FORMAT, "version": self.version, "feature_names": self.feature_names,
            "embedding": self.embedding.to_json(), "training_data_sha256": self.training_data_sha256,
            "metrics": self.metrics, "cheap": self.cheap.to_json(), "full": self.full.to_json(),
        }  # fmt: skip
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Artefact:
        """Read an artefact; ValueError if it is another format, version or feature set."""
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != ARTEFACT_FORMAT or document.get("version") != ARTEFACT_VERSION:
            raise ValueError(f"{path}: not a version {ARTEFACT_VERSION} {ARTEFACT_FORMAT} artefact")
        if document["feature_names"] != FEATURE_NAMES:
            raise ValueError(f"{path}: trained on features {document['feature_names']}, this code has {FEATURE_NAMES}")
        return cls(
            cheap=Stage.from_json(document["cheap"]), full=Stage.from_json(document["full"]),
            feature_names=document["feature_names"], embedding=EmbeddingSpec.from_json(document["embedding"]),
            training_data_sha256=document["training_data_sha256"], metrics=document["metrics"],
        )  # fmt: skip


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Embeds(Protocol):
    """What the cascade needs from an embedder (the real one is services.router.embedding.Embedder)."""

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]: ...


class Scorer:
    """Scores requests with the cascade; `score_batch` embeds all near-threshold prompts in one go."""

    def __init__(self, artefact: Artefact, embedder: Embedder | Embeds, threshold: float, band: float) -> None:
        self.artefact = artefact
        self.embedder = embedder
        self.threshold = threshold
        self.band = band

    def score(self, request: ChatRequest) -> Score:
        return self.score_batch([request])[0]

    def score_batch(self, requests: list[ChatRequest]) -> list[Score]:
        """One Score per request, in order; the embedding runs only for the uncertain ones."""
        features = self._features(requests)
        cheap = self.artefact.cheap.predict(features)
        scores = [self._explain(self.artefact.cheap, features[i : i + 1], float(p)) for i, p in enumerate(cheap)]
        uncertain = [i for i, p in enumerate(cheap) if self._uncertain(float(p))]
        if uncertain:
            embeddings = self.embedder.embed([user_text(requests[i]) for i in uncertain]).astype(np.float64)
            full_inputs = np.hstack([features[uncertain], embeddings])
            for row, i in enumerate(uncertain):
                value = float(self.artefact.full.predict(full_inputs[row : row + 1])[0])
                scores[i] = self._explain(self.artefact.full, full_inputs[row : row + 1], value)
        return scores

    def score_clear(self, requests: list[ChatRequest]) -> list[Score | None]:
        """The cheap stage alone: a Score where it settles the request, None where the embedding must decide
        (what `score_batch` would embed). Takes microseconds, so the router decides these without waiting."""
        features = self._features(requests)
        return [
            None if self._uncertain(float(p)) else self._explain(self.artefact.cheap, features[i : i + 1], float(p))
            for i, p in enumerate(self.artefact.cheap.predict(features))
        ]

    def _features(self, requests: list[ChatRequest]) -> npt.NDArray[np.float64]:
        rows = [extract_features(request) for request in requests]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))  # (0, n) when empty

    def _uncertain(self, cheap_score: float) -> bool:
        return abs(cheap_score - self.threshold) < self.band

    def _explain(self, stage: Stage, x: npt.NDArray[np.float64], value: float) -> Score:
        """Per-feature contributions to the calibrated logit; the embedding summed into one."""
        terms = stage.terms(x)[0]
        names = self.artefact.feature_names
        contributions = {name: float(term) for name, term in zip(names, terms[: len(names)], strict=True)}
        if len(terms) > len(names):
            contributions["embedding"] = float(terms[len(names) :].sum())
        return Score(value=min(max(value, 0.0), 1.0), contributions=contributions)


def load_scorer(options: ScorerOptions, threshold: float) -> Scorer | None:
    """The learned scorer, or None (with a log line saying why) so the router keeps the heuristic."""
    artefact_path, band = options.artefact, options.band
    if artefact_path is None:
        logger.info("no scorer artefact configured: routing with the heuristic scorer")
        return None
    try:
        from services.router.embedding import Embedder

        artefact = Artefact.load(artefact_path)
        embedder = Embedder(
            artefact.embedding, options.embedding_cache_size, options.embedding_batch_size,
            threads=options.embedding_threads,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, ImportError) as error:
        logger.warning("scorer artefact %s not loaded (%s): routing with the heuristic scorer", artefact_path, error)
        return None
    logger.info(
        "learned scorer v%d loaded from %s (data %s, held-out AUC %s): threshold %.2f, embedding band ±%.2f",
        artefact.version, artefact_path, artefact.training_data_sha256[:12], artefact.metrics.get("auc"),
        threshold, band,
    )  # fmt: skip
    return Scorer(artefact, embedder, threshold, band)
