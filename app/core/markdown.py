"""Markdown written by leads (project guidelines), rendered for annotators' pages.

Raw HTML in the source is shown as text, never passed through, and markdown-it's link check
refuses `javascript:`-style URLs, so the output is safe to insert into a page as it is.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markupsafe import Markup

# CommonMark with raw HTML off; tables and strikethrough as leads write them elsewhere.
_MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def render_markdown(source: str) -> Markup:
    """HTML for `source` (empty for blank text), marked safe for Jinja."""
    if not source.strip():
        return Markup("")
    return Markup(_MD.render(source))  # noqa: S704 - html is off: the source cannot inject tags
