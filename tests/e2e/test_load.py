"""A short run of `benchmarks/load.py`: concurrent annotators against the distributed stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import run_load
from tests.conftest import PG_ADMIN_URL, REDIS_URL


@pytest.mark.slow
def test_concurrent_annotators_lose_and_duplicate_no_vote(tmp_path: Path) -> None:
    report = run_load(
        annotators=30,
        seconds=10,
        web_workers=2,
        k=2,
        pg_admin_url=PG_ADMIN_URL,
        broker_url=REDIS_URL,
        log_path=tmp_path / "serve.log",
    )
    print(report.table())
    assert report.tally.errors == [], report.table()
    assert len(report.tally.acked) > 30, report.table()  # every annotator got votes in
    assert report.rows_match and report.rows == len(report.tally.acked), report.table()
    assert len(set(report.tally.acked)) == len(report.tally.acked)
    assert report.duplicates == 0 and report.over_k == 0, report.table()
    assert report.ok
