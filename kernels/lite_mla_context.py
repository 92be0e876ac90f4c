"""Triton kernels for LiteMLA's context: multi-scale aggregation fused into ReLU linear attention.

lite_mla_context(qkv) = lite_mla_attention(multiscale_aggregate(qkv)) without
the aggregated tensor ever reaching memory. Output heads [0, heads) attend over
qkv itself, the heads of scale s over aggregated q, k, v, recomputed tile by
tile from qkv; the first scale's kernels also serve heads [0, heads) from the
centre taps of the same tiles, so qkv is read from memory once:

    pass 1, grid (B*heads, SPLITS): k_s = Wp (dwconv(k) + bd) + bp, same for v;
            partial S = sum relu(k_s)^T v_s and z = sum relu(k_s) per split
    pass 2, grid (B*heads, SPLITS): q_s likewise; out = relu(q_s) S / (relu(q_s) . z + eps)

Math of each step: kernels/multiscale_aggregate.py and kernels/linear_attention.py.
The backward is not fused: it recomputes the aggregation and composes the two
ops' backward kernels (linattn/ops/lite_mla_context.py).
"""

import torch
import triton
import triton.language as tl

from ._device import Device, device_of, dot_precision
from .linear_attention import _sum_partials, attention_config, split_rows
from .multiscale_aggregate import _aggregate_tile, _bias_args


@triton.jit
def _lite_mla_context_state_kernel(
    S_ptr,  # fp32 (B*heads, SPLITS, BLOCK_D, BLOCK_D) partial S of the aggregated heads
    Z_ptr,  # fp32 (B*heads, SPLITS, BLOCK_D) partial z of the aggregated heads
    S0_ptr,  # same, for the heads over qkv itself (if WITH_RAW)
    Z0_ptr,
    X_ptr,  # (B, 3*heads*D, H, W) qkv
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    WD_ptr,  # (C, 1, K, K) this scale's depthwise weight, contiguous
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    HEADS,
    H,
    W,
    D,
    CHUNK,  # positions per split, a multiple of BLOCK_N
    SPLITS,
    KSIZE: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,  # also reduce the state of the heads over qkv itself, from the same tiles
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    ck = (3 * (pid_bh % HEADS) + 1) * D  # first channel of this head's k group; v follows
    cv = ck + D
    X_ptr += b * stride_xb
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    s_acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    s0_acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z0_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    N = H * W
    n_lo = pid_s * CHUNK
    for n0 in range(n_lo, tl.minimum(n_lo + CHUNK, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        h = offs_n // W
        w = offs_n % W
        k, k0 = _aggregate_tile(
            X_ptr + ck * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + ck * KSIZE * KSIZE, BD_ptr + ck,
            WP_ptr + ck * D, BP_ptr + ck, h, w, n_mask, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, PRECISION,
        )  # fmt: skip
        v, v0 = _aggregate_tile(
            X_ptr + cv * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + cv * KSIZE * KSIZE, BD_ptr + cv,
            WP_ptr + cv * D, BP_ptr + cv, h, w, n_mask, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, PRECISION,
        )  # fmt: skip
        kr = tl.maximum(k, 0.0)
        s_acc = tl.dot(tl.trans(kr), v, s_acc, input_precision=PRECISION)
        z_acc += tl.sum(kr, axis=0)
        if WITH_RAW:
            k0r = tl.maximum(k0, 0.0)
            s0_acc = tl.dot(tl.trans(k0r), v0, s0_acc, input_precision=PRECISION)
            z0_acc += tl.sum(k0r, axis=0)
    part = pid_bh * SPLITS + pid_s
    offs_s = part * BLOCK_D * BLOCK_D + offs_c[:, None] * BLOCK_D + offs_c[None, :]
    tl.store(S_ptr + offs_s, s_acc)
    tl.store(Z_ptr + part * BLOCK_D + offs_c, z_acc)
    if WITH_RAW:
        tl.store(S0_ptr + offs_s, s0_acc)
        tl.store(Z0_ptr + part * BLOCK_D + offs_c, z0_acc)


@triton.jit
def _lite_mla_context_fwd_kernel(
    O_ptr,  # (B, heads*D, H, W) this scale's slice of the output
    stride_ob,
    stride_oc,
    stride_oh,
    stride_ow,
    O0_ptr,  # (B, heads*D, H, W) the output's first slice, attention over qkv itself (if WITH_RAW)
    stride_o0b,
    stride_o0c,
    stride_o0h,
    stride_o0w,
    X_ptr,  # (B, 3*heads*D, H, W) qkv
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    WD_ptr,
    BD_ptr,
    WP_ptr,
    BP_ptr,
    S_ptr,  # fp32 partials from _lite_mla_context_state_kernel
    Z_ptr,
    S0_ptr,
    Z0_ptr,
    HEADS,
    H,
    W,
    D,
    CHUNK,
    SPLITS,
    eps,
    KSIZE: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    head = pid_bh % HEADS
    cq = 3 * head * D
    X_ptr += b * stride_xb
    O_ptr += b * stride_ob + head * D * stride_oc
    O0_ptr += b * stride_o0b + head * D * stride_o0c
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    offs_s = offs_c[:, None] * BLOCK_D + offs_c[None, :]
    s = _sum_partials(S_ptr + pid_bh * SPLITS * BLOCK_D * BLOCK_D, offs_s, BLOCK_D * BLOCK_D, SPLITS)
    z = _sum_partials(Z_ptr + pid_bh * SPLITS * BLOCK_D, offs_c, BLOCK_D, SPLITS)
    if WITH_RAW:
        s0 = _sum_partials(S0_ptr + pid_bh * SPLITS * BLOCK_D * BLOCK_D, offs_s, BLOCK_D * BLOCK_D, SPLITS)
        z0 = _sum_partials(Z0_ptr + pid_bh * SPLITS * BLOCK_D, offs_c, BLOCK_D, SPLITS)
    N = H * W
    n_lo = pid_s * CHUNK
    for n0 in range(n_lo, tl.minimum(n_lo + CHUNK, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        h = offs_n // W
        w = offs_n % W
        q, q0 = _aggregate_tile(
            X_ptr + cq * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + cq * KSIZE * KSIZE, BD_ptr + cq,
            WP_ptr + cq * D, BP_ptr + cq, h, w, n_mask, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, PRECISION,
        )  # fmt: skip
        mask = n_mask[:, None] & c_mask[None, :]
        qr = tl.maximum(q, 0.0)
        den = tl.sum(qr * z[None, :], axis=1) + eps
        out = tl.dot(qr, s, input_precision=PRECISION) / den[:, None]
        o_ptrs = O_ptr + offs_c[None, :] * stride_oc + h[:, None] * stride_oh + w[:, None] * stride_ow
        tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=mask)
        if WITH_RAW:
            q0r = tl.maximum(q0, 0.0)
            den0 = tl.sum(q0r * z0[None, :], axis=1) + eps
            out0 = tl.dot(q0r, s0, input_precision=PRECISION) / den0[:, None]
            o0_ptrs = O0_ptr + offs_c[None, :] * stride_o0c + h[:, None] * stride_o0h + w[:, None] * stride_o0w
            tl.store(o0_ptrs, out0.to(O0_ptr.dtype.element_ty), mask=mask)


def context_config(
    dev: Device, B: int, heads: int, N: int, dim: int, low_precision: bool, splits: int | None = None
) -> dict:
    """The attention's tiles and split of N (attention_config), its row loop not pipelined: each row tile
    is K*K shifted loads per aggregated head, and with num_stages > 1 every one of them takes a shared-memory
    buffer per stage (270 KB at K=5, over any GPU's per-block limit). With full fp32 products the state
    kernel's four dots keep their operands in registers: 32-row tiles over 8 warps (compile gate)."""
    cfg = attention_config(dev, B, heads, N, dim, dim, splits)
    del cfg["BLOCK_E"]
    if dev.gpu and not low_precision:
        cfg.update(BLOCK_N=32, num_warps=8)
    return dict(cfg, num_stages=1)


def lite_mla_context_fwd(
    qkv, dw_weights, pw_weights, heads: int, dim: int, eps: float, dw_biases, pw_biases, out, config=None
):
    """Write lite_mla_attention(multiscale_aggregate(qkv, ...)) into out (B, (1+S)*heads*dim, H, W).

    The first scale's passes also compute the heads over qkv itself from the
    centre taps they load anyway, so qkv is read from memory once for both.
    config: context_config()'s dict, to launch another device's choice."""
    B, C, H, W = qkv.shape
    low = qkv.dtype != torch.float32
    cfg, chunk, splits = split_rows(H * W, config or context_config(device_of(qkv), B, heads, H * W, dim, low))
    block_d = cfg["BLOCK_D"]
    grid = (B * heads, splits)

    def partials():
        s = torch.empty((B * heads, splits, block_d, block_d), device=qkv.device, dtype=torch.float32)
        return s, torch.empty((B * heads, splits, block_d), device=qkv.device, dtype=torch.float32)

    raw_out = out[:, : heads * dim]
    s0, z0 = partials()
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        bd, has_bd = _bias_args(dw_biases, s, wd)
        bp, has_bp = _bias_args(pw_biases, s, wp)
        flags = dict(KSIZE=wd.shape[-1], HAS_BD=has_bd, HAS_BP=has_bp, WITH_RAW=s == 0, PRECISION=dot_precision(qkv))
        state, z = partials()
        _lite_mla_context_state_kernel[grid](
            state, z, s0, z0, qkv, *qkv.stride(), wd, bd, wp, bp, heads, H, W, dim, chunk, splits, **flags, **cfg,
        )  # fmt: skip
        o = out[:, (1 + s) * heads * dim : (2 + s) * heads * dim]
        _lite_mla_context_fwd_kernel[grid](
            o, *o.stride(), raw_out, *raw_out.stride(), qkv, *qkv.stride(), wd, bd, wp, bp, state, z, s0, z0,
            heads, H, W, dim, chunk, splits, eps, **flags, **cfg,
        )  # fmt: skip
    return out
