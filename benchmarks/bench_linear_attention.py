"""Benchmark of ReLU linear attention on EfficientViT's packed layout (linattn.lite_mla_attention).

    python benchmarks/bench_linear_attention.py        # on a GPU: every provider, fp32/fp16/bf16, fwd and fwd+bwd
    python benchmarks/bench_linear_attention.py --dtype bf16 --batch 16 --providers eager compile triton --no-backward

Input is the (B, heads*3*32, Hs, Ws) tensor EfficientViT's LiteMLA builds after
its multi-scale concat; output (B, heads*32, Hs, Ws). Shapes: every LiteMLA stage of
docs/design.md 5 (--stages picks some), with heads = (1 + scales) x heads per branch: L
32 heads at 16x16, XL 32 at 32x32 and 64 at 16x16; at B=16 and 1 on a GPU, the L stage
at B=1 on a CPU. Providers:
  eager                 the official EfficientViT eager computation, in the input dtype
  compile               torch.compile of eager (default mode)
  compile-max-autotune  torch.compile of eager, mode="max-autotune"
  triton, cuda          linattn.lite_mla_attention forced onto that backend
  auto                  linattn.lite_mla_attention as users get it: auto, on a GPU the fastest implementation
                        measured on the call's first run; auto_choices records what it ran
  reference             linattn.lite_mla_attention on the pure-PyTorch reference backend (fp32 accumulation)

Bytes moved, s = element size, counting every input read once and every output written once:
  fwd      qkv read + out written                                 = B*N*heads*(3*32 + 32)*s
  fwd+bwd  qkv read + out written + grad_out read + dqkv written  = B*N*heads*(3*32 + 32 + 32 + 3*32)*s
(the forward output is counted in fwd+bwd too: the caller of a training step consumes it.)
GB/s = bytes / time; pct_copy compares it with the measured device-to-device copy bandwidth.
Errors are against the float64 reference (linattn.reference) on the same input: max |out - ref| and
||out - ref|| / ||ref||. peak_mb is the memory one call allocates beyond what is live before it (output
included). ms is the median of reps timed calls, iqr_pct their interquartile range over the median (%).
Rows are appended to <out>/linear_attention*.jsonl (+ .csv) with the environment; the plot is drawn from
that file.
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
    report,
    result_name,
    run_device,
    run_providers,
    table_columns,
)

OP = "lite_mla_attention"
TABLE = table_columns("pass", "dtype", "shape")


@dataclass(frozen=True)
class Shape:
    """The attention of one LiteMLA stage: `heads` counts every scale's heads (the multi-scale concat)."""

    stage: str
    batch: int
    heads: int
    height: int
    width: int
    dim: int = 32

    @classmethod
    def of(cls, mla: LiteMLAShape) -> "Shape":
        return cls(mla.stage, mla.batch, (1 + len(mla.scales)) * mla.heads, mla.height, mla.width, mla.dim)

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


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator(device).manual_seed(0)
    size = (shape.batch, shape.heads * shape.dim, shape.height, shape.width)
    qkv = torch.randn(size[0], 3 * size[1], *size[2:], device=device, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(size, device=device, generator=gen).to(dtype)
    return Inputs(qkv, grad_out)


def setup(provider: str, shape: Shape, inputs: Inputs) -> dict:
    """{"fwd", "fwd+bwd"} callables of `provider` on `inputs`; raises Skipped when it cannot run here.

    fwd returns the output from a detached qkv (inference, no autograd graph);
    fwd+bwd returns dqkv = d(sum(out * grad_out))/dqkv.
    """
    device = inputs.qkv.device
    if provider in BACKEND_PROVIDERS:
        check_backend(OP, provider, device)
        context = lambda: linattn.backend(provider)  # the backend is resolved per call, backward included

        def attention(x):
            return linattn.lite_mla_attention(x, shape.dim)
    else:
        context = contextlib.nullcontext

        def attention(x):
            return eager.lite_mla_attention(x, shape.dim)

        if provider in COMPILE_MODES:
            attention = compiled(attention, provider)
    qkv, grad_out, qkv_inference = inputs.qkv, inputs.grad_out, inputs.qkv.detach()

    def forward():
        with context():
            return attention(qkv_inference)

    def forward_backward():
        with context():
            return torch.autograd.grad(attention(qkv), qkv, grad_out)[0]

    return {"fwd": forward, "fwd+bwd": forward_backward}


def passes(shape: Shape, inputs: Inputs, backward: bool) -> dict:
    """{pass: (float64 reference result, bytes moved)}."""
    qkv64 = inputs.qkv.detach().double()
    # one dim-wide slice of every head
    slice_bytes = shape.batch * shape.n * shape.heads * shape.dim * inputs.qkv.element_size()
    result = {"fwd": (reference.lite_mla_attention(qkv64, shape.dim), 4 * slice_bytes)}
    if backward:
        dqkv = reference.lite_mla_attention_backward(inputs.grad_out.double(), qkv64, shape.dim)
        result["fwd+bwd"] = (dqkv, 8 * slice_bytes)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_args(parser, PROVIDERS)
    parser.add_argument(
        "--backward",
        action=argparse.BooleanOptionalAction,
        help="also time forward+backward (default: on GPU yes, on CPU no)",
    )
    return parse_benchmark_args(parser, argv, dtype=DTYPES, providers=PROVIDERS, stages=LITE_MLA_STAGES)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, on_gpu = run_device(
        args,
        "by default a short CPU run (eager and reference, fp32, forward, the L-model stage at batch 1)",
        "the compile, triton, cuda and auto providers, fp16/bf16, forward+backward and every LiteMLA stage",
    )
    shapes = [Shape.of(s) for s in lite_mla_run_shapes(args, on_gpu)]
    dtypes = args.dtype or (list(DTYPES) if on_gpu else ["fp32"])
    providers = args.providers or list(PROVIDERS if on_gpu else CPU_PROVIDERS)
    backward = on_gpu if args.backward is None else args.backward

    env, copy_gbs = announce(device)
    rows = []
    with measuring(len(shapes) * len(dtypes) * len(providers), "linear_attention") as bar:  # SIGTERM: rows kept
        for shape in shapes:
            skip = max_autotune_skip(args, shape.batch)
            for dtype_name in dtypes:
                inputs = make_inputs(shape, DTYPES[dtype_name], device)
                base = {
                    "op": OP,
                    "stage": shape.stage,
                    "dtype": dtype_name,
                    "shape": shape.label,
                    "batch": shape.batch,
                    "heads": shape.heads,
                    "dim": shape.dim,
                    "hw": f"{shape.height}x{shape.width}",
                    "n": shape.n,
                    "copy_gbs": copy_gbs,
                }
                rows += run_providers(
                    providers,
                    lambda provider, shape=shape, inputs=inputs: setup(provider, shape, inputs),
                    passes(shape, inputs, backward),
                    base,
                    device,
                    copy_gbs,
                    bar,
                    cuda_graph=args.cuda_graph,
                    skip=skip,
                )
                del inputs
                if on_gpu:
                    torch.cuda.empty_cache()
    report(rows, TABLE, args.out, result_name("linear_attention", args.quick, device), env)
    return rows


if __name__ == "__main__":
    sys.exit(exit_status(main()))
