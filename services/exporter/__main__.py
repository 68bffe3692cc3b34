"""`python -m services.exporter`: run the exporter."""

from __future__ import annotations

import argparse

from services.exporter.app import SERVICE, create_app
from services.exporter.config import ExporterSettings
from shared.logging import setup_logging
from shared.service import serve
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    """Parse --help, load settings, run until SIGTERM."""
    argparse.ArgumentParser(
        prog="python -m services.exporter",
        description="Open-AutoGLM exporter: persists requests and results from Kafka into PostgreSQL. "
        "Configured by deploy/deployment.yaml and AUTOGLM_* environment variables.",
    ).parse_args(argv)
    settings = load_settings(ExporterSettings)
    setup_logging(SERVICE, settings.log_level, settings.log_format)
    serve(create_app(settings), host=settings.exporter.host, port=settings.exporter.port, service=SERVICE)


if __name__ == "__main__":
    main()
