"""Permissions, sliding windows and request bounds: the gateway's auth and limits logic without a stack."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from services.gateway.auth import Principal, principal_of
from services.gateway.config import DEFAULT_ROLES, GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.limits import (
    BodySizeLimit,
    RateLimiter,
    SlidingWindow,
    bounds_for,
    check_request,
    token_cost,
)
from services.gateway.protocol import ChatCompletionRequest
from shared.db.keys import KEY_PREFIX, ApiKey, generate_key, hash_key
from shared.messages import utcnow
from shared.supervisor import local_admin_key, service_specs


def principal(role: str, key_id: str = "key_a", **limits: int) -> Principal:
    key = ApiKey(key_id, "test", role, "sk-agl-xxxx", utcnow(), None, limits.get("rpm"), limits.get("tpm"))
    return principal_of(key, DEFAULT_ROLES)


def chat(model: str = "auto", messages: int = 1, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "hello"}] * messages, **fields)


# ------------------------------------------------------------------------------------ keys, roles


def test_keys_are_random_and_only_their_digest_is_kept() -> None:
    first, second = generate_key(), generate_key()
    assert first.startswith(KEY_PREFIX) and len(first) > 40 and first != second
    assert len(hash_key(first)) == 64 and hash_key(first) != hash_key(second) and first not in hash_key(first)


def test_roles_grant_their_permissions() -> None:
    admin, user, reader = principal("admin"), principal("user"), principal("reader")
    assert all(admin.allows(permission) for permission in ("chat", "models", "keys", "requests:all"))
    assert user.allows("chat") and user.allows("models") and not user.allows("keys")
    assert reader.allows("models") and not reader.allows("chat")
    assert not principal("retired-role").allows("models")  # a role no longer configured grants nothing


def test_a_key_sees_its_own_requests_and_an_admin_sees_all() -> None:
    user = principal("user", key_id="key_mine")
    assert user.can_see("key_mine")
    assert not user.can_see("key_theirs") and not user.can_see(None)
    assert principal("admin").can_see("key_theirs")
    assert not principal("reader", key_id="key_mine").can_see("key_mine")  # no requests permission at all


# ------------------------------------------------------------------------------ sliding windows


def test_a_sliding_window_frees_what_left_it() -> None:
    window = SlidingWindow(limit=2, window_s=60)
    window.add(1, now=0.0)
    window.add(1, now=10.0)
    assert window.retry_after(1, now=20.0) == pytest.approx(40.0)  # the first one leaves at 60
    assert window.retry_after(1, now=60.0) is None
    assert window.retry_after(2, now=60.0) == pytest.approx(10.0)  # both must leave: at 70
    assert window.retry_after(3, now=60.0) == 60  # never fits: a whole window


def test_rate_limits_count_per_key_and_prefer_the_keys_own() -> None:
    limiter = RateLimiter(requests_per_minute=5, tokens_per_minute=None)
    strict, other = principal("user", "key_strict", rpm=2), principal("user", "key_other")
    for now in (0.0, 1.0):
        assert limiter.check(strict, 10, now) is None
        limiter.record(strict, 10, now)
    rejection = limiter.check(strict, 10, 2.0)
    assert rejection is not None and rejection.reason == "rate_limit_requests"
    assert rejection.retry_after_s == pytest.approx(58.0)
    assert limiter.check(other, 10, 2.0) is None  # another key has its own window


def test_tokens_per_minute_count_prompt_and_max_tokens() -> None:
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=100)
    caller = principal("user")
    limiter.record(caller, 80, 0.0)
    rejection = limiter.check(caller, 30, 5.0)
    assert rejection is not None and rejection.reason == "rate_limit_tokens" and "used 80" in rejection.message
    assert limiter.check(caller, 20, 5.0) is None


# -------------------------------------------------------------------------------- request bounds


def test_bounds_of_auto_and_pools_are_the_loosest_of_their_models() -> None:
    settings = GatewaySettings()  # tiny-light: context 512, default 16; tiny-heavy: 1024, 32
    auto, light, heavy = (bounds_for(settings, name) for name in ("auto", "light", "tiny-heavy"))
    assert auto is not None and (auto.max_output_tokens, auto.default_max_tokens) == (1024, 32)
    assert light is not None and light.max_output_tokens == 512
    assert heavy is not None and heavy.max_messages == 256
    assert bounds_for(settings, "gpt-17") is None


def test_a_model_may_set_its_own_output_and_message_bounds() -> None:
    settings = GatewaySettings(
        pools={"light": {"models": [{"id": "m", "path": "m", "max_output_tokens": 8, "max_messages": 2}]}},
        routing={"light_pool": "light", "heavy_pool": "light"},
    )
    bounds = bounds_for(settings, "m")
    assert bounds is not None
    check_request(chat("m", messages=2, max_tokens=8), bounds)
    with pytest.raises(ApiError) as too_many:
        check_request(chat("m", messages=3), bounds)
    assert (too_many.value.status, too_many.value.info.param) == (400, "messages")
    with pytest.raises(ApiError) as too_long:
        check_request(chat("m", max_completion_tokens=9), bounds)
    assert (too_long.value.status, too_long.value.info.param) == (400, "max_completion_tokens")


def test_the_token_cost_uses_the_default_max_tokens_when_none_is_asked() -> None:
    bounds = bounds_for(GatewaySettings(), "tiny-light")
    assert token_cost(chat("tiny-light"), bounds) == token_cost(chat("tiny-light", max_tokens=16), bounds)
    assert token_cost(chat("tiny-light", max_tokens=100), bounds) > 100


# ------------------------------------------------------------------------------------- body size


def test_a_body_over_the_limit_is_refused_whether_declared_or_not() -> None:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_middleware(BodySizeLimit, max_bytes=1024)
    client = TestClient(app)
    assert client.post("/echo", content=b"x" * 1024).json() == {"size": 1024}
    declared = client.post("/echo", content=b"x" * 1025)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    streamed = client.post("/echo", content=iter([b"x" * 1000, b"x" * 1000]))  # chunked: no Content-Length
    assert streamed.status_code == 413


# ------------------------------------------------------------------------------ local admin key


def test_make_run_keeps_one_private_admin_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOGLM_ADMIN_KEY", raising=False)
    key, source = local_admin_key(tmp_path)
    assert key.startswith(KEY_PREFIX) and str(tmp_path / "admin.key") in source
    assert stat.S_IMODE((tmp_path / "admin.key").stat().st_mode) == 0o600
    assert local_admin_key(tmp_path)[0] == key  # reused
    monkeypatch.setenv("AUTOGLM_ADMIN_KEY", "sk-agl-from-the-environment-0123")
    assert local_admin_key(tmp_path) == ("sk-agl-from-the-environment-0123", "from AUTOGLM_ADMIN_KEY")


def test_only_the_gateway_is_given_the_admin_key() -> None:
    ports = {"exporter": 1, "router": 2, "worker": 3}
    specs = {spec.name: spec for spec in service_specs(GatewaySettings(), 8000, ports, "sk-agl-local-admin-key-0123")}
    assert specs["gateway"].env == {"AUTOGLM_ADMIN_KEY": "sk-agl-local-admin-key-0123"}
    assert all("AUTOGLM_ADMIN_KEY" not in spec.env for name, spec in specs.items() if name != "gateway")
