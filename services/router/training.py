"""Training and evaluation of the learned scorer (`autoglm router train` / `autoglm router eval`).

Data: JSONL rows {prompt, label (0 easy, 1 hard), source, split (train | validation | test)}; see
data/router/DATA.md. Each stage is an L2-regularised logistic regression fitted by Newton's method on
`train`, its regularisation picked and its Platt scaling fitted on `validation`; `test` is held out for
`eval`. Baselines at the same heavy share: a length-only router (longest prompts to heavy) and a
random router (catches as many hard prompts as it sends, in expectation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.router.embedding import Embedder
from services.router.learned import FEATURE_NAMES, Artefact, Scorer, Stage, extract_features, file_sha256, sigmoid
from shared.messages import ChatMessage, ChatRequest

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
L2_CHOICES = (0.1, 1.0, 10.0, 100.0)


@dataclass
class Split:
    """The rows of one split as requests and labels."""

    requests: list[ChatRequest]
    labels: npt.NDArray[np.int64]
    prompts: list[str]


def load_splits(path: Path) -> dict[str, Split]:
    """The labelled JSONL grouped by split."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            grouped.setdefault(row["split"], []).append(row)
    return {
        name: Split(
            requests=[as_request(row["prompt"]) for row in rows],
            labels=np.asarray([int(row["label"]) for row in rows], dtype=np.int64),
            prompts=[row["prompt"] for row in rows],
        )
        for name, rows in grouped.items()
    }


def as_request(prompt: str) -> ChatRequest:
    return ChatRequest(model="auto", messages=[ChatMessage(role="user", content=prompt)])


def features_of(split: Split) -> Array:
    return np.asarray([extract_features(request) for request in split.requests], dtype=np.float64)


def fit_logistic(x: Array, y: Array, l2: float, steps: int = 25) -> Stage:
    """Newton's method on the standardised inputs (the bias is not regularised)."""
    mean = x.mean(axis=0)
    std = np.where(x.std(axis=0) > 1e-9, x.std(axis=0), 1.0)
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    theta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = sigmoid(z @ theta)
        gradient = z.T @ (p - y) + penalty * theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-6:
            break
    return Stage(mean=mean, std=std, weights=theta[:-1], bias=float(theta[-1]))


def fit_platt(stage: Stage, x: Array, y: Array) -> Stage:
    """Fit p = sigmoid(a * logit + b) on held-apart data, so scores are calibrated probabilities."""
    logits = stage.raw_logit(x)
    platt = fit_logistic(logits[:, None], y, l2=0.0)
    # fit_logistic standardised the logit; fold that back into a and b
    stage.platt_a = float(platt.weights[0] / platt.std[0])
    stage.platt_b = float(platt.bias - platt.weights[0] * platt.mean[0] / platt.std[0])
    return stage


def log_loss(p: Array, y: Array) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def train_stage(x_train: Array, y_train: Array, x_val: Array, y_val: Array) -> Stage:
    """The L2 strength with the lowest validation loss, then Platt-calibrated on validation."""
    fitted = [fit_logistic(x_train, y_train, l2) for l2 in L2_CHOICES]
    best = min(fitted, key=lambda stage: log_loss(sigmoid(stage.raw_logit(x_val)), y_val))
    return fit_platt(best, x_val, y_val)


def train(data: Path, output: Path, embedder: Embedder, threshold: float, band: float) -> Artefact:
    """Fit both stages on `train`/`validation`, measure on `test`, write the artefact."""
    splits = load_splits(data)
    inputs: dict[str, tuple[Array, Array]] = {}
    for name in ("train", "validation"):
        split = splits[name]
        features = features_of(split)
        embeddings = embedder.embed(split.prompts).astype(np.float64)
        inputs[name] = (features, np.hstack([features, embeddings]))
    y_train, y_val = (splits[name].labels.astype(np.float64) for name in ("train", "validation"))
    cheap = train_stage(inputs["train"][0], y_train, inputs["validation"][0], y_val)
    full = train_stage(inputs["train"][1], y_train, inputs["validation"][1], y_val)
    artefact = Artefact(
        cheap=cheap, full=full, feature_names=list(FEATURE_NAMES), embedding=embedder.spec,
        training_data_sha256=file_sha256(data), metrics={},
    )  # fmt: skip
    artefact.metrics = evaluate(artefact, splits["test"], embedder, threshold, band).summary()
    artefact.save(output)
    return artefact


def auc(scores: Array, labels: npt.NDArray[np.int64]) -> float:
    """Probability that a random hard prompt scores above a random easy one (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(sorted_scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(scores: Array, labels: npt.NDArray[np.int64], bins: int = 10) -> float:
    edges = np.minimum((scores * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = edges == b
        if in_bin.any():
            error += in_bin.mean() * abs(scores[in_bin].mean() - labels[in_bin].mean())
    return float(error)


def caught_at_share(scores: Array, labels: npt.NDArray[np.int64], share: float) -> float:
    """Share of hard prompts among the top `share` of scores (what a router at that heavy share catches)."""
    count = round(share * len(scores))
    top = np.argsort(-scores, kind="mergesort")[:count]
    return float(labels[top].sum() / max(labels.sum(), 1))


@dataclass
class Evaluation:
    """The held-out figures of the learned scorer and the baselines."""

    scores: Array  # the cascade's
    full_scores: Array | None  # stage 2 on every prompt (None: not measured, it embeds them all)
    lengths: Array
    labels: npt.NDArray[np.int64]
    threshold: float
    embedded_share: float

    def summary(self) -> dict[str, Any]:
        heavy = self.scores >= self.threshold
        share = float(heavy.mean())
        return {
            "rows": len(self.labels),
            "threshold": self.threshold,
            "accuracy": float((heavy == (self.labels == 1)).mean()),
            "auc": auc(self.scores, self.labels),
            "auc_embedding_on_all": None if self.full_scores is None else auc(self.full_scores, self.labels),
            "auc_length_only": auc(self.lengths, self.labels),
            "brier": float(np.mean((self.scores - self.labels) ** 2)),
            "ece": expected_calibration_error(self.scores, self.labels),
            "embedded_share": self.embedded_share,
            "heavy_share": share,
            "hard_caught": float(heavy[self.labels == 1].mean()),
            "hard_caught_length_only": caught_at_share(self.lengths, self.labels, share),
            "hard_caught_random": share,
        }

    def curve(self, scores: Array, points: int = 21) -> list[tuple[float, float]]:
        shares = np.linspace(0.0, 1.0, points)
        return [(float(s), caught_at_share(scores, self.labels, float(s))) for s in shares]


def evaluate(
    artefact: Artefact, split: Split, embedder: Embedder, threshold: float, band: float, *, embed_all: bool = True
) -> Evaluation:
    """Score the split with the cascade (and, with `embed_all`, stage 2 on everything for comparison)."""
    before = embedder.computed + embedder.cache_hits
    scores = np.asarray([s.value for s in Scorer(artefact, embedder, threshold, band).score_batch(split.requests)])
    embedded = embedder.computed + embedder.cache_hits - before
    full_scores = None
    if embed_all:
        full_inputs = np.hstack([features_of(split), embedder.embed(split.prompts).astype(np.float64)])
        full_scores = artefact.full.predict(full_inputs)
    return Evaluation(
        scores=scores, full_scores=full_scores,
        lengths=np.asarray([len(p) for p in split.prompts], dtype=np.float64), labels=split.labels,
        threshold=threshold, embedded_share=embedded / max(len(split.prompts), 1),
    )  # fmt: skip


def write_curve_png(evaluation: Evaluation, path: Path) -> None:
    """Heavy share vs hard prompts caught: ours, ours with the embedding on all, length-only, random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 5))
    curves = [("learned (cascade)", evaluation.scores), ("length only", evaluation.lengths)]
    if evaluation.full_scores is not None:
        curves.insert(1, ("learned, embedding on all", evaluation.full_scores))
    for label, scores in curves:
        shares, caught = zip(*evaluation.curve(scores, points=101), strict=True)
        axes.plot(shares, caught, label=label)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="random")
    summary = evaluation.summary()
    axes.scatter([summary["heavy_share"]], [summary["hard_caught"]], color="black", zorder=3,
                 label=f"threshold {evaluation.threshold}")  # fmt: skip
    axes.set_xlabel("share of requests sent to heavy")
    axes.set_ylabel("share of hard prompts caught")
    axes.set_title(f"Router on the held-out split ({summary['rows']} prompts)")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_report(evaluation: Evaluation) -> str:
    """The figures `autoglm router eval` prints."""
    s = evaluation.summary()
    all_auc = "n/a" if s["auc_embedding_on_all"] is None else f"{s['auc_embedding_on_all']:.3f}"
    lines = [
        f"held-out rows: {s['rows']}  threshold: {s['threshold']}  embedded: {s['embedded_share']:.1%} of prompts",
        f"accuracy: {s['accuracy']:.3f}  AUC: {s['auc']:.3f} (embedding on all {all_auc}, "
        f"length only {s['auc_length_only']:.3f}, random 0.500)",
        f"calibration: Brier {s['brier']:.3f}  ECE {s['ece']:.3f}",
        f"at heavy share {s['heavy_share']:.1%}, hard prompts caught: learned {s['hard_caught']:.1%}, "
        f"length only {s['hard_caught_length_only']:.1%}, random {s['hard_caught_random']:.1%}",
        "heavy share -> hard caught (learned | length only | random):",
    ]
    for (share, ours), (_, length) in zip(
        evaluation.curve(evaluation.scores, 11), evaluation.curve(evaluation.lengths, 11), strict=True
    ):
        lines.append(f"  {share:4.0%} -> {ours:6.1%} | {length:6.1%} | {share:6.1%}")
    return "\n".join(lines)
