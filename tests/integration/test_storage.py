"""The object store: both backends behave the same (S3 against a real local endpoint)."""

from __future__ import annotations

import threading

import pytest

from tasks.config import load_settings
from tasks.adapters.storage import LocalStore, ObjectNotFound, StoreError, open_store


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def test_roundtrip_list_delete(any_store):
    any_store.put_bytes("drops/d1/images/a.png", b"\x89PNG")
    any_store.put_json("drops/d1/_SUCCESS", {"rows": 1})
    any_store.put_text("drops/d2/readme.txt", "hello")
    assert any_store.get_bytes("drops/d1/images/a.png") == b"\x89PNG"
    assert any_store.get_json("drops/d1/_SUCCESS") == {"rows": 1}
    assert any_store.exists("drops/d1/_SUCCESS")
    assert not any_store.exists("drops/d1/missing")
    assert any_store.list("drops/d1/") == ["drops/d1/_SUCCESS", "drops/d1/images/a.png"]
    assert any_store.list_dirs("drops") == ["d1", "d2"]
    any_store.delete("drops/d2/readme.txt")
    assert any_store.list_dirs("drops") == ["d1"]


def test_missing_key_is_a_clear_error(any_store):
    with pytest.raises(ObjectNotFound) as err:
        any_store.get_bytes("models/digits/9/model.onnx")
    assert "models/digits/9/model.onnx" in str(err.value)


def test_overwrite_and_files(any_store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    any_store.put_file("runs/r1/model.onnx", src)
    any_store.put_bytes("runs/r1/model.onnx", b"v2")
    out = any_store.get_file("runs/r1/model.onnx", tmp_path / "out" / "m.onnx")
    assert out.read_bytes() == b"v2"
    site = tmp_path / "site"
    (site / "static").mkdir(parents=True)
    (site / "index.html").write_text("<html/>")
    (site / "static" / "a.css").write_text("body{}")
    keys = any_store.put_dir("drops/d1/validation/data_docs", site)
    assert keys == ["drops/d1/validation/data_docs/index.html", "drops/d1/validation/data_docs/static/a.css"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "..", "a\\b"])
def test_bad_keys_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="invalid object key"):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_local_writes_are_atomic(tmp_path):
    """A reader polling during many overwrites only ever sees a complete object."""
    store = LocalStore(tmp_path)
    a, b = b"A" * 2_000_000, b"B" * 3_000_000
    store.put_bytes("k", a)
    seen: set[int] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(len(store.get_bytes("k")))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        store.put_bytes("k", a if i % 2 else b)
    stop.set()
    t.join()
    assert seen <= {len(a), len(b)}
    assert store.list() == ["k"]  # no temporary files left behind


def test_open_store_from_env(monkeypatch, tmp_path, s3_endpoint):
    monkeypatch.setenv("MLPIPE_STORE_URL", f"file://{tmp_path}/st")
    assert isinstance(open_store(load_settings()), LocalStore)
    monkeypatch.setenv("MLPIPE_STORE_URL", "s3://envbucket/pfx")
    monkeypatch.delenv("MLPIPE_S3_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="MLPIPE_S3_ENDPOINT"):
        open_store(load_settings())  # checked when the store is opened (a DAG parse needs no S3 keys)
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT", s3_endpoint.endpoint)
    monkeypatch.setenv("MLPIPE_S3_ACCESS_KEY", s3_endpoint.access_key.get_secret_value())
    monkeypatch.setenv("MLPIPE_S3_SECRET_KEY", s3_endpoint.secret_key.get_secret_value())
    st = open_store(load_settings())
    st.put_bytes("x/y", b"1")
    assert st.list("x/") == ["x/y"]
    assert st.url == "s3://envbucket/pfx"
    # The prefix is honoured: the object lives under pfx/ in the bucket.
    assert [o.object_name for o in st.client.list_objects("envbucket", recursive=True)] == ["pfx/x/y"]


def test_unreachable_s3_endpoint_names_it():
    from tasks.config import S3Settings
    from tasks.local.procs import free_port
    from tasks.adapters.storage import S3Store

    port = free_port()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        S3Store("bucket", S3Settings(endpoint=f"127.0.0.1:{port}", access_key="k", secret_key="s"))


# --------------------------------------------------------------------------- atomic primitives


def test_put_if_absent_creates_once(any_store):
    assert any_store.put_if_absent("claims/1.json", b"first") is True
    assert any_store.put_if_absent("claims/1.json", b"second") is False
    assert any_store.get_bytes("claims/1.json") == b"first"
    assert any_store.put_json_if_absent("claims/2.json", {"run": "a"}) is True
    assert any_store.put_json_if_absent("claims/2.json", {"run": "b"}) is False
    assert any_store.get_json("claims/2.json") == {"run": "a"}
    assert any_store.list("claims/") == ["claims/1.json", "claims/2.json"]  # no temp files left


def test_put_if_absent_has_one_winner_among_concurrent_writers(any_store):
    winners: list[int] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        if any_store.put_if_absent("race/claim.json", str(i).encode()):
            winners.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert any_store.get_bytes("race/claim.json") == str(winners[0]).encode()


def test_put_if_match_is_a_compare_and_swap(any_store):
    any_store.put_json("m/version.json", {"n": 0})
    obj, token = any_store.get_json_with_token("m/version.json")
    assert any_store.put_json_if_match("m/version.json", {"n": 1}, token) is True
    # the token of the first read is stale now: a second writer with it loses
    assert any_store.put_json_if_match("m/version.json", {"n": 99}, token) is False
    assert any_store.get_json("m/version.json") == {"n": 1}
    assert any_store.put_if_match("m/missing.json", b"x", token) is False
    assert not any_store.exists("m/missing.json")


def test_concurrent_read_modify_write_loses_no_update(any_store):
    any_store.put_json("cas/counter.json", {"items": []})

    def add(i: int) -> None:
        for _ in range(200):
            obj, token = any_store.get_json_with_token("cas/counter.json")
            obj["items"].append(i)
            if any_store.put_json_if_match("cas/counter.json", obj, token):
                return
        raise AssertionError("no progress")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(any_store.get_json("cas/counter.json")["items"]) == list(range(8))
