"""pairs.hidden: pairs of archived prompts and models, not served and not counted open

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The counter's trigger function of 0005, with the pair's openness as a parameter: a hidden pair
# is not open from here on, so archiving moves the count in the same transaction as the flag.
FUNCTION = """
CREATE OR REPLACE FUNCTION prefloop_pair_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_open boolean := false;
  is_open boolean := false;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    was_open := {old};
  END IF;
  IF TG_OP <> 'DELETE' THEN
    is_open := {new};
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
OPEN = "NOT {row}.is_gold AND NOT {row}.hidden AND {row}.vote_count < {row}.votes_wanted"
OPEN_BEFORE = "NOT {row}.is_gold AND {row}.vote_count < {row}.votes_wanted"

# A pair is hidden while its prompt, or the model of either of its images, is archived.
BACKFILL = """
UPDATE pairs SET hidden = true
WHERE EXISTS (
    SELECT 1 FROM prompts WHERE prompts.id = pairs.prompt_id AND prompts.archived_at IS NOT NULL)
  OR EXISTS (
    SELECT 1 FROM images JOIN model_versions ON model_versions.id = images.model_version_id
    WHERE images.id IN (pairs.image_a_id, pairs.image_b_id)
      AND model_versions.archived_at IS NOT NULL)
"""


def _recount(open_pair: str) -> None:
    op.execute("DELETE FROM pair_counts")
    op.execute(
        "INSERT INTO pair_counts (project_id, open_pairs)"
        f" SELECT project_id, count(*) FILTER (WHERE {open_pair.format(row='pairs')})"
        " FROM pairs GROUP BY project_id"
    )


def _replace_function(open_pair: str) -> None:
    op.execute(FUNCTION.format(old=open_pair.format(row="OLD"), new=open_pair.format(row="NEW")))


def upgrade() -> None:
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("hidden", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.execute(BACKFILL)
    if op.get_bind().dialect.name != "postgresql":
        return  # no counter to keep: SQLite counts open pairs when asked
    _replace_function(OPEN)
    _recount(OPEN)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _replace_function(OPEN_BEFORE)
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.drop_column("hidden")
    if op.get_bind().dialect.name == "postgresql":
        _recount(OPEN_BEFORE)
