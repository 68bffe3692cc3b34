"""API keys, roles and limits on the real stack: keys in PostgreSQL, the gateway enforcing them over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.harness import PORT_BASE, REPO, Service, Stack
from tests.e2e.test_pipeline import fetch_row

HI = [{"role": "user", "content": "hi"}]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-light", "messages": HI, "max_tokens": 1, **fields}


@pytest.fixture
def admin(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client of the gateway holding the stack's admin key."""
    with httpx.Client(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=60) as client:
        yield client


def create_key(admin: httpx.Client, role: str, **limits: int) -> dict[str, Any]:
    """A new key made through the admin API (its answer holds the key itself)."""
    response = admin.post("/v1/admin/keys", json={"name": f"test-{role}", "role": role, **limits})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0, timeout=60)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------------ 401


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/auto"), ("GET", "/v1/admin/keys")],
)
def test_a_missing_key_is_an_openai_401(stack: Stack, method: str, path: str) -> None:
    response = httpx.request(method, f"{stack.gateway_url}{path}", json=chat_body() if method == "POST" else None)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "API key" in error["message"] and response.headers["WWW-Authenticate"] == "Bearer"


def test_ops_endpoints_and_the_api_description_need_no_key(stack: Stack) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{stack.gateway_url}{path}", timeout=30, follow_redirects=True).status_code == 200, path


def test_the_openai_sdk_sees_an_authentication_error(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(stack, "sk-agl-not-a-real-key-at-all-0000000000").chat.completions.create(model="auto", messages=HI)  # type: ignore[arg-type]
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    assert "not-a-real-key" not in str(raised.value)  # only a masked prefix is echoed


def test_a_revoked_key_is_refused(stack: Stack, admin: httpx.Client) -> None:
    created = create_key(admin, "user")
    assert httpx.get(f"{stack.gateway_url}/v1/models", headers=bearer(created["key"])).status_code == 200
    revoked = admin.delete(f"/v1/admin/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    response = httpx.get(f"{stack.gateway_url}/v1/models", headers=bearer(created["key"]))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert admin.delete("/v1/admin/keys/key_nobody").status_code == 404


# ------------------------------------------------------------------------------------- roles


def test_a_reader_may_list_models_but_not_chat(stack: Stack, admin: httpx.Client) -> None:
    reader = create_key(admin, "reader")["key"]
    assert httpx.get(f"{stack.gateway_url}/v1/models", headers=bearer(reader)).status_code == 200
    response = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=chat_body(), headers=bearer(reader))
    assert response.status_code == 403
    assert response.json()["error"] | {"message": ""} == {
        "message": "", "type": "permission_error", "param": None, "code": "permission_denied",
    }  # fmt: skip
    with pytest.raises(openai.PermissionDeniedError):
        sdk(stack, reader).chat.completions.create(model="auto", messages=HI)  # type: ignore[arg-type]


def test_a_user_key_cannot_manage_keys(stack: Stack, admin: httpx.Client) -> None:
    user = create_key(admin, "user")["key"]
    response = httpx.get(f"{stack.gateway_url}/v1/admin/keys", headers=bearer(user))
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


def test_a_key_sees_and_cancels_only_its_own_requests(stack: Stack, admin: httpx.Client) -> None:
    alice, bob = create_key(admin, "user")["key"], create_key(admin, "user")["key"]
    accepted = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json=chat_body(),
        headers={**bearer(alice), "Prefer": "respond-async"},
    )
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]
    asyncio.run(fetch_row(stack, "requests", request_id))  # stored: ownership is known to every gateway
    for path in (f"/v1/requests/{request_id}", f"/v1/requests/{request_id}/cancel"):
        method = "POST" if path.endswith("cancel") else "GET"
        theirs = httpx.request(method, f"{stack.gateway_url}{path}", headers=bearer(bob))
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "request_not_found", path
        assert httpx.request(method, f"{stack.gateway_url}{path}", headers=bearer(alice)).status_code in (200, 202)
    assert admin.get(f"/v1/requests/{request_id}").status_code == 200  # an admin sees every request


def test_an_unknown_role_is_a_400(admin: httpx.Client) -> None:
    response = admin.post("/v1/admin/keys", json={"name": "x", "role": "superuser"})
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("role", "unknown_role")


def test_a_key_name_with_control_characters_is_a_400_naming_name(admin: httpx.Client) -> None:
    response = admin.post("/v1/admin/keys", json={"name": "ci\u0000bot", "role": "user"})  # PostgreSQL text has no NUL
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "name"


def test_revoking_an_id_postgresql_cannot_hold_is_a_404(admin: httpx.Client) -> None:
    response = admin.delete("/v1/admin/keys/key_%00")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "key_not_found"


def test_a_key_made_through_the_api_is_listed_without_its_secret(admin: httpx.Client) -> None:
    created = create_key(admin, "user")
    assert created["key"].startswith("sk-agl-") and created["prefix"] == created["key"][:12]
    listed = {key["id"]: key for key in admin.get("/v1/admin/keys").json()["data"]}
    assert listed[created["id"]]["role"] == "user" and "key" not in listed[created["id"]]  # never the secret again


async def test_a_key_made_through_the_api_works_with_the_openai_sdk(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers) as admin:
        response = await admin.post("/v1/admin/keys", json={"name": "sdk", "role": "user"})
    created = response.json()
    client = sdk(stack, created["key"])
    completion = await asyncio.to_thread(client.chat.completions.create, model="auto", messages=HI, max_tokens=2)  # type: ignore[call-overload]
    assert completion.choices[0].message.role == "assistant"
    stored = await fetch_row(stack, "requests", completion.id)
    assert stored["caller"] == created["id"]  # the request is on the key's account


# ----------------------------------------------------------------------------------------- CLI


def autoglm(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`autoglm` as an operator runs it, against the stack's PostgreSQL."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], check=False, cwd=REPO, env=stack.env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_keys_made_revoked_and_listed_with_the_cli(stack: Stack) -> None:
    created = autoglm(stack, "keys", "create", "--name", "cli-test", "--role", "user", "--rpm", "100")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = re.search(r"created (key_[0-9a-f]+)", created.stderr).group(1)  # type: ignore[union-attr]
    completion = sdk(stack, key).chat.completions.create(model="tiny-light", messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert completion.choices[0].message.role == "assistant"

    listing = autoglm(stack, "keys", "list")
    line = next(line for line in listing.stdout.splitlines() if line.startswith(key_id))
    assert "cli-test" in line and "user" in line and key[:12] in line and key not in listing.stdout

    assert autoglm(stack, "keys", "revoke", key_id).returncode == 0
    deadline = time.monotonic() + 10  # the gateway trusts a checked key for key_cache_ttl_s (5 s)
    while httpx.get(f"{stack.gateway_url}/v1/models", headers=bearer(key)).status_code == 200:
        assert time.monotonic() < deadline, "a key revoked with the CLI still works after 10 s"
        time.sleep(0.5)
    assert autoglm(stack, "keys", "revoke", "key_nobody").returncode == 1
    unknown_role = autoglm(stack, "keys", "create", "--name", "x", "--role", "superuser")
    assert unknown_role.returncode == 2 and "unknown role" in unknown_role.stderr


# -------------------------------------------------------------------------------------- limits


def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(stack: Stack, admin: httpx.Client) -> None:
    key = create_key(admin, "user", requests_per_minute=2)["key"]
    url = f"{stack.gateway_url}/v1/chat/completions"
    for _ in range(2):
        assert httpx.post(url, json=chat_body(), headers=bearer(key), timeout=60).status_code == 200
    third = httpx.post(url, json=chat_body(), headers=bearer(key), timeout=60)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert httpx.post(url, json=chat_body(), headers=stack.auth_headers, timeout=60).status_code == 200  # others go on
    metrics = httpx.get(f"{stack.gateway_url}/metrics/").text
    assert re.search(r'autoglm_gateway_rejections_total\{reason="rate_limit_requests"\} [1-9]', metrics)


def test_a_key_over_its_tokens_per_minute_gets_429(stack: Stack, admin: httpx.Client) -> None:
    key = create_key(admin, "user", tokens_per_minute=60)["key"]
    url = f"{stack.gateway_url}/v1/chat/completions"
    assert httpx.post(url, json=chat_body(max_tokens=40), headers=bearer(key), timeout=60).status_code == 200
    second = httpx.post(url, json=chat_body(max_tokens=40), headers=bearer(key), timeout=60)
    assert second.status_code == 429 and "tokens per minute" in second.json()["error"]["message"]
    assert int(second.headers["Retry-After"]) >= 1


def test_an_oversized_body_is_a_413(stack: Stack) -> None:
    body = chat_body(messages=[{"role": "user", "content": "x" * 600_000}] * 2)  # 1.2 MB > 1 MiB
    response = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body, headers=stack.auth_headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_too_many_messages_is_a_400_naming_messages(stack: Stack) -> None:
    body = chat_body(messages=HI * 257)
    response = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body, headers=stack.auth_headers)
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("messages", "too_many_messages")


def test_max_tokens_over_the_models_bound_is_a_400(stack: Stack) -> None:
    url = f"{stack.gateway_url}/v1/chat/completions"
    light = httpx.post(url, json=chat_body(max_tokens=513), headers=stack.auth_headers)  # tiny-light: 512
    assert light.status_code == 400 and light.json()["error"]["param"] == "max_tokens"
    assert "512" in light.json()["error"]["message"]
    auto = httpx.post(url, json=chat_body(model="auto", max_tokens=1025), headers=stack.auth_headers)
    assert auto.status_code == 400 and "1024" in auto.json()["error"]["message"]  # the larger of the two pools


# ------------------------------------------------------------------------------------ in flight


@pytest.fixture
def small_gateway(stack: Stack) -> Iterator[Service]:
    """A second gateway (instance 1) that lets one request in flight at a time."""
    settings = {"AUTOGLM_GATEWAY__LIMITS__MAX_IN_FLIGHT": "1"}
    with stack.extra_gateway("gateway-small", PORT_BASE + 120, instance=1, **settings) as gateway:
        yield gateway


async def test_beyond_max_in_flight_the_gateway_answers_503_with_retry_after(
    stack: Stack, small_gateway: Service
) -> None:
    light = next(service for service in stack.services if service.name == "worker-light")
    assert light.process is not None
    url = f"http://127.0.0.1:{small_gateway.port}/v1/chat/completions"
    async with httpx.AsyncClient(headers=stack.auth_headers, timeout=60) as client:
        os.kill(light.process.pid, signal.SIGSTOP)  # the light pool stops taking jobs: the first request waits
        try:
            held = asyncio.create_task(client.post(url, json=chat_body()))
            await wait_in_flight(client, small_gateway.port, 1)
            refused = await client.post(url, json=chat_body())
        finally:
            os.kill(light.process.pid, signal.SIGCONT)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert (await held).status_code == 200  # the waiting one is answered once the pool works again
        metrics = (await client.get(f"http://127.0.0.1:{small_gateway.port}/metrics/")).text
    assert 'autoglm_gateway_rejections_total{reason="overloaded"} 1.0' in metrics


async def wait_in_flight(client: httpx.AsyncClient, port: int, count: int) -> None:
    """Until the gateway's in-flight gauge reads `count`."""
    gauge = f"autoglm_gateway_in_flight {count:.1f}"
    async with asyncio.timeout(10):
        while gauge not in (await client.get(f"http://127.0.0.1:{port}/metrics/")).text:  # noqa: ASYNC110 - polling a metric
            await asyncio.sleep(0.05)
