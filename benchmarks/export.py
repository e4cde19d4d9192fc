"""Export speed and memory: 100 k votes in every format, streamed, against a build-a-list baseline.

Builds projects in a fresh Postgres database (bulk inserts; small random PNGs shared between
pairs), then exports each one in a child process per run, so each run's peak RSS is its own:
- streamed: the real exports (app.exports.service), N = 10 k and 100 k votes — the peak must
  not grow with N (the bound: peak RSS < 300 MB, Python allocations < 100 MB regardless of votes;
  with large images a row group is cut at 32 MB of image bytes, the "big images" row);
- baseline: the same rows fetched with one query into a list and written in one go.
Per run: wall time, the child's peak RSS (ru_maxrss; imports alone are ~100 MB) and its growth
over the RSS after imports, and, in a second child with tracemalloc on, the peak of Python
allocations, beside the size of the output. Planner statistics are not refreshed after the bulk
load: the worst case for the export's queries (see iter_vote_rows).

Run: .venv/bin/python benchmarks/export.py [--votes 100000] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _configure(db_url: str, media: str) -> None:
    os.environ["PREFLOOP_DATABASE_URL"] = db_url
    os.environ["PREFLOOP_MEDIA_DIR"] = media
    os.environ.setdefault("PREFLOOP_SECRET_KEY", "benchmark-secret-" + uuid.uuid4().hex)


# --------------------------------------------------------------------------------------------
# Building a project with bulk inserts
# --------------------------------------------------------------------------------------------


def _png(seed: int, size: int) -> bytes:
    from PIL import Image as PILImage

    rng = random.Random(seed)
    img = PILImage.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def build(n_votes: int, image_size: int, annotators: int = 3) -> int:
    """A project with n_votes votes (annotators per pair) on eval pairs of 4 models."""
    import datetime as dt

    from sqlalchemy import insert

    from app.core.db import session_scope
    from app.core.storage import get_media_store
    from app.generators.models import ModelVersion
    from app.images.models import Image
    from app.pairs.models import Pair
    from app.projects.models import Project, Prompt
    from app.users.models import User
    from app.votes.models import Vote

    store = get_media_store()
    blobs = [store.put(_png(k, image_size)) for k in range(64)]
    n_pairs = -(-n_votes // annotators)
    with session_scope() as s:
        project = Project(name=f"bench-{n_votes}", settings={})
        s.add(project)
        s.flush()
        models = [
            ModelVersion(project_id=project.id, name=f"m{k}", base="toy", params={}, evaluation={})
            for k in range(4)
        ]
        s.add_all(models)
        users = [
            User(email=f"bench-{uuid.uuid4().hex[:8]}@example.com", role="annotator", groups=[])
            for _ in range(annotators)
        ]
        s.add_all(users)
        s.flush()
        n_prompts = max(1, n_pairs // 50)
        prompt_ids = s.scalars(
            insert(Prompt).returning(Prompt.id),
            [
                dict(project_id=project.id, text=f"prompt {k}", split="train", tags=[])
                for k in range(n_prompts)
            ],
        ).all()
        # 20 images per prompt (5 seeds × 4 models) give 150 cross-model pairs per prompt.
        images = []
        for p_index, prompt_id in enumerate(prompt_ids):
            for m_index, model in enumerate(models):
                for seed in range(5):
                    digest, key = blobs[(p_index * 20 + m_index * 5 + seed) % len(blobs)]
                    images.append(
                        dict(
                            id=uuid.uuid4().hex,
                            project_id=project.id,
                            prompt_id=prompt_id,
                            model_version_id=model.id,
                            seed=seed,
                            sha256=digest,
                            storage_key=key,
                            width=image_size,
                            height=image_size,
                            provenance={},
                            _model=m_index,
                        )
                    )
        for start in range(0, len(images), 10_000):
            chunk = [
                {k: v for k, v in row.items() if k != "_model"}
                for row in images[start : start + 10_000]
            ]
            s.execute(insert(Image), chunk)
        pairs = []
        for p_index, prompt_id in enumerate(prompt_ids):
            own = images[p_index * 20 : p_index * 20 + 20]
            for i, a in enumerate(own):
                for b in own[i + 1 :]:
                    if a["_model"] != b["_model"] and len(pairs) < n_pairs:
                        pairs.append((prompt_id, a["id"], b["id"]))
        pair_ids: list[int] = []
        for start in range(0, len(pairs), 10_000):
            pair_ids += s.scalars(
                insert(Pair).returning(Pair.id),
                [
                    dict(
                        project_id=project.id,
                        prompt_id=p,
                        image_a_id=a,
                        image_b_id=b,
                        purpose="eval",
                        is_gold=False,
                        votes_wanted=annotators,
                        vote_count=annotators,
                    )
                    for p, a, b in pairs[start : start + 10_000]
                ],
            ).all()
        choices = ("left", "right", "tie", "both_bad", "left", "right")
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        votes = []
        for k, (pair_id, (_, a, b)) in enumerate(zip(pair_ids, pairs, strict=True)):
            for u, user in enumerate(users):
                if len(votes) < n_votes:
                    votes.append(
                        dict(
                            pair_id=pair_id,
                            project_id=project.id,
                            annotator_id=user.id,
                            left_image_id=a if (k + u) % 2 else b,
                            choice=choices[(k + u) % 6],
                            latency_ms=1000 + k % 500,
                            created_at=t0 + dt.timedelta(seconds=k),
                        )
                    )
        for start in range(0, len(votes), 20_000):
            s.execute(insert(Vote), votes[start : start + 20_000])
        if len(votes) < n_votes:
            raise SystemExit(f"built only {len(votes)} votes; need more prompts")
        return project.id


# --------------------------------------------------------------------------------------------
# One export run (child process)
# --------------------------------------------------------------------------------------------


def _baseline(session, project_id: int, fmt: str) -> bytes:  # type: ignore[no-untyped-def]
    """Everything in memory: all rows in one list, then the whole file in one buffer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.core.storage import get_media_store
    from app.exports import service
    from app.votes.models import Vote

    stmt = service._vote_select(project_id, service.SCOPES[fmt], service._ROW_COLUMNS)
    rows = session.execute(stmt.order_by(Vote.id)).all()
    if fmt == "pickapic":
        counts = service._prompt_counts(session, project_id)
        records = [service._pickapic_record(r, get_media_store(), counts) for r in rows]
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=service.PICKAPIC_SCHEMA), sink)
        return sink.getvalue()
    if fmt == "fastchat":
        return json.dumps([service.fastchat_record(r) for r in rows]).encode()
    if fmt == "jsonl":
        return "".join(json.dumps(service.vote_record(r)) + "\n" for r in rows).encode()
    buffer = io.StringIO()
    import csv

    writer = csv.writer(buffer)
    writer.writerow(service.CSV_COLUMNS)
    writer.writerows(service.csv_row(r) for r in rows)
    return buffer.getvalue().encode()


def child(args: argparse.Namespace) -> None:
    _configure(args.db, args.media)
    from app.core.db import session_scope
    from app.exports import service

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.trace:
        tracemalloc.start()
    start = time.perf_counter()
    size = 0
    with session_scope() as session, open(args.out, "wb") as fh:
        if args.mode == "streamed":
            for chunk in service.export_stream(session, args.project, args.format):
                fh.write(chunk)
                size += len(chunk)
        else:
            data = _baseline(session, args.project, args.format)
            fh.write(data)
            size = len(data)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] if args.trace else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": size,
                "rss_kib": rss,
                "rss_start_kib": rss_start,
                "traced": peak,
            }
        )
    )


def run_child(
    db: str, media: str, project: int, fmt: str, mode: str, trace: bool, out: Path
) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--db",
        db,
        "--media",
        media,
        "--project",
        str(project),
        "--format",
        fmt,
        "--mode",
        mode,
        "--out",
        str(out),
    ]
    if trace:
        cmd.append("--trace")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--image-size", type=int, default=16, help="PNG side in pixels.")
    parser.add_argument("--quick", action="store_true", help="10 k / 2 k votes, no baseline.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--media", help=argparse.SUPPRESS)
    parser.add_argument("--project", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from tests.conftest import create_database, drop_database  # sets PREFLOOP_* test defaults

    name = f"prefloop_bench_export_{os.getpid()}"
    url = create_database(name)
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-export-"))
    media = str(work / "media")
    _configure(url, media)
    from app.core.migrate import upgrade_head

    try:
        upgrade_head(url.replace("postgresql://", "postgresql+psycopg://"))
        big = 2_000 if args.quick else args.votes
        small = max(1, big // 10)
        start = time.perf_counter()
        projects = {small: build(small, args.image_size), big: build(big, args.image_size)}
        large_images = build(600, 160)  # ~75 KB PNGs: row groups cut by bytes, not rows
        print(
            f"built {small} + {big} + 600 (160 px images) votes in "
            f"{time.perf_counter() - start:.1f} s; images {args.image_size} px"
        )
        header = (
            f"{'format':<9} {'mode':<9} {'votes':>10} {'seconds':>8} {'votes/s':>8} "
            f"{'output MB':>9} {'peak RSS MB':>11} {'RSS growth MB':>13} {'traced MB':>9}"
        )
        print(header)
        runs = [
            (fmt, "streamed", n)
            for fmt in ("pickapic", "fastchat", "jsonl", "csv")
            for n in (small, big)
        ]
        runs.append(("pickapic", "streamed", "big images"))
        if not args.quick:
            runs += [(fmt, "baseline", big) for fmt in ("pickapic", "jsonl")]
        results = {}
        for fmt, mode, n in runs:
            project = large_images if n == "big images" else projects[n]  # type: ignore[index]
            votes = 600 if n == "big images" else n
            out = work / f"{fmt}-{mode}-{votes}.out"
            plain = run_child(url, media, project, fmt, mode, False, out)
            traced = run_child(url, media, project, fmt, mode, True, out)
            results[(fmt, mode, n)] = plain
            print(
                f"{fmt:<9} {mode:<9} {str(n):>10} {plain['seconds']:8.2f} "
                f"{votes / plain['seconds']:8.0f} {plain['bytes'] / 2**20:9.1f} "
                f"{plain['rss_kib'] / 1024:11.1f} "
                f"{(plain['rss_kib'] - plain['rss_start_kib']) / 1024:13.1f} "
                f"{traced['traced'] / 2**20:9.1f}"
            )
            out.unlink(missing_ok=True)
        if not args.quick:
            for fmt in ("pickapic", "jsonl"):
                ours, base = results[(fmt, "streamed", big)], results[(fmt, "baseline", big)]
                print(
                    f"{fmt}: baseline peak RSS / streamed peak RSS = "
                    f"{base['rss_kib'] / max(ours['rss_kib'], 1):.1f}x, time ratio "
                    f"{base['seconds'] / ours['seconds']:.2f}x"
                )
        for fmt in ("pickapic", "fastchat", "jsonl", "csv"):
            a, b = results[(fmt, "streamed", small)], results[(fmt, "streamed", big)]
            print(
                f"{fmt}: peak RSS at {big} votes / at {small} votes = "
                f"{b['rss_kib'] / max(a['rss_kib'], 1):.2f}x for {big // small}x the votes"
            )
    finally:
        from app.core.db import get_engine

        get_engine().dispose()
        drop_database(name)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
