"""Smoke test of the benchmark machinery (``tasks.tools.bench``) with tiny counts.

Starts the real local services (Tansu, Triton, the consumer as a subprocess) like
``make bench`` does and checks that the results file has its keys and positive
numbers. No timing is asserted: timings belong to ``make bench``, not to tests.
"""

from __future__ import annotations

import json

import pytest

from tasks.tools.bench import LATENCY_STEPS, RESULT_KEYS, latency_steps, main


pytestmark = pytest.mark.integration


def test_bench_writes_results_with_every_key(tmp_path, mlpipe_env, _tiny_onnx_cache, capsys):  # noqa: F811
    out = tmp_path / "bench"
    rc = main(["--out-dir", str(out), "--onnx", str(_tiny_onnx_cache), "--frames", "300", "--naive-frames", "30",
               "--latency-seconds", "1", "--latency-fractions", "0.5", "--ort-seconds", "0.2", "--policies", "default", "--profile", "always",
               "--profile-frames", "200", "--dag-repeats", "1", "--phase-timeout", "120",
               "--session-timeout-ms", "2000"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in RESULT_KEYS + ("dag_parse_s",):
        assert isinstance(results[key], (int, float)) and results[key] > 0, (key, results.get(key),
                                                                             results["details"].get("consumers_2"))
    d = results["details"]
    assert d["naive"]["frames"] == 30
    assert d["naive"]["qdrant_policy"] == "low_confidence:0.7,sample:0.05"  # (b) does the same sink work as (c)
    assert d["config"]["partitions"] == 1
    drain = d["consumer"]["default"]["max"]
    assert drain["predicted"] >= 300 and drain["complete"], drain
    assert drain["policy"] == "low_confidence:0.7,sample:0.05"
    lat = d["consumer"]["default"]["latency"]
    # every frame: its prediction read back from Kafka, and its latency to both sinks logged by the consumer
    assert lat["complete"] and lat["predictions_read"] == lat["e2e"]["n"] == lat["frames"] > 0
    # both sinks are written after Triton answered
    assert lat["e2e"]["p50_ms"] >= lat["consumer_reported"]["p50_ms"]
    # and where the time went, step by step, for every frame
    assert [name for name, _ in LATENCY_STEPS] == list(lat["steps"])
    assert all(st["n"] == lat["frames"] and st["p50_ms"] >= 0 for st in lat["steps"].values())
    assert "Where a frame's end-to-end time goes at 50 % load" in (out / "results.md").read_text()
    assert d["profile"]["main_thread"], d["profile"]
    # DAG import errors are tests/test_dag_structure.py's business; here: every DAG file was timed
    assert d["dag_parse"]["files"] and all(f["median_s"] > 0 for f in d["dag_parse"]["files"].values())
    assert 0 < results["targets"]["fraction_of_ort"] == results["consumer_fraction_of_ort"]
    # issue 14: the compiled models measured like (a), and two consumers of one group over two partitions
    assert set(d["compiled"]) == {"model.opt.onnx", "model.int8.onnx"}
    assert results["compiled_speedup"] == max(results["compiled_speedup_by_artifact"].values())
    assert all(c["agreement_with_fp32"] >= 0.9 for c in d["compiled"].values()), d["compiled"]
    # Triton serves what QC would serve on CPU (the tiny model's INT8 file may or may not meet the bars)
    assert d["served"]["artifact"] in {"model.int8.onnx", "model.opt.onnx", "model.onnx"} and d["served"]["reason"]
    assert f"Triton serves `{d['served']['artifact']}`" in (out / "results.md").read_text()
    pair = d["consumers_2"]
    assert pair["complete"] and pair["predictions_read"] >= 300 and pair["partitions"] == 2, pair
    assert results["consumers_2_fps"] == pair["fps"]
    assert sum(c["predicted"] for c in pair["per_consumer"]) >= 300
    assert all(c["predicted"] > 0 for c in pair["per_consumer"]), pair  # both members had a partition
    table = (out / "results.md").read_text()
    assert "| scenario | images/s | p50 ms | p95 ms | notes |" in table
    assert "(c) consumer" in table and table in printed.out  # the table is printed too
    # the targets, each with its verdict for this run
    assert f"| (c) >= 0.7 of (a), ONNX Runtime FP32 in-process | `{drain['policy']}` |" in table
    assert "| p95 <= 25 ms at 50 % of (c)'s max |" in table
    assert "Consumer main thread, `low_confidence:0.7,sample:0.05` drain, seconds per step" in table
    assert set(drain["consumer_loop_s"]) >= {"check", "wait_triton", "qdrant", "commit"}
    # CPU per process group (psutil) and Triton's / the consumer's Prometheus metrics (prometheus_client)
    assert drain["cpu_cores"]["consumer"] > 0 and drain["cpu_cores"]["triton"] > 0, drain["cpu_cores"]
    assert drain["cpu_cores"]["machine"] >= drain["cpu_cores"]["consumer"]
    assert drain["triton"]["digits"]["requests"] > 0 and drain["triton"]["digits"]["avg_batch"] >= 1, drain["triton"]
    assert lat["avg_batch"] is not None and lat["avg_batch"] >= 1


def test_latency_steps_split_each_frame_at_its_timestamps():
    # [captured_at, to sinks, to polled, to Triton's answer, to the answer taken] in seconds
    entries = [[1.7e9, 0.030, 0.010, 0.018, 0.019], [1.7e9 + 1, 0.050, 0.020, 0.030, 0.040]]
    steps = latency_steps(entries + [[1.7e9, 0.02]])  # an entry without the breakdown is left out
    assert list(steps) == [name for name, _ in LATENCY_STEPS]
    assert steps["kafka_to_poll"]["p50_ms"] == pytest.approx(15.0)
    assert steps["triton"]["max_ms"] == pytest.approx(10.0)
    assert steps["answer_taken"]["p50_ms"] == pytest.approx(5.5)
    assert steps["sinks"]["p50_ms"] == pytest.approx(10.5) and all(st["n"] == 2 for st in steps.values())
    assert latency_steps([[1.7e9, 0.02]]) == {}


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames must be positive"),
    (["--onnx", "/nonexistent/model.onnx"], "is not a file"),
    (["--policies", "everything"], "bad Qdrant policy"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["--out-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
