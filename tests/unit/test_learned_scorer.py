"""The learned scorer: features, calibration, the cascade and its cache, the artefact, the held-out figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from services.router.config import DEFAULT_ARTEFACT, ScorerOptions
from services.router.embedding import DIMENSIONS, Embedder
from services.router.learned import FEATURE_NAMES, Artefact, Scorer, extract_features, load_scorer
from services.router.scoring import heuristic_score, score_batch, score_clear, score_request, use_scorer
from services.router.training import as_request, evaluate, load_splits
from shared.cli import main as autoglm
from shared.messages import ChatMessage, ChatRequest

DATA = Path(__file__).parents[2] / "data" / "router" / "labelled.jsonl"
HARD_MATH = (
    "Let $f(x)=\\frac{x^3-3x+1}{x^2+1}$. Find the number of real $c$ such that $f(f(c))=c$ "
    "and compute the sum $\\sum_{k=1}^{n} \\binom{n}{k} k^2$ in closed form."
)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(Artefact.load(DEFAULT_ARTEFACT).embedding, cache_size=64)


@pytest.fixture(scope="module")
def artefact() -> Artefact:
    return Artefact.load(DEFAULT_ARTEFACT)


def features(request: ChatRequest) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, extract_features(request), strict=True))


def test_features_read_the_conversation() -> None:
    request = ChatRequest(
        model="auto", max_tokens=2000,
        messages=[
            ChatMessage(role="system", content="You are terse."),
            ChatMessage(role="user", content="Was ist $\\frac{1}{2}$?\n A. 0.5\n B. 2"),
            ChatMessage(role="user", content="```python\ndef f(): pass\n```"),
        ],
    )  # fmt: skip
    values = features(request)
    assert values["turns"] == 1 and values["code"] == 1 and values["long_answer"] == 1
    assert values["system_prompt"] > 0 and values["latex"] > 0 and values["choices"] == 2
    assert features(as_request("hi"))["system_prompt"] == 0
    assert features(as_request("日本語の質問です"))["non_ascii"] == 1.0


def test_the_embedder_is_normalised_and_caches_repeats(embedder: Embedder) -> None:
    vectors = embedder.embed(["a question about cells", "a question about cells", "prove it"])
    assert vectors.shape == (3, DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[1])
    computed = embedder.computed
    again = embedder.embed(["prove it"])
    assert embedder.computed == computed and np.array_equal(again[0], vectors[2])


def test_scores_are_probabilities_and_explained(artefact: Artefact, embedder: Embedder) -> None:
    scorer = Scorer(artefact, embedder, threshold=0.5, band=1.0)  # band 1: every request is embedded
    prompts = ["hi", HARD_MATH, "x" * 20_000, "", "Why?" * 500]
    for score in scorer.score_batch([as_request(prompt) for prompt in prompts]):
        assert 0.0 <= score.value <= 1.0
        assert set(score.contributions) == {*FEATURE_NAMES, "embedding"}
    assert scorer.score(as_request("hi")).value < 0.5 < scorer.score(as_request(HARD_MATH)).value


def test_the_cascade_embeds_only_near_the_threshold_and_once(artefact: Artefact) -> None:
    embedder = Embedder(artefact.embedding, cache_size=64)
    scorer = Scorer(artefact, embedder, threshold=0.5, band=0.15)
    clear = as_request("hi")
    assert abs(artefact.cheap.predict(np.asarray([extract_features(clear)]))[0] - 0.5) >= 0.15
    assert "embedding" not in scorer.score(clear).contributions and embedder.computed == 0
    rows = load_splits(DATA)["validation"].requests
    cheap = artefact.cheap.predict(np.asarray([extract_features(r) for r in rows]))
    near = [r for r, p in zip(rows, cheap, strict=True) if abs(p - 0.5) < 0.15][:3]
    assert near, "the validation split has prompts the cheap stage is unsure of"
    scores = scorer.score_batch([clear, *near])
    assert embedder.computed == len(near) and all("embedding" in s.contributions for s in scores[1:])
    scorer.score_batch(near)
    assert embedder.computed == len(near) and embedder.cache_hits == len(near)


def test_the_cheap_pass_settles_what_the_cascade_would_not_embed(artefact: Artefact) -> None:
    embedder = Embedder(artefact.embedding, cache_size=64)
    scorer = Scorer(artefact, embedder, threshold=0.5, band=0.10)
    requests = load_splits(DATA)["validation"].requests[:200]
    first = scorer.score_clear(requests)
    assert embedder.computed == 0, "the cheap pass never runs the embedding"
    full = scorer.score_batch(requests)
    settled = [i for i, score in enumerate(first) if score is not None]
    assert 0 < len(settled) < len(requests)
    assert all(first[i] == full[i] for i in settled)
    assert all("embedding" in full[i].contributions for i in range(len(requests)) if first[i] is None)
    assert embedder.computed == len(requests) - len(settled)


def test_the_artefact_round_trips(artefact: Artefact, tmp_path: Path) -> None:
    path = tmp_path / "scorer.json"
    artefact.save(path)
    loaded = Artefact.load(path)
    x = np.random.default_rng(0).normal(size=(4, len(FEATURE_NAMES) + DIMENSIONS))
    assert np.array_equal(loaded.full.predict(x), artefact.full.predict(x))
    assert loaded.training_data_sha256 == artefact.training_data_sha256 and loaded.metrics == artefact.metrics


def test_a_bad_artefact_falls_back_to_the_heuristic(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = tmp_path / "old.json"
    stale.write_text(json.dumps({"format": "autoglm-router-scorer", "version": 0}))
    with caplog.at_level(logging.INFO):
        assert load_scorer(ScorerOptions(artefact=tmp_path / "missing.json"), 0.5) is None
        assert load_scorer(ScorerOptions(artefact=stale), 0.5) is None
        assert load_scorer(ScorerOptions(artefact=None), 0.5) is None
    assert caplog.text.count("routing with the heuristic scorer") == 3 and "not a version 2" in caplog.text


def test_score_request_uses_the_installed_scorer(artefact: Artefact, embedder: Embedder) -> None:
    request = as_request(HARD_MATH)
    use_scorer(Scorer(artefact, embedder, 0.5, 0.15))
    try:
        learned = score_request(request)
    finally:
        use_scorer(None)
    assert "latex" in learned.contributions
    assert score_request(request) == heuristic_score(request)


def test_the_committed_artefact_beats_length_and_random_on_the_held_out_split(
    artefact: Artefact, embedder: Embedder
) -> None:
    figures = evaluate(artefact, load_splits(DATA)["test"], embedder, 0.5, 0.10, embed_all=False).summary()
    assert figures["rows"] > 1000
    assert figures["auc"] > figures["auc_length_only"] + 0.1
    assert figures["hard_caught"] > figures["hard_caught_length_only"] + 0.1
    assert figures["hard_caught"] > figures["hard_caught_random"] + 0.2
    assert figures["ece"] < 0.1
    assert figures["embedded_share"] < 0.6  # the cascade spares most prompts the embedding


def test_router_eval_prints_the_figures_and_draws_the_curve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    sample = [row for row in rows if row["split"] == "test"][::40]  # both labels, every source
    data = tmp_path / "sample.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sample))
    png = tmp_path / "curve.png"
    assert autoglm(["router", "eval", "--data", str(data), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "AUC:" in out and "ECE" in out and "length only" in out and "random" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert autoglm(["router", "eval", "--data", str(data), "--split", "nope"]) == 2


def test_a_batch_with_no_valid_request_scores_to_nothing(artefact: Artefact, embedder: Embedder) -> None:
    """A batch of garbage is all dead letters: scoring what is left must not fail (the batch would loop)."""
    use_scorer(Scorer(artefact, embedder, threshold=0.5, band=0.1))
    try:
        assert score_batch([]) == [] and score_clear([]) == []
    finally:
        use_scorer(None)
