"""Run Alembic migrations programmatically (used by `prefloop migrate` and `prefloop serve`)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from app.core.resources import shared_dir


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(shared_dir("migrations")))
    if url:
        # ConfigParser interpolation would choke on '%' in passwords.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_head(url: str | None = None) -> None:
    command.upgrade(alembic_config(url), "head")


def downgrade_base(url: str | None = None) -> None:
    command.downgrade(alembic_config(url), "base")
