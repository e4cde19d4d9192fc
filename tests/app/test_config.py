from __future__ import annotations

import pytest

from app.core.config import Settings, SettingsError, load_settings


def test_defaults_give_embedded_mode(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for var in ("DATABASE_URL", "BROKER_URL", "SECRET_KEY", "MEDIA_DIR"):
        monkeypatch.delenv(f"PREFLOOP_{var}", raising=False)
    monkeypatch.setenv("PREFLOOP_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.is_sqlite and settings.embedded
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'prefloop.db'}"
    assert settings.celery_broker_url == "filesystem://"
    assert settings.resolved_media_dir == tmp_path.resolve() / "media"
    # The embedded mode generates a secret once and keeps it.
    key = settings.effective_secret_key()
    assert len(key) > 32 and settings.effective_secret_key() == key


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PREFLOOP_LOG_LEVEL", "LOUD"),
        ("PREFLOOP_DATABASE_URL", "mysql://x"),
        ("PREFLOOP_JOB_MAX_ATTEMPTS", "zero"),
        ("PREFLOOP_LOGIN_ATTEMPTS_PER_MINUTE", "0"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert var in str(err.value)


def test_default_secret_refused_outside_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.delenv("PREFLOOP_SECRET_KEY", raising=False)
    with pytest.raises(SettingsError, match="PREFLOOP_SECRET_KEY"):
        load_settings()
    monkeypatch.setenv("PREFLOOP_SECRET_KEY", "changeme")
    with pytest.raises(SettingsError, match="PREFLOOP_SECRET_KEY"):
        load_settings()
    monkeypatch.setenv("PREFLOOP_SECRET_KEY", "a-long-enough-real-secret-value")
    assert load_settings().sqlalchemy_url.startswith("postgresql+psycopg://")


def test_production_environment_needs_a_secret_even_on_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PREFLOOP_DATABASE_URL", raising=False)
    monkeypatch.delenv("PREFLOOP_SECRET_KEY", raising=False)
    monkeypatch.setenv("PREFLOOP_ENVIRONMENT", "production")
    with pytest.raises(SettingsError, match="PREFLOOP_SECRET_KEY"):
        load_settings()


def test_env_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFLOOP_PUBLIC_BASE_URL", raising=False)
    (tmp_path / ".env").write_text("PREFLOOP_PUBLIC_BASE_URL=https://prefs.example.org\n")
    settings = Settings()
    assert settings.public_base_url == "https://prefs.example.org"
    assert settings.cookie_secure
