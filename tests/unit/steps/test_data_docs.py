"""Offline Data Docs (tasks/steps/data_docs.py) on pages shaped like GX's: CDN links and scripts go, the
browser-drawn table is rendered into the page, the remote logo points at the site's own copy, and a remote
reference no rule knows is emptied (with a warning) instead of failing the validation. The real GX site is
checked in tests/unit/tools/test_operator_view.py (validated, stored and served)."""

from __future__ import annotations

import logging

from tasks.steps.data_docs import external_assets, make_offline

PAGE = """<!DOCTYPE html><html><head>
<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>
<style>.navbar-brand a { background: url('https://great-expectations-web-assets.s3.amazonaws.com/full_logo_dark.png') }
</style></head><body>
<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=20261202T063853Z">
<table id="t-1" class="table-sm" data-toggle="table">
</table>
<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>
<script>
  $('#t-1').bootstrapTable(
    Object.assign(
      {
        columns: [{'field': 'run_name', 'title': 'Run Name'}, {'field': 'ok', 'title': 'Status'}],
        data: [{'run_name': 'drop-a', 'ok': '<i class="fas fa-check-circle"></i>', '_table_row_link_path': 'validations/a.html'}],
        toolbar: '#t-1-toolbar'
      },
      {'search': 'true'}
    )
  );
</script>
<a href="https://greatexpectations.io">a link is not an asset</a>
</body></html>"""


def test_a_gx_page_renders_offline(tmp_path):
    (tmp_path / "static" / "images").mkdir(parents=True)
    (tmp_path / "static" / "images" / "logo-long.png").write_bytes(b"png")
    (tmp_path / "validations").mkdir()
    (tmp_path / "validations" / "page.html").write_text(PAGE)
    (tmp_path / "index.html").write_text(PAGE)
    assert external_assets(PAGE)  # what GX writes loads from CDNs
    assert make_offline(tmp_path) == 2
    for page, logo in (("index.html", "static/images/logo-long.png"),
                       ("validations/page.html", "../static/images/logo-long.png")):
        text = (tmp_path / page).read_text()
        assert external_assets(text) == [] and "<script" not in text
        assert f'<img src="{logo}">' in text
        assert "<thead><tr><th>Run Name</th><th>Status</th><th></th></tr></thead>" in text
        assert '<td>drop-a</td><td><i class="fas fa-check-circle"></i></td><td><a href="validations/a.html">' in text
        assert 'href="https://greatexpectations.io"' in text  # links stay links
        assert "background: none" in text
    assert make_offline(tmp_path) == 0  # idempotent


def test_an_unknown_remote_reference_is_emptied_not_fatal(tmp_path, caplog):
    (tmp_path / "index.html").write_text('<html><head></head><body><iframe src="https://x.example/embed"></iframe>'
                                         '<style>@import "https://fonts.example/f.css";</style></body></html>')
    with caplog.at_level(logging.WARNING, logger="tasks.steps.data_docs"):
        assert make_offline(tmp_path) == 1
    text = (tmp_path / "index.html").read_text()
    assert external_assets(text) == [] and '<iframe src="">' in text and "@import" not in text
    assert any("index.html" in r.getMessage() and "x.example" in r.getMessage() for r in caplog.records)
