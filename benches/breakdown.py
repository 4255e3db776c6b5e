"""Where one call's time goes: the host's share, and on a GPU each kernel's, measured by torch.profiler.

A call timed with the device synchronised after it (harness.run_timed) takes the longer of two times:
the host's, issuing its launches, and the device's, running them. `breakdown(fn)` tells them apart, so
that a bench case slower than its peer says whether the kernels are slower (their device time) or the
host is (launch and Python overhead, which leaves the GPU waiting between kernels: a busy span longer
than the kernels' sum). The bench cases record it in `benchmark.extra_info["breakdown"]`, and
`python -m echo_kernels.report` renders it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from harness import GPU, synchronize

TOP = 6  # kernels and host ops kept, the largest first


def breakdown(fn, calls: int = 3) -> dict:
    """Per call of fn, each a median over `calls` calls, in seconds:

    host_s: until fn returns, the device idle before it (what the host spends issuing the call);
    ops_s: the host's time inside the torch ops and runtime calls the profiler records (their own
    times summed; the profiler slows them); ops: {op: its own time}, the TOP largest;
    and on a GPU, from the profiler's device activity:
    device_s: the kernels' summed time; span_s: from the first kernel's start to the last one's end
    (span_s - device_s: the device waiting for the host, an upper bound, since the profiler slows the
    host too);
    kernels: {kernel name: [seconds, launches]}, the TOP largest by time.
    """
    fn()
    synchronize()
    host = []
    for _ in range(calls):
        synchronize()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
    synchronize()
    spans, device, kernels, ops = [], [], defaultdict(lambda: [0.0, 0]), defaultdict(float)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if GPU else [])
    for _ in range(calls):  # one profile per call: its device events are that call's alone
        with profile(activities=activities) as prof:
            fn()
            synchronize()
        on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        if GPU:
            if not on_device:
                raise RuntimeError("the profiler recorded no device activity: is CUPTI available?")
            spans.append(max(e.time_range.end for e in on_device)
                         - min(e.time_range.start for e in on_device))
            device.append(sum(e.time_range.elapsed_us() for e in on_device))
        for e in on_device:
            kernels[e.name][0] += e.time_range.elapsed_us() / calls
            kernels[e.name][1] += 1
        for row in prof.key_averages():
            if row.self_cpu_time_total > 0:
                ops[row.key] += row.self_cpu_time_total / calls
    result = {"host_s": statistics.median(host), "ops_s": sum(ops.values()) * 1e-6,
              "ops": _largest({k: v * 1e-6 for k, v in ops.items()})}
    if GPU:
        result.update(
            device_s=statistics.median(device) * 1e-6,
            span_s=statistics.median(spans) * 1e-6,
            kernels=_largest({name: [us * 1e-6, count / calls] for name, (us, count) in kernels.items()}),
        )
    return result


def _largest(times: dict) -> dict:
    """The TOP entries of {name: seconds or [seconds, ...]}, the largest first."""
    seconds = lambda item: item[1][0] if isinstance(item[1], list) else item[1]
    return dict(sorted(times.items(), key=seconds, reverse=True)[:TOP])
