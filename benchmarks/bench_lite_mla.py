"""Benchmark of the whole LiteMLA block (linattn.nn.LiteMLA) against EfficientViT's eager LiteMLA, inference.

    python benchmarks/bench_lite_mla.py        # GPU: every LiteMLA of docs/design.md 5, B=16 and 1, bf16, eval
    python benchmarks/bench_lite_mla.py --dtype fp16 bf16 --batch 16 --providers eager compile triton

The block as EfficientViT-SAM builds it (C -> C, head dim 32, heads C/32, no biases, BatchNorm eps 1e-6 after
the projection): qkv 1x1 conv, per scale a depthwise and a grouped 1x1 conv, cat, ReLU linear attention, proj
1x1 conv + BatchNorm, in eval mode (forward only), input and modules channels_last as in an optimized encoder
(--layout nchw, or both). Shapes: every LiteMLA stage of docs/design.md 5 (--stages picks
some) at B=16 and 1 on a GPU; without a GPU a short run: the L stage at B=1, fp32, eager and reference. Providers:
  eager                 EfficientViTLiteMLA below: the official forward in eager PyTorch (nn.Conv2d modules,
                        torch.cat, EfficientViT's attention, conv then BatchNorm), in the input dtype
  compile               torch.compile of the eager module (default mode)
  compile-max-autotune  torch.compile of the eager module, mode="max-autotune" (with CUDA graphs; slow to
                        compile: --max-autotune-batch limits it)
  triton, cuda          linattn.nn.LiteMLA (qkv conv, linattn.lite_mla_context, proj conv with the BatchNorm
                        folded) with its op forced onto that backend
  auto                  linattn.nn.LiteMLA as users get it: auto, on a GPU the fastest implementation of each
                        op measured on the call's first run; auto_choices records what it ran
  reference             linattn.nn.LiteMLA on the pure-PyTorch reference backend
Every provider runs the same weights: linattn.nn.LiteMLA loads the eager module's state_dict (strict), and the
BatchNorm has random running statistics so that folding it is exercised.

img_s = batch / time (images per second through this one block). Bytes moved: x read + out written + weights
read; GB/s = bytes / time, pct_copy against the measured device-to-device copy bandwidth (the block is partly
compute-bound: the 1x1 convs; tflops counts their multiply-adds x2 plus the aggregation and attention). Errors are
against the eager module run in float64 on the same input. Rows are appended to <out>/lite_mla*.jsonl (+ .csv)
with the environment; the plot (speedups over eager) is drawn from that file.
"""

import argparse
import copy
import sys

import torch
from torch import nn

import linattn
import linattn.nn
from linattn import eager
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
    report,
    result_name,
    run_device,
    run_providers,
    table_columns,
)

OP = "lite_mla"  # the block; its fused op is lite_mla_context
EPS = 1e-15  # EfficientViT's attention eps
NORM_EPS = 1e-6  # EfficientViT-SAM's BatchNorm eps
TABLE = table_columns("dtype", "layout", "shape", work=("img_s", "tflops", "gbs", "pct_copy"))


class _ConvNorm(nn.Module):
    """EfficientViT's ConvLayer as LiteMLA uses it: a 1x1 conv, then a BatchNorm when `norm_eps` is given."""

    def __init__(self, in_channels: int, out_channels: int, norm_eps: float | None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = None if norm_eps is None else nn.BatchNorm2d(out_channels, eps=norm_eps)

    def forward(self, x):
        x = self.conv(x)
        return x if self.norm is None else self.norm(x)


class EfficientViTLiteMLA(nn.Module):
    """EfficientViT-SAM's LiteMLA in eager PyTorch, the official forward (the baseline of this benchmark).

    Same submodule names and state_dict keys as the official module, timm's `efficientvit_mit.LiteMLA` and
    `linattn.nn.LiteMLA`: qkv.conv, aggreg.{i}.{0,1}, proj.conv, proj.norm. (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, in_channels, out_channels, heads, dim=32, scales=(5,), eps=EPS, norm_eps=NORM_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps
        total_dim = heads * dim
        self.qkv = _ConvNorm(in_channels, 3 * total_dim, None)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, k, padding=k // 2, groups=3 * total_dim, bias=False),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False),
            )
            for k in scales
        )
        self.proj = _ConvNorm(total_dim * (1 + len(scales)), out_channels, norm_eps)

    def forward(self, x):
        qkv = self.qkv(x)
        multi_scale_qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        return self.proj(eager.lite_mla_attention(multi_scale_qkv, self.dim, self.eps))


def make_modules(shape: LiteMLAShape, dtype: torch.dtype, layout: str, device: torch.device):
    """(eager EfficientViTLiteMLA, linattn.nn.LiteMLA with its state_dict), both in eval mode, same random weights,
    their weights in the layout."""
    torch.manual_seed(0)
    args = (shape.channels, shape.channels, shape.heads, shape.dim, shape.scales)
    eager = EfficientViTLiteMLA(*args)
    norm = eager.proj.norm
    with torch.no_grad():  # running statistics and affine away from identity, so that folding the BN matters
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    fused = linattn.nn.LiteMLA(
        shape.channels,
        shape.channels,
        heads=shape.heads,
        dim=shape.dim,
        norm=(None, "bn2d"),
        act_func=(None, None),
        scales=shape.scales,
        eps=EPS,
        norm_eps=NORM_EPS,
    )
    fused.load_state_dict(eager.state_dict(), strict=True)
    fmt = LAYOUTS[layout]
    return tuple(m.to(device, dtype, memory_format=fmt).eval().requires_grad_(False) for m in (eager, fused))


def flops(shape: LiteMLAShape) -> int:
    """Multiply-adds x2 of one forward: qkv conv, aggregation convs, attention (S and z, then out), proj conv."""
    N, C, T, D, S = shape.n, shape.channels, shape.total_dim, shape.dim, len(shape.scales)
    qkv = C * 3 * T
    aggreg = sum(3 * T * (k * k + D) for k in shape.scales)
    attention = (1 + S) * shape.heads * 2 * D * (D + 1)
    proj = (1 + S) * T * C
    return 2 * shape.batch * N * (qkv + aggreg + attention + proj)


def setup(provider: str, shape: LiteMLAShape, eager: nn.Module, fused: nn.Module, x: torch.Tensor) -> dict:
    """{"fwd": callable} of `provider` (inference: no autograd graph); raises Skipped when it cannot run here."""
    if provider in BACKEND_PROVIDERS:
        check_backend("lite_mla_context", provider, x.device)

        def forward():
            with torch.no_grad(), linattn.backend(provider):
                return fused(x)
    else:
        module = compiled(eager, provider) if provider in COMPILE_MODES else eager

        def forward():
            with torch.no_grad():
                return module(x)

    return {"fwd": forward}


def make_input(shape: LiteMLAShape, dtype: torch.dtype, layout: str, device) -> torch.Tensor:
    """The block's random input at a shape."""
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(shape.batch, shape.channels, shape.height, shape.width, device=device, generator=gen)
    return x.to(dtype, memory_format=LAYOUTS[layout])


def run_shape(shape, dtype_name, layout, providers, device, copy_gbs, bar, cuda_graph, skip) -> list[dict]:
    dtype = DTYPES[dtype_name]
    eager, fused = make_modules(shape, dtype, layout, device)
    x = make_input(shape, dtype, layout, device)
    with torch.no_grad():
        ref = copy.deepcopy(eager).double()(x.double())
    weights = sum(p.numel() for p in eager.parameters())
    nbytes = (x.numel() + ref.numel() + weights) * x.element_size()
    base = {"op": OP, "dtype": dtype_name, "layout": layout, **shape.columns(), "copy_gbs": copy_gbs}
    rows = run_providers(
        providers,
        lambda provider: setup(provider, shape, eager, fused, x),
        {"fwd": (ref, nbytes)},
        base,
        device,
        copy_gbs,
        bar,
        cuda_graph=cuda_graph,
        skip=skip,
    )
    work = flops(shape)
    for row in rows:
        row["flops"] = work
        if row["ms"] is not None:
            row["img_s"] = shape.batch * 1e3 / row["ms"]
            row["tflops"] = work / row["ms"] / 1e9
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_args(parser, PROVIDERS, layouts=True)
    return parse_benchmark_args(parser, argv, dtype=DTYPES, providers=PROVIDERS, stages=LITE_MLA_STAGES)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, on_gpu = run_device(
        args,
        "by default a short CPU run (eager and reference, fp32, the L-model stage at batch 1)",
        "the compile, triton, cuda and auto providers, fp16/bf16 and every LiteMLA shape of docs/design.md 5",
    )
    shapes = lite_mla_run_shapes(args, on_gpu)
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    providers = args.providers or list(GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)

    env, copy_gbs = announce(device)
    rows = []
    cases = [(shape, d, layout) for shape in shapes for d in dtypes for layout in args.layout]
    with measuring(len(cases) * len(providers), OP) as bar:  # SIGTERM ends the loop, rows kept
        for shape, dtype_name, layout in cases:
            skip = max_autotune_skip(args, shape.batch)
            rows += run_shape(shape, dtype_name, layout, providers, device, copy_gbs, bar, args.cuda_graph, skip)
            if on_gpu:
                torch.cuda.empty_cache()
    # speedups, not images/s: B=16 and B=1 differ tenfold in images/s and share the plot's axis
    plot = {"y": "speedup_vs_eager", "hline": None, "ylabel": "speedup over eager (x)"}
    report(rows, TABLE, args.out, result_name(OP, args.quick, device), env, **plot)
    return rows


if __name__ == "__main__":
    sys.exit(exit_status(main()))
