"""Small shared pieces of the ds01 widgets: message boxes and human-readable numbers."""

from __future__ import annotations

import html

from .client import Ds01Error

_BOX = (
    "<div class='ds01-{kind}' style='border-left:4px solid {colour};padding:6px 10px;"
    "margin:4px 0;background:{background}'>{body}</div>"
)
_STYLES = {
    "error": ("#c62828", "#fdecea"),
    "ok": ("#2e7d32", "#edf7ed"),
    "info": ("#1565c0", "#e8f1fb"),
}


def box(kind: str, text: str, detail: str | None = None, strong: bool = True) -> str:
    """An HTML message box (``kind``: error, ok or info); ``text`` is escaped and, when
    ``strong``, bold (a title); explanations are plain."""
    colour, background = _STYLES[kind]
    body = html.escape(text, quote=False)
    if strong:
        body = f"<b>{body}</b>"
    if detail:
        body += f"<br><span style='white-space:pre-line'>{html.escape(detail, quote=False)}</span>"
    return _BOX.format(kind=kind, colour=colour, background=background, body=body)


def error_box(error: Exception) -> str:
    """A readable box for any failure; unreachable services say so plainly."""
    if isinstance(error, Ds01Error):
        title = error.message
        if error.unreachable and "not reachable" not in title and "did not answer" not in title:
            title = f"The ds01 service is not available right now: {title}"
        return box("error", title, error.hint)
    return box("error", str(error))


def table(headers: list[str], rows: list[list[object]], css_class: str) -> str:
    """A plain HTML table (cells escaped)."""
    head = "".join(
        f"<th style='text-align:left;padding:2px 8px'>{html.escape(h)}</th>" for h in headers
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td style='padding:2px 8px'>{html.escape(str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table class='{css_class}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
