"""bench offload --trace's summary: read from the profiler's Chrome-trace export."""

import pytest
import torch

from engram_ray.bench.trace import summarise_trace, trace_run


def _x(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_summary_counts_overlapping_kernels_once_and_self_times():
    events = [
        _x("cpu_op", "aten::linear", 0, 100), _x("cpu_op", "aten::mm", 10, 60),   # linear's own: 40
        _x("cpu_op", "aten::empty", 20, 5),                                       # inside mm: mm's own 55
        _x("cpu_op", "aten::linear", 200, 50),                                    # a second call
        _x("cuda_runtime", "cudaLaunchKernel", 30, 8), _x("cuda_runtime", "cudaStreamSynchronize", 300, 400),
        _x("kernel", "gemm", 100, 300, tid=7), _x("kernel", "gemm", 200, 300, tid=8),  # two streams: 100-500
        _x("gpu_memcpy", "Memcpy HtoD", 600, 100, tid=9),
        {"ph": "i", "name": "marker", "ts": 5},                                   # not a span: ignored
    ]
    s = summarise_trace(events, wall_ms=1.0, cuda=True)
    assert s["device_busy_ms"] == pytest.approx(0.5)        # 400 us of gemm (union) + 100 us of copy
    assert s["device_idle_share"] == pytest.approx(0.5)
    assert s["device_top"][0] == {"op": "gemm", "calls": 2, "ms": pytest.approx(0.6)}
    host = {h["op"]: h for h in s["host_top"]}
    assert host["aten::linear"]["calls"] == 2 and host["aten::linear"]["self_ms"] == pytest.approx(0.09)
    assert host["aten::mm"]["self_ms"] == pytest.approx(0.047)  # less empty's 5 us and the 8 us launch
    assert host["aten::empty"]["self_ms"] == pytest.approx(0.005)
    rt = s["runtime_calls"]
    assert rt[0] == {"call": "cudaStreamSynchronize", "calls": 1, "host_ms": pytest.approx(0.4), "blocking": True}
    assert rt[1]["call"] == "cudaLaunchKernel" and not rt[1]["blocking"]


def test_self_times_survive_odd_spans():
    events = [
        _x("cpu_op", "parent", 0, 100), _x("cpu_op", "child", 90, 20),   # crosses its parent's end: clamped
        _x("cpu_op", "zero", 50, 0), {"ph": "X", "cat": "cpu_op", "ts": 5},  # no name or duration: skipped
        dict(_x("cpu_op", "other", 0, 30), pid=2),                           # another process, same tid
    ]
    host = {h["op"]: h["self_ms"] for h in summarise_trace(events, wall_ms=1.0, cuda=False)["host_top"]}
    assert host["parent"] == pytest.approx(0.09) and host["child"] == pytest.approx(0.01)
    assert host["zero"] == 0 and host["other"] == pytest.approx(0.03)


def test_summary_without_a_device():
    s = summarise_trace([_x("cpu_op", "aten::add", 0, 10)], wall_ms=0.02, cuda=False)
    assert s["device_busy_ms"] is None and s["device_idle_share"] is None and s["device_top"] == []
    assert s["host_top"] == [{"op": "aten::add", "calls": 1, "self_ms": pytest.approx(0.01)}]


def test_trace_run_on_cpu_reads_the_operators():
    x = torch.randn(8, 8)

    def run():
        y = x
        for _ in range(50):
            y = (y @ x).relu()

    s = trace_run(run, torch.device("cpu"))
    ops = {h["op"]: h["calls"] for h in s["host_top"]}
    assert ops.get("aten::relu") == 50 and s["wall_ms"] > 0 and s["device_busy_ms"] is None
