"""`python -m services.gateway`: run the gateway."""

from __future__ import annotations

import argparse

from services.gateway.app import SERVICE, create_app
from services.gateway.config import GatewaySettings
from shared.logging import setup_logging
from shared.service import serve
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    """Parse --help, load settings, serve HTTP until SIGTERM."""
    argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="Open-AutoGLM gateway: OpenAI-compatible HTTP API on 127.0.0.1:8000 by default. "
        "Configured by deploy/deployment.yaml and AUTOGLM_* environment variables.",
    ).parse_args(argv)
    settings = load_settings(GatewaySettings)
    setup_logging(SERVICE, settings.log_level, settings.log_format)
    serve(create_app(settings), host=settings.gateway.host, port=settings.gateway.port, service=SERVICE)


if __name__ == "__main__":
    main()
