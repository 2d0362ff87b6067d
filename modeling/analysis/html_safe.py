"""User strings in the offline pages (viewer, dataset report): never markup, never a URL scheme.

* :func:`text`: a string as HTML text or a quoted attribute value (``& < > " '`` escaped).
* :func:`fill`: a page template's ``{{NAME}}`` placeholders replaced in **one pass**, so a value
  that itself contains ``{{JS}}`` (a prompt, a label) is inserted as is and never substituted.
* :func:`relative_href`: a link to a file beside the page: a relative path inside the page's
  folder, percent-encoded (``javascript:x`` becomes ``./javascript%3Ax``, a file name), or None.
* :func:`plot_text`: a string for a matplotlib label or title, with ``$`` escaped so mathtext
  never parses (or crashes on) it.
* :func:`page_file`: the viewer's template, script and style sheet (``viewer_page/``, package data).
"""
import html
import os
import re
from functools import lru_cache
from typing import Mapping, Optional
from urllib.parse import quote

__all__ = ["fill", "page_file", "plot_text", "relative_href", "text"]

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "viewer_page")

_PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")


def text(value) -> str:
    """``value`` (any object, as ``str``) escaped for HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with every ``{{NAME}}`` replaced by ``values[NAME]`` in one pass (inserted
    text is never scanned again). A placeholder without a value raises ``KeyError``."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise KeyError(f"page template: no value for the placeholder(s) {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def relative_href(path: str) -> Optional[str]:
    """An ``href`` value (already escaped) for ``path`` relative to the page's folder, or None when
    ``path`` is absolute, leaves the folder (``..``), is empty or has control characters."""
    if not isinstance(path, str) or not path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return None
    if os.path.isabs(path) or path.startswith(("\\", "~")):
        return None
    norm = os.path.normpath(path)
    if norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        return None
    return text("./" + quote(norm.replace(os.sep, "/"), safe="/"))


def plot_text(value) -> str:
    """``value`` as a matplotlib text that is shown literally (no mathtext)."""
    return str(value).replace("$", r"\$")


@lru_cache(maxsize=None)
def page_file(name: str) -> str:
    """The text of ``viewer_page/<name>`` (the viewer's ``page.html``, ``viewer.js``, ``viewer.css``)."""
    with open(os.path.join(PAGE_DIR, name), encoding="utf-8") as f:
        return f.read()
