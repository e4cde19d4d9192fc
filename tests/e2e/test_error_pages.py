"""The 403 page says who is signed in and offers to log out (a real `serve`, its own database)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.core.db import session_scope
from app.users import service as users
from tests.support import embedded_web, login

HTML = {"Accept": "text/html"}


@pytest.mark.slow
def test_forbidden_page_names_the_signed_in_user(tmp_path: Path) -> None:
    with embedded_web(tmp_path) as (base, factory, _store):
        with session_scope(factory) as session:
            users.create_user(session, email="ann@example.org", role="annotator")
            user = users.get_by_email(session, "ann@example.org")
            assert user is not None
            users.set_password(session, user, "annotator-password")
        with httpx.Client(base_url=base, timeout=10) as client:
            csrf = login(client, "ann@example.org", "annotator-password")
            page = client.get("/admin/audit", headers=HTML)
            assert page.status_code == 403
            assert "You are signed in as <strong>ann@example.org</strong> (annotator)" in page.text
            assert 'action="/logout"' in page.text and f'value="{csrf}"' in page.text
            # The offered form logs out.
            out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
            assert out.status_code == 303
            assert client.get("/admin/audit", headers=HTML, follow_redirects=False).status_code in (
                303,
                401,
            )
        # Signed out, a 403/404 page shows no one.
        anonymous = httpx.get(f"{base}/no/such/page", headers=HTML, timeout=10)
        assert anonymous.status_code == 404 and "signed in as" not in anonymous.text
