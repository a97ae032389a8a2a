"""The pod path of the trainer contract (plugins/mlpipe_steps.py): the training pod's image, command and
arguments come from the model spec's ``trainer``, resolved when the task runs for the run's model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "plugins"))

import mlpipe_steps  # noqa: E402
from tasks.steps.train import default_run_id  # noqa: E402


def _custom(models_dir: Path, monkeypatch) -> None:
    data = yaml.safe_load((ROOT / "models" / "shapes" / "spec.yaml").read_text())
    data.update(name="byo")
    data["trainer"] = {"entry_point": "byo_trainer:fit", "image": "registry.example/byo-trainer:3",
                       "command": ["byo-train"],
                       "args": ["--data={drop_ids}", "--out", "runs/{run_id}", "--seed", "{seed}", "-n", "{epochs}"]}
    (models_dir / "byo").mkdir(parents=True)
    (models_dir / "byo" / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(models_dir))


def test_the_pod_runs_the_specs_trainer_with_the_placeholders_filled(tmp_path, monkeypatch):
    _custom(tmp_path / "models", monkeypatch)
    image, cmds, args = mlpipe_steps.trainer_pod("byo", {"drop_ids": "d2,d1,d2", "seed": "4", "epochs": "12"})
    run_id = default_run_id(["d2", "d1"], seed=4, epochs=12, model="byo")  # what `mlpipe train` derives for the same inputs
    assert image == "registry.example/byo-trainer:3" and cmds == ["byo-train"]
    assert args == ["--data=d2,d1", "--out", f"runs/{run_id}", "--seed", "4", "-n", "12",
                    "--result-json", mlpipe_steps.POD_XCOM_PATH]


def test_the_shipped_digits_trainer_is_the_training_cli(monkeypatch):
    monkeypatch.delenv("MLPIPE_MODELS_DIR", raising=False)
    image, cmds, args = mlpipe_steps.trainer_pod("digits", {"drop_ids": "d1", "seed": "0", "epochs": "8"})
    assert image.startswith("ghcr.io/mlpipe/trainer:") and cmds == ["python", "-m", "tasks.cli", "train"]
    assert args == ["--drop-id", "d1", "--epochs", "8", "--seed", "0", "--result-json", mlpipe_steps.POD_XCOM_PATH]


def test_an_unknown_model_is_a_spec_error(tmp_path, monkeypatch):
    from tasks.contracts.spec import SpecError

    monkeypatch.setenv("MLPIPE_MODELS_DIR", str(tmp_path))
    with pytest.raises(SpecError, match="no model spec for 'nope'"):
        mlpipe_steps.trainer_pod("nope", {"drop_ids": "d1", "seed": "0", "epochs": "1"})


def test_train_step_in_both_modes(tmp_path, monkeypatch):
    _custom(tmp_path / "models", monkeypatch)
    monkeypatch.setenv("MLPIPE_EXECUTION", "local")
    local = mlpipe_steps.train_step("train", model="byo", drop_ids="d1,d2", seed="1", epochs="3")
    assert local.command == "train"
    assert local.arguments == ["--model", "byo", "--drop-id", "d1,d2", "--epochs", "3", "--seed", "1"]

    pytest.importorskip("airflow.providers.cncf.kubernetes")
    monkeypatch.setenv("MLPIPE_EXECUTION", "kubernetes")
    pod = mlpipe_steps.train_step("train", model="{{ params.model }}", drop_ids="d1", seed="1", epochs="3",
                                  deferrable=True)
    assert pod.deferrable is True and pod.trainer_model == "{{ params.model }}"
    assert {"trainer_model", "trainer_values"} <= set(pod.template_fields)
    assert pod.trainer_values == {"drop_ids": "d1", "seed": "1", "epochs": "3"}
    # what execute() applies once the template is rendered to the run's model
    image, cmds, args = mlpipe_steps.trainer_pod("byo", pod.trainer_values)
    assert image == "registry.example/byo-trainer:3" and cmds == ["byo-train"] and args[0] == "--data=d1"
