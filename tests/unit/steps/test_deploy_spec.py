"""deploy reads its smoke-test floor from the model spec (not a digits number)."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.steps import deploy
from tests.support import spec_models as sm


def test_the_smoke_floor_is_the_specs_qc_accuracy_less_the_margin(tmp_path, monkeypatch):
    digits = load_settings().model_spec("digits")
    assert deploy.smoke_floor(digits) == pytest.approx(digits.qc.min_accuracy - deploy.SMOKE_MARGIN)
    assert deploy.smoke_floor(digits, 0.5) == 0.5  # an explicit floor wins
    sm.write_spec(tmp_path / "models", "easy", base="shapes", qc={**sm.spec_data("easy")["qc"], "min_accuracy": 0.05})
    sm.use_specs(monkeypatch, tmp_path / "models")
    assert deploy.smoke_floor(load_settings().model_spec("easy")) == 0.0  # never below 0
