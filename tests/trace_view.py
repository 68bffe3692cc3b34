"""Drive the local trace view (deploy/local/jaeger/ui) from tests: its layout code under node, its page
in headless Chromium. Each is skipped, with the reason, on a machine without that program."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from html import unescape
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VIEW_MODULE = REPO_ROOT / "deploy" / "local" / "jaeger" / "ui" / "static" / "trace-view.mjs"

NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps trying hosts this closed network refuses.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def needs_node() -> None:
    if NODE is None:
        pytest.skip("node is not installed: the trace view's layout code is JavaScript (apt-get install nodejs)")


def span_rows(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """`spanRows` of the trace view for a trace in the query API's JSON: the rows its trace page draws."""
    needs_node()
    assert NODE is not None
    script = (
        f"import {{ spanRows }} from {json.dumps(VIEW_MODULE.as_uri())};\n"
        "let input = ''; for await (const chunk of process.stdin) input += chunk;\n"
        "process.stdout.write(JSON.stringify(spanRows(JSON.parse(input))));\n"
    )
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        input=json.dumps(trace),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def rendered_page(url: str) -> str:
    """The page at `url` as headless Chromium has it once its scripts have run (its DOM, serialised)."""
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed: the trace view is checked in headless Chromium (apt-get install chromium)"
        )
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def waterfall_rows(page: str) -> list[tuple[str, str]]:
    """(service, operation) of each row of a trace page's waterfall."""
    labels = re.findall(r'<div class="label"[^>]*><span class="service"[^>]*>([^<]*)</span>([^<]*)</div>', page)
    return [(unescape(service), unescape(operation).strip()) for service, operation in labels]
