"""Prompt file uploads: text, CSV and JSONL parsing, line-numbered errors, all or nothing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.projects.models import Membership, Project, Prompt
from app.projects.uploads import PromptFileError, detect_format, parse_prompt_file
from tests.support import bearer


def _errors(data: bytes, **kwargs: str) -> list[str]:
    with pytest.raises(PromptFileError) as info:
        parse_prompt_file(data, **kwargs)
    return info.value.errors


def test_text_one_prompt_per_line_blank_lines_ignored() -> None:
    prompts = parse_prompt_file(b"a red circle\n\n   \r\nblue square  \r\n", filename="p.txt")
    assert [(p.text, p.split, p.tags) for p in prompts] == [
        ("a red circle", "train", []),
        ("blue square", "train", []),
    ]
    assert _errors(b"ok\n" + b"x" * 2001 + b"\n", filename="p.txt") == [
        "line 2: text is longer than 2000 characters"
    ]


def test_csv_with_split_and_tags() -> None:
    data = (
        b"id,Text,split,tags\n"
        b'1,"a red circle, large",test,shapes;red\n'
        b"\n"
        b"2,blue square,,a|b | c\n"
        b'3,"two\nlines",val,\n'
    )
    prompts = parse_prompt_file(data, filename="prompts.csv")
    assert [(p.text, p.split, p.tags) for p in prompts] == [
        ("a red circle, large", "test", ["shapes", "red"]),
        ("blue square", "train", ["a", "b", "c"]),
        ("two\nlines", "val", []),
    ]
    bad = b"text,split\nfine,train\nnot fine,holdout\n\n,test\n"
    assert _errors(bad, filename="p.csv") == [
        "line 3: split must be one of train, val, test",
        "line 5: text must not be blank",
    ]
    assert _errors(b"prompt,split\nx,train\n", filename="p.csv") == [
        "line 1: missing column text (the header names: 'prompt', 'split')"
    ]
    # A quoted field spanning lines: the error names the line where the record starts.
    assert _errors(b'text,split\n"multi\nline",nope\nok,bad\n', filename="p.csv") == [
        "line 2: split must be one of train, val, test",
        "line 4: split must be one of train, val, test",
    ]


def test_jsonl_records() -> None:
    data = b'{"text": "a", "split": "val", "tags": ["x"]}\n\n{"text": "b"}\n'
    prompts = parse_prompt_file(data, filename="p.jsonl")
    assert [(p.text, p.split, p.tags) for p in prompts] == [("a", "val", ["x"]), ("b", "train", [])]
    bad = b'{"text": "a"}\n{"text": "b", "split": "dev"}\n{oops\n[1]\n{"txt": "c"}\n'
    errors = _errors(bad, filename="p.jsonl")
    assert errors[0] == "line 2: split must be one of train, val, test"
    assert errors[1].startswith("line 3: not valid JSON: ")
    assert errors[2] == "line 4: expected an object, got list"
    assert set(errors[3:]) == {"line 5: unknown field 'txt'", "line 5: missing field 'text'"}


def test_encoding_and_unstorable_text() -> None:
    assert _errors(b"caf\xe9\n", filename="p.txt") == ["not UTF-8 text (byte 0xe9 at offset 3)"]
    assert parse_prompt_file(b"\xef\xbb\xbfhello\n", filename="p.txt")[0].text == "hello"
    assert _errors(b"ok\nnul\x00here\n", filename="p.txt") == [
        "line 2: text contains a NUL character"
    ]
    assert _errors(b'{"text": "\\ud800"}\n', filename="p.jsonl") == [
        "line 1: text is not valid Unicode (a lone surrogate)"
    ]
    assert _errors(b"\n \n", filename="p.txt") == ["the file has no prompts (read as text)"]


@pytest.mark.parametrize(
    ("filename", "content_type", "text", "explicit", "expected"),
    [
        ("a.TXT", None, "{", None, "text"),
        ("a.csv", "text/plain", "x", None, "csv"),
        ("a.ndjson", None, "x", None, "jsonl"),
        ("upload", "text/csv; charset=utf-8", "x", None, "csv"),
        ("upload", "application/x-ndjson", "x", None, "jsonl"),
        (None, None, '\n{"text": "a"}', None, "jsonl"),
        (None, None, "Text,split\na,train", None, "csv"),
        (None, None, "a cat, sitting", None, "text"),
        ("a.csv", None, "x", "text", "text"),
    ],
)
def test_detect_format(
    filename: str | None, content_type: str | None, text: str, explicit: str | None, expected: str
) -> None:
    assert detect_format(filename, content_type, text, explicit) == expected


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def lead_project(db, make_user) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """A project and its lead's token (hypothesis shares it across a test's examples)."""
    lead, token = make_user("lead")
    project = Project(name="uploads", settings={})
    db.add(project)
    db.flush()
    db.add(Membership(project_id=project.id, user_id=lead.id, role="lead"))
    db.commit()
    return project.id, token


def _count(db, project_id: int) -> int:  # type: ignore[no-untyped-def]
    return db.scalar(
        select(func.count()).select_from(Prompt).where(Prompt.project_id == project_id)
    )


def test_upload_endpoint_creates_or_reports(client, db, lead_project) -> None:  # type: ignore[no-untyped-def]
    pid, token = lead_project
    url = f"/api/v1/projects/{pid}/prompts/upload"
    created = client.post(
        url,
        files={"file": ("p.csv", b"text,split,tags\nred circle,test,a;b\nsquare,,\n", "text/csv")},
        headers=bearer(token),
    )
    assert created.status_code == 201 and created.json() == {"created": 2}
    rows = db.scalars(select(Prompt).where(Prompt.project_id == pid).order_by(Prompt.id)).all()
    assert [(p.text, p.split, p.tags) for p in rows] == [
        ("red circle", "test", ["a", "b"]),
        ("square", "train", []),
    ]
    refused = client.post(
        url,
        files={"file": ("p.jsonl", b'{"text": "fine"}\n{"text": "x", "split": "nope"}\n')},
        headers=bearer(token),
    )
    assert refused.status_code == 422
    assert refused.json() == {
        "detail": {"errors": ["line 2: split must be one of train, val, test"]}
    }
    assert _count(db, pid) == 2  # "fine" was not half-imported
    forced = client.post(
        url + "?format=text", files={"file": ("p.csv", b"text,split\n")}, headers=bearer(token)
    )
    assert forced.status_code == 201 and forced.json() == {"created": 1}
    unknown = client.post(
        url + "?format=xml", files={"file": ("p.txt", b"a")}, headers=bearer(token)
    )
    assert unknown.status_code == 422


SPLIT_VALUES = ["train", "val", "test"]
_safe_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1, max_size=30
).filter(lambda t: t.strip() != "")


@st.composite
def prompt_files(draw: st.DrawFn) -> tuple[str, bytes, list[int] | None]:
    """(format, file bytes, the 1-based lines that must be reported, or None when all valid)."""
    fmt = draw(st.sampled_from(["text", "csv", "jsonl"]))
    entries = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["valid", "blank", "bad_split", "bad_json", "long"]),
                _safe_text,
                st.sampled_from(SPLIT_VALUES),
            ),
            min_size=0,
            max_size=12,
        )
    )
    lines: list[str] = ["text,split"] if fmt == "csv" else []
    bad: list[int] = []
    valid = 0
    for kind, text, split in entries:
        if fmt == "text" and kind in ("bad_split", "bad_json"):
            kind = "valid"
        if fmt == "csv" and kind == "bad_json":
            kind = "bad_split"
        line_no = len(lines) + 1
        if kind == "blank":
            lines.append("  ")
            continue
        body = "y" * 2001 if kind == "long" else text
        split_value = "nope" if kind == "bad_split" else split
        if fmt == "text":
            lines.append(body.replace("\r", " ").replace("\n", " ").replace("\x85", " "))
        elif fmt == "csv":
            quoted = '"' + body.replace('"', '""').replace("\r", " ").replace("\n", " ") + '"'
            lines.append(f"{quoted},{split_value}")
        elif kind == "bad_json":
            lines.append('{"text": ' + json.dumps(body)[:-1])
        else:
            lines.append(json.dumps({"text": body, "split": split_value}))
        if kind == "valid":
            valid += 1
        else:
            bad.append(line_no)
    data = "\n".join(lines).encode()
    if bad:
        return fmt, data, bad
    return fmt, data, None if valid else []


@pytest.mark.slow
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=prompt_files())
def test_property_structured_files(client, db, lead_project, case) -> None:  # type: ignore[no-untyped-def]
    fmt, data, bad_lines = case
    pid, token = lead_project
    before = _count(db, pid)
    response = client.post(
        f"/api/v1/projects/{pid}/prompts/upload?format={fmt}",
        files={"file": (f"p.{fmt}", data)},
        headers=bearer(token),
    )
    after = _count(db, pid)
    if bad_lines is None:
        assert response.status_code == 201, response.text
        expected = sum(1 for line in data.decode().split("\n") if line.strip())
        expected -= 1 if fmt == "csv" else 0
        assert response.json() == {"created": expected} and after - before == expected
        return
    assert response.status_code == 422, response.text
    assert after == before
    errors = response.json()["detail"]["errors"]
    if bad_lines:
        reported = sorted({int(e.split(":", 1)[0].removeprefix("line ")) for e in errors})
        assert reported == bad_lines, errors
    else:
        assert errors == [f"the file has no prompts (read as {fmt})"]


@pytest.mark.slow
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    fmt=st.sampled_from(["text", "csv", "jsonl", None]),
)
def test_property_random_bytes_never_500(client, db, lead_project, data, fmt) -> None:  # type: ignore[no-untyped-def]
    pid, token = lead_project
    before = _count(db, pid)
    query = f"?format={fmt}" if fmt else ""
    response = client.post(
        f"/api/v1/projects/{pid}/prompts/upload{query}",
        files={"file": ("upload", data)},
        headers=bearer(token),
    )
    after = _count(db, pid)
    assert response.status_code in (201, 422), response.text
    if response.status_code == 201:
        assert after - before == response.json()["created"] > 0
    else:
        assert after == before
        errors = response.json()["detail"]["errors"]
        whole_file = ("not UTF-8 text", "the file has no prompts", "line 1: missing column text")
        assert errors and all(e.startswith(("line ", *whole_file)) for e in errors), errors


def test_prompts_pasted_one_per_line_into_a_split(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from app.projects.models import Prompt
    from app.projects.schemas import ProjectCreate
    from app.projects.service import create_project
    from tests.support import login

    lead, _ = make_user("lead", password="lead-password-1")
    csrf = login(client, lead.email, "lead-password-1")
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    db.commit()
    url = f"/projects/{project.id}/prompts"
    page = client.get(url)
    assert 'id="prompt-paste"' in page.text and '<textarea id="pasted" name="pasted"' in page.text

    def stored() -> list[tuple[str, str]]:
        rows = db.scalars(select(Prompt).where(Prompt.project_id == project.id).order_by(Prompt.id))
        return [(p.text, p.split) for p in rows]

    too_long = "x" * 5000
    bad = client.post(url, data={"csrf_token": csrf, "pasted": f"a red cube\n{too_long}\n",
                                 "split": "test"})  # fmt: skip
    assert bad.status_code == 422 and "Nothing was imported" in bad.text
    assert "line 2:" in bad.text
    assert "a red cube" in bad.text.split('id="pasted"')[1]  # kept in the box
    assert '<option value="test" selected>' in bad.text
    wrong_split = client.post(url, data={"csrf_token": csrf, "pasted": "a", "split": "dev"})
    assert wrong_split.status_code == 422 and "unknown split &#39;dev&#39;" in wrong_split.text
    nothing = client.post(url, data={"csrf_token": csrf, "pasted": "  \n"})
    assert nothing.status_code == 422 and "choose a file to upload, or paste" in nothing.text
    assert stored() == []

    ok = client.post(url, data={"csrf_token": csrf, "pasted": "a red cube\n\n  a blue ball  \n",
                                "split": "test"}, follow_redirects=False)  # fmt: skip
    assert ok.status_code == 303 and ok.headers["location"].endswith("created=2")
    assert stored() == [("a red cube", "test"), ("a blue ball", "test")]
    from app.audit.models import AuditEvent

    events = db.scalars(select(AuditEvent).where(AuditEvent.project_id == project.id)).all()
    added = [e for e in events if e.action == "prompts.add"]
    assert len(added) == 1 and added[0].details == {"created": 2, "source": "pasted"}
