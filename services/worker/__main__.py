"""`python -m services.worker`: run a worker for one pool."""

from __future__ import annotations

import argparse

from services.worker.app import create_app
from services.worker.config import WorkerSettings
from services.worker.handlers import SERVICE
from shared.logging import setup_logging
from shared.service import serve
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load settings, run until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m services.worker",
        description="Open-AutoGLM worker: batches a pool's jobs from Kafka and runs them on its models. "
        "Configured by deploy/deployment.yaml and AUTOGLM_* environment variables.",
    )
    parser.add_argument("--pool", help="pool to serve (default: AUTOGLM_WORKER__POOL or 'light')")
    parser.add_argument("--port", type=int, help="ops port (default: AUTOGLM_WORKER__PORT or 8110)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("pool", args.pool), ("port", args.port)) if value is not None}
    settings = load_settings(WorkerSettings)
    if overrides:
        settings = load_settings(WorkerSettings, worker=settings.worker.model_copy(update=overrides))
    setup_logging(f"{SERVICE}-{settings.worker.pool}", settings.log_level, settings.log_format)
    serve(create_app(settings), host=settings.worker.host, port=settings.worker.port, service=SERVICE)


if __name__ == "__main__":
    main()
