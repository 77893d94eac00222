"""Markdown to safe HTML, on the server.

markdown-it-py parses CommonMark with tables and strikethrough and with raw HTML turned off, so
any ``<tag>`` the user or the model writes comes out as text; code blocks are highlighted by
Pygments; then ammonia (nh3) cleans the result against an allow-list, so that even a bug in the
steps before cannot let a script, an event handler or a ``javascript:`` link through.
"""

from __future__ import annotations

import functools

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

_FORMATTER = HtmlFormatter(nowrap=True, classprefix="tok-")

ALLOWED_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "blockquote", "pre", "code",
    "span", "em", "strong", "del", "s", "a", "table", "thead", "tbody", "tr", "th", "td", "sup", "sub",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "span": {"class"}, "code": {"class"}, "pre": {"class"}, "ol": {"start"}}


def _highlight(code: str, lang: str, _attrs: str) -> str:
    name = (lang or "").split()[0] if lang else ""
    try:
        lexer = get_lexer_by_name(name) if name else None
    except ClassNotFound:
        lexer = None
    body = highlight(code, lexer, _FORMATTER) if lexer is not None else str(escape(code))
    label = f' class="language-{escape(name)}"' if name else ""
    return f'<pre class="code"><code{label}>{body}</code></pre>'


@functools.cache
def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False, "highlight": _highlight})
    md.enable(["table", "strikethrough"])
    # Images would fetch from wherever the text points; show their alt text as a link instead.
    md.add_render_rule("image", lambda self, tokens, idx, options, env: _image_as_link(tokens[idx]))
    return md


def _image_as_link(token) -> str:  # type: ignore[no-untyped-def]
    alt = token.content or "image"
    src = token.attrGet("src") or ""
    return f'<a href="{escape(src)}">{escape(alt)}</a>'


def clean(html: str) -> str:
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def markdown(text: str) -> Markup:
    """``text`` as sanitized HTML, ready to drop into a page."""
    return Markup(clean(_parser().render(text)))


def plain(text: str) -> Markup:
    """``text`` escaped, for ``white-space: pre-wrap`` blocks (user messages, reasoning)."""
    return escape(text)


def pygments_css() -> str:
    return _FORMATTER.get_style_defs(".code")
