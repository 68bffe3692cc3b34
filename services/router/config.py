"""Router settings: the shared deployment settings plus the router's own section."""

from pathlib import Path

from pydantic import BaseModel, Field

from shared.settings import CommonSettings

DEFAULT_ARTEFACT = Path(__file__).with_name("artefacts") / "scorer-v2.json"


class ScorerOptions(BaseModel):
    """The learned complexity scorer (services/router/learned.py)."""

    artefact: Path | None = Field(
        default=DEFAULT_ARTEFACT, description="trained scorer to load at start; null keeps the heuristic"
    )
    band: float = Field(
        default=0.10, ge=0.0, le=1.0, description="cheap scores this close to the threshold pay for the embedding"
    )
    embedding_cache_size: int = Field(default=4096, ge=0, description="prompts whose embedding is kept (LRU)")
    embedding_batch_size: int = Field(default=32, ge=1)
    embedding_threads: int = Field(
        default=1, ge=1, description="onnxruntime threads per router: more only pay on an otherwise idle machine"
    )


class RouterOptions(BaseModel):
    """Where the router's ops endpoints listen, and its scorer."""

    host: str = "127.0.0.1"
    port: int = Field(default=8101, ge=1, le=65535)
    scorer: ScorerOptions = Field(default_factory=ScorerOptions)


class RouterSettings(CommonSettings):
    """Everything the router reads (env prefix AUTOGLM_, e.g. AUTOGLM_ROUTER__PORT)."""

    router: RouterOptions = Field(default_factory=RouterOptions)
