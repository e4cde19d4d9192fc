"""Revocation on the hot path: nothing about a token or a membership is cached, so revoking
either refuses the very next request (bound: 0 s). Signed image URLs already handed out are the
one exception, bounded by their expiry and limited to images already shown
(tests/app/test_image_urls.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from app.projects.models import Membership
from app.users.models import ApiToken
from tests.factories import build_world
from tests.support import bearer


def test_revoked_token_and_deactivated_membership_refuse_the_next_request(
    client: Any, db: Any, make_user: Any
) -> None:
    w = build_world(db, make_user, n_prompts=4, n_models=2, seeds=(0,))
    (user, token), (other, other_token) = w.annotators
    nxt = f"/api/v1/projects/{w.project.id}/pairs/next"
    served = client.get(nxt, headers=bearer(token))
    assert served.status_code == 200
    pair = served.json()
    # The membership ends: the next pair and the vote on the pair already served are refused.
    db.execute(
        update(Membership)
        .where(Membership.project_id == w.project.id, Membership.user_id == user.id)
        .values(is_active=False)
    )
    db.commit()
    assert client.get(nxt, headers=bearer(token)).status_code == 403
    vote = client.post(
        f"/api/v1/pairs/{pair['pair_id']}/votes",
        json={"choice": "left", "left_image_id": pair["left"]["image_id"]},
        headers=bearer(token),
    )
    assert vote.status_code == 403
    # The token is revoked: 401 at once, on every hot route.
    assert client.get(nxt, headers=bearer(other_token)).status_code == 200
    row = db.scalar(select(ApiToken).where(ApiToken.user_id == other.id))
    db.execute(update(ApiToken).where(ApiToken.id == row.id).values(revoked_at=ApiToken.created_at))
    db.commit()
    assert client.get(nxt, headers=bearer(other_token)).status_code == 401
    vote = client.post(
        f"/api/v1/pairs/{pair['pair_id']}/votes",
        json={"choice": "left", "left_image_id": pair["left"]["image_id"]},
        headers=bearer(other_token),
    )
    assert vote.status_code == 401
    assert (
        client.get(
            f"/api/v1/images/{pair['left']['image_id']}", headers=bearer(other_token)
        ).status_code
        == 401
    )
