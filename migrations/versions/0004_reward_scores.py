"""reward-model image scores in a table; jobs.celery_task_id dropped (never written)

Scores written before this revision lived in `reward_models/<id>/image_scores.json` files and are
not carried over: until the next train_reward or score_images job, active sampling treats those
images as unscored (maximally uncertain), as it does any new image.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reward_image_scores",
        sa.Column("reward_model_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_reward_image_scores_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_id"],
            ["reward_models.id"],
            name=op.f("fk_reward_image_scores_reward_model_id_reward_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("reward_model_id", "image_id", name=op.f("pk_reward_image_scores")),
    )
    with op.batch_alter_table("reward_image_scores", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reward_image_scores_image_id"), ["image_id"], unique=False
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("celery_task_id")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("celery_task_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("reward_image_scores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reward_image_scores_image_id"))
    op.drop_table("reward_image_scores")
