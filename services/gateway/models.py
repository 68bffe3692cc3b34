"""What `GET /v1/models` lists: live models from the registry, or the configured ones until it has any.

With live cards (a heartbeat within their ttl) the list is `auto`, every pool with a live model and
every live model, with what the workers report (pool, backend, version, precision, device,
instances). Until the registry holds a live card (the gateway just started and is replaying the
topic, or no worker has announced itself within the ttl) the list comes from the deployment file:
`auto`, every pool and every model, without the fields only a worker knows.
"""

from __future__ import annotations

from collections import defaultdict

from services.gateway.protocol import ModelCard
from shared.messages import ModelCard as RegistryCard
from shared.registry import RegistryView
from shared.settings import CommonSettings

AUTO = "auto"


def list_models(settings: CommonSettings, registry: RegistryView) -> list[ModelCard]:
    """`auto`, pools and models: live ones from the registry, else the configured ones."""
    live = registry.live_models()
    return from_registry(settings, live) if live else from_config(settings)


def find_model(settings: CommonSettings, registry: RegistryView, model_id: str) -> ModelCard | None:
    """The listed entry named `model_id`, or None."""
    return next((model for model in list_models(settings, registry) if model.id == model_id), None)


def from_registry(settings: CommonSettings, live: list[RegistryCard]) -> list[ModelCard]:
    """One entry per live model (its replicas merged), per pool that has one, and `auto`."""
    by_model: dict[str, list[RegistryCard]] = defaultdict(list)
    by_pool: dict[str, list[RegistryCard]] = defaultdict(list)
    for card in live:
        by_model[card.model_id].append(card)
        by_pool[card.pool].append(card)
    # Configured pools in the file's order, then any pool only a worker knows about.
    pools = [pool for pool in settings.pools if pool in by_pool] + sorted(set(by_pool) - set(settings.pools))
    return [
        ModelCard(id=AUTO, created=created(live)),
        *(pool_entry(pool, by_pool[pool]) for pool in pools),
        *(model_entry(cards) for cards in by_model.values()),
    ]


def pool_entry(pool: str, cards: list[RegistryCard]) -> ModelCard:
    """A pool as a model name: requests to it go to its first model."""
    return ModelCard(
        id=pool,
        created=created(cards),
        pool=pool,
        backend=newest(cards).backend,
        instances=len({card.instance_id for card in cards}),
    )


def model_entry(cards: list[RegistryCard]) -> ModelCard:
    """A live model; fields from its most recently renewed card, `instances` over all of them."""
    card = newest(cards)
    return ModelCard(
        id=card.model_id,
        created=created(cards),
        pool=card.pool,
        backend=card.backend,
        version=card.version,
        precision=card.precision,
        device=card.device,
        max_context_tokens=card.max_context_tokens,
        instances=len({card.instance_id for card in cards}),
    )


def from_config(settings: CommonSettings) -> list[ModelCard]:
    """The fallback: what the deployment file says should run."""
    entries = [ModelCard(id=AUTO)]
    entries += [ModelCard(id=name, pool=name, backend=pool.backend) for name, pool in settings.pools.items()]
    entries += [
        ModelCard(
            id=model.id,
            pool=name,
            backend=pool.backend,
            version=model.version,
            max_context_tokens=model.max_context_tokens,
        )
        for name, pool in settings.pools.items()
        for model in pool.models
    ]
    return entries


def newest(cards: list[RegistryCard]) -> RegistryCard:
    """The most recently renewed card."""
    return max(cards, key=lambda card: card.heartbeat_at)


def created(cards: list[RegistryCard]) -> int:
    """OpenAI's `created`: when the longest-running of these workers started, in Unix seconds."""
    return int(min(card.started_at for card in cards).timestamp())
