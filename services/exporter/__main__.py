"""`python -m services.exporter`: run the exporter."""

from __future__ import annotations

from services.exporter.app import SERVICE, create_app
from services.exporter.config import ExporterSettings
from shared.service import parse_help, run_service
from shared.settings import load_settings

DESCRIPTION = "Open-AutoGLM exporter: persists requests and results from Kafka into PostgreSQL."


def main(argv: list[str] | None = None) -> None:
    """Parse --help, load settings, serve until SIGTERM."""
    parse_help("python -m services.exporter", DESCRIPTION, argv)
    settings = load_settings(ExporterSettings)
    run_service(service=SERVICE, settings=settings, create_app=create_app, listen=settings.exporter)


if __name__ == "__main__":
    main()
