"""The annotator's session on the vote page: votes this session, the lead's per-session target,
the gold streak where the project reveals gold, and the Settings field for the target."""

from __future__ import annotations

import datetime as dt
import random
import re
from typing import Any

from sqlalchemy import delete, select

from app.core.db import utcnow
from app.core.storage import get_media_store
from app.pairs import service as pairs
from app.pairs.models import Pair
from app.projects.service import add_member, project_settings
from app.votes.models import Vote
from app.votes.sitting import LOOK_BACK, SESSION_GAP, gold_record, session_votes
from tests.factories import Backend, build_world, user_maker
from tests.support import bearer


def _counter(html: str, cls: str) -> str | None:
    found = re.search(rf'class="{cls}"[^>]*>([^<]*)<', html)
    return found.group(1).strip() if found else None


def _vote(db: Any, w: Any, user: Any, pair: Pair, choice: str, left: str, at: dt.datetime) -> None:
    db.add(Vote(pair_id=pair.id, project_id=w.project.id, annotator_id=user.id,
                left_image_id=left, choice=choice, latency_ms=2000, created_at=at))  # fmt: skip


def test_session_counts_votes_since_the_last_long_pause(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=6, n_models=2, seeds=(0, 1), session_target=4)
    (user, token), (other, _) = w.annotators
    regular = list(db.scalars(select(Pair).where(Pair.project_id == w.project.id)))
    assert len(regular) >= 9
    now = utcnow()
    # An earlier sitting (three votes two hours ago), then three votes in the last minutes with
    # pauses shorter than the gap; one of the other annotator's votes does not count.
    for i, pair in enumerate(regular[:3]):
        _vote(db, w, user, pair, "left", pair.image_a_id, now - dt.timedelta(hours=2, minutes=i))
    for i, pair in enumerate(regular[3:6]):
        at = now - dt.timedelta(minutes=25 * (2 - i) + 1)  # 51, 26 and 1 minutes ago
        _vote(db, w, user, pair, "right", pair.image_b_id, at)
    _vote(db, w, other, regular[6], "left", regular[6].image_a_id, now)
    db.commit()
    assert session_votes(db, project_id=w.project.id, annotator_id=user.id, now=now) == 3
    # Half an hour after the last vote, the next vote starts a new session.
    later = now + SESSION_GAP + dt.timedelta(minutes=1)
    assert session_votes(db, project_id=w.project.id, annotator_id=user.id, now=later) == 0

    url = f"/projects/{w.project.id}/vote"
    page = client.get(url, headers=bearer(token))
    assert page.status_code == 200
    assert _counter(page.text, "session-votes") == "3"
    assert _counter(page.text, "votes-given") == "6"
    assert _counter(page.text, "session-target") == "of 4"
    assert 'class="session-progress" max="4" value="3"' in page.text
    assert "target reached" not in page.text
    # Gold is not revealed in this project: no gold figures on the page.
    assert "gold-streak" not in page.text

    # One more vote through the page reaches the target.
    pair_id = int(re.search(r'name="pair_id" value="(\d+)"', page.text).group(1))  # type: ignore[union-attr]
    left = re.search(r'name="left_image_id" value="(\w+)"', page.text).group(1)  # type: ignore[union-attr]
    voted = client.post(
        url,
        data={"pair_id": pair_id, "left_image_id": left, "choice": "left", "latency_ms": "900"},
        headers=bearer(token),
    )
    assert voted.status_code == 200, voted.text
    assert _counter(voted.text, "session-votes") == "4"
    assert 'value="4"' in voted.text and "target reached" in voted.text


def test_gold_streak_and_accuracy_shown_only_when_revealed(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=5, n_models=2, reveal_gold=True)
    user, token = w.annotators[0]
    gold = pairs.create_gold_pairs(
        db, get_media_store(), project=w.project, images=[w.images[(p, 0, 0)] for p in range(5)]
    )
    t0 = utcnow() - dt.timedelta(minutes=10)
    # Oldest first: right, wrong, right, skip, right → 3 of 4 answers right, 2 in a row (a skip
    # is no answer and does not break the streak).
    for i, (pair, correct) in enumerate(zip(gold, (True, False, True, None, True), strict=True)):
        left = pair.image_a_id
        picks_left = (pair.gold_expected == left) == correct
        choice = "skip" if correct is None else "left" if picks_left else "right"
        _vote(db, w, user, pair, choice, left, t0 + dt.timedelta(seconds=i))
    db.commit()
    record = gold_record(db, project_id=w.project.id, annotator_id=user.id)
    assert (record.answered, record.correct, record.streak) == (4, 3, 2)
    assert record.accuracy == 0.75

    page = client.get(f"/projects/{w.project.id}/vote", headers=bearer(token))
    assert _counter(page.text, "gold-streak") == "2"
    assert _counter(page.text, "gold-accuracy") == "75 %"
    # The same figures as the annotator's JSON, which exists for the same setting.
    me = client.get(f"/api/v1/projects/{w.project.id}/me", headers=bearer(token)).json()
    assert me["gold"] == {"answered": 4, "correct": 3, "accuracy": 0.75}

    w.project.settings = {**w.project.settings, "reveal_gold": False}
    db.commit()
    hidden = client.get(f"/projects/{w.project.id}/vote", headers=bearer(token))
    assert hidden.status_code == 200 and "gold-streak" not in hidden.text
    assert "gold-accuracy" not in hidden.text


def test_lead_sets_the_session_target_on_the_settings_page(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import lead_client as _lead_client

    w = build_world(db, make_user, n_prompts=1)
    client, lead, csrf = _lead_client(client, make_user)
    add_member(db, project=w.project, user=lead, role="lead")
    db.commit()
    url = f"/projects/{w.project.id}/settings"
    page = client.get(url)
    assert 'name="session_target"' in page.text and "votes asked of an annotator" in page.text
    bad = client.post(url, data={"csrf_token": csrf, "session_target": "-1"})
    assert bad.status_code == 422 and "greater than or equal to 0" in bad.text
    ok = client.post(url, data={"csrf_token": csrf, "session_target": "25"}, follow_redirects=False)
    assert ok.status_code == 303
    db.expire_all()
    assert project_settings(w.project).session_target == 25


def test_empty_state_says_when_new_pairs_are_expected(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    from app.jobs.models import Job

    w = build_world(db, make_user, n_prompts=1, pairs=False)
    _, token = w.annotators[0]
    url = f"/projects/{w.project.id}/vote"
    page = client.get(url, headers=bearer(token))
    assert "Nothing to do" in page.text and "every 15 seconds" not in page.text
    queued = Job(project_id=w.project.id, kind="generate", queue="gpu", params={})
    db.add(queued)
    db.commit()
    page = client.get(url, headers=bearer(token))
    assert "queued for generation" in page.text and 'hx-trigger="every 15s"' in page.text
    # Running for 4 minutes and 40 % done: about 6 more minutes.
    queued.status = "running"
    queued.progress = 0.4
    queued.started_at = utcnow() - dt.timedelta(minutes=4)
    db.commit()
    page = client.get(url, headers=bearer(token))
    text = " ".join(page.text.split())
    assert "being generated for this project right now (40 % done, about 6 min left)" in text
    # A job of another kind brings no pairs.
    queued.kind = "fit_ratings"
    db.commit()
    assert "every 15 seconds" not in client.get(url, headers=bearer(token)).text


def _walk(times: list[dt.datetime], now: dt.datetime, gap: dt.timedelta) -> int:
    """The sitting rule spelled out: back from now, vote by vote, until a pause over `gap`."""
    count, later = 0, now
    for at in sorted((t for t in times if t >= now - LOOK_BACK), reverse=True):
        if later - at > gap:
            break
        count += 1
        later = at
    return count


def test_the_sitting_count_follows_the_rule_on_both_databases(backend: Backend) -> None:
    db = backend.db
    w = build_world(db, user_maker(db), n_prompts=10, n_models=2, seeds=(0, 1))
    user, token = w.annotators[0]
    regular = list(db.scalars(select(Pair).where(Pair.project_id == w.project.id)))
    now = utcnow()
    rng = random.Random(7)
    for trial in range(12):
        db.execute(delete(Vote).where(Vote.annotator_id == user.id))
        # Pauses from seconds to hours, some twice the same time; the oldest past the look-back.
        at, times = now - dt.timedelta(minutes=rng.choice([0, 5, 29, 31, 90])), []
        for _ in range(rng.randint(0, len(regular))):
            times.append(at)
            at -= dt.timedelta(minutes=rng.choice([0, 0.5, 10, 29.5, 30.5, 45, 300]))
        for pair, when in zip(regular, times, strict=False):
            _vote(db, w, user, pair, "left", pair.image_a_id, when)
        db.flush()
        for gap in (SESSION_GAP, dt.timedelta(minutes=12)):
            got = session_votes(db, project_id=w.project.id, annotator_id=user.id, now=now, gap=gap)
            assert got == _walk(times, now, gap), (backend.name, trial, gap)
    # The vote page reads the session's votes and the pairs left in one statement.
    db.commit()
    left = pairs.pairs_left(db, project=w.project, annotator=user)
    page = backend.client.get(f"/projects/{w.project.id}/vote", headers=bearer(token))
    assert page.status_code == 200, page.text
    assert _counter(page.text, "session-votes") == str(_walk(times, utcnow(), SESSION_GAP))
    assert _counter(page.text, "pairs-left") == str(left)
