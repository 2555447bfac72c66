"""``bench offload --trace``: one run of a phase per mode under ``torch.profiler``, summed up.

Why: on an H100 the remote modes lost more than their time blocked for rows -- the model
thread's "compute" itself grew (results/gpu/offload.json, 2026-11-27). A host-side profile
(``--profile``) cannot tell a GPU that idles between kernels from one that works longer, or
name a CUDA runtime call that blocks the host (a synchronisation, an allocation). The trace
can: per mode, the device's busy time against the run's wall time, the kernels and copies that
took it, and the CUDA runtime calls by host time. On a CPU-only machine it reports the host
side alone (the operators), which is what the dry run checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["trace_run"]

#: Runtime calls that stop the host until the device catches up, or allocate (a slow driver
#: call): flagged in the summary. cudaMemcpyAsync is not among them (it blocks only from
#: pageable memory, which the host time then shows).
BLOCKING = frozenset({"cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMalloc",
                      "cudaMallocAsync", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost",
                      "cudaHostRegister", "cudaHostUnregister", "cudaMemcpy"})


def _device_us(e: Any) -> float:
    """An event's own device time (µs); torch renamed it from ``self_cuda_time_total``."""
    return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)


def _on_device(e: Any) -> bool:
    """A kernel or a copy as the device ran it. The CPU operator that launched it carries the
    same time again (Kineto attributes it to both): counting those would double the busy time."""
    from torch.autograd import DeviceType

    return getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU and not getattr(e, "is_user_annotation", False)


def trace_run(run: Callable[[], Any], device: torch.device, top: int = 12) -> dict[str, Any]:
    """Run ``run()`` once under the profiler; the device's busy time (kernels and copies,
    summed: overlapping streams may count twice) against the wall time, the ``top`` device
    operators and host operators by own time, and every CUDA runtime call by host time."""
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
    events = list(prof.key_averages())
    device_ops = sorted((e for e in events if _on_device(e) and _device_us(e) > 0), key=_device_us, reverse=True)
    host = [e for e in events if not _on_device(e)]
    runtime = [e for e in host if e.key.startswith("cuda")]  # cudaLaunchKernel, cudaMemcpyAsync, ...
    host_ops = sorted((e for e in host if not e.key.startswith("cuda")), key=lambda e: e.self_cpu_time_total,
                      reverse=True)
    busy_ms = sum(_device_us(e) for e in device_ops) / 1e3
    return {
        "wall_ms": wall * 1e3,
        "device_busy_ms": busy_ms if cuda else None,
        "device_idle_share": max(0.0, 1 - busy_ms / (wall * 1e3)) if cuda and wall > 0 else None,
        "device_top": [{"op": e.key, "calls": e.count, "ms": _device_us(e) / 1e3} for e in device_ops[:top]],
        "host_top": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                     for e in host_ops[:top]],
        "runtime_calls": sorted(({"call": e.key, "calls": e.count, "host_ms": e.self_cpu_time_total / 1e3,
                                  "blocking": e.key in BLOCKING} for e in runtime),
                                key=lambda r: -r["host_ms"]),
    }
