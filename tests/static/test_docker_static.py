"""Dockerfiles are checked statically (no Docker engine here): every instruction is known,
every COPY source exists in the repository, and each image's entrypoint is the CLI it claims."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def test_expected_images_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"airflow.Dockerfile", "trainer.Dockerfile", "trt-compiler.Dockerfile", "triton.Dockerfile",
            "tasks.Dockerfile"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_well_formed(path):
    instrs = parse(path)
    assert instrs and instrs[0][0] in {"FROM", "ARG"}, "a Dockerfile starts with FROM (or ARG)"
    unknown = [i for i, _ in instrs if i not in INSTRUCTIONS]
    assert not unknown, f"unknown instructions {unknown}"
    for instr, rest in instrs:
        if instr in {"ENTRYPOINT", "CMD"} and rest.startswith("["):
            json.loads(rest)  # exec form must be valid JSON
        if instr == "COPY" and not rest.startswith("--from"):
            srcs = [a for a in rest.split()[:-1] if not a.startswith("--")]
            for src in srcs:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"
        if instr == "FROM":
            assert ":" in rest.split()[0] and not rest.split()[0].endswith(":latest"), "pin base image tags"


def _entrypoint(path: Path) -> list[str]:
    return json.loads(next(rest for i, rest in parse(path) if i == "ENTRYPOINT"))


def test_step_images_run_the_step_clis():
    assert _entrypoint(ROOT / "docker/trainer.Dockerfile")[-3:] == ["-m", "tasks.cli", "train"]
    assert _entrypoint(ROOT / "docker/trt-compiler.Dockerfile")[-3:] == ["-m", "tasks.cli", "compile"]
    assert _entrypoint(ROOT / "docker/triton.Dockerfile")[0] == "tritonserver"


def _copied(path: Path) -> dict[str, str]:
    """``COPY`` sources -> destination of one Dockerfile."""
    copies = [args.split() for op, args in parse(path) if op == "COPY"]
    return {src: dst for *srcs, dst in copies for src in srcs}


CODE_IMAGES = [p for p in DOCKERFILES if "tasks" in _copied(p)]


def test_the_code_images_are_found():
    assert len(CODE_IMAGES) >= 6, [p.name for p in CODE_IMAGES]


@pytest.mark.parametrize("path", CODE_IMAGES, ids=lambda p: p.name)
def test_an_image_with_the_code_carries_the_model_specs_next_to_it(path):
    """Every layer finds its model's spec at ``<code root>/models/<name>/spec.yaml`` (MLPIPE_MODELS_DIR's
    default): an image that copies ``tasks`` must copy ``models`` into the same folder."""
    dest = _copied(path)
    assert "models" in dest, f"{path.name} copies tasks but not models (the model specs)"
    assert Path(dest["models"]).parent == Path(dest["tasks"]).parent, (dest["tasks"], dest["models"])
