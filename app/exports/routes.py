"""Data in and out of a project: prompt file uploads, vote exports (streamed) and imports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, HTTPException, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.config import get_settings
from app.core.db import SessionDep, session_scope
from app.core.deps import CurrentUser, get_project_for
from app.core.storage import get_media_store
from app.exports import importers, service
from app.projects import uploads

router = APIRouter(prefix="/api/v1", tags=["data"])

SessionOpener = Callable[[], AbstractContextManager[Session]]


def streaming_sessions() -> SessionOpener:
    """How a streamed download opens its own session.

    The request's session commits and closes before the response body is sent, so a streaming
    export reads through a session of its own, opened when the first chunk is asked for.
    """
    return session_scope


StreamingSessions = Annotated[SessionOpener, Depends(streaming_sessions)]


def _limited(upload: UploadFile) -> IO[bytes]:
    """The uploaded file, rewound; 413 when it is over the configured size limit."""
    limit = get_settings().max_upload_bytes
    handle = upload.file
    size = handle.seek(0, 2)
    handle.seek(0)
    if size > limit:
        raise HTTPException(413, f"the file is {size} bytes; uploads are limited to {limit} bytes")
    return handle


@router.post("/projects/{project_id}/prompts/upload", status_code=201)
def upload_prompts(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    file: UploadFile = File(description="Prompts as text (a line each), CSV or JSONL."),
    format: Literal["text", "csv", "jsonl"] | None = Query(
        default=None, description="Override the format detected from the name and content type."
    ),
) -> dict[str, int]:
    """Add prompts from a file: all of it, or nothing and 422 with line-numbered errors."""
    project = get_project_for(session, user, project_id, lead=True)
    data = _limited(file).read()
    try:
        created = uploads.import_prompt_file(
            session,
            project=project,
            data=data,
            filename=file.filename,
            content_type=file.content_type,
            file_format=format,
        )
    except uploads.PromptFileError as exc:
        raise HTTPException(422, {"errors": exc.errors}) from None
    record(session, actor=user, action="prompts.add", target=f"project:{project.id}",
           project_id=project.id, details={"created": created, "source": "file"})  # fmt: skip
    return {"created": created}


def _stream(opener: SessionOpener, project_id: int, fmt: str) -> Iterator[bytes]:
    with opener() as session:
        yield from service.export_stream(session, project_id, fmt)


@router.get("/projects/{project_id}/export", response_class=StreamingResponse)
def export_votes(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    sessions: StreamingSessions,
    format: Literal["pickapic", "fastchat", "jsonl", "csv"] = Query(
        description="pickapic (parquet), fastchat (battle JSON), jsonl or csv"
    ),
) -> StreamingResponse:
    """Download the project's votes, streamed.

    pickapic: Pick-a-Pic-schema parquet whose `jpg_0`/`jpg_1` hold the stored image bytes (PNG
    for generated images); fastchat: a JSON list of battle records from eval pairs; jsonl/csv:
    every vote with its provenance (CSV cells escaped against formula injection).
    """
    get_project_for(session, user, project_id, lead=True)
    record(session, actor=user, action="project.export", target=f"project:{project_id}",
           project_id=project_id, details={"format": format})  # fmt: skip
    filename = service.export_filename(project_id, format)
    return StreamingResponse(
        _stream(sessions, project_id, format),
        media_type=service.FILE_TYPES[format][1],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post("/projects/{project_id}/import", status_code=201)
def import_votes(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    file: UploadFile = File(description="A Pick-a-Pic parquet file or FastChat battle JSON."),
    format: Literal["pickapic", "fastchat"] = Query(description="pickapic or fastchat"),
) -> dict[str, Any]:
    """Import Pick-a-Pic parquet votes or FastChat battles (a leaderboard); all or nothing."""
    project = get_project_for(session, user, project_id, lead=True)
    handle = _limited(file)
    try:
        if format == "pickapic":
            summary = importers.import_pickapic(
                session, project=project, source=handle, store=get_media_store()
            ).as_dict()
        else:
            summary = importers.import_fastchat(session, project=project, data=handle.read())
    except importers.ImportFormatError as exc:
        raise HTTPException(422, {"errors": exc.errors}) from None
    record(session, actor=user, action="project.import", target=f"project:{project.id}",
           project_id=project.id, details={"format": format})  # fmt: skip
    return summary
