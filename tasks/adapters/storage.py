"""The object store: one interface, two backends.

* ``LocalStore``: a directory on disk (the local default). Writes go to a
  temporary file in the same folder and are renamed into place, so a reader
  never sees half an object.
* ``S3Store``: MinIO or any S3-compatible endpoint through the ``minio`` SDK.
  A PUT is atomic on S3. The client always gets explicit credentials and an
  explicit endpoint, so it never probes a cloud metadata address.

Keys are ``/``-separated relative paths such as ``drops/d1/manifest.parquet``.
This is the only module that talks to the object store.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Protocol

from tasks.config import S3Settings, Settings, load_settings
from tasks.contracts.files import atomic_write, sha256_bytes
from tasks.contracts.errors import BadInput, Transient


class StoreError(Transient, RuntimeError):
    """The object store could not be reached or refused an operation (transient: an outage is retried)."""


class ObjectNotFound(BadInput, StoreError, KeyError):
    """The key does not exist in the object store (bad input: final; still a ``StoreError`` and a ``KeyError``)."""

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        super().__init__(f"object not found: {key}" + (f" in {where}" if where else ""))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid object key {key!r}: must be a relative '/'-separated path")
    parts = key.split("/")
    if any(p in {"", ".", ".."} for p in parts[:-1]) or parts[-1] in {".", ".."}:
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' path segment")
    return key


class ObjectStore(Protocol):
    url: str

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get_file(self, key: str, path: str | Path) -> Path: ...
    def uri(self, key: str) -> str: ...
    # Atomic primitives (the registry's version claims and manifest updates):
    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool: ...
    def get_with_token(self, key: str) -> tuple[bytes, str]: ...
    def put_if_match(self, key: str, data: bytes, token: str,
                     content_type: str = "application/octet-stream") -> bool: ...


class _JsonMixin:
    """What both stores build on their own ``put_bytes`` / ``get_bytes``: JSON, text, files, folders."""

    def get_file(self, key: str, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.get_bytes(key))  # type: ignore[attr-defined]
        return path

    def put_json(self, key: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self.put_bytes(key, data, content_type="application/json")  # type: ignore[attr-defined]

    def get_json(self, key: str) -> Any:
        raw = self.get_bytes(key)  # type: ignore[attr-defined]
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StoreError(f"object {key} is not valid JSON: {exc}") from exc

    def put_json_if_absent(self, key: str, obj: Any) -> bool:
        """Create ``key`` with ``obj`` only if no object has that key; True when this call created it."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.put_if_absent(key, data, content_type="application/json")  # type: ignore[attr-defined]

    def get_json_with_token(self, key: str) -> tuple[Any, str]:
        """``(obj, token)``: pass the token to ``put_json_if_match`` to update only an unchanged object."""
        raw, token = self.get_with_token(key)  # type: ignore[attr-defined]
        try:
            return json.loads(raw), token
        except json.JSONDecodeError as exc:
            raise StoreError(f"object {key} is not valid JSON: {exc}") from exc

    def put_json_if_match(self, key: str, obj: Any, token: str) -> bool:
        """Replace ``key`` only if it is still the object read with ``token``; False when it changed."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.put_if_match(key, data, token, content_type="application/json")  # type: ignore[attr-defined]

    def put_text(self, key: str, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        self.put_bytes(key, text.encode(), content_type=content_type)  # type: ignore[attr-defined]

    def put_dir(self, prefix: str, folder: str | Path) -> list[str]:
        """Upload every file under ``folder`` to ``prefix/<relative path>``."""
        folder = Path(folder)
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
            self.put_file(key, path)  # type: ignore[attr-defined]
            keys.append(key)
        return keys

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix``."""
        prefix = prefix.rstrip("/") + "/"
        names = {k[len(prefix):].split("/", 1)[0] for k in self.list(prefix) if "/" in k[len(prefix):]}  # type: ignore[attr-defined]
        return sorted(names)


class LocalStore(_JsonMixin):
    """A directory used as an object store."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        atomic_write(self._path(key), data)

    def put_file(self, key: str, path: str | Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.url) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an in-flight atomic write
                rel = (Path(dirpath) / name).relative_to(base).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Exclusive create: the complete bytes go to a temp file that is ``link()``ed to the key,
        which fails when the key exists (atomic on a local file system, across processes)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, sha256_bytes(data)

    def put_if_match(self, key: str, data: bytes, token: str,
                     content_type: str = "application/octet-stream") -> bool:
        """Compare-and-swap: replace ``key`` only if its bytes still hash to ``token``. Writers that
        use this method serialize on an exclusive lock of the key's folder."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if sha256_bytes(current) != token:
                return False
            atomic_write(path, data)
            return True
        finally:
            os.close(dir_fd)  # closing releases the lock


class S3Store(_JsonMixin):
    """An S3-compatible bucket (MinIO in production) through the ``minio`` SDK."""

    def __init__(self, bucket: str, s3: S3Settings, prefix: str = "", create_bucket: bool = True) -> None:
        from minio import Minio

        if not bucket:
            raise ValueError("S3 store URL must name a bucket: s3://<bucket>[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._endpoint = s3.endpoint
        # Explicit endpoint, credentials and region: the SDK never looks for
        # credentials in the environment or at a metadata address.
        self.client = Minio(
            s3.endpoint,
            access_key=s3.access_key.get_secret_value(),
            secret_key=s3.secret_key.get_secret_value(),
            secure=s3.secure,
            region=s3.region,
        )
        if create_bucket:
            try:
                if not self.client.bucket_exists(bucket):
                    self.client.make_bucket(bucket)
            except ValueError:  # the SDK's check of the bucket name: a setting to fix, not an outage
                raise
            except Exception as exc:  # noqa: BLE001 - name the endpoint for the reader
                raise StoreError(f"cannot reach S3 endpoint {s3.endpoint} (bucket {bucket}): {exc}") from exc

    def _name(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _wrap(self, key: str, exc: Exception) -> StoreError:
        from minio.error import S3Error

        if isinstance(exc, S3Error) and exc.code in {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}:
            return ObjectNotFound(key, self.url)
        return StoreError(f"S3 error on {self.uri(key)} at {self._endpoint}: {exc}")

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data), content_type=content_type)
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def put_file(self, key: str, path: str | Path) -> None:
        try:
            self.client.fput_object(self.bucket, self._name(key), str(path))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, self._name(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._name(key))
            return True
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"}:
                return False
            raise self._wrap(key, exc) from exc
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def _iter(self, prefix: str) -> Iterator[str]:
        full = self._name(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        for obj in self.client.list_objects(self.bucket, prefix=full, recursive=True):
            yield obj.object_name[strip:]

    def list(self, prefix: str = "") -> list[str]:
        try:
            return sorted(self._iter(prefix))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(prefix or "/", exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._name(key))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def _conditional_put(self, key: str, data: bytes, content_type: str, condition: dict[str, str]) -> bool:
        """PUT with an ``If-None-Match``/``If-Match`` precondition (S3 conditional writes; MinIO and
        moto support both). ``put_object`` of the SDK would send them as user metadata, so this goes
        through the SDK's plain PutObject call. False when the precondition failed (HTTP 412)."""
        from minio.error import S3Error

        headers = {"Content-Type": content_type, **condition}
        try:
            self.client._put_object(self.bucket, self._name(key), data, headers=headers)  # noqa: SLF001
            return True
        except S3Error as exc:
            if exc.code in {"PreconditionFailed", "ConditionalRequestConflict"} or (
                    exc.response is not None and exc.response.status in (409, 412)):
                return False
            if exc.code in {"NoSuchKey", "NoSuchObject"} and "If-Match" in condition:
                return False
            raise self._wrap(key, exc) from exc
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        return self._conditional_put(key, data, content_type, {"If-None-Match": "*"})

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        """The bytes and the ETag they were read with."""
        try:
            resp = self.client.get_object(self.bucket, self._name(key))
            try:
                return resp.read(), str(resp.headers.get("etag", "")).strip('"')
            finally:
                resp.close()
                resp.release_conn()
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(key, exc) from exc

    def put_if_match(self, key: str, data: bytes, token: str,
                     content_type: str = "application/octet-stream") -> bool:
        return self._conditional_put(key, data, content_type, {"If-Match": f'"{token}"'})


Store = LocalStore | S3Store


def open_store(cfg: Settings | None = None, url: str | None = None) -> Store:
    """Open the store named by ``url`` or by the settings (``MLPIPE_STORE_URL``)."""
    cfg = cfg or load_settings()
    url = url or cfg.store_url
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):])
    if url.startswith("s3://"):
        if cfg.s3 is None:
            raise ValueError("an s3:// store needs MLPIPE_S3_ENDPOINT, MLPIPE_S3_ACCESS_KEY and MLPIPE_S3_SECRET_KEY")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Store(bucket, cfg.s3, prefix)
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: use file:///path or s3://bucket[/prefix]")
    return LocalStore(url)
