"""Benchmark of ReLU linear attention on EfficientViT's packed layout (linattn.lite_mla_attention).

    python benchmarks/bench_linear_attention.py        # on a GPU: every provider, fp32/fp16/bf16, fwd and fwd+bwd
    python benchmarks/bench_linear_attention.py --dtype bf16 --providers eager compile triton --no-backward

Input is the (B, heads*3*32, Hs, Ws) tensor EfficientViT's LiteMLA builds after
its multi-scale concat; output (B, heads*32, Hs, Ws). Providers:
  eager                 the official EfficientViT eager computation, in the input dtype
  compile               torch.compile of eager (default mode)
  compile-max-autotune  torch.compile of eager, mode="max-autotune"
  triton, cuda          linattn.lite_mla_attention forced onto that backend
  reference             linattn.lite_mla_attention on the pure-PyTorch reference backend (fp32 accumulation)

Bytes moved, s = element size, counting every input read once and every output written once:
  fwd      qkv read + out written                                 = B*N*heads*(3*32 + 32)*s
  fwd+bwd  qkv read + out written + grad_out read + dqkv written  = B*N*heads*(3*32 + 32 + 32 + 3*32)*s
(the forward output is counted in fwd+bwd too: the caller of a training step consumes it.)
GB/s = bytes / time; pct_copy compares it with the measured device-to-device copy bandwidth.
Errors are against the float64 reference (linattn.reference) on the same input: max |out - ref| and
||out - ref|| / ||ref||. peak_mb is the memory one call allocates beyond what is live before it (output
included). Rows are appended to <out>/linear_attention*.jsonl (+ .csv) with the environment; the plot is
drawn from that file.
"""

import argparse
import contextlib
from dataclasses import dataclass

import torch

import linattn
from linattn import reference
from linattn._backend import unavailable
from linattn.benchmarks.common import (
    announce,
    error_line,
    plot_results,
    print_table,
    progress,
    run_device,
    save_results,
    time_ms,
)

OP = "lite_mla_attention"
HEAD_DIM = 32  # every LiteMLA of EfficientViT-SAM (DESIGN.md 5)
PROVIDERS = ("eager", "compile", "compile-max-autotune", "triton", "cuda", "reference")
BACKEND_PROVIDERS = ("triton", "cuda", "reference")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# DESIGN.md 5's LiteMLA stages: heads after the multi-scale concat (2 x heads per branch: 32 and 64) on
# feature maps of 16x16 to 64x64 tokens.
GPU_SHAPES = {"heads": (32, 64), "maps": ((16, 16), (32, 32), (64, 64)), "batch": 16}
CPU_SHAPES = {"heads": (32,), "maps": ((16, 16), (32, 32)), "batch": 1}
# --quick checks the harness end to end in seconds; its numbers are not worth keeping.
QUICK_SHAPES = {"heads": (2,), "maps": ((8, 8), (16, 16)), "batch": 2}
TABLE = (
    "pass",
    "dtype",
    "shape",
    "provider",
    "ms",
    "gbs",
    "pct_copy",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "peak_mb",
    "rel_err",
    "note",
)


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    height: int
    width: int
    dim: int = HEAD_DIM

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.heads} {self.height}x{self.width}"


@dataclass
class Inputs:
    """The tensors every provider of one (shape, dtype) reads."""

    qkv: torch.Tensor  # (B, heads*3*dim, Hs, Ws), requires grad
    grad_out: torch.Tensor  # (B, heads*dim, Hs, Ws)


class Skipped(Exception):
    """A provider that cannot run here; the message says why."""


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator(device).manual_seed(0)
    size = (shape.batch, shape.heads * shape.dim, shape.height, shape.width)
    qkv = torch.randn(size[0], 3 * size[1], *size[2:], device=device, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(size, device=device, generator=gen).to(dtype)
    return Inputs(qkv, grad_out)


def setup(provider: str, shape: Shape, dtype: torch.dtype, inputs: Inputs):
    """(forward, forward_backward) callables of `provider` on `inputs`; raises Skipped when it cannot run here.

    forward returns the output from a detached qkv (inference, no autograd graph);
    forward_backward returns dqkv = d(sum(out * grad_out))/dqkv.
    """
    device = inputs.qkv.device
    if provider in BACKEND_PROVIDERS:
        why = unavailable(provider, device)
        if why:
            raise Skipped(why)
        context = lambda: linattn.backend(provider)  # the backend is resolved per call, backward included

        def attention(x):
            return linattn.lite_mla_attention(x, shape.dim)
    else:
        context = contextlib.nullcontext

        def attention(x):
            return reference.efficientvit_lite_mla_attention(x, shape.dim)

        if provider != "eager":
            # Dynamo caches per code object, and every shape and dtype would recompile the same function until
            # the recompile limit silently falls back to eager: start each compiled provider from a clean cache.
            torch.compiler.reset()
            mode = "max-autotune" if provider == "compile-max-autotune" else None
            attention = torch.compile(attention, mode=mode, dynamic=False)
    qkv, grad_out, qkv_inference = inputs.qkv, inputs.grad_out, inputs.qkv.detach()

    def forward():
        with context():
            return attention(qkv_inference)

    def forward_backward():
        with context():
            return torch.autograd.grad(attention(qkv), qkv, grad_out)[0]

    return forward, forward_backward


def measure(fn, ref: torch.Tensor, nbytes: int, device: torch.device, cuda_graph: bool) -> dict:
    """Error, peak memory and time of one provider's callable."""
    out = fn()  # first call compiles / autotunes, outside the timed region
    diff = out.double() - ref  # the float64 difference, once, before any later call may reuse out's memory
    row = {"max_abs_err": diff.abs().max().item(), "rel_err": (diff.norm() / ref.norm()).item(), "peak_mb": None}
    del out, diff
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    notes = []
    ms = time_ms(fn, device, cuda_graph=cuda_graph, notes=notes)
    timer = "perf_counter" if device.type != "cuda" else ("cuda_graph" if cuda_graph and not notes else "do_bench")
    return {**row, "ms": ms, "gbs": nbytes / ms / 1e6, "timer": timer, "note": "; ".join(notes) or None}


def run_group(
    shape: Shape,
    dtype_name: str,
    providers,
    backward: bool,
    device: torch.device,
    cuda_graph: bool,
    copy_gbs: float,
    bar,
) -> list[dict]:
    """Every provider on one (shape, dtype), on the same input tensors; rows with speedups filled in."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, dtype, device)
    qkv64 = inputs.qkv.detach().double()
    slice_bytes = shape.batch * shape.n * shape.heads * shape.dim * dtype.itemsize  # one dim-wide slice of every head
    passes = {"fwd": (reference.lite_mla_attention(qkv64, shape.dim), 4 * slice_bytes)}
    if backward:
        dqkv = reference.lite_mla_attention_backward(inputs.grad_out.double(), qkv64, shape.dim)
        passes["fwd+bwd"] = (dqkv, 8 * slice_bytes)
    del qkv64
    base = {
        "op": OP,
        "dtype": dtype_name,
        "shape": shape.label,
        "batch": shape.batch,
        "heads": shape.heads,
        "dim": shape.dim,
        "hw": f"{shape.height}x{shape.width}",
        "n": shape.n,
        "copy_gbs": copy_gbs,
    }
    rows = []
    for provider in providers:
        bar.set_postfix_str(f"{shape.label} {dtype_name} {provider}")
        try:
            fns, skip = dict(zip(("fwd", "fwd+bwd"), setup(provider, shape, dtype, inputs), strict=True)), None
        except Exception as err:
            fns, skip = {}, str(err) if isinstance(err, Skipped) else error_line(err)
        for pass_name, (ref, nbytes) in passes.items():
            row = {**base, "pass": pass_name, "provider": provider, "bytes": nbytes, "ms": None}
            if skip:
                row["note"] = f"skipped: {skip}"
            else:
                try:
                    row.update(measure(fns[pass_name], ref, nbytes, device, cuda_graph))
                    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                except Exception as err:  # a provider that fails (compile error, OOM, bad kernel) must not end the run
                    row["note"] = f"skipped: {error_line(err)}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
        bar.update()
    for pass_name in passes:
        timed = {r["provider"]: r["ms"] for r in rows if r["pass"] == pass_name and r["ms"] is not None}
        for row in rows:
            if row["pass"] == pass_name and row["ms"] is not None:
                for baseline in ("eager", "compile"):
                    row[f"speedup_vs_{baseline}"] = timed[baseline] / row["ms"] if baseline in timed else None
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", help=f"one or more of {', '.join(DTYPES)} (space or comma separated)")
    parser.add_argument("--batch", type=int, help="batch size (default 16 on GPU, 1 on CPU)")
    parser.add_argument("--providers", nargs="+", help=f"some of {', '.join(PROVIDERS)} (default: all on GPU)")
    parser.add_argument(
        "--backward",
        action=argparse.BooleanOptionalAction,
        help="also time forward+backward (default: on GPU yes, on CPU no)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay calls from a CUDA graph (no launch overhead; inputs may stay in L2)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder of the result files and plot")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, numbers not kept")
    args = parser.parse_args(argv)
    for name, allowed in (("dtype", DTYPES), ("providers", PROVIDERS)):
        values = getattr(args, name)
        if values is not None:
            values = [v for value in values for v in value.split(",") if v]
            if bad := [v for v in values if v not in allowed]:
                parser.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
            setattr(args, name, values)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, on_gpu = run_device(
        args,
        "by default a short CPU run (eager and reference, fp32, batch 1, 32 heads, N 256 and 1024)",
        "the compile, triton and cuda providers, fp16/bf16 and the full shape table",
    )
    shapes_of = QUICK_SHAPES if args.quick else GPU_SHAPES if on_gpu else CPU_SHAPES
    batch = args.batch or shapes_of["batch"]
    shapes = [Shape(batch, h, *hw) for h in shapes_of["heads"] for hw in shapes_of["maps"]]
    dtypes = args.dtype or (list(DTYPES) if on_gpu else ["fp32"])
    providers = args.providers or (list(PROVIDERS) if on_gpu else ["eager", "reference"])
    backward = on_gpu if args.backward is None else args.backward

    env, copy_gbs = announce(device)
    rows = []
    with progress(len(shapes) * len(dtypes) * len(providers), "linear_attention") as bar:
        for shape in shapes:
            for dtype_name in dtypes:
                rows += run_group(shape, dtype_name, providers, backward, device, args.cuda_graph, copy_gbs, bar)
                if on_gpu:
                    torch.cuda.empty_cache()

    print_table(rows, TABLE)
    name = "linear_attention" + ("-quick" if args.quick else "") + ("" if on_gpu else "-cpu")
    jsonl_path, csv_path = save_results(rows, args.out, name, env)
    png_path = plot_results(jsonl_path, jsonl_path.with_suffix(".png"))
    print(f"results: {jsonl_path}, {csv_path}" + (f"; plot: {png_path}" if png_path else ""))
    return rows


if __name__ == "__main__":
    main()
