"""Schemathesis against the application's own OpenAPI document, in process.

Every operation of `/openapi.json` gets generated requests (valid ones, and invalid ones that
must be refused with a 4xx) sent with an admin's and a project lead's bearer token, on the test
database. Most requests name the real ids of a fixture project (so they reach past the 404 of an
unknown id); the rest keep the generated ids. Every answer must be below 500, and 2xx answers
must match the documented schema and content type.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)
from sqlalchemy.orm import Session

from app.exports.routes import streaming_sessions
from app.main import create_app
from tests.route_matrix import World, build_world
from tests.support import bearer

EXAMPLES_PER_OPERATION = 30
MIN_TOTAL_CASES = 1000
ROLES = ("admin", "lead")

SCHEMA = schemathesis.openapi.from_dict(create_app().openapi())
OPERATIONS = sorted(
    f"{op.ok().method.upper()} {op.ok().path}" for op in SCHEMA.get_all_operations()
)
CASES: dict[str, int] = {}


def test_the_schema_lists_the_api() -> None:
    assert len(OPERATIONS) >= 25
    assert "POST /api/v1/pairs/{pair_id}/votes" in OPERATIONS
    assert "POST /api/v1/projects/{project_id}/import" in OPERATIONS


@pytest.fixture(scope="module")
def case_count() -> Iterator[dict[str, int]]:
    yield CASES
    print(f"\nschemathesis: {sum(CASES.values())} generated requests over {len(CASES)} runs")
    # The total is only meaningful when every operation ran for both roles.
    if len(CASES) == len(OPERATIONS) * len(ROLES):
        assert sum(CASES.values()) >= MIN_TOTAL_CASES, CASES


@pytest.fixture()
def world(app: Any, db: Session, make_user: Any) -> World:
    # Streamed exports read through the test's session (rolled back afterwards).
    app.dependency_overrides[streaming_sessions] = lambda: lambda: nullcontext(db)
    return build_world(db, make_user)


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_generated_requests_never_fail_on_the_server(
    client: Any, world: World, case_count: dict[str, int], operation: str, role: str
) -> None:
    method, path = operation.split(" ", 1)
    api_operation = SCHEMA[path][method]
    strategy = st.one_of(
        api_operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        api_operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    headers = bearer(world.tokens[role] or "")
    body = api_operation.definition.raw.get("requestBody", {})
    multipart = "multipart/form-data" in body.get("content", {})
    seen = 0

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, real_ids=st.integers(0, 3))
    def run(case: Any, real_ids: int) -> None:
        nonlocal seen
        seen += 1
        if real_ids and case.path_parameters:
            for name in list(case.path_parameters):
                if name in world.params:
                    case.path_parameters[name] = world.params[name]
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        kwargs.pop("timeout", None)
        kwargs.pop("allow_redirects", None)
        kwargs["headers"] = {**(kwargs.get("headers") or {}), **headers}
        response = client.request(follow_redirects=False, **kwargs)
        if path == "/healthz" and response.status_code == 503:
            # Its documented answer under ?strict=1 while no worker reports in (none runs here).
            assert response.json()["status"] == "degraded" and case.query.get("strict"), (
                response.text
            )
            return
        assert response.status_code < 500, (
            f"{response.status_code} {case.as_curl_command()}\n{response.text[:1000]}"
        )
        if multipart:
            return  # the checks re-read the request body, which a sent multipart stream is not
        checks = [not_a_server_error]
        if 200 <= response.status_code < 300 and response.status_code != 204:
            checks += [response_schema_conformance, content_type_conformance]
        case.validate_response(response, checks=checks)

    run()
    case_count[f"{operation} {role}"] = seen
    assert seen >= 1
