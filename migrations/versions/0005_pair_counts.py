"""open pairs per project, kept by a trigger on pairs (Postgres)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A pair is open while it is not gold and has fewer votes than wanted. The counter row is only
# touched when a pair opens or closes (about one vote in k), not on every vote. Decrements are
# plain updates: when the project itself is being deleted its row is already gone.
FUNCTION = """
CREATE FUNCTION prefloop_pair_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_open boolean := false;
  is_open boolean := false;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    was_open := NOT OLD.is_gold AND OLD.vote_count < OLD.votes_wanted;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    is_open := NOT NEW.is_gold AND NEW.vote_count < NEW.votes_wanted;
  END IF;
  IF TG_OP = 'UPDATE' AND was_open = is_open AND OLD.project_id = NEW.project_id THEN
    RETURN NULL;
  END IF;
  IF was_open THEN
    UPDATE pair_counts SET open_pairs = open_pairs - 1 WHERE project_id = OLD.project_id;
  END IF;
  IF is_open THEN
    INSERT INTO pair_counts AS c (project_id, open_pairs) VALUES (NEW.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET open_pairs = c.open_pairs + 1;
  END IF;
  RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "pair_counts",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("open_pairs", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_pair_counts_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project_id", name=op.f("pk_pair_counts")),
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(
        "CREATE TRIGGER pairs_count_open AFTER INSERT OR UPDATE OR DELETE ON pairs"
        " FOR EACH ROW EXECUTE FUNCTION prefloop_pair_counts()"
    )
    op.execute(
        "INSERT INTO pair_counts (project_id, open_pairs)"
        " SELECT project_id, count(*) FILTER (WHERE NOT is_gold AND vote_count < votes_wanted)"
        " FROM pairs GROUP BY project_id"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS pairs_count_open ON pairs")
        op.execute("DROP FUNCTION IF EXISTS prefloop_pair_counts()")
    op.drop_table("pair_counts")
