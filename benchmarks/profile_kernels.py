"""What runs on the GPU for one op call, kernel by kernel: the profiler's view of the op benchmarks' shapes.

    python benchmarks/profile_kernels.py [--conv-shapes NAME ...] [--stages NAME ...] [--providers ...] [--out DIR]

Each (shape, provider) call runs twice to warm up (Triton compiles, measured dispatch, cuDNN graph builds), then
once under torch.profiler. Per kernel of that call: its name, GPU microseconds, grid and block, registers per
thread, shared memory and the profiler's estimated occupancy; per call: the kernels' summed time, the span from
the first kernel's start to the last one's end, the host time of the call, and the bytes the call must move
over the span (GB/s, and percent of the measured copy bandwidth). A span well over the kernels' sum, or a host
time over the span, says the call is launch-bound; a kernel far under the copy bandwidth with low occupancy
says where to look. Rows go to DIR/profile.jsonl (gpu_check.sh's "profile" step; gpu_summary counts them).
Without a GPU it runs the calls on CPU tensors at --quick shapes (no kernels): it checks the script.

--bare: no torch.profiler (its CUPTI session and Nsight Compute's cannot share a process); the third call of each
(shape, provider) runs inside the NVTX range "linattn-profiled" for an outside profiler to select, and nothing is
saved (gpu_check.sh's "ncu" step: `ncu --nvtx --nvtx-include linattn-profiled/ ...`).
"""

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from linattn._backend import Unsupported
from linattn.benchmarks import bench_conv_bn_act as conv_bench
from linattn.benchmarks import bench_lite_mla as mla_bench
from linattn.benchmarks.common import (
    DTYPES,
    QUICK_LITE_MLA_STAGES,
    Skipped,
    announce,
    lite_mla_shapes,
    save_results,
)

# one of each kind and model (gpu_check.sh hands its conv benchmark's list)
CONV_SHAPES = (
    "sq.enc128.c2", "sq.up64", "l0.s3.mb.dw3", "l0.s3.mb.pw_proj", "l0.s3.mb.sep", "xl1.s3.fmb.conv3", "xl1.s4.mb.dw3"
)  # fmt: skip
QUICK_CONV_SHAPES = ("tiny.dense3", "tiny.pw.res")
STAGES = ("l", "xl-s4")
PROVIDERS = ("eager", "triton", "cuda")


NVTX_RANGE = "linattn-profiled"
_bare = False  # main's --bare: kernels_of runs the call in NVTX_RANGE, without torch.profiler


def kernels_of(fn, label: str) -> tuple[list[dict], float]:
    """The GPU kernels one call of fn runs (chrome-trace kernel events, times in us) and its host microseconds."""
    if _bare:
        started = time.perf_counter()
        with torch.cuda.nvtx.range(NVTX_RANGE) if torch.cuda.is_available() else contextlib.nullcontext():
            fn()
        return [], (time.perf_counter() - started) * 1e6
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(label):
            started = time.perf_counter()
            fn()
            host_us = (time.perf_counter() - started) * 1e6
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    return [e for e in events if e.get("cat") == "kernel"], host_us


def rows_of(kernels: list[dict], host_us: float, nbytes: int, copy_gbs: float, base: dict) -> list[dict]:
    """One row per kernel, then the call's row (kernel "(call)")."""
    rows = []
    for k in kernels:
        args = k.get("args", {})
        rows.append({
            **base, "kernel": k.get("name", "?")[:120], "us": k.get("dur"), "grid": args.get("grid"),
            "block": args.get("block"), "regs": args.get("registers per thread"),
            "smem": args.get("shared memory"), "occupancy_pct": args.get("est. achieved occupancy %"),
        })  # fmt: skip
    total = sum(k.get("dur") or 0.0 for k in kernels)
    span = (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) if kernels else None
    gbs = nbytes / span / 1e3 if span else None
    rows.append({
        **base, "kernel": "(call)", "kernels": len(kernels), "us": total or None, "span_us": span,
        "host_us": round(host_us, 1), "bytes": nbytes, "gbs": gbs,
        "pct_copy": None if gbs is None or not copy_gbs else 100 * gbs / copy_gbs,
    })  # fmt: skip
    return rows


def profile(label: str, fn, nbytes: int, copy_gbs: float, base: dict) -> list[dict]:
    fn()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    kernels, host_us = kernels_of(fn, label)
    return rows_of(kernels, host_us, nbytes, copy_gbs, base)


def provider_rows(providers, op: str, shape: str, batch: int, nbytes: int, copy_gbs: float, setup, *inputs):
    """profile()'s rows of each provider that runs here: setup(provider, *inputs), a benchmark's, gives the call
    (Skipped where it cannot run; Unsupported where the call's own limit says no)."""
    rows = []
    for provider in providers:
        try:
            fn = setup(provider, *inputs)["fwd"]
        except Skipped:
            continue
        base = {"op": op, "shape": shape, "batch": batch, "provider": provider}
        try:
            rows += profile(f"{shape} {provider}", fn, nbytes, copy_gbs, base)
        except Unsupported:  # the call's own limit: cuDNN declines it
            continue
    return rows


def conv_rows(names, providers, dtype, device, copy_gbs, quick: bool) -> list[dict]:
    table = conv_bench.QUICK_TABLE if quick else conv_bench.all_entries()
    entries = [e for e in table if e["name"] in names]
    rows = []
    for shape in conv_bench.make_shapes(entries, (2,) if quick else (16,), model="quick" if quick else None):
        eager, x, residual = conv_bench.make_inputs(shape, dtype, device, "channels_last")
        call = (conv_bench.shape_op(shape), shape.name, shape.batch, shape.bytes(x.element_size()), copy_gbs)
        rows += provider_rows(providers, *call, conv_bench.setup, shape, eager, x, residual)
    return rows


def lite_mla_rows(stages, providers, dtype, device, copy_gbs, quick: bool) -> list[dict]:
    shapes = lite_mla_shapes((2,), QUICK_LITE_MLA_STAGES) if quick else lite_mla_shapes((16,), names=stages)
    rows = []
    for shape in shapes:
        eager, fused = mla_bench.make_modules(shape, dtype, "channels_last", device)
        x = mla_bench.make_input(shape, dtype, "channels_last", device)
        nbytes = 2 * x.numel() * x.element_size()  # the block's input read and output written, at the least
        rows += provider_rows(providers, "lite_mla", shape.label, shape.batch, nbytes, copy_gbs, mla_bench.setup,
                              shape, eager, fused, x)  # fmt: skip
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv-shapes", nargs="+", help=f"conv benchmark shapes (default: {' '.join(CONV_SHAPES)})")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), help="LiteMLA stages (bench_lite_mla.py's)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--out", default="benchmarks/results", help="folder of profile.jsonl")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, numbers not kept")
    parser.add_argument("--bare", action="store_true", help=f"no torch.profiler: the calls in NVTX range {NVTX_RANGE}")
    args = parser.parse_args(argv)
    global _bare
    _bare = args.bare
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    quick = args.quick or not on_gpu
    _, copy_gbs = announce(device)
    dtype = DTYPES["bf16" if on_gpu else "fp32"]
    names = QUICK_CONV_SHAPES if quick else (args.conv_shapes or CONV_SHAPES)
    rows = conv_rows(names, args.providers, dtype, device, copy_gbs, quick)
    rows += lite_mla_rows(args.stages, args.providers, dtype, device, copy_gbs, quick)
    if args.bare:
        calls = sum(r["kernel"] == "(call)" for r in rows)
        print(f"{calls} calls run in NVTX range {NVTX_RANGE!r}, each after two warm-up calls; nothing saved")
        return []
    for r in rows:
        if r["kernel"] == "(call)":
            span, gbs = r["span_us"], r["gbs"]
            where = f"{r['kernels']} kernels, {r['us'] or 0:.1f} us of kernels over {span or 0:.1f} us"
            print(f"{r['shape']:24} {r['provider']:8} {where}, host {r['host_us']:.1f} us, {gbs or 0:.0f} GB/s")
        else:
            launch = f"regs {r['regs']}  smem {r['smem']}  occ {r['occupancy_pct']}"
            print(f"    {r['us']:8.1f} us  {launch}  {r['kernel'][:70]}")
    name = "profile-quick-cpu" if quick and not on_gpu else "profile-quick" if quick else "profile"
    path, _ = save_results(rows, args.out, name)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
