"""End-to-end benchmark of the SAM encoders, eager against linattn.optimize (what `python -m linattn bench` runs).

    python -m linattn bench                       # on a GPU: xl1, l0, squeezesam, vitt at batch 16 in bf16
    python -m linattn bench --model l0 xl1 --batch 16 --dtype bf16 fp16 --providers eager linattn-compile
    python benchmarks/bench_e2e.py --quick        # tiny inputs: checks the harness in seconds, numbers not kept

Models (docs/design.md 5; random weights, BatchNorm running statistics randomised so that folding matters), each at
its native input size: efficientvit-sam-l0/l1/l2 512x512, efficientvit-sam-xl0/xl1 1024x1024, efficientsam-vitt/
vits 1024x1024, squeezesam 512x512 with its 5-channel input (image, box mask, click map). Short names: l0 .. xl1,
vitt, vits. Providers (eval mode, torch.inference_mode):
  eager                 the reference encoder (linattn.models) as it is
  compile               torch.compile of it (default mode)
  compile-max-autotune  torch.compile of it, mode="max-autotune" (slow to compile)
  compile-reduce-overhead  torch.compile of it, mode="reduce-overhead" (inductor's CUDA graphs; GPU only)
  linattn               linattn.optimize(model, backend=--backend)
  linattn-compile       torch.compile of the optimized model (run under `linattn.backend(--backend)`)
  linattn-priority      linattn with "auto" in the registry's fixed priority order, not measured (on a GPU,
                        what measured dispatch gains; every linattn row records auto's choices: auto_choices)
  linattn-graph         linattn.optimize(model, backend=--backend, cuda_graph=True): the optimized forward
                        captured into a CUDA graph per input shape and replayed, outputs cloned (no host
                        overhead per op; GPU only). Its first call per shape warms up (measured dispatch
                        times there), then captures
Defaults: on a GPU every provider, the four models of the issue, batch 16, bf16, backend auto. Without a GPU a
short run: eager and linattn (reference backend), efficientvit-sam-l0 and squeezesam, batch 1, fp32.

Per model and provider: ms (the median of reps timed calls, with iqr_pct their interquartile range over the median
in %, min_ms and max_ms; timer says which clock: CUDA events, or perf_counter on a CPU), img_s (batch / time),
lat_b1_ms (batch-1 latency, with lat_b1_reps, lat_b1_iqr_pct...; the same run when the batch is 1), peak_mb (CUDA
max_memory_allocated during one call beyond what was live before it, so neither weights nor linattn's folded weights
nor max-autotune's CUDA-graph pool count; "-" on CPU), speedups over eager / compile / max-autotune, rel_err (||out
- ref|| / ||ref||, the worst over the outputs, ref = the eager model in fp32 without TF32 on the same input) and
max_abs_err; top_ops: the torch.profiler breakdown of one call (top ops by self time, printed for eager and
linattn); host_b1_ms: the host's time per batch-1 call (the median of 5, the GPU idle at each call's start: the time
to queue its work; GPU only), with top_host the functions that took it (cProfile over 5 more calls, own time per
call; printed for eager and linattn). The compiled providers run without inductor's freezing (its default), so
linattn-compile refolds its BatchNorms inside the graph on every call, where linattn reuses the folded weights. The
CUDA-graph providers (compile-reduce-overhead, linattn-graph) allocate their activations in a graph pool at capture,
outside peak_mb, which counts what a replay allocates (linattn-graph: its output copy; its rows also carry `graphs`,
the wrapper's captures, replays and eager calls). For eager and linattn (not compiled) a TorchDispatchMode counts
the ops dispatched in one call (`ops`) and the bytes of the tensors they produce (`act_bytes`; view ops excluded,
since they write nothing). A custom op (`linattn::conv_bn_act`) counts as one op with its outputs: the mode does not
see inside it. The issue's CPU target: linattn at most 40% of eager's ops and at most half its bytes.

Rows are appended to <out>/e2e*.jsonl (+ .csv) with the environment (-cpu and -quick files stay out of git);
the plot (images/s per provider and model) is drawn from that file.
"""

import argparse
import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import linattn
from linattn._tune import fixed_priority
from linattn.benchmarks.common import (
    COMPILE_MODES,
    DTYPES,
    SPEEDUP_BASELINES,
    TimeUp,
    Timing,
    add_speedups,
    announce,
    compiled,
    cpu_timing,
    default_device,
    device_arg,
    error_line,
    exit_status,
    failed,
    first_call,
    flag_wrong,
    measuring,
    out_dir_arg,
    parse_benchmark_args,
    peak_mb,
    positive_int,
    report,
    result_name,
    run_device,
    speedup_column,
    tensors,
    timer_name,
    timing,
    write,
)
from linattn.models import efficientsam_encoder, efficientvit_sam_encoder, squeezesam

NAME = "e2e"
PROVIDERS = (
    "eager",
    "compile",
    "compile-max-autotune",
    "compile-reduce-overhead",
    "linattn",
    "linattn-compile",
    "linattn-priority",
    "linattn-graph",
)
# providers that need a CUDA device: on a CPU their rows say why they were skipped
GPU_ONLY = {
    "compile-reduce-overhead": "reduce-overhead is torch.compile's CUDA graphs, it needs a GPU",
    "linattn-graph": "CUDA graphs need a GPU (on CPU inputs linattn.graphs runs the optimized model eagerly)",
}
CPU_PROVIDERS = ("eager", "linattn")
GPU_MODELS = ("efficientvit-sam-xl1", "efficientvit-sam-l0", "squeezesam", "efficientsam-vitt")
CPU_MODELS = ("efficientvit-sam-l0", "squeezesam")
COUNTED = ("eager", "linattn")  # providers whose dispatched ops and bytes are counted (compiled graphs are opaque)
PROFILED = ("eager", "linattn")  # providers whose profile is printed (every provider's is saved)
TARGET_OPS, TARGET_BYTES = 0.40, 0.50  # the CPU target: linattn / eager
# the GPU targets (an H100, bf16, batch 16), met by the faster of linattn and linattn-compile
TARGETS = {
    "efficientvit-sam-xl1": {"img_s": 500, "speedup_vs_eager": 2.5, "speedup_vs_max_autotune": 1.25},
    "efficientvit-sam-l0": {"img_s": 2000},
    "squeezesam": {"speedup_vs_eager": 2.0},
}
TABLE = (
    "model",
    "dtype",
    "batch",
    "provider",
    "ms",
    "reps",
    "iqr_pct",
    "img_s",
    "lat_b1_ms",
    "host_b1_ms",
    "peak_mb",
    *map(speedup_column, SPEEDUP_BASELINES),
    "rel_err",
    "ops",
    "act_mb",
    "note",
)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[bool], nn.Module]  # build(quick)
    size: int  # native input side
    quick_size: int  # --quick input side
    channels: int = 3


def _efficientvit(variant: str, size: int, quick_size: int) -> ModelSpec:
    # quick: the neck's maps follow the input size (the official 64x64 needs the native input)
    build = lambda quick: efficientvit_sam_encoder(variant, embed_size=None if quick else 64)
    return ModelSpec(build, size, quick_size)


MODELS = {
    **{f"efficientvit-sam-{v}": _efficientvit(v, 512, 64) for v in ("l0", "l1", "l2")},
    **{f"efficientvit-sam-{v}": _efficientvit(v, 1024, 128) for v in ("xl0", "xl1")},
    "squeezesam": ModelSpec(lambda quick: squeezesam(), 512, 64, channels=5),
    **{f"efficientsam-{v}": ModelSpec(lambda quick, v=v: efficientsam_encoder(v), 1024, 64) for v in ("vitt", "vits")},
}
ALIASES = {**{v: f"efficientvit-sam-{v}" for v in ("l0", "l1", "l2", "xl0", "xl1")}, "vitt": "efficientsam-vitt"}
ALIASES["vits"] = "efficientsam-vits"


def build_model(name: str, quick: bool) -> nn.Module:
    """The encoder `name` in fp32 eval mode, seeded weights, BatchNorm running statistics away from identity."""
    torch.manual_seed(0)
    model = MODELS[name].build(quick).eval().requires_grad_(False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def make_input(name: str, batch: int, quick: bool, device: torch.device) -> torch.Tensor:
    """A normalised random image batch at the model's size; SqueezeSAM's carries a box mask and a click disk."""
    spec = MODELS[name]
    side = spec.quick_size if quick else spec.size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, side, side, generator=gen)
    if spec.channels == 5:
        box = torch.zeros(batch, 1, side, side)
        box[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        click = (((ys - side // 2) ** 2 + (xs - side // 2) ** 2) <= (side // 32 + 1) ** 2).float()
        x = torch.cat([x, box, click.expand(batch, 1, side, side)], 1)
    return x.to(device)


class OpCounter(TorchDispatchMode):
    """Counts the aten (and custom) ops dispatched and the bytes of the tensors they produce (views excluded).

    The mode is off while an op it intercepted runs, so a custom op is one op: its internals are not seen.
    """

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.per_op = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func.overloadpacket)
        self.per_op[name] = self.per_op.get(name, 0) + 1
        if not getattr(func, "is_view", False):
            self.bytes += sum(t.numel() * t.element_size() for t in tensors(out))
        return out


def count_ops(fn: Callable) -> dict:
    with OpCounter() as counter:
        fn()
    top = sorted(counter.per_op.items(), key=lambda kv: -kv[1])[:10]
    return {"ops": counter.ops, "act_bytes": counter.bytes, "act_mb": counter.bytes / 2**20, "ops_by_name": dict(top)}


def profile_ops(fn: Callable, device: torch.device, top: int = 10) -> list[dict]:
    """torch.profiler over one call: the `top` ops by self time (device time on CUDA), with their share."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # kineto prints USDT lines on every trace and, on a CUDA build without a GPU, "gpuGetDeviceCount failed";
    # 6 is above its highest level. It is read at the process's first profiler start; a user's setting wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def self_us(event) -> float:
        if device.type == "cuda":
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        return event.self_cpu_time_total

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [
        {"op": e.key, "self_ms": self_us(e) / 1e3, "calls": e.count, "pct": 100 * self_us(e) / total}
        for e in events[:top]
    ]


HOST_CALLS = 5  # host_profile: calls timed, then as many profiled


def host_profile(fn: Callable, device: torch.device, top: int) -> tuple[float, list[dict]]:
    """(host ms, top functions) of a warmed-up `fn`: the median over HOST_CALLS calls of each call's wall time
    until it returns, the device synchronized before each call and not waited for after it (on a GPU: the time
    the host takes to queue the call's work); then cProfile over HOST_CALLS more calls, the `top` functions by
    own time per call (Python functions, and the C functions they call: launches, allocations, dispatch)."""
    import cProfile
    import pstats

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wall = []
    for _ in range(HOST_CALLS):
        sync()
        start = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    for _ in range(HOST_CALLS):
        sync()
        profiler.runcall(fn)
    sync()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, _)
    hot = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    functions = [
        {"function": pstats.func_std_string(where), "own_ms": own * 1e3 / HOST_CALLS, "calls": calls / HOST_CALLS}
        for where, (_, calls, own, _, _) in hot
    ]
    return sorted(wall)[HOST_CALLS // 2] * 1e3, functions


def timed(fn: Callable, device: torch.device) -> Timing:
    """The caller has warmed `fn` up; on CPU a whole encoder takes seconds a call: a 2 s budget, 3 runs at least."""
    if device.type == "cuda":
        return timing(fn, device)
    return cpu_timing(fn, budget_s=2.0, min_runs=3, max_runs=20, warm_up=False)


def prepare(provider: str, model: nn.Module, backend: str) -> tuple[Callable, str | None, bool]:
    """(callable module, note, whether it takes its input channels_last) of `provider` on the eager `model`
    (already in the run's dtype and device). An optimized model that runs channels_last gets its input so from
    run_case: the conversion stays out of the timing."""
    if provider == "eager":
        return model, None, False
    if provider in COMPILE_MODES:
        return compiled(model, provider), None, False
    graph = provider == "linattn-graph"
    optimized, rep = linattn.optimize(model, backend=backend, return_report=True, cuda_graph=graph)
    fused = ", ".join(f"{n} {k}" for k, n in rep.counts().items())
    note = f"optimize: {fused or 'nothing replaced'}" + (f"; {len(rep.skipped)} left" if rep.skipped else "")
    if rep.channels_last:
        note += "; channels_last"
    if graph:
        note += "; CUDA graph per input shape, outputs cloned"
    if provider == "linattn-priority":

        def fixed(x, module=optimized):
            with fixed_priority():
                return module(x)

        return fixed, note, rep.channels_last
    if provider == "linattn-compile":
        optimized = compiled(optimized, "compile")
    return optimized, note, rep.channels_last


@contextlib.contextmanager
def _without_tf32():
    """True fp32 for the reference: cuDNN convs default to TF32 (about 1e-3 relative) on Ampere and later."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_case(name, dtype_name, batch, providers, args, device, bar, rows: list[dict]) -> None:
    """Every provider on one model, dtype and batch size; each row is appended to `rows` as soon as it is done
    (a provider stopped by TimeUp gets a row that says so, then TimeUp goes on up)."""
    dtype = DTYPES[dtype_name]
    case = f"{name} {dtype_name} B{batch}"
    try:  # a case that cannot be set up (out of memory at a large batch) is a row per provider; the run goes on
        model32 = build_model(name, args.quick).to(device)
        x32 = make_input(name, batch, args.quick, device)
        with torch.inference_mode(), _without_tf32():
            ref = model32(x32)  # eager fp32: every provider's error is against this
        model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype)
        x = x32.to(dtype)
    except Exception as err:
        write(f"{case}: setup failed: {error_line(err)}")
        for provider in providers:
            rows.append({"model": name, "dtype": dtype_name, "batch": batch, "case": case, "provider": provider,
                         "backend": args.backend, "ms": None, "note": f"failed: setup: {error_line(err)}"})  # fmt: skip
            bar.update()
        return

    def backend_ctx():  # a fresh context per call (linattn.backend is a one-shot context manager)
        return linattn.backend(args.backend) if args.backend != "auto" else contextlib.nullcontext()

    for provider in providers:
        bar.set_postfix_str(f"{case} {provider}")
        row = {"model": name, "dtype": dtype_name, "batch": batch, "case": case, "provider": provider}
        row |= {"input": f"{x.shape[1]}x{x.shape[2]}x{x.shape[3]}", "backend": args.backend, "ms": None}
        row |= {"peak_mb": None, "note": None, "timer": timer_name(device)}
        if provider in GPU_ONLY and device.type != "cuda":
            row["note"] = f"skipped: {GPU_ONLY[provider]}"
            rows.append(row)
            bar.update()
            continue
        try:
            module, row["note"], channels_last = prepare(provider, model, args.backend)
            inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x

            def call(inp=inp, module=module):
                with torch.inference_mode(), backend_ctx():
                    return module(inp)

            if provider == "compile-reduce-overhead":
                call(), call()  # inductor's CUDA graph trees warm up, then record: the third call is a replay
            checked, ran = first_call(call, ref)  # compiles / warms up / measures, outside the timed region
            row |= checked
            if provider.startswith("linattn"):
                row["auto_choices"] = ran  # what auto ran in that call
            row["peak_mb"] = peak_mb(call, device)
            whole = timed(call, device)
            row |= whole.columns()
            row["img_s"] = batch * 1e3 / row["ms"]
            if batch == 1:
                row |= whole.columns("lat_b1_")
            else:
                one = inp[:1].clone()
                call(one)  # a compiled module recompiles for the new shape here
                row |= timed(lambda one=one, call=call: call(one), device).columns("lat_b1_")
            if device.type == "cuda":  # on a CPU the host's time is the call's (ms)
                one = inp if batch == 1 else inp[:1].clone()
                # before the torch.profiler run: right after one, the sixth H100 pass's eager host time came out
                # at 13.9 ms per call against a 7.3 ms batch-1 latency
                try:  # a diagnostic: its failure (another profiler active, say) is a note, not the provider's
                    row["host_b1_ms"], row["top_host"] = host_profile(lambda one=one: call(one), device, args.top_ops)
                except Exception as err:
                    row["note"] = f"{row['note'] or ''}; host profile failed: {error_line(err)}".lstrip("; ")
            row["top_ops"] = profile_ops(call, device, args.top_ops)
            if provider in COUNTED:
                row |= count_ops(call)
            if provider == "linattn-graph":  # captures, replays, and the calls that ran eagerly (and why)
                row["graphs"] = module.cache_info()
                if row["graphs"]["eager"]:
                    row["note"] += f"; ran eagerly: {row['graphs']['eager']}"
        except TimeUp as err:  # what was measured before it stays in the row
            row["note"] = f"stopped: {err}"
            rows.append(row)
            raise
        except Exception as err:  # a provider that fails (compiler, OOM, kernel) is one line; the run goes on
            row["ms"] = None
            row["note"] = f"failed: {error_line(err)}"
            write(f"{case} {provider}: {error_line(err)}")
        rows.append(row)
        bar.update()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def finish(rows: list[dict]) -> None:
    """Speedups within each case, rows whose error breaks docs/design.md 8's bound against the case's eager one
    marked "wrong: ...", and the op and byte ratios against the case's eager row."""
    add_speedups(rows, by="case")
    flag_wrong(rows, by="case")
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        eager = next((r for r in mine if r["provider"] == "eager" and r.get("ops")), None)
        for row in mine:
            if eager and row.get("ops") is not None:
                row["ops_ratio"] = row["ops"] / eager["ops"]
                row["bytes_ratio"] = row["act_bytes"] / eager["act_bytes"]


def print_profiles(rows: list[dict]) -> None:
    for row in rows:
        if row["provider"] in PROFILED and row.get("top_ops"):
            print(f"\n{row['case']} {row['provider']}: top ops by self time (one call)")
            for op in row["top_ops"]:
                print(f"  {op['self_ms']:10.2f} ms {op['pct']:5.1f}%  {op['calls']:5d}x  {op['op']}")
        if row["provider"] in PROFILED and row.get("top_host"):
            print(f"\n{row['case']} {row['provider']}: host {row['host_b1_ms']:.2f} ms per batch-1 call; top "
                  "functions by own time (cProfile, per call)")  # fmt: skip
            for fn in row["top_host"]:
                print(f"  {fn['own_ms']:10.3f} ms  {fn['calls']:7.1f}x  {fn['function']}")


def dispatch_lines(rows: list[dict]) -> list[str]:
    """ "ops dispatched: eager N, linattn M (M/N %)" and the same for bytes, per case with both counted."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = {r["provider"]: r for r in rows if r["case"] == case and r.get("ops") is not None}
        if "eager" not in mine or "linattn" not in mine:
            continue
        e, f = mine["eager"], mine["linattn"]
        ops_ok = "meets" if f["ops_ratio"] <= TARGET_OPS else "misses"
        bytes_ok = "meets" if f["bytes_ratio"] <= TARGET_BYTES else "misses"
        lines.append(
            f"{case}: ops dispatched: eager {e['ops']}, linattn {f['ops']} ({100 * f['ops_ratio']:.0f} %; "
            f"target <= {100 * TARGET_OPS:.0f} %: {ops_ok})"
        )
        lines.append(
            f"{case}: activation bytes written: eager {e['act_mb']:.1f} MiB, linattn {f['act_mb']:.1f} MiB "
            f"({100 * f['bytes_ratio']:.0f} %; target <= {100 * TARGET_BYTES:.0f} %: {bytes_ok})"
        )
    if lines:
        lines.append(
            "(ops and bytes count each linattn op as one call writing its outputs: what the fused kernels dispatch "
            "and write on a GPU. The reference backend, a CPU's, runs the unfused ops inside each: this run's time "
            "and memory do not show the saving.)"
        )
    return lines


def target_lines(rows: list[dict], device: str = "") -> list[str]:
    """Per bf16 batch-16 case with a target: the faster linattn provider against each target (set for an H100;
    `device`: the GPU that ran them, named where it is another)."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        model, dtype, batch = mine[0]["model"], mine[0]["dtype"], mine[0]["batch"]
        fused = [r for r in mine if r["provider"].startswith("linattn") and r.get("ms") is not None]
        if model not in TARGETS or dtype != "bf16" or batch != 16 or not fused:
            continue
        best = max(fused, key=lambda r: r["img_s"])
        parts = []
        for key, goal in TARGETS[model].items():
            got = best.get(key)
            show = (lambda v: f"{v:.0f}") if key == "img_s" else (lambda v: f"{v:.2f}x")
            verdict = "not measured" if got is None else f"{show(got)}: {'meets' if got >= goal else 'misses'}"
            parts.append(f"{key} >= {show(goal)} ({verdict})")
        where = "H100" if not device or "H100" in device else f"set for an H100, run on an {device}"
        lines.append(f"{case} targets ({where}), {best['provider']}: " + "; ".join(parts))
    return lines


def resolve_model(name: str) -> str:
    return ALIASES.get(name, name)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m linattn bench",
        description=__doc__.split("\n\n")[0]
        + " Per-op kernel benchmarks: python"
        + " benchmarks/bench_{linear_attention,lite_mla,multiscale,conv_bn_act,upsample_sum}.py.",
    )
    names = [*MODELS, *ALIASES]
    parser.add_argument("--model", nargs="+", help=f"some of {', '.join(names)} (default: {', '.join(GPU_MODELS)} "
                        f"on GPU; {', '.join(CPU_MODELS)} on CPU)")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, help="batch size (default: 16 on GPU, 1 on CPU)")
    parser.add_argument("--dtype", nargs="+", help=f"some of {', '.join(DTYPES)} (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--providers", nargs="+", help=f"some of {', '.join(PROVIDERS)} (default: all on GPU; "
                        f"{', '.join(CPU_PROVIDERS)} on CPU)")  # fmt: skip
    parser.add_argument("--backend", choices=linattn.BACKENDS, help="linattn backend (default: auto; reference on CPU)")
    parser.add_argument("--device", type=device_arg, default=default_device())
    parser.add_argument("--top-ops", type=positive_int, default=10, help="ops kept from each profile (default 10)")
    parser.add_argument("--out", type=out_dir_arg, default="benchmarks/results",
                        help="folder of the result files and plot (default: benchmarks/results, from the current "
                        "directory)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny inputs (64x64, XL 128x128): checks the harness")
    args = parse_benchmark_args(parser, argv, dtype=DTYPES, providers=PROVIDERS, model=names)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, on_gpu = run_device(
        args,
        f"a short CPU run (by default eager and linattn on the reference backend, {' and '.join(CPU_MODELS)}, "
        "batch 1, fp32)",
        "the compiled providers, bf16 at batch 16 and the throughput targets",
    )
    models = [resolve_model(m) for m in args.model] if args.model else list(GPU_MODELS if on_gpu else CPU_MODELS)
    models = list(dict.fromkeys(models))
    providers = args.providers or list(PROVIDERS if on_gpu else CPU_PROVIDERS)
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    batch = args.batch or (16 if on_gpu else 1)
    args.backend = args.backend or ("auto" if on_gpu else "reference")

    env, _ = announce(device)
    start = time.perf_counter()
    rows = []
    with measuring(len(models) * len(dtypes) * len(providers), NAME) as bar:  # SIGTERM ends the loop, rows kept
        for name in models:
            for dtype_name in dtypes:
                run_case(name, dtype_name, batch, providers, args, device, bar, rows)
    finish(rows)
    print_profiles(rows)
    print()
    plot = {"x": "model", "y": "img_s", "panel_rows": "batch", "hline": None, "ylabel": "images/s"}
    saved = [{k: v for k, v in row.items() if k != "case"} for row in rows]
    report(saved, TABLE, args.out, result_name(NAME, args.quick, device), env, **plot)
    for line in dispatch_lines(rows) + target_lines(rows, env["device"]):
        print(line)
    print(f"bench: {time.perf_counter() - start:.0f} s")
    if bad := failed(rows):
        print(f"bench: {len(bad)} rows failed or wrong: {', '.join(bad)}")
    return rows


if __name__ == "__main__":
    sys.exit(exit_status(main()))
