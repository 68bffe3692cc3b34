"""`python -m services.worker`: run a worker for one pool."""

from __future__ import annotations

import argparse

from services.worker.app import create_app
from services.worker.config import WorkerSettings
from services.worker.handlers import SERVICE
from shared.service import run_service
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load settings, serve until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m services.worker",
        description="Open-AutoGLM worker: batches a pool's jobs from Kafka and runs them on its models.",
        epilog="Configured by deploy/deployment.yaml and AUTOGLM_* environment variables (see README).",
    )
    parser.add_argument("--pool", help="pool to serve (default: AUTOGLM_WORKER__POOL or 'light')")
    parser.add_argument("--port", type=int, help="ops port (default: AUTOGLM_WORKER__PORT or 8110)")
    args = parser.parse_args(argv)
    settings = load_settings(WorkerSettings)
    overrides = {key: value for key, value in (("pool", args.pool), ("port", args.port)) if value is not None}
    if overrides:
        settings = load_settings(WorkerSettings, worker=settings.worker.model_copy(update=overrides))
    service = f"{SERVICE}-{settings.worker.pool}"
    run_service(service=service, settings=settings, create_app=create_app, listen=settings.worker)


if __name__ == "__main__":
    main()
