"""tasks/contracts/layout.py is the one owner of the object-store keys: nobody else spells them."""

from __future__ import annotations

import re
from pathlib import Path

from tasks.contracts import layout

ROOT = Path(__file__).resolve().parents[2]
# a string literal that starts a store key by hand: "drops/...", f"models/{m}/...", "runs/", "monitoring/..."
HAND_WRITTEN = re.compile(r"""(?<![\w/.])f?["'](drops|models|runs|monitoring|triggers)/""")


def test_no_hand_written_store_keys_outside_the_layout():
    offenders = []
    for folder in ("tasks", "plugins", "dags"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "tasks/contracts/layout.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if HAND_WRITTEN.search(code) and "``" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "build these keys with tasks/contracts/layout.py:\n" + "\n".join(offenders)


def test_layout_keys():
    assert layout.manifest_key("d1") == "drops/d1/manifest.parquet"
    assert layout.image_key("d1", "d1-000001") == "drops/d1/images/d1-000001.png"
    assert layout.image_id_from_key("d1", "drops/d1/images/d1-000001.png") == "d1-000001"
    assert layout.image_id_from_key("d1", "drops/d1/manifest.parquet") is None
    assert layout.image_key("d1", "d1-000001", "jpg") == "drops/d1/images/d1-000001.jpg"
    assert layout.image_id_from_key("d1", "drops/d1/images/d1-000001.jpg") == "d1-000001"
    assert layout.image_id_from_key("d1", "drops/d1/images/sub/x.png") is None
    assert layout.success_key("d1") == "drops/d1/_SUCCESS"
    assert layout.validation_result_key("d1") == "drops/d1/validation/result.json"
    assert layout.validation_content_key("d1") == "drops/d1/validation/content.json"
    assert layout.data_docs_index_key("d1") == "drops/d1/validation/data_docs/index.html"
    assert layout.version_manifest_key("digits", 3) == "models/digits/3/version.json"
    assert layout.version_file_key("digits", 3, layout.MODEL_PLAN) == "models/digits/3/model.plan"
    assert layout.event_key("digits", "20260101T000000Z", "ab12") == "models/digits/_events/20260101T000000Z-ab12.json"
    assert layout.version_claim_key("digits", 2) == "models/digits/_claims/versions/2.json"
    assert layout.run_claim_key("digits", "r1") == "models/digits/_claims/runs/r1.json"
    assert layout.run_file_key("r1", layout.METRICS) == "runs/r1/metrics.json"
    assert layout.monitor_reference_key("digits", 4) == "monitoring/reference/digits/v4.npz"
    assert layout.drop_arrival_claim_key("d1") == "triggers/drop_arrival/d1.json"
    # version directories and the registry's own folders never collide: versions are digits only
    assert not layout.EVENTS_DIR.isdigit() and not layout.CLAIMS_DIR.isdigit()
