"""model checks and archiving of models, prompts and projects

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.core.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Models registered before checks existed have been generating already: they are ready.
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("check_status", sa.String(length=16), server_default="ready", nullable=False)
        )
        batch_op.add_column(sa.Column("check_error", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("archived_at", app.core.db.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("archived_at", app.core.db.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("archived_at", app.core.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("archived_at")
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.drop_column("archived_at")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("archived_at")
        batch_op.drop_column("check_error")
        batch_op.drop_column("check_status")
