"""`python -m services.router`: run the router."""

from __future__ import annotations

import argparse

from services.router.app import SERVICE, create_app
from services.router.config import RouterSettings
from shared.logging import setup_logging
from shared.service import serve
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    """Parse --help, load settings, run until SIGTERM."""
    argparse.ArgumentParser(
        prog="python -m services.router",
        description="Open-AutoGLM router: scores each request and sends it to a pool's jobs topic. "
        "Configured by deploy/deployment.yaml and AUTOGLM_* environment variables.",
    ).parse_args(argv)
    settings = load_settings(RouterSettings)
    setup_logging(SERVICE, settings.log_level, settings.log_format)
    serve(create_app(settings), host=settings.router.host, port=settings.router.port, service=SERVICE)


if __name__ == "__main__":
    main()
