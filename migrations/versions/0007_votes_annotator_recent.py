"""votes (annotator_id, project_id, created_at): an annotator's recent votes in a project

The vote rate limit counts them on every vote; without this index Postgres read all of the
annotator's votes to find the last second's, a cost that grew with the annotator's history.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("votes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_votes_annotator_recent", ["annotator_id", "project_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("votes", schema=None) as batch_op:
        batch_op.drop_index("ix_votes_annotator_recent")
