"""Where a training step's time goes: a few steps under torch.profiler, summed per kernel.

On a GPU it answers the two questions a step-time figure leaves open: is the step bound by the GPU (its kernels
are busy for most of the step) or by the host (the GPU idles between launches), and which kernels dominate.
Kernels replayed from CUDA graphs are traced too (CUPTI records graph kernels). On the CPU it lists the
operators by their own CPU time instead, and reports no busy time.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import torch

TOP = 15  # operators per variant in the table (the JSON keeps TOP_JSON)
TOP_JSON = 400  # about every kernel name of a compiled step: where the many small kernels go
# Each profiled step runs inside this record_function region; the profiler lays it on the GPU's timeline from the
# step's first kernel on (step_windows), which separates the idle time inside a step from the host's turn between
# steps.
STEP_REGION = "electra_ds.profiled_step"
# Kernel families by name, first match first: where a GPU-bound step's time goes, in a handful of numbers.
CATEGORIES = (("attention", r"flash|fmha|attention|sdpa|cudnn"),
              ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|wgmma"),
              ("electra_ds Triton kernels", r"^_electra_"),  # the kernels' names in electra_ds/kernels/
              ("inductor (torch.compile)", r"^triton_"),
              ("copy / fill", r"memcpy|memset|copy|fill"),
              ("communication", r"nccl|all_?reduce|reduce_scatter|all_?gather"),
              ("other", r""))


def category(kernel: str) -> str:
    """The family of a GPU kernel name (see CATEGORIES)."""
    return next(name for name, pattern in CATEGORIES if re.search(pattern, kernel, re.IGNORECASE))


def _device_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


def profile_steps(step: Callable[[int], Any], first: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Run steps first .. first+steps-1 under torch.profiler; per step: GPU busy ms (the sum of kernel, copy and
    memset times; None on the CPU), the number of GPU kernels, ms and kernels per kernel family (GPU only), the
    TOP_JSON operators by time, each as (name, ms per step, calls per step), and on a GPU the span of each
    record_function region on the GPU's timeline (not part of the busy time; STEP_REGION is the step's own span)
    and where the GPU idled inside the steps and between them (idle_gaps), and the first step's kernels in order
    (step_timeline)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for k in range(steps):
            with record_function(STEP_REGION):
                step(first + k)
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    annotations: list[tuple[str, float, int]] = []
    gaps = timeline = None
    if cuda:
        timed, annotations = device_events(events, DeviceType.CUDA)
        on_gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernels = [(e.time_range.start, e.time_range.end, e.name) for e in on_gpu if not _is_region(e)]
        windows = step_windows(kernels, [e.time_range.start for e in on_gpu if _is_region(e) and e.name == STEP_REGION])
        gaps = idle_gaps(kernels, steps, windows)
        timeline = step_timeline(kernels, min(windows)) if windows else None
    else:
        timed = [(e.key, float(e.self_cpu_time_total), e.count) for e in events]
    timed = [t for t in timed if t[1] > 0]
    timed.sort(key=lambda t: -t[1])
    busy = sum(us for _, us, _ in timed) / steps / 1e3 if cuda else None
    families: dict[str, float] = {}
    family_kernels: dict[str, float] = {}
    for name, us, count in timed if cuda else ():
        families[category(name)] = families.get(category(name), 0.0) + us / steps / 1e3
        family_kernels[category(name)] = family_kernels.get(category(name), 0.0) + count / steps
    return {"profiled_steps": steps, "gpu_busy_ms_per_step": busy,
            "gpu_kernels_per_step": sum(count for *_, count in timed) / steps if cuda else None,
            "ms_per_kernel_family": families or None,
            "kernels_per_family": family_kernels or None,
            "top_ops": [{"name": name, "ms_per_step": us / steps / 1e3, "calls_per_step": count / steps}
                        for name, us, count in timed[:TOP_JSON]],
            "gpu_annotations": [{"name": name, "span_ms_per_step": us / steps / 1e3}
                                for name, us, _ in annotations] if cuda else None,
            "gpu_idle": gaps, "timeline": timeline}


def kernel_gigabytes(source: str) -> dict[str, float]:
    """Each Triton kernel a module that inductor generated defines -> inductor's estimate of the gigabytes one launch
    reads and writes (`kernel_num_gb` in its metadata, there when compiled under `benchmark_kernel`): the sizes of
    its buffers or of the slices it touches (a broadcast read of a buffer larger than the kernel's output counts as
    one value per output value)."""
    kernels = re.finditer(r"^(\w+) = async_compile\.triton\('\w+', '''(.*?)'''", source, re.M | re.S)
    return {name: float(gb.group(1)) for name, code in (k.groups() for k in kernels)
            if (gb := re.search(r"'kernel_num_gb': ([0-9.e+-]+)", code))}


def merged_kernel_gigabytes(sources: Iterable[str]) -> dict[str, float]:
    """`kernel_gigabytes` over several generated modules; a name that two graphs give kernels of different
    estimates is left out (a profile cannot tell their launches apart)."""
    found: dict[str, set[float]] = {}
    for source in sources:
        for name, gb in kernel_gigabytes(source).items():
            found.setdefault(name, set()).add(gb)
    return {name: gbs.pop() for name, gbs in found.items() if len(gbs) == 1}


def generated_kernel_gigabytes(modules: Iterable[ModuleType]) -> dict[str, float]:
    """`merged_kernel_gigabytes` over the code of inductor's loaded modules (PyCodeCache.modules)."""
    paths = [Path(getattr(module, "__file__", None) or "") for module in modules]
    return merged_kernel_gigabytes(path.read_text() for path in paths if path.suffix == ".py" and path.is_file())


SIZE_CLASSES_MB = (1, 10, 40)  # per launch: on an H100/H200 latency-bound below 1 MB, streaming above 40 MB


def add_bandwidth(profile: dict[str, Any], gigabytes: dict[str, float]) -> None:
    """Each of the profile's top ops that `gigabytes` (kernel -> GB per launch) knows gets its GB per launch and the
    bandwidth it reached (TB/s); the profile gets their sums ("kernel_bandwidth": ms, GB, launches and TB/s per step,
    in all and by MB per launch), which say how far those kernels are from the card's memory bandwidth."""
    known = [op for op in profile["top_ops"] if op["name"] in gigabytes]
    classes: dict[str, list[float]] = {}
    for op in known:
        op["gb_per_call"] = gigabytes[op["name"]]
        gb = op["gb_per_call"] * op["calls_per_step"]
        op["tb_per_s"] = gb / op["ms_per_step"]  # GB per ms
        mb = 1e3 * op["gb_per_call"]
        size = next((f"< {b} MB" for b in SIZE_CLASSES_MB if mb < b), f">= {SIZE_CLASSES_MB[-1]} MB")
        totals = classes.setdefault(size, [0.0, 0.0, 0.0])
        for i, value in enumerate((op["ms_per_step"], gb, op["calls_per_step"])):
            totals[i] += value

    def summary(ms: float, gb: float, calls: float) -> dict[str, float]:
        return {"ms_per_step": ms, "gb_per_step": gb, "calls_per_step": calls, "tb_per_s": gb / ms if ms else 0.0}

    profile["kernel_bandwidth"] = {
        "all": summary(*(sum(t[i] for t in classes.values()) for i in range(3))),
        "by_launch_size": {size: summary(*totals) for size, totals in sorted(classes.items())}} if known else None


def step_windows(kernels: list[tuple[float, float, str]], region_starts: Sequence[float]) -> list[tuple[float, float]]:
    """Each profiled step's (start us, end us) on the GPU's timeline: from where its STEP_REGION starts there to the
    end of the last kernel that starts before the next step's region. Not the region's own span on the GPU: that
    covers the kernels launched from the thread that entered it, and the backward's, which autograd's device thread
    launches, fall outside it (at 9d46b65 the span ended after the forward: 3.58 ms of a 9.78 ms step)."""
    starts = sorted(region_starts)
    windows = []
    for start, following in zip(starts, starts[1:] + [float("inf")]):
        ends = [stop for begin, stop, _ in kernels if start <= begin < following]
        if ends:
            windows.append((start, max(ends)))
    return windows


def step_timeline(kernels: list[tuple[float, float, str]], window: tuple[float, float]) -> list[dict[str, Any]]:
    """Every kernel of one step in launch order, from the (start us, end us, name) of the profiled kernels and the
    step's (start us, end us) on the GPU's timeline: name (cut to 100 characters), start from the step's start and
    duration in us. Which tower and pass each kernel serves, and what each memset or copy follows, are read from it
    offline, without another GPU run."""
    w_start, w_end = window
    return [{"name": name[:100], "start_us": round(start - w_start, 2), "us": round(stop - start, 2)}
            for start, stop, name in sorted(kernels) if w_start <= start < w_end]


def copies_after(timeline: list[dict[str, Any]], top: int = 3) -> list[dict[str, Any]]:
    """What the step's copies and fills (memsets, memcpys, fill kernels) follow: the `top` kernel names launched just
    before one, with how many each precedes, from `step_timeline`'s list. Small copies and fills usually come from
    the op before them (a library's workspace, a zero-initialised output), which names where to look."""
    before = Counter(prev["name"] for prev, item in zip(timeline, timeline[1:])
                     if category(item["name"]) == "copy / fill")
    return [{"after": name, "count": count} for name, count in before.most_common(top)]


def idle_gaps(kernels: list[tuple[float, float, str]], steps: int, windows: Sequence[tuple[float, float]] = (),
              top: int = 10) -> dict[str, Any] | None:
    """Where the GPU waits: from the (start us, end us, name) of every kernel in `steps` profiled steps (any stream),
    the time when no kernel runs, per step, and the `top` longest gaps with the kernels on either side (the host was
    late to launch the second). With `windows`, the (start us, end us) of each step on the GPU's timeline, only idle
    time inside a step counts, and the time between steps is reported apart (None without windows: then every gap
    from the first kernel to the last counts)."""
    if not kernels:
        return None
    kernels = sorted(kernels)
    gaps = []
    end, last = kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append((end, start, last, name))
        if stop > end:
            end, last = stop, name
    between = None
    if windows:
        inside = [(sum(max(0.0, min(stop, w_end) - max(start, w_start)) for w_start, w_end in windows), after, before)
                  for start, stop, after, before in gaps]
        between = (sum(stop - start for start, stop, *_ in gaps) - sum(us for us, *_ in inside)) / steps / 1e3
        idle = [g for g in inside if g[0] > 0]
    else:
        idle = [(stop - start, after, before) for start, stop, after, before in gaps]
    idle.sort(key=lambda g: -g[0])
    return {"idle_ms_per_step": sum(g[0] for g in idle) / steps / 1e3,
            "gaps_per_step": len(idle) / steps,
            "between_steps_ms_per_step": between,
            "longest": [{"us": us, "after": after, "before": before} for us, after, before in idle[:top]]}


def device_events(events: Any, device_type: Any) -> tuple[list[tuple[str, float, int]], list[tuple[str, float, int]]]:
    """(kernels, annotations): the (name, device us, count) of `events` (key_averages) on `device_type`, the GPU
    kernels, copies and memsets apart from the user annotations. The profiler also puts each record_function region
    (e.g. "Optimizer.step#ElectraAdam.step") on the GPU's timeline, spanning the kernels inside it: summed with them
    it would count their time twice."""
    kernels, regions = [], []
    for e in events:
        if e.device_type == device_type:
            (regions if _is_region(e) else kernels).append((e.key, _device_us(e), e.count))
    return kernels, regions


def _is_region(event: Any) -> bool:
    """A record_function region laid on the device's timeline, not a kernel, copy or memset."""
    return bool(getattr(event, "is_user_annotation", False))


def markdown(name: str, ms_per_step: float | None, profile: dict[str, Any]) -> str:
    """A small section: busy fraction and the top operators of one variant."""
    busy = profile["gpu_busy_ms_per_step"]
    head = f"**{name}**: " + (f"GPU busy {busy:.2f} ms of a {ms_per_step:.2f} ms step ({100 * busy / ms_per_step:.0f}%)"
                              if busy is not None and ms_per_step else "operators by own CPU time")
    if profile.get("gpu_kernels_per_step") is not None:
        families = sorted(profile["ms_per_kernel_family"].items(), key=lambda kv: -kv[1])
        counts = profile.get("kernels_per_family") or {}  # absent from results saved before it was recorded
        head += (f", {profile['gpu_kernels_per_step']:g} kernels per step; by family: "
                 + ", ".join(f"{family} {ms:.2f} ms" + (f" ({counts[family]:g} kernels)" if family in counts else "")
                             for family, ms in families))
    idle = profile.get("gpu_idle")
    if idle:
        between = idle.get("between_steps_ms_per_step")  # absent from results saved before it was recorded
        head += (f"; GPU idle {idle['idle_ms_per_step']:.2f} ms per step "
                 + ("inside the step " if between is not None else "")
                 + f"in {idle['gaps_per_step']:g} gaps"
                 + (f" (and {between:.2f} ms between steps)" if between is not None else "") + ", the longest "
                 + ", ".join(f"{g['us']:.0f} us before `{g['before'][:40]}`" for g in idle["longest"][:3]))
    copies = copies_after(profile.get("timeline") or [])  # no timeline in results saved before it was recorded
    if copies:
        head += "; copies and fills follow " + ", ".join(f"`{c['after'][:40]}` ({c['count']})" for c in copies)
    if profile.get("gpu_annotations"):
        head += "; regions on the GPU timeline, not in the busy time: " + ", ".join(
            f"{a['name']} {a['span_ms_per_step']:.2f} ms" for a in profile["gpu_annotations"])
    bandwidth = profile.get("kernel_bandwidth")  # absent from results saved before it was recorded
    if bandwidth:
        head += ("; inductor's kernels with a bytes estimate: " + ", ".join(
            f"{label} {b['ms_per_step']:.2f} ms for {b['gb_per_step']:.2f} GB ({b['tb_per_s']:.2f} TB/s)"
            for label, b in [("all", bandwidth["all"]),
                             *((f"{size} a launch", b) for size, b in bandwidth["by_launch_size"].items())]))
    rows = ["| op | ms/step | calls/step | TB/s |", "|---|---:|---:|---:|"]
    rows += [f"| `{op['name'][:90]}` | {op['ms_per_step']:.3f} | {op['calls_per_step']:g} | "
             + (f"{op['tb_per_s']:.2f} |" if "tb_per_s" in op else " |") for op in profile["top_ops"][:TOP]]
    return "\n".join([head, "", *rows])


__all__ = ["CATEGORIES", "STEP_REGION", "add_bandwidth", "category", "copies_after", "device_events",
           "generated_kernel_gigabytes", "idle_gaps", "kernel_gigabytes", "markdown", "merged_kernel_gigabytes",
           "profile_steps", "step_timeline"]
