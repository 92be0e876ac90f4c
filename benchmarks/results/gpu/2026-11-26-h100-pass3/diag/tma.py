"""Every forward configuration of the Triton conv (the tensor-descriptor ones included) against float64, with no
epilogue: where the error sits (rows, columns, channels over 8x the median) for each. As run in this pass
(reformatted for the linter since)."""

import os

import torch
import torch.nn.functional as F

from linattn.kernels.conv_bn_act import conv_bn_act_fwd, fwd_configs

torch.manual_seed(0)
dev = os.environ.get("DEV", "cuda")
CL = torch.channels_last


def run(B, C, H, W, Cout, k, pad):
    x = torch.randn(B, C, H, W, device=dev, dtype=torch.bfloat16).to(memory_format=CL)
    w = (torch.randn(Cout, C, k, k, device=dev, dtype=torch.bfloat16) / (C * k * k) ** 0.5).to(memory_format=CL)
    ref = F.conv2d(x.double(), w.double(), padding=pad)
    Ho, Wo = ref.shape[-2:]
    for cfg in fwd_configs(x, w, (1, 1), (pad, pad), (1, 1), 1, False):
        out = torch.full((B, Cout, Ho, Wo), float("nan"), device=dev, dtype=torch.bfloat16).to(memory_format=CL)
        conv_bn_act_fwd(x, w, None, (1, 1), (pad, pad), (1, 1), 1, "identity", None, None, None, out, config=cfg)
        err = (out.double() - ref).abs()
        emap = err.amax(dim=(0, 1))  # (Ho, Wo)
        bad = (emap > 8 * emap.median()).nonzero().tolist()
        rows, cols = sorted({r for r, _ in bad}), sorted({c for _, c in bad})
        chmap = err.amax(dim=(0, 2, 3))
        badc = (chmap > 8 * chmap.median()).nonzero().flatten().tolist()
        print(
            f"B{B} C{C} {H}x{W} Cout{Cout} k{k} pad{pad} {cfg}: max {err.max().item():.3g} median-max "
            f"{emap.median().item():.3g} nan {out.isnan().sum().item()} bad pos {len(bad)} rows {rows[:12]} "
            f"cols {cols[:12]} bad ch {badc[:12]}"
        )


for args in [
    (2, 128, 32, 32, 128, 3, 1),
    (2, 128, 32, 32, 128, 3, 0),
    (2, 128, 32, 32, 128, 1, 0),
    (2, 64, 32, 32, 64, 3, 1),
    (2, 256, 64, 64, 256, 3, 1),
    (1, 128, 128, 128, 128, 3, 1),
    (2, 128, 24, 20, 96, 3, 1),
]:
    run(*args)
