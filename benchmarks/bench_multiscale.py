"""Benchmark of LiteMLA's multi-scale aggregation (linattn.multiscale_aggregate) and of the context op
(linattn.lite_mla_context: aggregation and ReLU linear attention fused, the aggregated tensor never written).

    python benchmarks/bench_multiscale.py      # GPU: both ops, every LiteMLA of docs/design.md 5, B=16 and 1, bf16
    python benchmarks/bench_multiscale.py --backward --dtype fp16 bf16 --ops lite_mla_context --providers eager triton

Input qkv is the (B, 3*heads*32, H, W) output of LiteMLA's qkv conv, channels_last as in an optimized encoder
(--layout nchw, or both); per scale k a depthwise weight (C, 1, k, k) and a grouped 1x1 weight (C, 32, 1, 1), no
biases (EfficientViT-SAM has none). multiscale_aggregate returns cat([qkv, y_1, ...]) (B, (1+S)*C, H, W);
lite_mla_context returns the attention over it, (B, (1+S)*heads*32, H, W).
Shapes: every LiteMLA stage of docs/design.md 5 (C=512, 16 heads, scales (5,), 16x16 for L; 512, 16, (3,), 32x32 and
1024, 32, (3,), 16x16 for XL; --stages picks some), at B=16 and 1 on a GPU. Without a GPU the default is a short
run: the L stage at B=1, fp32, eager and reference. Providers:
  eager                 EfficientViT's eager PyTorch in the input dtype: per scale the depthwise conv and the
                        grouped 1x1 conv, torch.cat, then (context op) EfficientViT's attention
                        (linattn.eager.multiscale_aggregate / lite_mla_context)
  compile               torch.compile of eager (default mode)
  compile-max-autotune  torch.compile of eager, mode="max-autotune" (with CUDA graphs; slow to compile:
                        --max-autotune-batch limits it)
  triton, cuda          the linattn op forced onto that backend
  auto                  the linattn op as users get it: auto, on a GPU the fastest implementation measured on
                        the call's first run; auto_choices records what it ran
  reference             the linattn op on the pure-PyTorch reference backend (fp32 accumulation)

Bytes moved, counting every input read once and every output written once (s = element size, C = 3*heads*32):
  fwd      qkv read + out written + weights read (S*C*(k*k + 32), tiny)
  fwd+bwd  2 x fwd: the forward, then grad_out read, dqkv and the weight gradients written
GB/s = bytes / time; pct_copy compares it with the measured device-to-device copy bandwidth.
The depthwise taps are fp32 FMAs in every provider: B*C*H*W*sum(k*k) of them forward, 3x that forward+backward
(the input's and the weight's gradients); pct_fma is their rate in percent of the GPU's fp32 peak (common.py
fma_peak_tflops). At L0's stage (k = 5) the taps at that peak take 2/3 of the bytes' time at the copy bandwidth
on an H100: the stencil's instructions, not memory, bound the context there. Errors are against
the float64 reference (linattn.reference) on the same inputs (fwd+bwd: the worst of dqkv and the weight
gradients). Speedups: a provider's time over eager's, compile's and compile-max-autotune's on the same inputs.
Rows are appended to <out>/multiscale_aggregate*.jsonl and <out>/lite_mla_context*.jsonl (+ .csv), with the
environment; each plot is drawn from its file.
"""

import argparse
import contextlib
import sys
from dataclasses import dataclass

import torch

import linattn
from linattn import eager, reference
from linattn.benchmarks.common import (
    BACKEND_PROVIDERS,
    COMPILE_MODES,
    CPU_PROVIDERS,
    DTYPES,
    GPU_PROVIDERS,
    LAYOUTS,
    LITE_MLA_STAGES,
    PROVIDERS,
    LiteMLAShape,
    add_benchmark_args,
    announce,
    check_backend,
    compiled,
    exit_status,
    lite_mla_run_shapes,
    max_autotune_skip,
    measuring,
    parse_benchmark_args,
    pct_fma,
    report,
    result_name,
    run_device,
    run_providers,
    table_columns,
)
from linattn.ops.multiscale_aggregate import tap_major

OPS = ("multiscale_aggregate", "lite_mla_context")
TABLE = table_columns("op", "pass", "dtype", "layout", "shape", work=("gbs", "pct_copy", "pct_fma"))


@dataclass
class Inputs:
    """The tensors every provider of one (op, shape, dtype) reads; leaves that require grad."""

    qkv: torch.Tensor  # (B, C, H, W), C = 3*heads*dim
    dws: list[torch.Tensor]  # per scale (C, 1, k, k)
    pws: list[torch.Tensor]  # per scale (C, dim, 1, 1)
    grad_out: torch.Tensor  # the op's output shape

    def leaves(self) -> list[torch.Tensor]:
        return [self.qkv, *self.dws, *self.pws]


def out_channels(op: str, shape: LiteMLAShape) -> int:
    width = shape.qkv_channels if op == "multiscale_aggregate" else shape.total_dim
    return (1 + len(shape.scales)) * width


def make_inputs(op: str, shape: LiteMLAShape, dtype: torch.dtype, layout: str, device: torch.device) -> Inputs:
    gen = torch.Generator(device).manual_seed(0)
    C, D = shape.qkv_channels, shape.dim

    def rand(*size, scale=1.0, fmt=torch.contiguous_format):
        return (torch.randn(size, device=device, generator=gen) * scale).to(dtype, memory_format=fmt).requires_grad_()

    qkv = rand(shape.batch, C, shape.height, shape.width, fmt=LAYOUTS[layout])
    dws = [rand(C, 1, k, k, scale=1 / k) for k in shape.scales]
    pws = [rand(C, D, 1, 1, scale=D**-0.5) for _ in shape.scales]
    out_size = (shape.batch, out_channels(op, shape), shape.height, shape.width)
    grad_out = torch.randn(out_size, device=device, generator=gen).to(dtype, memory_format=LAYOUTS[layout])
    return Inputs(qkv, dws, pws, grad_out)


def op_function(op: str, impl: str, shape: LiteMLAShape):
    """f(qkv, dws, pws) -> output: `impl` "eager" (EfficientViT's PyTorch), "linattn" (the op) or "reference"."""
    if op == "multiscale_aggregate":
        fn = {
            "eager": eager.multiscale_aggregate,
            "linattn": linattn.multiscale_aggregate,
            "reference": reference.multiscale_aggregate,
        }[impl]
        return lambda qkv, dws, pws: fn(qkv, dws, pws, shape.heads)
    fn = {
        "eager": eager.lite_mla_context,
        "linattn": linattn.lite_mla_context,
        "reference": reference.lite_mla_context,
    }[impl]
    return lambda qkv, dws, pws: fn(qkv, dws, pws, shape.heads, shape.dim)


def setup(op: str, provider: str, shape: LiteMLAShape, inputs: Inputs) -> dict:
    """{"fwd", "fwd+bwd"} callables of `provider`; raises Skipped when it cannot run here.

    fwd returns the output from detached inputs (inference, no autograd graph; the triton and auto providers take
    the depthwise weights as linattn.nn.LiteMLA hands them at inference, tap-major, packed before the timing);
    fwd+bwd returns the gradients of sum(out * grad_out) with respect to qkv and every weight.
    """
    device = inputs.qkv.device
    if provider in BACKEND_PROVIDERS:
        check_backend(op, provider, device)
        run = op_function(op, "linattn", shape)
        context = lambda: linattn.backend(provider)  # the backend is resolved per call: the backward's too
    else:
        run = op_function(op, "eager", shape)
        context = contextlib.nullcontext
        if provider in COMPILE_MODES:
            run = compiled(run, provider)
    leaves = inputs.leaves()
    S = len(shape.scales)
    detached = [t.detach() for t in leaves]
    if provider in ("triton", "auto"):  # (the cuda implementation reads contiguous ones)
        detached[1 : 1 + S] = [tap_major(w) for w in detached[1 : 1 + S]]

    def forward():
        with context():
            return run(detached[0], detached[1 : 1 + S], detached[1 + S :])

    def forward_backward():
        with context():
            out = run(inputs.qkv, inputs.dws, inputs.pws)
            return torch.autograd.grad(out, leaves, inputs.grad_out)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def tap_fmas(shape: LiteMLAShape, pass_name: str) -> int:
    """The depthwise taps' multiply-adds of one call (see the module's docstring)."""
    fwd = shape.batch * shape.qkv_channels * shape.height * shape.width * sum(k * k for k in shape.scales)
    return fwd if pass_name == "fwd" else 3 * fwd


def passes(op: str, shape: LiteMLAShape, inputs: Inputs, backward: bool) -> dict:
    """{pass: (float64 reference result, bytes moved)}."""
    s = inputs.qkv.element_size()
    leaves = [t.detach().double().requires_grad_() for t in inputs.leaves()]
    S = len(shape.scales)
    out = op_function(op, "reference", shape)(leaves[0], leaves[1 : 1 + S], leaves[1 + S :])
    weights = sum(t.numel() for t in leaves[1:])
    fwd_bytes = (leaves[0].numel() + out.numel() + weights) * s
    result = {"fwd": (out.detach(), fwd_bytes)}
    if backward:
        grads = torch.autograd.grad(out, leaves, inputs.grad_out.double())
        result["fwd+bwd"] = (grads, 2 * fwd_bytes)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_args(parser, PROVIDERS, layouts=True)
    parser.add_argument("--ops", nargs="+", help=f"some of {', '.join(OPS)} (default: both)")
    parser.add_argument(
        "--backward", action=argparse.BooleanOptionalAction, default=False, help="also time forward+backward"
    )
    return parse_benchmark_args(parser, argv, dtype=DTYPES, providers=PROVIDERS, stages=LITE_MLA_STAGES, ops=OPS)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, on_gpu = run_device(
        args,
        "by default a short CPU run (eager and reference, fp32, forward, the L-model stage at batch 1)",
        "the compile, triton, cuda and auto providers, fp16/bf16 and docs/design.md 5's LiteMLA shapes",
    )
    shapes = lite_mla_run_shapes(args, on_gpu)
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    providers = args.providers or list(GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)
    ops = args.ops or list(OPS)

    env, copy_gbs = announce(device)
    rows = {op: [] for op in ops}
    cases = [(shape, d, layout, op) for shape in shapes for d in dtypes for layout in args.layout for op in ops]
    with measuring(len(cases) * len(providers), "multiscale") as bar:  # SIGTERM: rows kept
        for shape, dtype_name, layout, op in cases:
            inputs = make_inputs(op, shape, DTYPES[dtype_name], layout, device)
            base = {"op": op, "dtype": dtype_name, "layout": layout, **shape.columns(), "copy_gbs": copy_gbs}
            timed = run_providers(
                providers,
                lambda provider, op=op, shape=shape, inputs=inputs: setup(op, provider, shape, inputs),
                passes(op, shape, inputs, args.backward),
                base,
                device,
                copy_gbs,
                bar,
                cuda_graph=args.cuda_graph,
                skip=max_autotune_skip(args, shape.batch),
            )
            pct_fma(timed, lambda row, shape=shape: tap_fmas(shape, row["pass"]), device)
            rows[op] += timed
            del inputs
            if on_gpu:
                torch.cuda.empty_cache()
    for op in ops:
        report(rows[op], TABLE, args.out, result_name(op, args.quick, device), env)
    return [row for op in ops for row in rows[op]]


if __name__ == "__main__":
    sys.exit(exit_status(main()))
