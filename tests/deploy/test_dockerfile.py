"""The Dockerfile, read as Docker would (no engine here, and hadolint, a Haskell program, is not installable)."""

from __future__ import annotations

import fnmatch
import re

from shared.settings import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    parsed = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), rest.strip()))
    return parsed


def test_multi_stage_with_a_slim_non_root_runtime() -> None:
    steps = instructions()
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) >= 3 and stages[-1].endswith("AS runtime")
    assert any(keyword == "ARG" and args.startswith("PYTHON_IMAGE=python:3.11-slim") for keyword, args in steps)
    runtime = steps[[i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"][-1] :]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert any(keyword == "ARG" and args.startswith("VARIANT=cpu") for keyword, args in steps)


def test_everything_copied_is_in_the_build_context() -> None:
    """Each COPY source exists and .dockerignore lets it through (a `**` then `!path` allow-list)."""
    rules = [
        line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negated = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or pattern == "**":
                keep = negated
        return keep

    sources = [args.split()[:-1] for keyword, args in instructions() if keyword == "COPY" and "--from=" not in args]
    assert sources
    for source in (item for group in sources for item in group):
        assert (REPO_ROOT / source).exists(), source
        assert included(source.rstrip("/")), f"{source} is excluded by .dockerignore"
