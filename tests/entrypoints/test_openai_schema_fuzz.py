"""Schemathesis against the server's own OpenAPI schema: valid and invalid inputs generated for every
operation must never get a 5xx, and the server must stay healthy. Bounded: 50 examples per operation
on the shared server, whose max_model_len of 64 keeps any accepted generation short."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def api_schema(shared_server):
    config = schemathesis.Config.from_dict({})  # not discovered from the working directory
    return schemathesis.openapi.from_url(f"{shared_server.base_url}/openapi.json", config=config)


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(api_schema, shared_server, mode):
    operations = _operations(api_schema)
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "POST /tokenize",
        "POST /detokenize",
        "GET /health",
    }
    seen: dict[int, int] = {}
    for op in operations:
        if mode == "negative" and (
            op.method.upper() in ("GET", "DELETE") or not op.body and not list(op.iter_parameters())
        ):
            continue  # no body or parameters to get wrong (a GET, DELETE /v1/responses/{id}'s string id, POST /ping)

        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=shared_server.base_url, headers=shared_server.auth, timeout=120)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r} -> {response.status_code}: {response.text[:500]}"
            )
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] == response.status_code and error["message"]

        check()
    print(mode, "status counts:", dict(sorted(seen.items())))
    assert seen.get(200, 0) > 0 if mode == "positive" else seen.get(400, 0) > 0


def test_server_still_healthy_after_fuzzing(shared_server):
    assert httpx.get(f"{shared_server.base_url}/health").status_code == 200
