"""`python -m services.gateway`: run the gateway."""

from __future__ import annotations

from services.gateway.app import SERVICE, create_app
from services.gateway.config import GatewaySettings
from shared.service import parse_help, run_service
from shared.settings import load_settings

DESCRIPTION = "Open-AutoGLM gateway: OpenAI-compatible HTTP API (127.0.0.1:8000 by default)."


def main(argv: list[str] | None = None) -> None:
    """Parse --help, load settings, serve until SIGTERM."""
    parse_help("python -m services.gateway", DESCRIPTION, argv)
    settings = load_settings(GatewaySettings)
    run_service(service=SERVICE, settings=settings, create_app=create_app, listen=settings.gateway)


if __name__ == "__main__":
    main()
