"""Benchmark of EfficientViT-SAM's neck merge (linattn.upsample_sum): the neck's projected stage maps resized
bicubically to the embedding size and summed, in one kernel.

    python benchmarks/bench_upsample_sum.py     # GPU: the neck of l0 and xl1, B=16 and 1, bf16, channels_last
    python benchmarks/bench_upsample_sum.py --models l0 --batch 16 --providers eager triton --cuda-graph

Shapes come from the encoders (linattn.models, traced on the meta device): the neck's inputs after their 1x1
projections, (B, 256, h_i, w_i) per stage (l0: 16x16, 32x32 and 64x64 to 64x64; xl1: the same from stages 5, 4
and 3), in channels_last (as `optimize` runs them on a GPU; --layout nchw for the other). Without a GPU the
default is a short run: l0 at B=1, fp32, eager and reference. Providers:
  eager                 the official neck's merge in the input dtype: each UpSampleLayer (bicubic in fp32, cast
                        back), then the adds (linattn.eager.upsample_sum)
  compile               torch.compile of eager (default mode); compile-max-autotune the same, mode="max-autotune"
  triton                the linattn op on its Triton kernel
  auto                  the linattn op as users get it (measured dispatch: triton or the PyTorch path)
  reference             the linattn op on the pure-PyTorch reference (fp32 resizes and sums, one cast)

Bytes moved: every input read once and the output written once (fwd); fwd+bwd adds grad_out read and every
input gradient written. Errors are against the float64 reference on the same inputs. Rows are appended to
<out>/upsample_sum*.jsonl (+ .csv), with the environment, and the plot is drawn from that file.
"""

import argparse
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
    LAYOUTS,
    add_benchmark_args,
    announce,
    check_backend,
    compiled,
    exit_status,
    max_autotune_skip,
    measuring,
    parse_benchmark_args,
    report,
    result_name,
    run_device,
    run_providers,
    table_columns,
)

OP = "upsample_sum"
MODELS = ("l0", "l1", "l2", "xl0", "xl1")
PROVIDERS = ("eager", *COMPILE_MODES, "triton", "auto", "reference")
GPU_PROVIDERS = ("eager", "compile", "triton", "auto")
TABLE = table_columns("model", "pass", "dtype", "layout", "shape")


@dataclass(frozen=True)
class NeckShape:
    model: str
    batch: int
    channels: int
    sizes: tuple[tuple[int, int], ...]  # each input's (h, w)
    size: tuple[int, int]  # the output's

    @property
    def label(self) -> str:
        return f"B{self.batch} C{self.channels} " + "+".join(f"{h}x{w}" for h, w in self.sizes)

    def columns(self) -> dict:
        return {"model": self.model, "shape": self.label, "batch": self.batch, "channels": self.channels}


def neck_shapes(model: str, batches) -> list[NeckShape]:
    """The merge of `model`'s neck at each batch size: its input ops' output channels and the stage maps' sizes,
    from a meta-device run of the backbone (no weights, no memory)."""
    from linattn.models import efficientvit_sam_encoder
    from linattn.models.efficientvit_sam import input_size

    with torch.device("meta"):
        encoder = efficientvit_sam_encoder(model)
        side = input_size(model)
        features = encoder.backbone(torch.empty(1, 3, side, side))
    neck = encoder.neck
    sizes = tuple(tuple(features[key].shape[-2:]) for key in neck.input_keys)
    channels = neck.input_ops[0].op_list[0].conv.out_channels
    return [NeckShape(model, b, channels, sizes, neck.merge_size(features)) for b in batches]


def make_inputs(shape: NeckShape, dtype, layout: str, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    fmt = LAYOUTS[layout]
    maps = [
        torch.randn(shape.batch, shape.channels, h, w, device=device, generator=gen)
        .to(dtype)
        .contiguous(memory_format=fmt)
        .requires_grad_()
        for h, w in shape.sizes
    ]
    grad_out = torch.randn(shape.batch, shape.channels, *shape.size, device=device, generator=gen).to(dtype)
    return maps, grad_out.contiguous(memory_format=fmt)


def setup(provider: str, shape: NeckShape, maps, grad_out) -> dict:
    """{"fwd", "fwd+bwd"} callables of `provider`; raises Skipped when it cannot run here."""
    device = maps[0].device
    if provider in BACKEND_PROVIDERS:
        check_backend(OP, provider, device)

        def run(m):
            with linattn.backend(provider):
                return linattn.upsample_sum(m, shape.size)
    else:
        run = lambda m: eager.upsample_sum(m, shape.size)  # noqa: E731
        if provider in COMPILE_MODES:
            run = compiled(run, provider)
    detached = [x.detach() for x in maps]
    return {"fwd": lambda: run(detached), "fwd+bwd": lambda: torch.autograd.grad(run(maps), maps, grad_out)}


def passes(shape: NeckShape, maps, grad_out, backward: bool) -> dict:
    """{pass: (float64 reference result, bytes moved)}."""
    leaves = [x.detach().double().requires_grad_() for x in maps]
    out = reference.upsample_sum(leaves, shape.size)
    fwd_bytes = (sum(x.numel() for x in maps) + out.numel()) * maps[0].element_size()
    result = {"fwd": (out.detach(), fwd_bytes)}
    if backward:
        result["fwd+bwd"] = (torch.autograd.grad(out, leaves, grad_out.double()), 2 * fwd_bytes)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_args(parser, PROVIDERS, stages=False, layouts=True)
    parser.add_argument("--models", nargs="+", help=f"some of {', '.join(MODELS)} (default: l0 xl1)")
    parser.add_argument(
        "--backward", action=argparse.BooleanOptionalAction, default=False, help="also time forward+backward"
    )
    return parse_benchmark_args(parser, argv, dtype=DTYPES, providers=PROVIDERS, models=MODELS)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, on_gpu = run_device(
        args,
        "by default a short CPU run (eager and reference, fp32, forward, l0's neck at batch 1)",
        "the compile, triton and auto providers, bf16 and the xl1 neck",
    )
    batches = args.batch or ((2,) if args.quick else (16, 1) if on_gpu else (1,))
    models = args.models or (["l0", "xl1"] if on_gpu else ["l0"])
    shapes = [s for m in models for s in neck_shapes(m, batches)]
    if args.quick:  # the harness end to end in seconds: the same maps at an eighth of their side, 16 channels
        shapes = [
            NeckShape(s.model, s.batch, 16, tuple((h // 8, w // 8) for h, w in s.sizes), (s.size[0] // 8,) * 2)
            for s in shapes
        ]
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    layouts = args.layout
    providers = args.providers or list(GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)

    env, copy_gbs = announce(device)
    rows = []
    with measuring(len(shapes) * len(dtypes) * len(layouts) * len(providers), OP) as bar:  # SIGTERM: rows kept
        for shape in shapes:
            for dtype_name in dtypes:
                for layout in layouts:
                    maps, grad_out = make_inputs(shape, DTYPES[dtype_name], layout, device)
                    base = {"op": OP, "dtype": dtype_name, "layout": layout, **shape.columns(), "copy_gbs": copy_gbs}
                    rows += run_providers(
                        providers,
                        lambda provider, shape=shape, maps=maps, g=grad_out: setup(provider, shape, maps, g),
                        passes(shape, maps, grad_out, args.backward),
                        base,
                        device,
                        copy_gbs,
                        bar,
                        cuda_graph=args.cuda_graph,
                        skip=max_autotune_skip(args, shape.batch),
                    )
                    del maps, grad_out
    report(rows, TABLE, args.out, result_name(OP, args.quick, device), env)
    return rows


if __name__ == "__main__":
    sys.exit(exit_status(main()))
