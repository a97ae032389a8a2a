"""deploy and rollback: put a registered version into Triton's model repository and serve it.

deploy (in the spirit of TFX's Pusher, which only pushes a blessed model):

1. refuse a version that has not passed the QC gate (or was rejected), unless ``--force``;
2. check Triton answers *before* touching anything (down: exit 75, nothing changed);
3. choose the file to serve and pre-flight it in ONNX Runtime (corrupt file, wrong output
   shape: a clear error, nothing changed). The local flavour serves the artefact QC chose
   (``qc.serving`` on the manifest: ``model.int8.onnx`` if it passed its QC check against
   ``model.onnx``, else ``model.opt.onnx``, else ``model.onnx``; a file whose sha256 is not the one
   QC checked is never served) as the classifier version's ``model.onnx``; the production flavour
   serves ``model.plan`` when one was compiled, else ``model.onnx``. What is served, and why, is
   recorded on the version manifest (``serving``) and in a ``serving`` registry event;
4. write the new numbered classifier version atomically (Triton never sees half a version);
5. pin it as the serving version and load it through Triton's repository API (Triton loads
   the new version before it retires the old one, so in-flight clients see no errors);
6. smoke-test it through the ensemble on golden samples sent as encoded frames (the model spec's
   encoding): every frame decoded, the spec's output shapes, labels, and the scores ONNX Runtime
   gives for this version's file on the same decoded frames (so the right version answers);
7. promote it to ``production`` in the registry and archive the previous champion;
8. keep the last N versions in the repository (the serving one always stays).

Any failure in 4-6 restores the previous serving version (and checks that it answers),
then fails with the reason. ``rollback`` serves any earlier registered version the same way
and records a ``rollback`` event in the registry. One deploy or rollback at a time per
repository (a lock file at its root).

The repository (``MLPIPE_MODEL_REPO``) is a directory (the local flavour: written in place, the
lock is a ``flock``) or ``s3://bucket/prefix`` in the object store (production: Triton reads it with
``--model-repository=s3://host:port/bucket/prefix``). For s3:// the step works on a temporary copy
and uploads what changed through ``tasks.adapters.storage`` (version files before the config that
pins them, see ``RepoMirror``) before each load call, and the lock is a lease object that works
across nodes (``RepoLease``: atomic create, renewed while held, taken over when it expired).
Settings: ``MLPIPE_MODEL_REPO``, ``MLPIPE_REPO_FLAVOUR`` (flavour rendered into an empty
repository: default ``local`` for a directory, ``production`` for s3://),
``MLPIPE_DEPLOY_LEASE_TTL_S`` (default 120); the s3:// endpoint and keys are ``MLPIPE_S3_*``.

    mlpipe deploy deploy --version 3
    mlpipe deploy rollback --version 2 --reason "v3 misclassifies 7s"
    mlpipe deploy status

Exit codes (``tasks.contracts.errors``): 0 done; ``EXIT_REJECTED`` the deploy/rollback failed
(the previous version serves again); ``EXIT_BAD_INPUT`` a bad request (unknown version, not
QC-passed, rejected); ``EXIT_TRANSIENT`` Triton or the object store unreachable, or another
deploy holds the repository (retried; nothing was changed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from tasks.steps import registry
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.errors import Rejected, Transient, run_cli
from tasks.logs import setup_logging
from tasks.adapters.storage import ObjectNotFound, Store, StoreError, open_store
from tasks.contracts.results import write_result_json
from tasks.contracts.serving import MAX_BATCH, frame_error_rows
from tasks.contracts.files import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)
SMOKE_SAMPLES = 64
#: the smoke test's accuracy floor is the spec's QC ``min_accuracy`` less this margin (64 samples are noisy; QC
#: already judged the version on the whole golden set, and the smoke test's real check is agreement with
#: the version's own model.onnx)
SMOKE_MARGIN = 0.1
LOCK_NAME = ".mlpipe-deploy.lock"  # a file at the repository root: Triton only indexes folders
SCORE_TOLERANCE = {"onnx": 1e-3, "plan": 5e-2}  # |Triton - ONNX Runtime| on SCORE/TOPK_SCORES
LEASE_TTL_S = 120.0  # the S3 repository lease: renewed every third of this while held
KEEP_NAME = ".mlpipe-keep"  # an empty folder in object storage (the ensemble's version folder)


class DeployError(Rejected, RuntimeError):
    """The deploy or rollback failed (final); the message says what and which version serves now."""


class TritonDown(Transient, RuntimeError):
    """Triton did not answer (transient: worth a retry); the message says what was left as it was."""


class StoreDown(Transient, RuntimeError):
    """The object store failed while the repository was being written (transient: retried; restored)."""


class RepoBusy(Transient, RuntimeError):
    """Another deploy or rollback held the repository lock too long (transient: retried)."""


@dataclass(frozen=True)
class ServingTarget:
    """Where deploy writes and which Triton it drives.

    ``repo_dir`` is Triton's model repository: a directory (the local flavour: written in place,
    one deploy at a time by a ``flock``), or ``s3://bucket/prefix`` (production: the repository is
    objects in the store, Triton reads it with ``--model-repository=s3://host:port/bucket/prefix``;
    deploy works on a temporary local copy and uploads what changed, one deploy at a time across
    nodes by a lease object, see ``RepoLease``). A ``Path`` that lost a slash of ``s3://`` on the
    command line (``Path("s3://b/p")`` is ``s3:/b/p``) is read as the URL.
    """

    repo_dir: Path | str  # a directory, or s3://bucket/prefix (a str; see repo_url)
    triton_url: str  # host:port of Triton's HTTP endpoint (or gRPC with protocol="grpc")
    protocol: str = "http"
    keep_versions: int = 3
    smoke_min_accuracy: float | None = None  # None: the spec's qc.min_accuracy - SMOKE_MARGIN
    lock_timeout_s: float = 600.0
    flavour: str | None = None  # flavour rendered into an empty repository (default: local; s3://: production)
    lease_ttl_s: float = LEASE_TTL_S  # the S3 lease expires this long after its holder stopped renewing it

    def __post_init__(self) -> None:
        if self.protocol not in ("http", "grpc"):
            raise ValueError(f"Triton protocol must be 'http' or 'grpc', got {self.protocol!r} "
                             "(MLPIPE_TRITON_PROTOCOL)")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 (the serving version is always kept), got "
                             f"{self.keep_versions} (MLPIPE_KEEP_VERSIONS)")
        repo = str(self.repo_dir)
        if repo.startswith("s3:/"):
            url = repo if repo.startswith("s3://") else "s3://" + repo[len("s3:/"):]
            bucket = url[len("s3://"):].split("/", 1)[0]
            if not bucket:
                raise ValueError(f"model repository URL {repo!r} names no bucket: use s3://bucket/prefix "
                                 "(MLPIPE_MODEL_REPO)")
            object.__setattr__(self, "repo_dir", url.rstrip("/"))
        elif "://" in repo:
            raise ValueError(f"unsupported model repository {repo!r}: a directory or s3://bucket/prefix "
                             "(MLPIPE_MODEL_REPO)")
        else:
            object.__setattr__(self, "repo_dir", Path(self.repo_dir))
        if self.flavour is not None and self.flavour not in ("local", "production"):
            raise ValueError(f"repository flavour must be 'local' or 'production', got {self.flavour!r} "
                             "(MLPIPE_REPO_FLAVOUR)")
        if not self.lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {self.lease_ttl_s} (MLPIPE_DEPLOY_LEASE_TTL_S)")

    @property
    def repo_url(self) -> str | None:
        """``s3://bucket/prefix`` when the repository lives in object storage, else None."""
        return self.repo_dir if isinstance(self.repo_dir, str) else None

    @property
    def default_flavour(self) -> str:
        return self.flavour or ("production" if self.repo_url else "local")

    @classmethod
    def from_env(cls) -> "ServingTarget":
        """From ``load_settings()``: ``triton`` (URL, protocol, model repository) and ``deploy``."""
        cfg = load_settings()
        return cls(
            repo_dir=cfg.model_repo,
            triton_url=cfg.triton.url,
            protocol=cfg.triton.protocol,
            keep_versions=cfg.deploy.keep_versions,
            flavour=cfg.deploy.repo_flavour,
            lease_ttl_s=cfg.deploy.lease_ttl_s,
        )


def _client(target: ServingTarget):
    from tasks.adapters.triton import TritonClient

    return TritonClient(target.triton_url, protocol=target.protocol)


# ----------------------------------------------------------------------------------------------
# Pre-flight and smoke test
# ----------------------------------------------------------------------------------------------


def smoke_samples(spec: "ModelSpec", n: int = SMOKE_SAMPLES) -> tuple[list[bytes], "np.ndarray", "np.ndarray"]:
    """``(frames, images, labels)``: ``n`` golden images of ``spec`` spread over every class, as the frames a
    producer sends (``frames.encode_frame``: the spec's encoding), the images those frames decode to on
    the host (``frames.decode_frame``, the decoder Triton's preprocess runs: uint8 ``[n, *image_shape]``)
    and their class ids."""
    import numpy as np

    from tasks.model.frames import decode_frame, encode_frame
    from tasks.steps.drops import golden_set

    images, labels = golden_set(spec)
    idx = np.linspace(0, len(labels) - 1, n).astype(int)
    frames = [encode_frame(img, spec) for img in images[idx]]
    decoded = np.stack([decode_frame(f, spec) for f in frames])
    return frames, decoded, labels[idx]


def _top_k(spec: "ModelSpec") -> int:
    """How many classes the ensemble's TOPK outputs hold (``tasks.model.repo.repo_spec``)."""
    from tasks.model import repo as model_repo

    return int(model_repo.repo_spec(spec).postprocess.outputs[2].dims[0])


def preflight(onnx_path: Path, spec: "ModelSpec", what: str, n: int = SMOKE_SAMPLES) -> dict[str, Any]:
    """Check ``onnx_path`` against ``spec``'s classifier contract and run it in ONNX Runtime on the smoke samples.

    Returns what the ensemble must answer for these samples (``labels``, ``topk_scores``);
    raises ``DeployError`` naming the problem (unreadable file, a tensor of the wrong name or shape,
    non-finite outputs) before anything in the repository or in Triton is touched.
    """
    import numpy as np

    from tasks.model.networks import OnnxContractError, check_onnx_contract, onnx_session, run_onnx, to_input

    _, images, _ = smoke_samples(spec, n)
    try:
        sess = onnx_session(onnx_path)
        check_onnx_contract(onnx_path, spec, session=sess)
        logits, emb = run_onnx(sess, to_input(images, spec), spec)
    except OnnxContractError as exc:
        raise DeployError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable model file"
        raise DeployError(f"{what}: model.onnx is not a usable ONNX classifier ({type(exc).__name__}: "
                          f"{str(exc).strip()[:300]})") from None
    if not (np.isfinite(logits).all() and np.isfinite(emb).all()):
        raise DeployError(f"{what}: model.onnx gives NaN or infinite outputs on golden samples")
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return {"labels": logits.argmax(axis=1), "topk_scores": -np.sort(-probs, axis=1)[:, :_top_k(spec)]}


def smoke_floor(spec: "ModelSpec", min_accuracy: float | None = None) -> float:
    """The smoke test's accuracy floor: ``min_accuracy``, else the spec's QC ``min_accuracy - SMOKE_MARGIN``."""
    return min_accuracy if min_accuracy is not None else max(0.0, spec.qc.min_accuracy - SMOKE_MARGIN)


def smoke_test(client, spec: "ModelSpec", n: int = SMOKE_SAMPLES, min_accuracy: float | None = None,
               expected: dict[str, Any] | None = None, score_tolerance: float = SCORE_TOLERANCE["onnx"]
               ) -> dict[str, Any]:
    """Golden samples, sent as encoded frames, through ensemble ``spec.name``: every frame decoded (empty
    ``FRAME_ERROR``), every output present with the spec's shape, labels mostly right and, given
    ``expected`` (from ``preflight``), the same labels and scores ONNX Runtime gives for the version's
    file. Raises ``DeployError`` (or ``TritonError``) with what was wrong."""
    import numpy as np

    from tasks.contracts.serving import FRAME_ERROR

    model = spec.name
    frames, _, labels = smoke_samples(spec, n)
    out = client.infer_frames(model, frames)
    k = _top_k(spec)
    shapes = {key: list(np.asarray(v).shape) for key, v in out.items()}
    want = {"LABEL": [n, 1], "SCORE": [n, 1], "TOPK_LABELS": [n, k], "TOPK_SCORES": [n, k],
            "EMBEDDING": [n, spec.embedding_dim], FRAME_ERROR: [n, 1]}
    wrong = {key: shapes.get(key) for key, v in want.items() if shapes.get(key) != v}
    if wrong:
        raise DeployError(f"smoke test: ensemble {model!r} answered with wrong output shapes {wrong}; expected "
                          f"{ {key: want[key] for key in wrong} } (model spec {spec.name!r})")
    failed = [text for _, text in frame_error_rows(out)]
    if failed:
        raise DeployError(f"smoke test: ensemble {model!r} could not use {len(failed)} of {n} golden frames "
                          f"({spec.image_encoding}); first FRAME_ERROR: {failed[0]!r}")
    got = np.asarray(out["LABEL"]).reshape(-1)
    acc = float(np.mean(got == labels))
    min_accuracy = smoke_floor(spec, min_accuracy)
    if acc < min_accuracy:
        raise DeployError(f"smoke test: only {acc:.0%} of {n} golden samples right through the ensemble "
                          f"(need {min_accuracy:.0%})")
    result: dict[str, Any] = {"samples": n, "accuracy": acc, "first_label": int(got[0]),
                              "first_true": int(labels[0]),
                              "first_score": float(np.asarray(out["SCORE"]).reshape(-1)[0])}
    result["full_batch"] = _full_batch_check(client, model, frames, got)
    if expected is not None:
        agree = float(np.mean(got == expected["labels"]))
        diff = float(np.max(np.abs(np.asarray(out["TOPK_SCORES"]) - expected["topk_scores"])))
        result.update(onnx_agreement=agree, max_score_diff=diff)
        if agree < 0.95 or diff > score_tolerance:
            raise DeployError(f"smoke test: the ensemble's answers do not match this version's model.onnx "
                              f"({agree:.0%} of labels agree, max score difference {diff:.3g} > "
                              f"{score_tolerance:g}): another version may be answering")
    return result


def _full_batch_check(client, model: str, frames: Sequence[bytes], labels) -> int:
    """One request of the ensemble's declared ``max_batch_size`` (what the consumer may send at once), the
    smoke frames repeated: Triton must take it whole and give the same labels as the small batch.
    Returns the batch size."""
    import numpy as np

    from tasks.contracts.serving import FRAME_ERROR, FRAME_INPUT

    full = int(client.model_config(model).get("max_batch_size", 0) or 0)
    if full <= 1:
        return full
    reps = -(-full // len(frames))
    batch = np.empty((full, 1), dtype=object)
    batch[:, 0] = (list(frames) * reps)[:full]
    try:  # client.infer, not infer_frames: one request of exactly `full` frames, whatever the client splits at
        out = client.infer(model, {FRAME_INPUT: batch}, ["LABEL", FRAME_ERROR])
    except Exception as exc:  # noqa: BLE001 - TritonError: the model refuses its own declared batch size
        raise DeployError(f"smoke test: ensemble {model!r} declares max_batch_size {full} but a batch of {full} "
                          f"failed ({exc})") from None
    got = np.asarray(out["LABEL"]).reshape(-1)
    want = np.tile(np.asarray(labels), reps)[:full]
    failed = [text for _, text in frame_error_rows(out)]
    if got.shape != (full,) or failed or not np.array_equal(got, want):
        raise DeployError(f"smoke test: a full batch of {full} through {model!r} gave {got.shape[0]} labels, "
                          f"{int(np.sum(got[:len(want)] != want[:len(got)]))} differing from the same frames "
                          f"sent in a small batch, {len(failed)} frame errors")
    return full


# ----------------------------------------------------------------------------------------------
# Repository and Triton steps
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _repo_lock(target: ServingTarget) -> Iterator[None]:
    """One deploy/rollback at a time per repository (``flock`` on a file at its root)."""
    import fcntl

    target.repo_dir.mkdir(parents=True, exist_ok=True)
    path = target.repo_dir / LOCK_NAME
    with open(path, "a+") as fh:
        deadline = time.monotonic() + target.lock_timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RepoBusy(f"another deploy or rollback holds {path} for over "
                                      f"{target.lock_timeout_s:.0f}s; try again when it is done") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class RepoLease:
    """One deploy/rollback at a time per repository in object storage, across nodes.

    The lease is the object ``LOCK_NAME`` at the repository's root (Triton only indexes folders),
    created with the store's atomic create (``put_if_absent``: S3 ``If-None-Match: *``, which MinIO,
    AWS S3 and moto honour; checked below). While held, a thread renews it every ``ttl_s / 3`` by a
    compare-and-swap on its token (``put_if_match``: S3 ``If-Match``), so a lease whose token stays
    the same for ``ttl_s`` of the waiter's own clock belongs to a dead holder (a killed pod) and is
    taken over by a compare-and-swap too: no clock has to agree with another. A lease whose
    ``renewed_at`` is more than ``2 * ttl_s`` in the past by the waiter's wall clock is taken over at
    once (a holder that died long ago). A holder that cannot renew (store down, lease taken over)
    is told by ``check()`` before each write. Release deletes the lease if it is still ours
    (read, then delete: S3 has no conditional delete in the minio SDK; a holder that kept renewing
    cannot have lost it).
    """

    def __init__(self, store: Store, what: str, *, ttl_s: float = LEASE_TTL_S, timeout_s: float = 600.0,
                 key: str = LOCK_NAME, poll_s: float = 1.0) -> None:
        self.store, self.what, self.key = store, what, key
        self.ttl_s, self.timeout_s, self.poll_s = float(ttl_s), float(timeout_s), poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._token: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.took_over: dict[str, Any] | None = None

    def _body(self, renewals: int) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "ttl_s": self.ttl_s, "renewed_at": now, "renewals": renewals,
                "acquired_at": getattr(self, "_acquired_at", now)}

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            obj, token = self.store.get_json_with_token(self.key)
        except ObjectNotFound:
            return None, None
        except StoreError as exc:
            if "not valid JSON" in str(exc):  # a torn or foreign object: treat as held, expire by token
                raw, token = self.store.get_with_token(self.key)
                return {"owner": "?", "what": "unreadable lease object"}, token
            raise
        return (obj if isinstance(obj, dict) else {"owner": "?"}), token

    def acquire(self) -> "RepoLease":
        deadline = time.monotonic() + self.timeout_s
        seen: tuple[str | None, float] = (None, 0.0)  # (token, when first seen on our monotonic clock)
        self._acquired_at = time.time()
        while True:
            if self.store.put_json_if_absent(self.key, self._body(0)):
                break
            holder, token = self._read()
            if holder is None:
                continue  # released between our create and our read: try again at once
            if token != seen[0]:
                seen = (token, time.monotonic())
            stale_by_token = time.monotonic() - seen[1] >= self.ttl_s
            try:
                stale_by_clock = time.time() - float(holder.get("renewed_at", 0)) > 2 * max(
                    self.ttl_s, float(holder.get("ttl_s", 0) or 0))
            except (TypeError, ValueError):
                stale_by_clock = False
            if (stale_by_token or stale_by_clock) and token is not None:
                if self.store.put_json_if_match(self.key, self._body(0), token):
                    self.took_over = holder
                    logger.warning("took over the expired deploy lease %s of %s (%s)", self.store.uri(self.key),
                                   holder.get("owner"), holder.get("what"))
                    break
                continue
            if time.monotonic() > deadline:
                raise RepoBusy(f"another deploy or rollback ({holder.get('what', '?')}, {holder.get('owner', '?')}) "
                                  f"holds the lease {self.store.uri(self.key)} for over {self.timeout_s:.0f}s; try "
                                  "again when it is done (a dead holder's lease expires "
                                  f"{self.ttl_s:.0f}s after its last renewal)")
            time.sleep(self.poll_s)
        if self.store.put_json_if_absent(self.key, self._body(0)):  # must fail now: the object exists
            self.store.delete(self.key)
            raise DeployError(f"the object store at {self.store.url} ignores conditional writes (a second "
                              f"create-if-absent of {self.key} succeeded): deploys cannot be serialized across "
                              "nodes with it; use a store that honours If-None-Match (MinIO, AWS S3)")
        _, self._token = self._read()
        self._thread = threading.Thread(target=self._renew_loop, name="mlpipe-deploy-lease", daemon=True)
        self._thread.start()
        logger.info("holding the deploy lease %s (%s)", self.store.uri(self.key), self.owner)
        return self

    def _renew_loop(self) -> None:
        renewals = 0
        while not self._stop.wait(self.ttl_s / 3):
            renewals += 1
            try:
                with self._lock:
                    if self._token is None or not self.store.put_json_if_match(self.key, self._body(renewals),
                                                                                self._token):
                        holder, _ = self._read()
                        self._lost = (f"the deploy lease {self.store.uri(self.key)} was taken over by "
                                      f"{(holder or {}).get('owner', 'nobody (it is gone)')}")
                        return
                    _, self._token = self._read()
            except Exception as exc:  # noqa: BLE001 - keep trying until the lease would have expired
                logger.warning("could not renew the deploy lease %s: %s", self.store.uri(self.key), exc)

    def check(self) -> None:
        """Raise ``RepoBusy`` when the lease was lost (taken over after a renewal gap: retry later)."""
        if self._lost:
            raise RepoBusy(f"{self._lost}: stopped before writing to the repository")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            with self._lock:
                holder, _ = self._read()
                if holder is not None and holder.get("owner") == self.owner:
                    self.store.delete(self.key)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            logger.warning("could not release the deploy lease %s (it expires %.0fs after its last renewal): %s",
                           self.store.uri(self.key), self.ttl_s, exc)

    def __enter__(self) -> "RepoLease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# When this process last uploaded each config.pbtxt: Triton tells a changed model by its files'
# modification times, which S3 gives to the second, so a config re-written within the same second
# (a failed deploy restoring the previous pin at once) waits for the next second before the upload.
_CONFIG_UPLOADS: dict[str, float] = {}


class RepoMirror:
    """A local working copy of a model repository kept in object storage.

    ``pull()`` downloads the repository; the ``tasks.model.repo`` functions then work on ``root`` as
    on any directory, and ``push()`` uploads what changed: new and changed files first (version
    folders before any config.pbtxt, the flavour marker last), so the object that switches what
    Triton serves (the classifier config's pin) is written only after the files it names, then
    deletes what was removed (pruned versions, never the pinned one). Triton reads nothing until
    told to load (explicit model control), and only the pinned version, so it never loads half a
    version. Object storage has no empty folders: one (the ensemble's ``<model>/1/``) gets a
    ``KEEP_NAME`` placeholder.
    """

    def __init__(self, store: Store, root: Path) -> None:
        self.store, self.root = store, Path(root)
        self._remote: dict[str, str] = {}  # key -> sha256 of what the store holds

    @staticmethod
    def _skip(rel: str) -> bool:
        parts = rel.split("/")
        return (rel == LOCK_NAME or rel.endswith("/") or any(p.startswith((".tmp-", ".trash-")) for p in parts[:-1])
                or (parts[-1].startswith(".") and parts[-1].endswith(".tmp")))

    def pull(self, *, model_files: bool = True) -> list[str]:
        """Download the repository (without model.onnx/model.plan when not ``model_files``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._partial = not model_files
        keys = [k for k in self.store.list("") if not self._skip(k)]
        for key in keys:
            if not model_files and key.rsplit("/", 1)[-1] in ("model.onnx", "model.plan"):
                continue
            path = self.store.get_file(key, self.root / key)
            self._remote[key] = sha256_file(path)
        return keys

    def _local(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if self._skip(rel) or self._skip(rel + "/x"):
                continue
            if path.is_dir() and not any(path.iterdir()):
                (path / KEEP_NAME).touch()
                files[f"{rel}/{KEEP_NAME}"] = path / KEEP_NAME
            elif path.is_file():
                files[rel] = path
        return files

    def push(self) -> dict[str, list[str]]:
        """Upload changed files and delete removed ones; returns ``{"uploaded": [...], "deleted": [...]}``."""
        from tasks.model.repo import MARKER

        if getattr(self, "_partial", False):
            raise RuntimeError("a mirror pulled without its model files is for reading only")
        local = self._local()
        shas = {k: sha256_file(p) for k, p in local.items()}
        changed = [k for k in local if self._remote.get(k) != shas[k]]
        rank = lambda k: (2 if k == MARKER else 1 if k.endswith("/config.pbtxt") else 0, k)  # noqa: E731
        for key in sorted(changed, key=rank):
            if key.endswith("/config.pbtxt"):
                wait = 1.05 - (time.time() - _CONFIG_UPLOADS.get(self.store.uri(key), 0.0))
                if wait > 0:
                    time.sleep(wait)
            self.store.put_file(key, local[key])
            if key.endswith("/config.pbtxt"):
                _CONFIG_UPLOADS[self.store.uri(key)] = time.time()
            self._remote[key] = shas[key]
        removed = sorted((k for k in self._remote if k not in local), key=lambda k: (-k.count("/"), k))
        for key in removed:
            self.store.delete(key)
            del self._remote[key]
        if changed or removed:
            logger.info("model repository %s: uploaded %s, deleted %s", self.store.url, changed, removed)
        return {"uploaded": changed, "deleted": removed}


def _repo_store(target: ServingTarget) -> Store:
    """The store holding ``target``'s repository (its s3:// URL; endpoint and keys: MLPIPE_S3_*)."""
    url = target.repo_url
    assert url is not None
    cfg = load_settings()
    if cfg.s3 is None:
        raise ValueError(f"the model repository {url} is in object storage, but no S3 endpoint is configured: set "
                         "MLPIPE_S3_ENDPOINT, MLPIPE_S3_ACCESS_KEY and MLPIPE_S3_SECRET_KEY (and an s3:// "
                         "MLPIPE_STORE_URL)")
    return open_store(cfg, url=url)


@dataclass
class RepoSession:
    """What a deploy works on: ``target.repo_dir`` is a local directory; ``sync()`` publishes it."""

    target: ServingTarget
    sync: Callable[[], None]
    mirror: RepoMirror | None = None
    lease: RepoLease | None = None


@contextlib.contextmanager
def repo_session(target: ServingTarget, what: str = "deploy") -> Iterator[RepoSession]:
    """Hold the repository (flock, or the S3 lease) and give a directory to work on.

    A directory repository is worked on in place (``sync`` does nothing). An s3:// repository is
    pulled into a temporary copy; ``sync()`` checks the lease is still held and pushes the copy.
    """
    if target.repo_url is None:
        with _repo_lock(target):
            yield RepoSession(target, lambda: None)
        return
    store = _repo_store(target)
    with RepoLease(store, what, ttl_s=target.lease_ttl_s, timeout_s=target.lock_timeout_s) as lease, \
            tempfile.TemporaryDirectory(prefix="mlpipe-repo-") as tmp:
        mirror = RepoMirror(store, Path(tmp) / "repo")
        mirror.pull()

        def sync() -> None:
            lease.check()
            mirror.push()

        yield RepoSession(dataclasses.replace(target, repo_dir=mirror.root), sync, mirror, lease)


def _pinned_in(target: ServingTarget, model: str) -> int | None:
    """The classifier version ``target``'s repository pins now (None: none, or not rendered)."""
    from tasks.model import repo as model_repo

    if target.repo_url is None:
        return model_repo.serving_version(target.repo_dir, model) if model_repo.repo_flavour(target.repo_dir) \
            else None
    key = f"{model_repo.classifier_name(model)}/config.pbtxt"
    with tempfile.TemporaryDirectory(prefix="mlpipe-pin-") as tmp:
        try:
            _repo_store(target).get_file(key, Path(tmp) / key)
        except ObjectNotFound:
            return None
        return model_repo.serving_version(Path(tmp), model)


def _ensure_rendered(target: ServingTarget, spec: "ModelSpec") -> str:
    """Render the static parts of ``spec``'s models (idempotent: only what the spec changed is rewritten, so
    the repository always matches the spec); returns the repository's flavour."""
    from tasks.model import repo as model_repo

    flavour = model_repo.repo_flavour(target.repo_dir) or target.default_flavour
    max_batch = model_repo.repo_max_batch_size(target.repo_dir) or MAX_BATCH
    model_repo.render_repo(flavour, target.repo_dir, spec, max_batch)
    return flavour


def _ensure_base_models(client, model: str) -> None:
    from tasks.model import repo as model_repo

    for name in (model_repo.preprocess_name(model), model_repo.postprocess_name(model)):
        if not client.model_ready(name):
            client.load_model(name)


def _is_serving(client, target: ServingTarget, model: str, version: int) -> bool:
    """Pinned in the files, the only READY classifier version, and the ensemble and its steps ready."""
    from tasks.model import repo as model_repo

    if model_repo.serving_version(target.repo_dir, model) != version:
        return False
    pre, clf, post, _ = model_repo.model_names(model)
    return (client.ready_versions(clf) == [version] and client.model_ready(model) and client.model_ready(pre)
            and client.model_ready(post))


def _serve(client, target: ServingTarget, spec: "ModelSpec", version: int,
           sync: Callable[[], None] | None = None) -> None:
    """Pin ``version`` and load it (Triton loads the new version before retiring the old), then the ensemble.

    ``sync`` publishes the pin (an s3:// repository) before Triton is asked to load."""
    from tasks.model.serve import serve_classifier_version

    _ensure_base_models(client, spec.name)
    serve_classifier_version(client, target.repo_dir, spec, version, sync=sync)


def _fetch(store: Store, model: str, version: int, tmp: Path, flavour: str) -> tuple[Path, Path | None]:
    prefix = layout.version_prefix(model, version)
    try:
        onnx = store.get_file(prefix + layout.MODEL_ONNX, tmp / "model.onnx")
    except ObjectNotFound:
        raise DeployError(f"{model} v{version} has no model.onnx in the store ({store.uri(prefix)}); "
                          "nothing was changed") from None
    plan = None
    if flavour == "production" and store.exists(prefix + "model.plan"):
        plan = store.get_file(prefix + "model.plan", tmp / "model.plan")
    return onnx, plan


def _served_artifact(store: Store, model: str, version: int, tmp: Path, flavour: str, onnx: Path,
                     plan: Path | None) -> tuple[Path, dict[str, Any]]:
    """The file the classifier version serves as ``model.onnx``, and what it is and why."""
    from tasks.contracts.files import sha256_file

    if flavour != "local":  # the production flavour's choice is Triton's platform: model.plan when compiled
        return onnx, {"artifact": layout.MODEL_PLAN if plan is not None else layout.MODEL_ONNX, "flavour": flavour,
                      "reason": "production flavour: the TensorRT plan when one was compiled, else model.onnx"}
    serving = (registry.get_version(store, model, version).get("qc") or {}).get("serving") or {}
    name = serving.get("artifact")
    if name in layout.CPU_COMPILED:
        try:
            path = store.get_file(layout.compiled_model_key(model, version, name), tmp / name)
        except ObjectNotFound:
            why = f"QC chose {name}, but it is missing from the store"
        else:
            sha = sha256_file(path)
            if sha == serving.get("sha256"):
                return path, {"artifact": name, "flavour": flavour, "sha256": sha, "reason": serving.get("reason")}
            why = f"QC chose {name}, but the stored file is not the one QC checked (sha256 {sha[:12]})"
        logger.warning("%s v%s: %s; serving model.onnx", model, version, why)
        return onnx, {"artifact": layout.MODEL_ONNX, "flavour": flavour, "sha256": sha256_file(onnx),
                      "reason": f"{why}: serving model.onnx"}
    return onnx, {"artifact": layout.MODEL_ONNX, "flavour": flavour, "sha256": sha256_file(onnx),
                  "reason": serving.get("reason") or "QC recorded no compiled artefact to serve"}


def _read_config(target: ServingTarget, model: str) -> bytes | None:
    from tasks.model import repo as model_repo

    try:
        return (target.repo_dir / model_repo.classifier_name(model) / "config.pbtxt").read_bytes()
    except FileNotFoundError:
        return None


def _put_back_config(target: ServingTarget, model: str, data: bytes) -> None:
    """Atomically put the classifier's config.pbtxt back as it was (newer mtime, so Triton notices)."""
    from tasks.model import repo as model_repo

    path = target.repo_dir / model_repo.classifier_name(model) / "config.pbtxt"
    model_repo.write_repo_file(path, data, only_if_changed=False)


def _restore(client, target: ServingTarget, spec: "ModelSpec", previous: int | None, config: bytes | None,
             expected: dict[str, Any] | None, sync: Callable[[], None] = lambda: None) -> str:
    """Serve ``previous`` again (or, with none, put the config back and unload the classifier)."""
    from tasks.model import repo as model_repo

    model = spec.name
    if previous is None:
        try:
            if config is not None:
                _put_back_config(target, model, config)
                sync()
            for name in (model, model_repo.classifier_name(model)):
                client.unload_model(name)
            return "there was no earlier version to restore: the classifier is unloaded and its config put back"
        except Exception as exc:  # noqa: BLE001
            return f"there was no earlier version to restore; cleaning up also failed: {exc}"
    try:
        if not _is_serving(client, target, model, previous):
            _serve(client, target, spec, previous, sync)
        smoke_test(client, spec, min_accuracy=target.smoke_min_accuracy, expected=expected)
        return f"restored v{previous}, which answers again"
    except Exception as exc:  # noqa: BLE001
        return f"restoring v{previous} ALSO failed: {exc} (check Triton's log)"


def _switch(store: Store, target: ServingTarget, spec: "ModelSpec", version: int, action: str) -> dict[str, Any]:
    """Serve ``version`` of ``spec``'s model; on failure restore the previous serving version and raise DeployError."""
    from tasks.model import repo as model_repo
    from tasks.adapters.triton import TritonError

    model = spec.name
    what = f"{action} of {model} v{version}"
    client = _client(target)
    try:
        if not client.is_live():
            pinned = _pinned_in(target, model)
            raise TritonDown(f"Triton at {target.triton_url} ({target.protocol}) is not reachable: {what} not "
                             f"attempted; nothing was changed (the repository still pins "
                             f"{f'v{pinned}' if pinned else 'no version'}). Start Triton or point "
                             "MLPIPE_TRITON_URL / --triton-url at it, then retry")
        with repo_session(target, what) as session, tempfile.TemporaryDirectory(prefix="mlpipe-deploy-") as tmp:
            target, sync = session.target, session.sync  # a directory: the repository, or a copy of the s3:// one
            flavour = _ensure_rendered(target, spec)
            sync()
            present = model_repo.list_versions(target.repo_dir, model)
            previous = model_repo.serving_version(target.repo_dir, model)
            if previous is not None and previous not in present:
                logger.warning("the repository pins v%s, but its folder is missing: nothing to restore", previous)
                previous = None
            config = _read_config(target, model)
            onnx, plan = _fetch(store, model, version, Path(tmp), flavour)
            onnx, served = _served_artifact(store, model, version, Path(tmp), flavour, onnx, plan)
            unchanged = "nothing was changed" + (f", v{previous} still serves" if previous is not None else "")
            serves = "" if served["artifact"] == layout.MODEL_ONNX else f"; serving {served['artifact']}"
            expected = preflight(onnx, spec, f"{what} ({unchanged}{serves})")
            prev_expected = None
            prev_dir = target.repo_dir / model_repo.classifier_name(model) / str(previous)
            if previous is not None and not (flavour == "production" and (prev_dir / "model.plan").is_file()):
                try:  # what v<previous> must answer, to check a restore (not for a TensorRT plan: FP16)
                    prev_expected = preflight(prev_dir / "model.onnx", spec, f"v{previous}")
                except DeployError as exc:
                    logger.warning("cannot pre-compute v%s's answers for the restore check: %s", previous, exc)
            tolerance = SCORE_TOLERANCE["plan" if plan is not None else "onnx"]
            try:
                model_repo.write_classifier_version(target.repo_dir, spec, version, onnx, plan, flavour=flavour)
                sync()
                if _is_serving(client, target, model, version):
                    logger.info("%s v%s is already served: smoke test only", model, version)
                else:
                    _serve(client, target, spec, version, sync)
                smoke = smoke_test(client, spec, min_accuracy=target.smoke_min_accuracy, expected=expected,
                                   score_tolerance=tolerance)
            except Exception as exc:  # noqa: BLE001 - whatever failed, put the previous version back
                reason = f"{what} failed: {exc}"
                logger.error("%s", reason)
                restored = _restore(client, target, spec, previous, config, prev_expected, sync)
                if version not in present and previous != version:
                    try:
                        model_repo.remove_version(target.repo_dir, model, version)
                        sync()
                    except Exception as rm_exc:  # noqa: BLE001
                        logger.warning("could not remove the failed v%s from the repository: %s", version, rm_exc)
                logger.error("%s", restored)
                if isinstance(exc, TritonError) and exc.unreachable:
                    cls: type[Exception] = TritonDown
                elif isinstance(exc, StoreError) and not isinstance(exc, ObjectNotFound):
                    cls = StoreDown  # an outage of the s3:// repository: retried, never "rejected"
                else:
                    cls = DeployError
                raise cls(f"{reason}; {restored}") from exc
    finally:
        client.close()
    logger.info("%s: Triton at %s serves v%s (was v%s) from %s (%s); smoke test %s", action, target.triton_url,
                version, previous, served["artifact"], served["reason"], smoke)
    return {"previous_version": previous, "smoke": smoke, "served": served}


def _record_serving(store: Store, model: str, version: int, served: dict[str, Any], action: str) -> None:
    """Record on the version manifest (through the registry) which artefact serves, and why."""
    entry = {**served, "action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    registry.update_version(store, model, version, lambda m: {**m, "serving": entry}, event="serving",
                            artifact=served["artifact"], reason=served.get("reason"), action=action)


def _switch_recorded(store: Store, target: ServingTarget, spec: "ModelSpec", version: int,
                     action: str) -> dict[str, Any]:
    """``_switch``, with a failure also recorded as a ``<action>_failed`` registry event (the reason)."""
    model = spec.name
    try:
        return _switch(store, target, spec, version, action)
    except (DeployError, Transient) as exc:
        try:
            registry.record_event(store, model, f"{action}_failed", version=version, reason=str(exc),
                                  transient=isinstance(exc, Transient), triton=target.triton_url)
        except Exception as rec_exc:  # noqa: BLE001 - the failure itself is what must be reported
            logger.warning("could not record the failed %s in the registry: %s", action, rec_exc)
        raise


def _prune(target: ServingTarget, model: str) -> list[int]:
    """Remove the oldest classifier versions beyond ``keep_versions`` (never the serving one)."""
    from tasks.model import repo as model_repo

    with repo_session(target, f"prune of {model}") as session:
        work = session.target
        serving = model_repo.serving_version(work.repo_dir, model)
        versions = [v for v in model_repo.list_versions(work.repo_dir, model) if v != serving]
        drop = versions[:max(0, len(versions) - (target.keep_versions - 1))]
        for v in drop:
            model_repo.remove_version(work.repo_dir, model, v)
        session.sync()
    if drop:
        logger.info("pruned %s versions %s (keeping the last %d)", model, drop, target.keep_versions)
    return drop


def _promote(store: Store, model: str, version: int, reason: str, **extra: Any) -> int | None:
    """``version`` -> production, every other production version -> archived; returns the replaced champion."""
    others = [v["version"] for v in registry.all_versions(store, model)
              if v.get("stage") == "production" and v["version"] != version]
    if registry.get_version(store, model, version).get("stage") != "production":
        registry.set_stage(store, model, version, "production", reason, **extra)
    for other in others:
        registry.set_stage(store, model, other, "archived", f"replaced by v{version} ({reason})")
    return max(others) if others else None


def _check_version(model: str, version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise registry.RegistryError(f"version must be an integer >= 1, got {version!r}")


def running_rollout(store: Store, model: str) -> dict[str, Any] | None:
    """The running safe rollout's lease body (``rollouts/<model>/lock.json``); None when none runs or its holder
    stopped renewing it (older than twice its TTL)."""
    try:
        body = store.get_json(layout.rollout_lock_key(model))
    except ObjectNotFound:
        return None
    try:
        fresh = time.time() - float(body.get("renewed_at", 0)) <= 2 * float(body.get("ttl_s", 60) or 60)
    except (TypeError, ValueError):
        fresh = True
    return body if fresh else None


def _no_rollout_running(store: Store, model: str, action: str, rollout_id: str | None = None) -> None:
    """Refuse ``action`` while a safe rollout of ``model`` runs (its lease, ``rollouts/<model>/lock.json``), unless
    it is that rollout's own promotion (``rollout_id``): a rollout and a rollback never run at once."""
    holder = running_rollout(store, model)
    if holder is None:
        return
    what = str(holder.get("what", ""))
    if not (rollout_id and rollout_id in what):
        raise registry.RegistryError(f"a safe rollout of {model} is running ({what}, {holder.get('owner', '?')}): "
                                     f"no {action} until it ends; stop it first with `mlpipe rollout kill "
                                     f"--model {model}` (the champion then answers every frame)")


def deploy(store: Store, model: str, version: int, target: ServingTarget | None = None, *,
           force: bool = False, rollout_id: str | None = None) -> dict[str, Any]:
    """Serve ``version`` of ``model`` (it must have passed QC unless ``force``); see the module doc for the steps.

    The model spec is ``models/<model>/spec.yaml`` (``Settings.model_spec``: a missing or invalid spec is
    bad input, raised before anything is touched). Refused while a safe rollout of the model runs, except
    for that rollout's own promotion (``rollout_id``)."""
    _check_version(model, version)
    _no_rollout_running(store, model, "deploy", rollout_id)
    spec = load_settings().model_spec(model)
    target = target or ServingTarget.from_env()
    manifest = registry.get_version(store, model, version)
    verdict = (manifest.get("qc") or {}).get("verdict")
    if manifest.get("stage") == "rejected" and not force:
        why = (manifest.get("history") or [{}])[-1].get("reason", "no reason recorded")
        raise registry.RegistryError(f"{model} v{version} was rejected ({why}); it cannot be deployed")
    if verdict != "passed" and not force:
        raise registry.RegistryError(f"{model} v{version} has not passed the QC gate (verdict: {verdict}); "
                                     f"run `mlpipe qc --version {version}` first")
    if force and verdict != "passed":
        logger.warning("FORCED deploy of %s v%s without a passed QC verdict (verdict: %s)", model, version, verdict)
    switched = _switch_recorded(store, target, spec, version, "deploy")
    _record_serving(store, model, version, switched["served"], "deploy")
    archived = _promote(store, model, version, "deployed after QC" if verdict == "passed" else "forced deploy",
                        smoke=switched["smoke"])
    pruned = _prune(target, model)
    registry.record_event(store, model, "deploy", version=version, previous=switched["previous_version"],
                          archived=archived, smoke=switched["smoke"], pruned=pruned, forced=bool(force),
                          triton=target.triton_url, served=switched["served"]["artifact"])
    logger.info("deployed %s v%s (previous v%s, archived v%s); pruned %s", model, version,
                switched["previous_version"], archived, pruned)
    return {"model": model, "deployed_version": version, "previous_version": switched["previous_version"],
            "archived_version": archived, "smoke": switched["smoke"], "pruned": pruned}


def rollback(store: Store, model: str, version: int, target: ServingTarget | None = None,
             reason: str = "manual rollback") -> dict[str, Any]:
    """Serve an earlier registered ``version`` (re-written from the store if it was pruned); the spec as ``deploy``."""
    _check_version(model, version)
    _no_rollout_running(store, model, "rollback")
    spec = load_settings().model_spec(model)
    target = target or ServingTarget.from_env()
    manifest = registry.get_version(store, model, version)  # unknown version: RegistryError, nothing touched
    if not store.exists(layout.version_file_key(model, version, layout.MODEL_ONNX)):
        raise registry.RegistryError(f"{model} v{version} has no model.onnx in the store; cannot serve it")
    if manifest.get("stage") == "rejected":
        raise registry.RegistryError(f"{model} v{version} was rejected by QC; roll back to a version that passed")
    switched = _switch_recorded(store, target, spec, version, "rollback")
    _record_serving(store, model, version, switched["served"], "rollback")
    replaced = _promote(store, model, version, f"rollback: {reason}", served_before=switched["previous_version"])
    registry.record_event(store, model, "rollback", version=version, previous=switched["previous_version"],
                          archived=replaced, reason=reason, smoke=switched["smoke"], triton=target.triton_url)
    logger.info("rolled back %s to v%s (was v%s): %s", model, version, switched["previous_version"], reason)
    return {"model": model, "serving_version": version, "previous_version": switched["previous_version"],
            "smoke": switched["smoke"]}


def status(target: ServingTarget, model: str, store: Store | None = None) -> dict[str, Any]:
    """The repository's pinned version and versions, what Triton reports READY, and the registry champion."""
    from tasks.model import repo as model_repo

    with contextlib.ExitStack() as stack:
        repo_dir = target.repo_dir
        if target.repo_url is not None:  # read a copy of the configs (no model files, no lease: read only)
            repo_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlpipe-status-"))) / "repo"
            RepoMirror(_repo_store(target), repo_dir).pull(model_files=False)
        rendered = model_repo.repo_flavour(repo_dir) is not None
        out: dict[str, Any] = {
            "model": model, "repo": str(target.repo_dir), "triton": target.triton_url,
            "serving_version": model_repo.serving_version(repo_dir, model) if rendered else None,
            "versions_in_repo": model_repo.list_versions(repo_dir, model) if rendered else [],
        }
    client = _client(target)
    try:
        out["triton_live"] = client.is_live()
        if out["triton_live"]:
            out["triton_ready_versions"] = client.ready_versions(model_repo.classifier_name(model))
    except Exception as exc:  # noqa: BLE001 - status is informative
        out["triton_error"] = str(exc)
    finally:
        client.close()
    if store is not None:
        champ = registry.champion(store, model)
        out["champion"] = None if champ is None else champ["version"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))  # RegistryError is a BadInput


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name: its spec is models/<name>/spec.yaml under "
                        "MLPIPE_MODELS_DIR (default $MLPIPE_MODEL_NAME or 'digits')")
    parser.add_argument("--repo", type=Path, default=None,
                        help="Triton model repository (env MLPIPE_MODEL_REPO, default "
                        "$MLPIPE_HOME/triton/model_repository, as tasks.model.repo and tasks.adapters.triton)")
    parser.add_argument("--triton-url", default=None, help="Triton host:port (env MLPIPE_TRITON_URL, default "
                        "127.0.0.1:8000)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default=None,
                        help="protocol of --triton-url (env MLPIPE_TRITON_PROTOCOL, default http)")
    parser.add_argument("--keep-versions", type=int, default=None,
                        help="classifier versions kept in the repository (env MLPIPE_KEEP_VERSIONS, default 3)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (("deploy", "serve a version that passed QC"), ("rollback", "serve an earlier version")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--version", type=int, required=True)
        p.add_argument("--result-json", type=Path)
        if name == "rollback":
            p.add_argument("--reason", default="manual rollback", help="recorded in the registry event log")
        if name == "deploy":
            p.add_argument("--force", action="store_true", help="deploy without a passed QC verdict (emergency)")
    st = sub.add_parser("status", help="which version the repository pins and Triton serves")
    st.add_argument("--result-json", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_settings()
    model = args.model or cfg.model_name
    base = ServingTarget.from_env()
    target = dataclasses.replace(  # flags override the settings; the rest (flavour, lease TTL) is kept
        base, repo_dir=args.repo or base.repo_dir, triton_url=args.triton_url or base.triton_url,
        protocol=args.protocol or base.protocol,
        keep_versions=args.keep_versions if args.keep_versions is not None else base.keep_versions)
    store = open_store(cfg)
    if args.cmd == "deploy":
        result = deploy(store, model, args.version, target, force=args.force)
    elif args.cmd == "rollback":
        result = rollback(store, model, args.version, target, reason=args.reason)
    else:
        result = status(target, model, store)
    print(json.dumps(result, indent=2, default=str))
    if getattr(args, "result_json", None):
        write_result_json(args.result_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
