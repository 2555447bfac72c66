"""``bench offload --trace``: one run of a phase per mode under ``torch.profiler``, summed up.

Why: on an H100 the remote modes lost more than their time blocked for rows -- the model
thread's "compute" itself grew (results/gpu/offload.json, 2026-11-27). A host-side profile
(``--profile``) cannot tell a GPU that idles between kernels from one that works longer, or
name a CUDA runtime call that blocks the host (a synchronisation, an allocation). The trace
can: per mode, the device's busy time against the run's wall time, the kernels and copies that
took it, and the CUDA runtime calls by host time. On a CPU-only machine it reports the host
side alone (the operators), which is what the dry run checks.

The events are summed from the profiler's own Chrome-trace export, not from
``prof.key_averages()``: building torch's Python event tree costs ~30 us an event (a 1B
backbone's serving run is ~10^6 events: minutes a mode on the H200 on 2026-11-28, which ran the
GPU check past its budget); the export is written by the profiler's C++ side and read back
here in ~4 us an event (measured on this repo's 2-core box, 280k events: 10.3 s against 1.2 s,
with this module's own sums ~2 s more).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["trace_run", "summarise_trace"]

#: Runtime calls that stop the host until the device catches up, or allocate (a slow driver
#: call): flagged in the summary. cudaMemcpyAsync is not among them (it blocks only from
#: pageable memory, which the host time then shows).
BLOCKING = frozenset({"cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMalloc",
                      "cudaMallocAsync", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost",
                      "cudaHostRegister", "cudaHostUnregister", "cudaMemcpy"})
#: Trace categories of work the device did (kernels, copies, memsets).
DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
#: Trace categories of the host's calls into the CUDA runtime and driver.
RUNTIME_CATS = frozenset({"cuda_runtime", "cuda_driver"})


def _union_ms(intervals: Iterable[tuple[float, float]]) -> float:
    """Length (ms) of the union of ``(start_us, end_us)`` intervals: kernels on two streams at
    once count once."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e3


#: Host-side categories whose own time is reported per operator name.
OP_CATS = frozenset({"cpu_op", "user_annotation"})


def _self_times(spans: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per operator name (categories :data:`OP_CATS`), ``[calls, self_us]``: an op's duration
    less its children's, the nesting read from each thread's intervals. Runtime calls made
    inside an op are among its children (so a launch is not counted in the op's own time as
    well as under its own name); a child that crosses its parent's end (timestamps rounded
    to the float's precision) is clamped to it."""
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in spans:
        if isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float)) and "name" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end_us, name, own_us, reported]
        for e in evs + [{"ts": float("inf"), "dur": 0.0, "name": None}]:
            while stack and stack[-1][0] <= e["ts"]:
                _, name, own, reported = stack.pop()
                if reported:
                    out[name][0] += 1
                    out[name][1] += max(0.0, own)
            if e["name"] is None:
                break
            end = e["ts"] + e["dur"]
            if stack:
                end = min(end, stack[-1][0])
                stack[-1][2] -= end - e["ts"]
            stack.append([end, e["name"], end - e["ts"], e.get("cat") in OP_CATS])
    return out


def summarise_trace(events: list[dict[str, Any]], wall_ms: float, cuda: bool, top: int = 12) -> dict[str, Any]:
    """The summary of one traced run from its Chrome-trace events (``traceEvents``): the device's
    busy time (the union of its kernels and copies) against ``wall_ms``, the ``top`` device
    operators and host operators by own time, and every CUDA runtime call by host time."""
    spans = [e for e in events if e.get("ph") == "X" and isinstance(e.get("dur"), (int, float))
             and isinstance(e.get("ts"), (int, float)) and "name" in e]
    device = [e for e in spans if e.get("cat") in DEVICE_CATS]
    dev_by: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in device:
        dev_by[e["name"]][0] += 1
        dev_by[e["name"]][1] += e["dur"]
    rt_by: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in spans:
        if e.get("cat") in RUNTIME_CATS:
            rt_by[e["name"]][0] += 1
            rt_by[e["name"]][1] += e["dur"]
    host_by = _self_times([e for e in spans if e.get("cat") in OP_CATS | RUNTIME_CATS])
    busy_ms = _union_ms((e["ts"], e["ts"] + e["dur"]) for e in device)
    ranked = sorted(dev_by.items(), key=lambda kv: -kv[1][1])
    return {
        "wall_ms": wall_ms,
        "device_busy_ms": busy_ms if cuda else None,
        "device_idle_share": max(0.0, 1 - busy_ms / wall_ms) if cuda and wall_ms > 0 else None,
        "device_top": [{"op": k, "calls": int(c), "ms": us / 1e3} for k, (c, us) in ranked[:top]],
        "host_self_excludes_runtime": True,  # runtime calls inside an op are not its own time
        "host_top": [{"op": k, "calls": int(c), "self_ms": us / 1e3}
                     for k, (c, us) in sorted(host_by.items(), key=lambda kv: -kv[1][1])[:top]],
        "runtime_calls": sorted(({"call": k, "calls": int(c), "host_ms": us / 1e3, "blocking": k in BLOCKING}
                                 for k, (c, us) in rt_by.items()), key=lambda r: -r["host_ms"]),
    }


def trace_run(run: Callable[[], Any], device: torch.device, top: int = 12) -> dict[str, Any]:
    """Run ``run()`` once under the profiler and summarise it (:func:`summarise_trace`); the
    run's own wall time excludes the profiler's start and its post-processing."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    fd, path = tempfile.mkstemp(suffix=".json", prefix="engram-trace-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    return summarise_trace(events, wall * 1e3, cuda, top)
