"""/docs in headless Chromium under the app's own CSP: Swagger UI from vendored files, no CDN."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.support import embedded_web, launch_chromium


@pytest.mark.slow
def test_docs_page_lists_the_operations(tmp_path: Path) -> None:
    with embedded_web(tmp_path) as (base, _factory, _store):
        page_source = httpx.get(f"{base}/docs", timeout=10)
        assert "script-src 'self'" in page_source.headers["content-security-policy"]
        assert "<script>" not in page_source.text and "cdn" not in page_source.text.lower()
        assert httpx.get(f"{base}/redoc", timeout=10).text == page_source.text
        spec = httpx.get(f"{base}/openapi.json", timeout=10).json()
        # Swagger UI lists an operation once under each of its tags.
        documented = sum(
            max(1, len(operation.get("tags", [])))
            for methods in spec["paths"].values()
            for operation in methods.values()
        )

        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page()
                problems: list[str] = []
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on(
                    "response",
                    lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
                )
                # Anything not served by the app itself would be a CDN leftover.
                foreign: list[str] = []
                page.on(
                    "request",
                    lambda r: foreign.append(r.url) if not r.url.startswith(base) else None,
                )
                page.goto(f"{base}/docs")
                page.wait_for_selector(".opblock", timeout=30_000)
                text = page.inner_text("#swagger-ui")
                assert "prefloop" in text
                for path in ("/api/v1/projects", "/api/v1/pairs/{pair_id}/votes", "/healthz"):
                    assert path in text, path
                operations = page.locator(".opblock").count()
                # Expanding an operation shows its parameters (the UI is live, not just drawn).
                page.locator(".opblock-summary", has_text="/api/v1/jobs/{job_id}").first.click()
                page.wait_for_selector(".parameters-container", timeout=10_000)
                assert "job_id" in page.inner_text(".parameters-container")
            finally:
                browser.close()
    assert operations == documented > 20
    assert not foreign, foreign
    assert not problems, problems
