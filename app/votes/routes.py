"""JSON API: cast a vote, change the last one, and an annotator's own figures."""

from __future__ import annotations

import os

from fastapi import APIRouter, HTTPException, Response
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for
from app.votes import service
from app.votes.schemas import (
    AnnotatorMe,
    GoldScore,
    VoteAck,
    VoteChange,
    VoteChanged,
    VoteCreate,
)

router = APIRouter(prefix="/api/v1", tags=["annotators"])

# Test-only fault injection, off unless PREFLOOP_FAULT_INJECTION=1 (never set it in production):
# a new vote whose idempotency key starts with this prefix ends the web process right after its
# transaction commits and before any response is written, the crash a client's retry must survive.
FAULT_EXIT_PREFIX = "fault-exit-after-commit-"


def fault_exit_wanted(idempotency_key: str | None) -> bool:
    return (
        os.environ.get("PREFLOOP_FAULT_INJECTION") == "1"
        and idempotency_key is not None
        and idempotency_key.startswith(FAULT_EXIT_PREFIX)
    )


def _inject_exit_after_commit(session: Session, idempotency_key: str | None) -> None:
    if fault_exit_wanted(idempotency_key):
        event.listen(session, "after_commit", lambda _session: os._exit(70), once=True)


def http_error(exc: service.VoteError) -> HTTPException:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return HTTPException(exc.status, exc.detail, headers)


@router.post(
    "/pairs/{pair_id}/votes",
    status_code=201,
    response_model=VoteAck,
    responses={
        200: {"description": "a replay: the vote already stored", "model": VoteAck},
        409: {"description": "already voted otherwise on this pair, or the pair is full"},
        422: {"description": "bad choice, or left_image_id not in the pair"},
        429: {"description": "too many votes per second (see Retry-After)"},
    },
)
def cast_vote(
    pair_id: int, body: VoteCreate, response: Response, session: SessionDep, user: CurrentUser
) -> VoteAck:
    try:
        vote, created = service.record_vote(
            session,
            pair_id=pair_id,
            annotator=user,
            choice=body.choice,
            left_image_id=body.left_image_id,
            latency_ms=body.latency_ms,
            idempotency_key=body.idempotency_key,
        )
    except service.VoteError as exc:
        raise http_error(exc) from None
    if not created:
        response.status_code = 200
    else:
        _inject_exit_after_commit(session, body.idempotency_key)
    return VoteAck(vote_id=vote.id)


@router.put("/votes/{vote_id}", response_model=VoteChanged)
def change_vote(
    vote_id: int, body: VoteChange, session: SessionDep, user: CurrentUser
) -> VoteChanged:
    try:
        vote = service.change_last_vote(
            session, vote_id=vote_id, annotator=user, choice=body.choice
        )
    except service.VoteError as exc:
        raise http_error(exc) from None
    return VoteChanged(vote_id=vote.id, choice=vote.choice)


@router.get("/projects/{project_id}/me", response_model=AnnotatorMe)
def me(project_id: int, session: SessionDep, user: CurrentUser) -> AnnotatorMe:
    project = get_project_for(session, user, project_id, lead=False)
    stats = service.annotator_stats(session, project=project, annotator=user)
    gold = (
        GoldScore(
            answered=stats.gold_answered,
            correct=stats.gold_correct,
            accuracy=stats.gold_accuracy,
        )
        if stats.reveal_gold
        else None
    )
    return AnnotatorMe(
        votes_today=stats.votes_today,
        votes_total=stats.votes_total,
        pairs_left=stats.pairs_left,
        gold=gold,
    )
