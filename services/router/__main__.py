"""`python -m services.router`: run the router."""

from __future__ import annotations

from services.router.app import SERVICE, create_app
from services.router.config import RouterSettings
from shared.service import parse_help, run_service
from shared.settings import load_settings

DESCRIPTION = "Open-AutoGLM router: scores each request and sends it to a pool's jobs topic."


def main(argv: list[str] | None = None) -> None:
    """Parse --help, load settings, serve until SIGTERM."""
    parse_help("python -m services.router", DESCRIPTION, argv)
    settings = load_settings(RouterSettings)
    run_service(service=SERVICE, settings=settings, create_app=create_app, listen=settings.router)


if __name__ == "__main__":
    main()
