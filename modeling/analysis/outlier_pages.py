"""Viewer pages of the dataset report's outliers: ``<out>/viewer/<name>.html``, one per record.

:func:`write_outlier_pages` writes, for each outlier row of ``report.html`` (only those: at most
``2 x dataset_report.OUTLIERS`` pages), the interactive viewer (``viewer.write_viewer``, the same
page as ``visualize`` / ``view``) of that record, atomically, in the folder ``viewer/`` beside the
report, and removes the pages of earlier outliers there (the folder belongs to the report). Each
page embeds at most ``PAGE_DATA_BYTES`` (6 MiB) of map data, so the pages stay under about 160 MiB
in all; with extraction's default spec (head-mean rows of the answer) a page is far smaller.

The image: an extraction's images are the ones its user named in the dataset's JSONL, so a page
embeds the record's image, found at the path the extraction recorded (``results.jsonl``'s
``image``), when that file is still there, readable and of the recorded size. When it is not, the
page is still written, drawn on grey, with one line saying why, and links the raw record ``.json``.

Names never become links or paths as they are: a page's file name is the record's file name reduced
to ``[A-Za-z0-9._-]`` (no leading dot, so never ``..``), the folder must not lead outside ``out``
(a ``viewer`` link elsewhere is refused) and every link is made by ``html_safe.relative_href``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

from ..attention_record import AttentionRecord, RecordError
from .html_safe import relative_href, text

__all__ = ["PAGE_DATA_BYTES", "VIEWER_DIR", "OutlierPage", "page_file_name", "write_outlier_pages"]

VIEWER_DIR = "viewer"
PAGE_DATA_BYTES = 6 * 2**20  # each page's map data (the viewer's budget, less than its 16 MiB): at most
# 20 pages of about 8 MiB; what does not fit is left out and listed on the page, as in the viewer
_NAME_LIMIT = 80


@dataclass
class OutlierPage:
    """One outlier's page: ``href`` (the link from ``report.html``, escaped) or None when no page
    could be written, and ``note``: why not, or what the page lacks (its image), else None."""

    href: Optional[str]
    note: Optional[str] = None


def page_file_name(row: dict) -> str:
    """The page's file name for a summary row: its record's file name (or its key) as
    ``[A-Za-z0-9._-]`` characters, no leading dot, ``.html``."""
    stem = os.path.basename(str(row.get("record") or "")) or str(row.get("key") or "record")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:_NAME_LIMIT].lstrip(".")
    return (stem or "record") + ".html"


def _inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _image_for(row: dict, record: AttentionRecord):
    """(the record's image or None, one line saying why it is not embedded or None)."""
    from .pipeline import open_image

    path = row.get("image")
    if not isinstance(path, str) or not path:
        return None, "image not embedded: the extraction recorded no image path for this record"
    name = os.path.basename(path)
    if not os.path.isabs(path):
        return None, f"image not embedded: the recorded path of {name} is not absolute"
    try:
        pic = open_image(path)
    except (ValueError, OSError) as e:
        why = "is missing" if not os.path.exists(path) else f"cannot be read ({type(e).__name__})"
        return None, f"image not embedded: {name} {why} (the path this extraction recorded); maps drawn on grey"
    want = tuple(int(v) for v in record.layout.images[0].size) if record.layout.images else None
    if want is not None and tuple(pic.size) != want:
        return None, (f"image not embedded: {name} is {pic.size[0]} x {pic.size[1]} px now, the record's image was "
                      f"{want[0]} x {want[1]} px (changed since the extraction); maps drawn on grey")
    return pic, None


def _header(row: dict, json_href: Optional[str], image_note: Optional[str]) -> str:
    name = text(str(row.get("id") or row.get("key", "")[:12]))
    share = row.get("image_share")
    json_link = (f' &middot; raw record: <a href="../{json_href[2:]}">{text(os.path.basename(str(row["record"])))}.json</a>'
                 if json_href else "")
    image = os.path.basename(str(row.get("image") or "")) or "not recorded"
    warn = f"<p class=warn>{text(image_note)}</p>" if image_note else ""
    return (f'<p><a href="../report.html">&larr; report</a>{json_link}</p>{warn}'
            f"<p><b>Record:</b> {name}<br><b>Image:</b> {text(image)}"
            + (f"<br><b>Image share</b> (mean over the captured LLM layers): {share:.3f}" if isinstance(
                share, (int, float)) else "") + "</p>")


def _one_page(out: str, row: dict, path: str) -> Optional[str]:
    """Write the page of ``row`` to ``path``; returns the image note (or None). Raises ValueError /
    OSError (RecordError is one) when the record cannot be viewed."""
    from .viewer import write_viewer

    rec = AttentionRecord.load(os.path.join(out, row["record"]))
    if rec.layout is None:
        raise ValueError("the record has no token layout")
    pic, note = _image_for(row, rec)
    json_href = relative_href(str(row["record"]) + ".json")
    title = "Attention viewer: " + str(row.get("id") or row.get("key", "")[:12])
    write_viewer(rec, pic, path, title=title, header_html=_header(row, json_href, note),
                 prompt=rec.meta.get("prompt"), answer=row.get("answer"), max_data_bytes=PAGE_DATA_BYTES)
    return note


def write_outlier_pages(out: str, rows: Iterable[dict],
                        warn: Optional[Callable[[str], None]] = None) -> Dict[str, OutlierPage]:
    """Write the viewer page of every row in ``rows`` (summary rows of the extraction folder
    ``out``, the report's outliers) to ``out/viewer/`` and remove the other ``.html`` files there.
    Returns ``{row key: OutlierPage}``; a record that cannot be viewed gets no page, a note and a
    warning, and never stops the report."""
    warn = warn or (lambda msg: None)
    rows = list(rows)
    folder = os.path.join(out, VIEWER_DIR)
    if os.path.lexists(folder) and (os.path.islink(folder) or not os.path.isdir(folder) or not _inside(out, folder)):
        why = f"{folder} is not a folder of the run (a link or a file); no viewer pages written"
        warn(why)
        return {r["key"]: OutlierPage(None, why) for r in rows}
    os.makedirs(folder, exist_ok=True)
    pages: Dict[str, OutlierPage] = {}
    names, written = set(), set()
    for row in rows:
        if row["key"] in pages:
            continue
        name = page_file_name(row)
        while name in names:
            name = name[:-5] + "_.html"
        names.add(name)
        path = os.path.join(folder, name)
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):  # never: the name is one file name
            raise AssertionError(f"outlier page {name!r} leaves {folder}")
        try:
            note = _one_page(out, row, path)
        except (ValueError, OSError, RecordError) as e:
            why = f"no viewer page: {' '.join(str(e).split())[:200]}"
            warn(f"report: {row.get('record')}: {why}")
            pages[row["key"]] = OutlierPage(None, why)
            continue
        written.add(name)
        pages[row["key"]] = OutlierPage(relative_href(f"{VIEWER_DIR}/{name}"), note)
    for old in os.listdir(folder):
        full = os.path.join(folder, old)
        if old.endswith(".html") and old not in written and (os.path.islink(full) or os.path.isfile(full)):
            os.unlink(full)
    return pages
