"""tasks.contracts.files (atomic writes, sha256) and tasks.contracts.results (the --result-json file)."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from tasks.contracts import files
from tasks.contracts.results import write_result_json


def test_atomic_write_bytes_text_mode_and_no_temp_left(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    files.atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the temp file's mode unless told
    files.atomic_write(path, "héllo", 0o644)
    assert path.read_text(encoding="utf-8") == "héllo"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    files.atomic_write(path, "old")

    def boom(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        files.atomic_write(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_newer_mtime_is_strictly_newer_even_when_the_clock_is_behind(tmp_path):
    path = tmp_path / "config.pbtxt"
    files.atomic_write(path, "a")
    future = path.stat().st_mtime_ns + 10**12  # the old file claims to be 1000 s in the future
    os.utime(path, ns=(future, future))
    files.atomic_write(path, "b", newer_mtime=True)
    assert path.stat().st_mtime_ns > future
    files.atomic_write(tmp_path / "new.pbtxt", "c", newer_mtime=True)  # no old file: fine too


def test_sha256_of_bytes_and_files(tmp_path):
    data = os.urandom(3 << 20)  # several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert files.sha256_bytes(data) == want == files.sha256_file(path) == files.sha256_file(str(path))
    assert files.sha256_bytes(b"") == hashlib.sha256(b"").hexdigest()


def test_write_result_json(tmp_path):
    path = tmp_path / "out" / "result.json"
    obj = {"b": 1, "a": path, "nested": {"z": [1, 2]}}
    assert write_result_json(path, obj) == path
    assert json.loads(path.read_text()) == {"a": str(path), "b": 1, "nested": {"z": [1, 2]}}
    assert path.read_text().startswith('{\n  "a"') and path.read_text().endswith("}\n")  # sorted, indented
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_result_json(str(path), [1])  # a str path, and the file is replaced
    assert json.loads(path.read_text()) == [1]
