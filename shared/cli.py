"""The `autoglm` command. Heavy modules are imported inside each command, so `--help` is instant."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from shared.logging import setup_logging
from shared.settings import CommonSettings, load_settings

if TYPE_CHECKING:
    from shared.db.keys import KeyStore


class StackSettings(CommonSettings):
    """Settings of the whole local stack, as `autoglm run` sees them."""


def cmd_run(args: argparse.Namespace) -> int:
    """Start and supervise the four services (Kafka and PostgreSQL must be up: `make up`)."""
    from shared.supervisor import run_stack

    settings = load_settings(StackSettings)
    ports = {"exporter": args.exporter_port, "router": args.router_port, "worker": args.worker_port}
    return asyncio.run(run_stack(settings, args.port, ports))


def cmd_build_tiny(args: argparse.Namespace) -> int:
    """Build the tiny light and heavy checkpoints (random weights, local tokenizer) if missing."""
    from services.worker.checkpoints import ensure_tiny_checkpoints

    models_dir = Path(args.models_dir) if args.models_dir else load_settings(StackSettings).models_dir
    ensure_tiny_checkpoints(models_dir, force=args.force)
    print(f"tiny checkpoints in {models_dir}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply the database migrations."""
    from shared.db.migrate import upgrade

    url = args.database_url or load_settings(StackSettings).database_url
    upgrade(url)
    print("database schema is up to date")
    return 0


def key_store_command(operation: Callable[[KeyStore, dict[str, list[str]]], Awaitable[int]]) -> int:
    """Run `operation` on the key store of the configured database, its schema migrated first."""
    from services.gateway.config import GatewaySettings
    from shared.db import make_engine
    from shared.db.keys import KeyStore
    from shared.db.migrate import upgrade

    settings = load_settings(GatewaySettings)
    upgrade(settings.database_url)

    async def run() -> int:
        engine = make_engine(settings.database_url, pool_size=1)
        try:
            return await operation(KeyStore(engine), settings.gateway.roles)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key and print it (once: only its hash is stored)."""

    async def create(store: KeyStore, roles: dict[str, list[str]]) -> int:
        if args.role not in roles:
            print(f"error: unknown role {args.role!r} (roles: {', '.join(sorted(roles))})", file=sys.stderr)
            return 2
        if not 1 <= len(args.name) <= 200:
            print("error: --name must be 1 to 200 characters", file=sys.stderr)
            return 2
        key, plaintext = await store.create(args.name, args.role, args.rpm, args.tpm)
        print(plaintext)  # alone on stdout, so that KEY=$(autoglm keys create ...) works
        print(f"created {key.key_id} (name {key.name!r}, role {key.role}); it is not shown again", file=sys.stderr)
        return 0

    return key_store_command(create)


def cmd_keys_list(args: argparse.Namespace) -> int:
    """List API keys (never their secrets)."""

    async def show(store: KeyStore, roles: dict[str, list[str]]) -> int:
        print(f"{'KEY ID':<22} {'NAME':<20} {'ROLE':<8} {'PREFIX':<14} {'CREATED':<20} {'REVOKED':<20} RPM    TPM")
        for key in await store.all_keys():
            revoked = f"{key.revoked_at:%Y-%m-%d %H:%M:%S}" if key.revoked_at else "-"
            print(
                f"{key.key_id:<22} {key.name[:20]:<20} {key.role:<8} {key.prefix:<14} "
                f"{key.created_at:%Y-%m-%d %H:%M:%S}  {revoked:<20} "
                f"{key.requests_per_minute or '-':<6} {key.tokens_per_minute or '-'}"
            )
        return 0

    return key_store_command(show)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke an API key (gateways stop accepting it within their key cache ttl, 5 s by default)."""

    async def revoke(store: KeyStore, roles: dict[str, list[str]]) -> int:
        key = await store.revoke(args.key_id)
        if key is None:
            print(f"error: no API key {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {key.key_id} ({key.name!r}, role {key.role})")
        return 0

    return key_store_command(revoke)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Rank models over a time window by the composite score: performance 40%, stability 30%, activity 20%,
    compatibility 10% (each z-score normalised), from the results the exporter stored."""
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db import make_engine
    from shared.leaderboard import WindowError, build_leaderboard, model_features, parse_window, read_live_cards, render

    try:
        parse_window(args.window)
    except WindowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = load_settings(StackSettings)

    async def run() -> int:
        try:
            cards = await asyncio.wait_for(read_live_cards(settings.kafka_bootstrap, timeout_s=5.0), 10.0)
        except Exception as error:  # Kafka is only needed for the model cards: fall back to the deployment file
            print(f"note: model cards not read from Kafka ({type(error).__name__}); using the deployment file",
                  file=sys.stderr)  # fmt: skip
            cards = []
        engine = make_engine(args.database_url or settings.database_url, pool_size=1)
        try:
            board = await build_leaderboard(engine, args.window, model_features(settings, cards), limit=args.limit)
        except (OSError, SQLAlchemyError) as error:
            print(f"error: cannot read the results from PostgreSQL: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        finally:
            await engine.dispose()
        print(board.model_dump_json(indent=2) if args.json else render(board))
        return 0

    return asyncio.run(run())


def add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`autoglm keys create|list|revoke`."""
    keys = commands.add_parser("keys", help="API keys of the gateway").add_subparsers(
        dest="keys_command", required=True, metavar="SUBCOMMAND"
    )
    create = keys.add_parser("create", help=cmd_keys_create.__doc__, description=cmd_keys_create.__doc__)
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--role", required=True, help="a role of gateway.roles: admin, user, reader by default")
    create.add_argument("--rpm", type=positive, help="chat completions per minute (default: the gateway's limit)")
    create.add_argument("--tpm", type=positive, help="tokens per minute (default: the gateway's limit)")
    create.set_defaults(handler=cmd_keys_create)
    keys.add_parser("list", help=cmd_keys_list.__doc__, description=cmd_keys_list.__doc__).set_defaults(
        handler=cmd_keys_list
    )
    revoke = keys.add_parser("revoke", help=cmd_keys_revoke.__doc__, description=cmd_keys_revoke.__doc__)
    revoke.add_argument("key_id", metavar="KEY_ID", help="e.g. key_0f3a9c2b5d7e1f00 (see `autoglm keys list`)")
    revoke.set_defaults(handler=cmd_keys_revoke)


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cmd_topics(args: argparse.Namespace) -> int:
    """Create the platform's topics with the configured partition counts."""
    from shared.kafka import ensure_topics, topic_partitions

    settings = load_settings(StackSettings)
    created = asyncio.run(ensure_topics(settings))
    for name, partitions in topic_partitions(settings).items():
        state = "created" if name in created else "exists"
        print(f"  {name:<28} {partitions:>3} partitions  {state}")
    return 0


def cmd_asyncapi(args: argparse.Namespace) -> int:
    """Write the AsyncAPI document of every topic and message (generated by FastStream)."""
    from shared.asyncapi import build_asyncapi

    document = json.dumps(build_asyncapi(), indent=2, sort_keys=True) + "\n"  # sorted: stable diffs
    if args.output == "-":
        sys.stdout.write(document)
    else:
        Path(args.output).write_text(document)
        print(f"wrote {args.output}")
    return 0


def cmd_triton_repo(args: argparse.Namespace) -> int:
    """Write a Triton model repository (config.pbtxt per model) from the deployment file's triton pools."""
    from services.worker.triton_repository import write_repository

    written = write_repository(load_settings(StackSettings), Path(args.output), args.pool or None, args.backend)
    for config in written:
        print(f"wrote {config}")
    if not written:
        print("no triton pools in the deployment file (name pools with --pool)", file=sys.stderr)
    return 0 if written else 1


def cmd_deploy_render(args: argparse.Namespace) -> int:
    """Render the compose override or the k8s overlay (replicas, resources, batching, workers) from deployment.yaml."""
    from shared.deploy import DeploySettings, default_output, render, write_rendered

    settings = load_settings(DeploySettings)
    out_dir = Path(args.output) if args.output else default_output(args.target)
    files = render(args.target, settings, out_dir, args.kafka_bootstrap)
    for path in write_rendered(files, out_dir):
        print(f"wrote {path}")
    return 0


def add_deploy_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`autoglm deploy render`."""
    deploy = commands.add_parser("deploy", help="container deployments").add_subparsers(
        dest="deploy_command", required=True, metavar="SUBCOMMAND"
    )
    render = deploy.add_parser("render", help=cmd_deploy_render.__doc__, description=cmd_deploy_render.__doc__)
    render.add_argument("--target", required=True, choices=["compose", "k8s"], help="what to render")
    render.add_argument(
        "-o", "--output", help="directory to write (default: deploy/compose or deploy/k8s/overlays/deployment)"
    )
    render.add_argument(
        "--kafka-bootstrap",
        default="kafka:9092",
        help="k8s: the Kafka cluster the pods and KEDA's scalers reach (default: kafka:9092)",
    )
    render.set_defaults(handler=cmd_deploy_render)


def cmd_router_train(args: argparse.Namespace) -> int:
    """Train the learned complexity scorer from labelled JSONL and write its artefact."""
    from services.router.config import RouterSettings
    from services.router.embedding import Embedder, EmbeddingSpec
    from services.router.training import train

    settings = load_settings(RouterSettings)
    threshold = settings.routing.threshold if args.threshold is None else args.threshold
    band = settings.router.scorer.band if args.band is None else args.band
    spec = EmbeddingSpec(engine=args.engine, max_tokens=args.max_tokens, layers=args.layers)
    embedder = Embedder(spec, cache_size=1_000_000)
    artefact = train(Path(args.data), Path(args.output), embedder, threshold, band)
    print(f"wrote {args.output}; held-out figures:")
    print(json.dumps(artefact.metrics, indent=1))
    return 0


def cmd_router_eval(args: argparse.Namespace) -> int:
    """Evaluate a scorer artefact on the held-out split: accuracy, AUC, calibration, heavy share vs hard caught."""
    from services.router.config import RouterSettings
    from services.router.embedding import Embedder
    from services.router.learned import Artefact
    from services.router.training import evaluate, format_report, load_splits, write_curve_png

    settings = load_settings(RouterSettings)
    threshold = settings.routing.threshold if args.threshold is None else args.threshold
    band = settings.router.scorer.band if args.band is None else args.band
    artefact_path = Path(args.artefact) if args.artefact else settings.router.scorer.artefact
    if artefact_path is None:
        print("error: no artefact: pass --artefact or set router.scorer.artefact", file=sys.stderr)
        return 2
    splits = load_splits(Path(args.data))
    if args.split not in splits:
        print(f"error: {args.data} has no {args.split!r} rows (splits: {sorted(splits)})", file=sys.stderr)
        return 2
    artefact = Artefact.load(artefact_path)
    evaluation = evaluate(artefact, splits[args.split], Embedder(artefact.embedding), threshold, band)
    print(format_report(evaluation))
    if args.png:
        write_curve_png(evaluation, Path(args.png))
        print(f"curve written to {args.png}")
    return 0


def cmd_router_export_feedback(args: argparse.Namespace) -> int:
    """Export clients' feedback on the light pool's answers as labelled JSONL for `autoglm router train`."""
    from services.router.config import RouterSettings
    from services.router.feedback_export import LabelRule, export_feedback, write_rows
    from shared.db import make_engine

    settings = load_settings(RouterSettings)
    try:
        rule = LabelRule(
            light_pool=settings.routing.light_pool, hard_at_most=args.hard_at_most,
            easy_at_least=args.easy_at_least, min_count=args.min_count, threshold=settings.routing.threshold,
        )  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    async def run() -> list[dict[str, object]]:
        engine = make_engine(args.database_url or settings.database_url, pool_size=1)
        try:
            export = await export_feedback(engine, rule, args.since)
        finally:
            await engine.dispose()
        print(export.summary(), file=sys.stderr)
        return export.rows

    rows = asyncio.run(run())
    if args.output == "-":
        write_rows(rows, sys.stdout)
    else:
        with Path(args.output).open("w", encoding="utf-8") as out:
            write_rows(rows, out)
        print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    return 0


def since(text: str) -> datetime:
    """An argparse type: an ISO date or time; without a zone, UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from error
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def add_router_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`autoglm router train|eval|export-feedback`."""
    router = commands.add_parser("router", help="the learned complexity scorer").add_subparsers(
        dest="router_command", required=True, metavar="SUBCOMMAND"
    )
    train = router.add_parser("train", help=cmd_router_train.__doc__, description=cmd_router_train.__doc__)
    train.add_argument("--data", required=True, help="labelled JSONL (prompt, label, source, split)")
    train.add_argument("--output", required=True, help="artefact file to write (JSON)")
    train.add_argument("--engine", choices=("onnx-int8", "torch"), default="onnx-int8", help="embedding engine")
    train.add_argument("--max-tokens", type=int, default=32, help="prompt tokens embedded (default 32)")
    train.add_argument(
        "--layers", type=int, default=2, help="encoder layers run, of MiniLM's 6 (default 2: routes as well as 6)"
    )
    evaluate = router.add_parser("eval", help=cmd_router_eval.__doc__, description=cmd_router_eval.__doc__)
    evaluate.add_argument("--data", required=True, help="labelled JSONL (prompt, label, source, split)")
    evaluate.add_argument("--artefact", help="default: router.scorer.artefact from the settings")
    evaluate.add_argument("--png", help="write the heavy-share vs hard-caught curve to this PNG")
    evaluate.add_argument("--split", default="test", help="rows to evaluate on (default: the held-out test split)")
    for sub in (train, evaluate):
        sub.add_argument("--threshold", type=float, help="routing threshold (default: routing.threshold)")
        sub.add_argument("--band", type=float, help="embedding band around it (default: router.scorer.band)")
    train.set_defaults(handler=cmd_router_train)
    evaluate.set_defaults(handler=cmd_router_eval)
    add_export_feedback_command(router)


def add_export_feedback_command(router: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`autoglm router export-feedback`: options of the labelling rule (data/router/DATA.md)."""
    doc = cmd_router_export_feedback.__doc__
    export = router.add_parser("export-feedback", help=doc, description=f"{doc} See data/router/DATA.md.")
    export.add_argument("-o", "--output", default="-", help="JSONL file to write (default: stdout)")
    export.add_argument(
        "--since", type=since, help="only feedback sent at or after this ISO date/time (UTC if no zone)"
    )
    export.add_argument("--min-count", type=positive, default=1, help="fewest scores a prompt needs (default 1)")
    hard_help = "mean score at or below which a light answer failed: label hard (default -0.5)"
    export.add_argument("--hard-at-most", type=float, default=-0.5, help=hard_help)
    easy_help = "mean score at or above which a light answer was enough: label easy (default 0.5)"
    export.add_argument("--easy-at-least", type=float, default=0.5, help=easy_help)
    export.add_argument("--database-url", help="default: AUTOGLM_DATABASE_URL or the local cluster")
    export.set_defaults(handler=cmd_router_export_feedback)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `autoglm` and its subcommands."""
    parser = argparse.ArgumentParser(prog="autoglm", description="Open-AutoGLM: LLM inference serving on Apache Kafka.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    run.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    run.add_argument("--router-port", type=int, default=8101)
    run.add_argument("--exporter-port", type=int, default=8102)
    run.add_argument("--worker-port", type=int, default=8110, help="first worker port; one per replica")
    run.set_defaults(handler=cmd_run)

    models = commands.add_parser("models", help="manage model checkpoints").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND"
    )
    tiny = models.add_parser("build-tiny", help=cmd_build_tiny.__doc__, description=cmd_build_tiny.__doc__)
    tiny.add_argument("--models-dir", help="where to write (default: AUTOGLM_MODELS_DIR or var/models)")
    tiny.add_argument("--force", action="store_true", help="rebuild even if present")
    tiny.set_defaults(handler=cmd_build_tiny)

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="SUBCOMMAND"
    )
    migrate = db.add_parser("migrate", help=cmd_migrate.__doc__, description=cmd_migrate.__doc__)
    migrate.add_argument("--database-url", help="default: AUTOGLM_DATABASE_URL or the local cluster")
    migrate.set_defaults(handler=cmd_migrate)

    topics = commands.add_parser("topics", help="Kafka topics").add_subparsers(
        dest="topics_command", required=True, metavar="SUBCOMMAND"
    )
    topics.add_parser("create", help=cmd_topics.__doc__, description=cmd_topics.__doc__).set_defaults(
        handler=cmd_topics
    )

    triton = commands.add_parser("triton", help="Triton Inference Server").add_subparsers(
        dest="triton_command", required=True, metavar="SUBCOMMAND"
    )
    repo = triton.add_parser("write-repo", help=cmd_triton_repo.__doc__, description=cmd_triton_repo.__doc__)
    repo.add_argument("--output", required=True, help="model repository directory to write")
    repo.add_argument("--pool", action="append", help="pool to include, any backend (default: the triton pools)")
    repo.add_argument("--backend", default="python", choices=["python", "tensorrtllm"], help="Triton backend")
    repo.set_defaults(handler=cmd_triton_repo)

    add_keys_commands(commands)
    add_router_commands(commands)
    add_deploy_commands(commands)

    board = commands.add_parser("leaderboard", help="rank models by the composite score",
                                description=cmd_leaderboard.__doc__)  # fmt: skip
    board.add_argument("--window", default="24h", help="how far back: 90s, 15m, 24h, 7d ... (default 24h)")
    board.add_argument("--limit", type=int, choices=range(1, 11), default=10, metavar="1-10", help="models shown")
    board.add_argument("--json", action="store_true", help="print the board as JSON (as GET /v1/leaderboard)")
    board.add_argument("--database-url", help="default: the configured database_url")
    board.set_defaults(handler=cmd_leaderboard)

    asyncapi = commands.add_parser("asyncapi", help=cmd_asyncapi.__doc__, description=cmd_asyncapi.__doc__)
    asyncapi.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    asyncapi.set_defaults(handler=cmd_asyncapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `autoglm` console script."""
    args = build_parser().parse_args(argv)
    setup_logging("autoglm", "INFO", "text" if sys.stderr.isatty() else "auto")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
