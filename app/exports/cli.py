"""`prefloop export` and `prefloop import`: a project's votes to and from files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from app.core.config import SettingsError, get_settings
from app.core.storage import atomic_file
from app.exports.importers import DEFAULT_FASTCHAT_BOOTSTRAP, ImportFormatError, summary_json
from app.exports.service import count_export_rows, export_stream


def _settings_or_exit() -> None:
    try:
        get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("export")
@click.option("--project", "project_id", type=int, required=True, help="Project id.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pickapic", "fastchat", "jsonl", "csv"]),
    required=True,
    help="pickapic: parquet with image bytes; fastchat: battle JSON; jsonl/csv: votes with "
    "provenance.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def export_command(project_id: int, fmt: str, out: Path) -> None:
    """Export a project's votes to a file (written atomically, with a progress bar)."""
    _settings_or_exit()
    from app.audit.service import record
    from app.core.db import session_scope
    from app.projects.models import Project

    with session_scope() as session:
        if session.get(Project, project_id) is None:
            raise click.ClickException(f"project {project_id} not found")
        total = count_export_rows(session, project_id, fmt)
        try:
            # Readers never see a half-written export.
            with (
                tqdm(total=total, unit="vote", desc=f"export {fmt}", file=sys.stderr) as bar,
                atomic_file(out) as fh,
            ):
                for chunk in export_stream(session, project_id, fmt, on_rows=bar.update):
                    fh.write(chunk)
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc}") from None
        record(session, actor=None, action="project.export", target=f"project:{project_id}",
               project_id=project_id, details={"format": fmt}, address="cli")  # fmt: skip
    click.echo(f"exported {total} votes of project {project_id} as {fmt} to {out}")


@click.command("import")
@click.option("--project", "project_id", type=int, required=True, help="Project id.")
@click.option("--format", "fmt", type=click.Choice(["pickapic", "fastchat"]), required=True)
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(min=1),
    default=DEFAULT_FASTCHAT_BOOTSTRAP,
    show_default=True,
    help="fastchat: bootstrap resamples for the rating intervals.",
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def import_command(project_id: int, fmt: str, n_bootstrap: int, file: Path) -> None:
    """Import votes (Pick-a-Pic parquet) or battles (FastChat JSON) into a project.

    All or nothing: a bad file exits with status 2, naming the offending rows, and adds nothing.
    Importing the same Pick-a-Pic file again adds nothing either.
    """
    _settings_or_exit()
    from app.audit.service import record
    from app.core.db import session_scope
    from app.core.storage import get_media_store
    from app.exports import importers
    from app.projects.models import Project

    try:
        with session_scope() as session:
            project = session.get(Project, project_id)
            if project is None:
                raise click.ClickException(f"project {project_id} not found")
            if fmt == "pickapic":
                with tqdm(unit="row", desc="import pickapic", file=sys.stderr) as bar:
                    result: importers.ImportSummary | dict[str, Any] = importers.import_pickapic(
                        session,
                        project=project,
                        source=str(file),
                        store=get_media_store(),
                        on_rows=bar.update,
                    )
            else:
                result = importers.import_fastchat(
                    session, project=project, data=file.read_bytes(), n_bootstrap=n_bootstrap
                )
            record(session, actor=None, action="project.import", target=f"project:{project_id}",
                   project_id=project_id, details={"format": fmt, "file": file.name},
                   address="cli")  # fmt: skip
    except ImportFormatError as exc:
        for error in exc.errors:
            click.echo(f"Error: {file}: {error}", err=True)
        raise SystemExit(2) from None
    click.echo(summary_json(result))
