"""Files that other processes read: written atomically, named by their content's digest.

* ``atomic_write``: a temp file in the same folder, fsync, then one ``os.replace``. A
  reader (Triton, Airflow, the local supervisor, another step) sees the old content or the
  new one, never a part. ``newer_mtime`` gives the new file a strictly newer mtime than
  the one it replaces (Triton's "was this model modified?" check compares mtimes).
* ``sha256_bytes`` / ``sha256_file``: the hex SHA-256 recorded in manifests and version
  metadata (``sha256``, ``onnx_sha256``, ``plan_sha256``; docs/CONTRACTS.md).

Standard library only: every layer may import it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str, mode: int | None = None, *,
                 newer_mtime: bool = False) -> None:
    """Write ``data`` (``str``: UTF-8) to ``path`` through a temp file in the same folder, then rename.

    Creates the parent folders. The file gets ``mode`` (default: the temp file's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_ns = 0
    if newer_mtime:
        try:
            old_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if newer_mtime:
            now = max(time.time_ns(), old_ns + 1_000_000)
            os.utime(tmp, ns=(now, now))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path``, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
