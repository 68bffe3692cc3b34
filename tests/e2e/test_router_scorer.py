"""The learned scorer inside the real router: loaded at start, it sends a greeting light and hard maths heavy."""

from __future__ import annotations

import httpx

from services.router.learned import ARTEFACT_VERSION
from tests.e2e.harness import Stack
from tests.e2e.test_request_tracking import ASYNC, chat_body, status_when_finished

HARD_MATH = (
    "Let $f(x)=\\frac{x^3-3x+1}{x^2+1}$. Find the number of real $c$ such that $f(f(c))=c$ "
    "and compute the sum $\\sum_{k=1}^{n} \\binom{n}{k} k^2$ in closed form."
)


async def routing_of(stack: Stack, content: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=10) as http:
        accepted = await http.post("/v1/chat/completions", json=chat_body(content), headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    status = await status_when_finished(stack, accepted.json()["id"])
    assert status["status"] == "completed", status
    return status["routing"]  # type: ignore[no-any-return]


async def test_the_learned_scorer_routes_a_greeting_light_and_hard_maths_heavy(stack: Stack) -> None:
    light = await routing_of(stack, "hi")
    heavy = await routing_of(stack, HARD_MATH)
    assert light["pool"] == "light" and heavy["pool"] == "heavy"
    assert isinstance(heavy["score"], float) and heavy["score"] >= 0.5 > light["score"]  # type: ignore[operator]
    # `latex` is a feature only the learned scorer has: its reasons prove the router loaded the artefact
    assert any(str(reason).startswith("latex=") for reason in heavy["reasons"])  # type: ignore[attr-defined]
    log = next(service for service in stack.services if service.name == "router").log_path.read_text()
    assert f"learned scorer v{ARTEFACT_VERSION} loaded" in log
