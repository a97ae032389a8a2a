"""Great Expectations Data Docs that render offline: no CDN asset, tables rendered into the page.

GX's site (``SiteBuilder``) loads Bootstrap, jQuery, bootstrap-table, Font Awesome and Vega from CDNs and
fills its index tables in the browser (``$('#t').bootstrapTable({columns, data})``). Served from the
operator's view inside a cluster with no way out, or opened from a copied folder, such a page shows empty
tables and unstyled blocks. ``make_offline(site_dir)`` rewrites the site GX wrote, in place, before
``validate`` uploads it:

* every ``<script src>`` / ``<link href>`` to ``http(s)://`` is removed, and with them every inline script
  (they all drive those libraries, which are not there);
* each bootstrap-table call becomes the table it would have drawn: its ``columns`` and ``data`` (Python
  literals in GX's template) are rendered as ``<thead>``/``<tbody>``, a row's link kept as a link;
* remote images point at the copies GX ships under ``static/images`` (or are dropped), CSS ``url(http...)``
  becomes ``none``;
* a small inline style sheet stands in for the parts of Bootstrap the pages rely on (grid, tables, cards,
  badges, alerts, hidden modals and collapsed blocks) and for the Font Awesome icons as characters.

``external_assets(html)`` lists what is left pointing outside: empty for every page after ``make_offline``.
"""

from __future__ import annotations

import ast
import html
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_EXT = r"(?:https?:)?//"
_SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc\s*=\s*['\"]" + _EXT + r"[^>]*>\s*</script>", re.IGNORECASE | re.DOTALL)
_LINK_EXT = re.compile(r"<link\b[^>]*\bhref\s*=\s*['\"]" + _EXT + r"[^>]*>", re.IGNORECASE)
_INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.IGNORECASE | re.DOTALL)
_IMG_EXT = re.compile(r"(<img\b[^>]*?\bsrc\s*=\s*)(['\"])(" + _EXT + r"[^'\"]*)\2", re.IGNORECASE)
_CSS_URL = re.compile(r"url\(\s*['\"]?" + _EXT + r"[^)]*\)", re.IGNORECASE)
_TABLE_CALL = re.compile(r"\$\('#(?P<id>[\w-]+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*columns:\s*"
                         r"(?P<columns>\[.*?\]),\s*data:\s*(?P<data>\[.*?\]),\s*toolbar:", re.DOTALL)
#: tags whose src/href is fetched by the browser (an <a href> is a link, not an asset)
_ASSET_TAG = re.compile(r"<(script|link|img|iframe|source|video|audio|embed|object|input)\b[^>]*>", re.IGNORECASE)
_ATTR_EXT = re.compile(r"\b(?:src|href|data|srcset|poster)\s*=\s*['\"]\s*" + _EXT, re.IGNORECASE)

ICONS = {"fa-check-circle": "\u2714", "fa-times-circle": "\u2716", "fa-times": "\u2716", "fa-question-circle": "?",
         "fa-exclamation-triangle": "\u26a0", "fa-info-circle": "\u2139", "fa-external-link-alt": "\u2197",
         "fa-chevron-down": "\u25be", "fa-chevron-up": "\u25b4", "fa-search": "\u2315", "fa-bars": "\u2630"}
OFFLINE_CSS = """
/* mlpipe: offline stand-in for the CDN style sheets (tasks/steps/data_docs.py) */
*{box-sizing:border-box}body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:15px;color:#212529;
margin:0;line-height:1.45}a{color:#0062cc}.container,.container-fluid{width:100%;padding:0 15px;margin:0 auto}
.row{display:flex;flex-wrap:wrap;margin:0 -8px}.row>*{padding:0 8px}[class*="col-"]{flex:1 1 100%;max-width:100%}
@media(min-width:768px){.col-md-2{flex:0 0 16.66%;max-width:16.66%}.col-md-10{flex:0 0 83.33%;max-width:83.33%}
.col-6{flex:0 0 50%;max-width:50%}.col-md-6{flex:0 0 50%;max-width:50%}}
@media(min-width:992px){.col-lg-2{flex:0 0 16.66%;max-width:16.66%}.col-lg-10{flex:0 0 83.33%;max-width:83.33%}}
table,.table{width:100%;border-collapse:collapse;margin-bottom:1em}th,td{border-top:1px solid #dee2e6;padding:.3em .5em;
vertical-align:top;text-align:left}thead th{border-bottom:2px solid #dee2e6;background:#f8f9fa}
.card{border:1px solid #dfdfdf;border-radius:4px;margin-bottom:1em;background:#fff}.card-header{padding:.5em .75em;
background:#f7f7f7;border-bottom:1px solid #dfdfdf}.card-body{padding:.75em}
.badge{display:inline-block;padding:.15em .45em;font-size:80%;border-radius:3px;background:#6c757d;color:#fff}
.badge-success{background:#28a745}.badge-danger{background:#dc3545}.badge-info{background:#17a2b8}
.alert{padding:.6em .9em;border:1px solid transparent;border-radius:4px;margin-bottom:1em}
.alert-secondary{background:#e2e3e5}.alert-info{background:#d1ecf1}.alert-danger{background:#f8d7da}
.text-success{color:#28a745}.text-danger{color:#dc3545}.text-muted{color:#6c757d}
.navbar{display:flex;align-items:center;padding:.5em 1em;background:#f8f9fa}.nav{list-style:none;padding:0}
.nav-link{display:block;padding:.2em .5em}.breadcrumb{list-style:none;display:flex;gap:.5em;padding:0}
.btn{display:inline-block;padding:.25em .6em;border:1px solid #6c757d;border-radius:3px;background:#fff}
.modal,.collapse:not(.show),.d-none,.cooltip .top,#ge-cta-footer,.hide-succeeded-validations-column-section-target
{display:none}.invisible{visibility:hidden}.sticky-top{position:static}
.tab-pane{margin-bottom:1.5em}.mlpipe-offline-note{font-size:85%;color:#6c757d;margin:.5em 0}
.fas,.fa{font-style:normal}[onclick*="clearTableFilters"]{display:none}
""" + "".join(f".{name}::before{{content:\"{char}\"}}" for name, char in ICONS.items())


def external_assets(text: str) -> list[str]:
    """Every reference in ``text`` the browser would fetch from another host: asset tags with an
    ``http(s)://`` (or ``//``) source, and CSS ``url(http...)`` / ``@import``."""
    found = [m.group(0)[:200] for m in _ASSET_TAG.finditer(text) if _ATTR_EXT.search(m.group(0))]
    found += [m.group(0)[:200] for m in _CSS_URL.finditer(text)]
    found += [m.group(0)[:200] for m in re.finditer(r"@import\s+[^;]*" + _EXT + r"[^;]*;", text, re.IGNORECASE)]
    return found


def _cell(value: Any) -> str:
    return "" if value is None else str(value)  # GX renders these cells as HTML itself


def _table_html(columns: list[dict[str, Any]], data: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c.get('title', c.get('field', ''))))}</th>" for c in columns)
    linked = any("_table_row_link_path" in row for row in data)
    if linked:
        head += "<th></th>"
    rows = []
    for row in data:
        cells = "".join(f"<td>{_cell(row.get(c.get('field')))}</td>" for c in columns)
        if linked:
            path = row.get("_table_row_link_path")
            cells += f'<td><a href="{html.escape(str(path))}">open</a></td>' if path else "<td></td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"


def _render_tables(text: str) -> str:
    """Fill each ``<table id=...>`` GX leaves empty with the rows its bootstrap-table call carries."""
    for match in _TABLE_CALL.finditer(text):
        try:
            columns = ast.literal_eval(match.group("columns"))
            data = ast.literal_eval(match.group("data"))
        except (ValueError, SyntaxError):
            continue  # not a literal: leave the table empty rather than guess
        table_id = re.escape(match.group("id"))
        text = re.sub(r"(<table\b[^>]*\bid=\"" + table_id + r"\"[^>]*>)\s*(</table>)",
                      lambda m: m.group(1) + _table_html(columns, data) + m.group(2), text, count=1)
    return text


def _local_image(site_dir: Path, page: Path, url: str) -> str | None:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    local = site_dir / "static" / "images" / name
    if name and local.is_file():
        depth = len(page.relative_to(site_dir).parts) - 1
        return "../" * depth + f"static/images/{name}"
    return None


def offline_html(text: str, site_dir: Path | None = None, page: Path | None = None) -> str:
    """One page of the site rewritten to render offline (see the module doc)."""
    text = _render_tables(text)
    text = _SCRIPT_SRC.sub("", text)
    text = _LINK_EXT.sub("", text)
    text = _INLINE_SCRIPT.sub("", text)

    def image(m: re.Match[str]) -> str:
        local = _local_image(site_dir, page, m.group(3)) if site_dir is not None and page is not None else None
        return f"{m.group(1)}{m.group(2)}{local or ''}{m.group(2)}" + ("" if local else ' data-offline="removed"')

    text = _IMG_EXT.sub(image, text)
    text = _CSS_URL.sub("none", text)
    style = f"<style>{OFFLINE_CSS}</style>"
    if OFFLINE_CSS in text:  # rewritten before: idempotent
        return text
    if re.search(r"</head>", text, re.IGNORECASE):
        text = re.sub(r"</head>", lambda _m: style + "</head>", text, count=1, flags=re.IGNORECASE)
    else:
        text = style + text
    return text


def _neutralise(text: str) -> str:
    """Last resort for a remote reference no rule above knows (a new GX template): its URL is emptied."""
    def tag(m: re.Match[str]) -> str:
        return re.sub(r"(\b(?:src|href|data|srcset|poster)\s*=\s*)(['\"])\s*" + _EXT + r"[^'\"]*\2", r"\1\2\2",
                      m.group(0), flags=re.IGNORECASE)

    text = _ASSET_TAG.sub(tag, text)
    text = re.sub(r"@import\s+[^;]*" + _EXT + r"[^;]*;", "", text, flags=re.IGNORECASE)
    return _CSS_URL.sub("none", text)


def make_offline(site_dir: str | Path) -> int:
    """Rewrite every page and style sheet of the Data Docs site under ``site_dir`` in place; returns how many
    files changed. A remote reference no rule knows (a GX template changed) is emptied with a warning naming
    it: the validation result never fails over how its report looks."""
    site_dir = Path(site_dir)
    changed = 0
    for path in sorted(site_dir.rglob("*")):
        if path.suffix not in (".html", ".css") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = offline_html(text, site_dir, path) if path.suffix == ".html" else _CSS_URL.sub("none", text)
        left = external_assets(new)
        if left:
            logger.warning("Data Docs page %s still referred to %r on another host after the offline rewrite: "
                           "emptied (tasks/steps/data_docs.py needs a rule for it)", path.relative_to(site_dir), left[0])
            new = _neutralise(new)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed += 1
    return changed
