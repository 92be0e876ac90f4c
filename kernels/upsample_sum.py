"""Triton kernel of `linattn.upsample_sum`: the sum of up to three feature maps, each resized bicubically to one size
(EfficientViT-SAM's neck), in one pass: every input is read once and the sum is written once, where eager PyTorch
writes and reads back each resized map in fp32 and each partial sum.

    out[b, c, y, x] = sum_i sum_{j, k < 4} wy_i(y)[j] * wx_i(x)[k] * in_i[b, c, clamp(y0 - 1 + j), clamp(x0 - 1 + k)]

PyTorch's bicubic (align_corners=False, no antialias): output row y reads source coordinate
s = (y + 0.5) * h / H - 0.5, y0 = floor(s), t = s - y0, and Keys' cubic convolution (A = -0.75) weighs rows
y0 - 1 .. y0 + 2 (indices clamped to the map); columns the same. An input already at the output size is added as
it is (EfficientViT's UpSampleLayer returns it untouched). Sums in fp32, one cast on store.

A program covers BLOCK_P output pixels (flattened y * W + x) of one image by BLOCK_C channels; the layout only
changes which axis is contiguous (channels for channels_last maps, pixels for NCHW), so tiles follow it.
"""

import triton
import triton.language as tl

from ._device import Device, cdiv, device_of, next_pow2
from ._math import widen

MAX_INPUTS = 3  # the kernel unrolls its inputs


@triton.jit
def _cubic_weight(d):
    """Keys' cubic convolution (A = -0.75) at distance d >= 0 from the source coordinate (0 from 2 on)."""
    A: tl.constexpr = -0.75
    near = ((A + 2.0) * d - (A + 3.0)) * d * d + 1.0
    far = ((A * d - 5.0 * A) * d + 8.0 * A) * d - 4.0 * A
    return tl.where(d <= 1.0, near, far)


@triton.jit
def _resized_tile(
    X_ptr,  # one input (B, C, h, w), any strides
    stride_b, stride_c, stride_h, stride_w,
    h, w, scale_h, scale_w,  # its size, and h / H, w / W
    b, oy, ox, offs_c, mask, SAME: tl.constexpr,  # SAME: the input is at the output size
):  # fmt: skip
    """The input's [BLOCK_P, BLOCK_C] contribution at output pixels (oy, ox) and channels offs_c, in fp32."""
    base = X_ptr + b * stride_b + offs_c[None, :].to(tl.int64) * stride_c
    if SAME:
        at = oy.to(tl.int64) * stride_h + ox.to(tl.int64) * stride_w
        return widen(tl.load(base + at[:, None], mask=mask, other=0.0))
    sy = (oy.to(tl.float32) + 0.5) * scale_h - 0.5
    sx = (ox.to(tl.float32) + 0.5) * scale_w - 0.5
    fy = tl.floor(sy)
    fx = tl.floor(sx)
    ty = sy - fy
    tx = sx - fx
    iy = fy.to(tl.int32)
    ix = fx.to(tl.int32)
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    # rows in a loop, not unrolled: 4 loads in flight per thread and row instead of 16 (unrolled, the compiler
    # hoists all 16 and spills)
    for j in range(4):
        row = tl.zeros(mask.shape, dtype=tl.float32)
        yy = tl.minimum(tl.maximum(iy - 1 + j, 0), h - 1).to(tl.int64) * stride_h
        for k in tl.static_range(4):
            xx = tl.minimum(tl.maximum(ix - 1 + k, 0), w - 1).to(tl.int64) * stride_w
            v = widen(tl.load(base + (yy + xx)[:, None], mask=mask, other=0.0))
            row += _cubic_weight(tl.abs(tx + 1.0 - k))[:, None] * v
        acc += _cubic_weight(tl.abs(ty + 1.0 - j))[:, None] * row
    return acc


@triton.jit
def _upsample_sum_fwd_kernel(
    Out_ptr,  # (B, C, H, W) output
    stride_ob, stride_oc, stride_oh, stride_ow,
    X0_ptr, s0_b, s0_c, s0_h, s0_w, h0, w0, scale_h0, scale_w0,  # input 0 (always present)
    X1_ptr, s1_b, s1_c, s1_h, s1_w, h1, w1, scale_h1, scale_w1,  # input 1 (read when N_INPUTS > 1)
    X2_ptr, s2_b, s2_c, s2_h, s2_w, h2, w2, scale_h2, scale_w2,  # input 2 (read when N_INPUTS > 2)
    C, H, W,
    N_INPUTS: tl.constexpr, SAME0: tl.constexpr, SAME1: tl.constexpr, SAME2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = sum over the N_INPUTS inputs of their bicubic resize to (H, W) (see the module docstring)."""
    # images and pixel tiles share the grid's first axis (2**31 - 1 programs; the others take 65535)
    tiles_p = tl.cdiv(H * W, BLOCK_P)
    pid_p = tl.program_id(0) % tiles_p
    b = (tl.program_id(0) // tiles_p).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    oy = offs_p // W
    ox = offs_p % W
    mask = (offs_p < H * W)[:, None] & (offs_c < C)[None, :]
    acc = _resized_tile(X0_ptr, s0_b, s0_c, s0_h, s0_w, h0, w0, scale_h0, scale_w0, b, oy, ox, offs_c, mask, SAME0)
    if N_INPUTS > 1:
        acc += _resized_tile(X1_ptr, s1_b, s1_c, s1_h, s1_w, h1, w1, scale_h1, scale_w1, b, oy, ox, offs_c, mask, SAME1)
    if N_INPUTS > 2:
        acc += _resized_tile(X2_ptr, s2_b, s2_c, s2_h, s2_w, h2, w2, scale_h2, scale_w2, b, oy, ox, offs_c, mask, SAME2)
    at = oy.to(tl.int64) * stride_oh + ox.to(tl.int64) * stride_ow
    out_ptrs = Out_ptr + b * stride_ob + offs_c[None, :].to(tl.int64) * stride_oc + at[:, None]
    tl.store(out_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=mask)


def upsample_sum_config(dev: Device, C: int, channels_last: bool) -> dict:
    """Tiles along the output's contiguous axis: 32 pixels by 64 channels for channels_last maps (128-byte rows
    of bf16 per pixel), 128 pixels by 8 channels for NCHW ones; 8 warps, so each thread holds 8 (4) sums and
    4 loads of a row in flight: 64 (112) registers on sm_90 in bf16, where 4 warps or wider tiles spilled or held
    116 to 255. The interpreter runs programs one by one: few, large tiles."""
    if not dev.gpu:
        return dict(BLOCK_P=256, BLOCK_C=min(64, next_pow2(C)), num_warps=4)
    if channels_last:
        return dict(BLOCK_P=32, BLOCK_C=min(64, max(16, next_pow2(C))), num_warps=8)
    return dict(BLOCK_P=128, BLOCK_C=min(8, next_pow2(C)), num_warps=8)


def upsample_sum_fwd(inputs, out, config=None):
    """Write the sum of `inputs` (1 to MAX_INPUTS maps (B, C, h_i, w_i)) resized to out's (H, W) into out
    (B, C, H, W). config: upsample_sum_config()'s dict, to launch another device's choice."""
    B, C, H, W = out.shape
    channels_last = out.stride(1) == 1 and C > 1
    cfg = config or upsample_sum_config(device_of(out), C, channels_last)
    args, same = [], []
    for i in range(MAX_INPUTS):
        x = inputs[min(i, len(inputs) - 1)]  # an absent input's slot repeats the last one (never read)
        h, w = x.shape[-2:]
        args += [x, *x.stride(), h, w, h / H, w / W]
        same.append((h, w) == (H, W))
    grid = (cdiv(H * W, cfg["BLOCK_P"]) * B, cdiv(C, cfg["BLOCK_C"]))
    _upsample_sum_fwd_kernel[grid](
        out, *out.stride(), *args, C, H, W,
        N_INPUTS=len(inputs), SAME0=same[0], SAME1=same[1], SAME2=same[2], **cfg,
    )  # fmt: skip
    return out
