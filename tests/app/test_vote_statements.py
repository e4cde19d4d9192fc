"""SQL statements per vote cycle (next pair + vote + the pair's 2 images): a budget that fails
when the hot path grows round trips again (benchmarks/vote_path.py measures what they cost).

These are the full application's statements: on Postgres its plain JSON API requests are
answered by the fast lane, whose own budget (next 3, vote 2) is in tests/app/test_fast_lane.py;
these counts hold for every request it hands on, for SQLite, and for the vote page.

Counted with the engine's `before_cursor_execute` event, after warming up. The tests' session
runs inside a rolled-back transaction, where each request's unit of work is a savepoint: savepoint
statements are left out (the hot path on Postgres uses none); BEGIN and COMMIT are not cursor
executions, in the tests or in production.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from app.projects.service import add_member
from tests.factories import build_world
from tests.support import bearer, login

# Per cycle, warm. Before the hot-path work: API 11 + 14 + 2 x 4 (the images), page 27 + 8.
API_BUDGET = {"next": 6, "images": 0, "vote": 4}
# The page flow: the session counter the vote page shows is read with the pairs left.
PAGE_BUDGET = {"vote": 14, "images": 0}

_TEST_UNIT = re.compile(r"^(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT) sa_savepoint_\d+$")


@contextmanager
def counted(engine: Any) -> Iterator[list[str]]:
    seen: list[str] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not _TEST_UNIT.match(statement):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def test_api_vote_cycle_statement_budget(client: Any, db: Any, make_user: Any, engine: Any) -> None:
    w = build_world(db, make_user, n_prompts=6, n_models=2, seeds=(0,))
    _, token = w.annotators[0]
    got: dict[str, list[int]] = {"next": [], "images": [], "vote": []}
    for _ in range(4):
        with counted(engine) as seen:
            served = client.get(
                f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token)
            )
        assert served.status_code == 200, served.text
        got["next"].append(len(seen))
        pair = served.json()
        with counted(engine) as seen:
            for side in ("left", "right"):
                assert client.get(pair[side]["url"]).status_code == 200
        got["images"].append(len(seen))
        with counted(engine) as seen:
            voted = client.post(
                f"/api/v1/pairs/{pair['pair_id']}/votes",
                json={"choice": "left", "left_image_id": pair["left"]["image_id"]},
                headers=bearer(token),
            )
        assert voted.status_code == 201, voted.text
        got["vote"].append(len(seen))
    warm = {key: max(values[1:]) for key, values in got.items()}
    print("API statements per cycle:", warm)
    for key, budget in API_BUDGET.items():
        assert warm[key] <= budget, (key, warm[key], budget)


def test_page_vote_cycle_statement_budget(
    client: Any, db: Any, make_user: Any, engine: Any
) -> None:
    w = build_world(db, make_user, n_prompts=6, n_models=2, seeds=(0,))
    user, _ = make_user("annotator", email="budget@example.com", password="pw-123456789")
    add_member(db, project=w.project, user=user, role="annotator")
    db.commit()
    csrf = login(client, "budget@example.com", "pw-123456789")
    htmx = {"HX-Request": "true", "X-CSRF-Token": csrf}
    html = client.get(f"/projects/{w.project.id}/vote", headers=htmx).text
    got: dict[str, list[int]] = {"vote": [], "images": []}
    for _ in range(4):
        pair_id = re.search(r'name="pair_id" value="(\d+)"', html)
        left = re.search(r'name="left_image_id" value="([0-9a-f]+)"', html)
        assert pair_id and left, html
        with counted(engine) as seen:
            response = client.post(
                f"/projects/{w.project.id}/vote",
                data={
                    "pair_id": pair_id.group(1),
                    "left_image_id": left.group(1),
                    "choice": "left",
                    "latency_ms": "900",
                },
                headers=htmx,
            )
        assert response.status_code == 200, response.text
        got["vote"].append(len(seen))
        html = response.text
        urls = re.findall(r'<img src="([^"]+)"', html)[:2]
        assert len(urls) == 2
        with counted(engine) as seen:
            for url in urls:
                assert client.get(url.replace("&amp;", "&")).status_code == 200
        got["images"].append(len(seen))
    warm = {key: max(values[1:]) for key, values in got.items()}
    print("page statements per vote:", warm)
    for key, budget in PAGE_BUDGET.items():
        assert warm[key] <= budget, (key, warm[key], budget)
