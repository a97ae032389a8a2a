"""Small helpers of tasks.tools.bench: percentile, Prometheus text via prometheus_client, CPU via psutil."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from tasks.tools import bench

TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="digits",version="1"} 12
nv_inference_request_success{model="digits",version="2"} 3
nv_inference_request_success{model="preprocess",version="1"} 15
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="digits",version="1"} 40
# HELP nv_gpu_utilization GPU utilization rate
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""

CONSUMER_TEXT = """\
# HELP mlpipe_consumer_batch_size Frames per Triton request
# TYPE mlpipe_consumer_batch_size histogram
mlpipe_consumer_batch_size_bucket{le="1.0"} 2.0
mlpipe_consumer_batch_size_bucket{le="+Inf"} 5.0
mlpipe_consumer_batch_size_count 5.0
mlpipe_consumer_batch_size_sum 71.0
# HELP mlpipe_consumer_frames_total Frames handled
# TYPE mlpipe_consumer_frames_total counter
mlpipe_consumer_frames_total{outcome="predicted"} 7.0
"""


def test_percentile():
    assert bench.percentile([], 50) is None
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile([1, 2], 95) == 1.95
    assert bench.percentile([0.0, 1.0 / 3.0], 100, 2) == 0.33
    assert bench.percentile((1.23456,), 50) == 1.235


def test_prometheus_text_is_parsed_by_prometheus_client(tmp_path):
    triton = tmp_path / "triton.txt"
    triton.write_text(TRITON_TEXT)
    assert bench.triton_metrics(triton.as_uri()) == {
        ("nv_inference_request_success", "digits"): 15.0, ("nv_inference_request_success", "preprocess"): 15.0,
        ("nv_inference_count", "digits"): 40.0}
    consumer = tmp_path / "consumer.txt"
    consumer.write_text(CONSUMER_TEXT)
    assert bench._metric_values(consumer.as_uri(), bench._BATCH_METRICS) == {
        "mlpipe_consumer_batch_size_sum": 71.0, "mlpipe_consumer_batch_size_count": 5.0}
    assert bench._metric_values(consumer.as_uri(), ["mlpipe_consumer_frames_total"]) == {}  # labelled
    assert bench.triton_metrics((tmp_path / "missing.txt").as_uri()) == {}


def test_cpu_accounting_with_psutil():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while len(bench.process_tree(child.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = bench.process_tree(child.pid)
        assert tree[0] == child.pid and len(tree) == 2
        me = psutil.Process(os.getpid())
        t0 = bench.proc_cpu_s(me)
        sum(i * i for i in range(300_000))
        assert bench.proc_cpu_s(me) > t0
        assert bench.machine_busy_s() > 0
    finally:
        for pid in reversed(bench.process_tree(child.pid)):
            psutil.Process(pid).kill()
        child.wait(timeout=10)
    assert bench.process_tree(child.pid) == [] and bench.process_tree(None) == []


def test_the_bench_serves_what_qc_would_serve(tmp_path):
    from pathlib import Path

    import numpy as np
    import pytest

    from tasks.config import load_settings
    from tasks.contracts import layout
    from tasks.steps.qc import QCThresholds, compare_compiled

    spec = load_settings().model_spec("digits")
    th = QCThresholds.for_spec(spec)
    y = np.arange(200) % 10
    # QC's comparison decides: an exact copy passes; 5 % of labels changed fails the agreement bar (99 % here)
    worse = y.copy()
    worse[::20] = (worse[::20] + 1) % 10
    assert compare_compiled(y, y, y, spec, th)["failures"] == []
    failed_qc = compare_compiled(y, y, worse, spec, th)["failures"]
    assert any(f.startswith("label agreement 95.00% <") for f in failed_qc), failed_qc
    fp32 = tmp_path / "model.onnx"
    good = {"path": str(tmp_path / "int8"), "agreement_with_fp32": 1.0, "qc_failures": []}
    opt = {"path": str(tmp_path / "opt"), "agreement_with_fp32": 1.0, "qc_failures": []}
    path, why = bench.served_model(fp32, {layout.MODEL_INT8_ONNX: good, layout.MODEL_OPT_ONNX: opt}, "auto")
    assert (path, why["artifact"]) == (Path(good["path"]), layout.MODEL_INT8_ONNX)
    # an INT8 model that failed QC's comparison is not served: the next compiled file is
    low = {**good, "agreement_with_fp32": 0.95, "qc_failures": failed_qc}
    path, why = bench.served_model(fp32, {layout.MODEL_INT8_ONNX: low, layout.MODEL_OPT_ONNX: opt}, "auto")
    assert why["artifact"] == layout.MODEL_OPT_ONNX
    # nothing built or good enough: model.onnx, and the reason names each file
    failed = {layout.MODEL_INT8_ONNX: low, layout.MODEL_OPT_ONNX: {"fps": None, "error": "boom"}}
    path, why = bench.served_model(fp32, failed, "auto")
    assert path == fp32 and "model.int8.onnx failed QC's comparison with model.onnx (label agreement 95.00%" in \
        why["reason"] and "model.opt.onnx did not build" in why["reason"]
    assert bench.served_model(fp32, failed, "fp32")[0] == fp32
    with pytest.raises(bench.BenchError, match="did not build"):
        bench.served_model(fp32, failed, layout.MODEL_OPT_ONNX)
