"""Triton kernels for LiteMLA's multi-scale aggregation.

For each scale s with odd kernel size K and group size D = C / (3*heads):

    t_s = dwconv_K(x) + bd_s            (depthwise, padding K // 2)
    y_s = conv1x1(t_s, groups=3*heads) + bp_s
    out = cat([x, y_1, ..., y_S], 1)

Group g (channels [g*D, (g+1)*D)) is one of q, k, v of one head, so a program
owns one (batch, group, tile of positions): it loads the K*K shifted tiles of
its D channels, sums them with the depthwise taps, and multiplies by the
group's (D x D) pointwise matrix. The first scale's kernel also writes the
centre tap, x itself, into the output's first slice: x is read once and no cat
is needed.

Backward, per scale, with dt_s = dy_s @ Wp (per group):

    dWp += dy_s^T t_s    dbp += sum dy_s    dbd += sum dt_s
    dWd[c, i, j] += sum_n dt_s[c, n] x[c, n + off_ij]
    dx = dy_0 + sum_s sum_ij dt_s[c, n - off_ij] Wd[c, i, j]

Positions are flattened n = h*W + w and addressed through (h, w) strides, so
NCHW and channels_last inputs are read in place. Weight gradients are
per-program fp32 partials summed afterwards: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from ._device import Device, cdiv, device_of, dot_precision, next_pow2
from ._math import round_tf32


@triton.jit
def _shifted_tile(X_ptr, stride_c, stride_h, stride_w, h, w, dh, dw, n_mask, offs_c, c_mask, H, W):
    """x[c, h + dh, w + dw] as an fp32 (BLOCK_N, BLOCK_D) tile, zero outside the image (the conv padding)."""
    hh = h + dh
    ww = w + dw
    mask = n_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    ptrs = X_ptr + offs_c[None, :] * stride_c + hh[:, None] * stride_h + ww[:, None] * stride_w
    return tl.load(ptrs, mask=mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dwconv_tile(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, BD_ptr, h, w, n_mask, offs_c, c_mask, H, W,
    KSIZE: tl.constexpr, HAS_BD: tl.constexpr,
):  # fmt: skip
    """Depthwise KSIZE x KSIZE conv (+ bias) of one group's channels at positions (h, w), and x itself there.

    X_ptr, WD_ptr, BD_ptr point at the group's first channel; tap t of channel c at WD_ptr + c*stride_wc +
    t*stride_wt. Returns fp32 (conv, x)
    tiles of (BLOCK_N, BLOCK_D), zero in rows outside the image's N positions; x,
    the centre tap loaded again, comes from cache (and is dropped by callers that
    do not use it)."""
    PAD: tl.constexpr = KSIZE // 2
    acc = tl.zeros((h.shape[0], offs_c.shape[0]), dtype=tl.float32)
    # a loop, not static_range: unrolled, the compiler hoists all K*K tile loads ahead of the sums and spills
    for t in range(KSIZE * KSIZE):
        x = _shifted_tile(
            X_ptr, stride_c, stride_h, stride_w, h, w, t // KSIZE - PAD, t % KSIZE - PAD, n_mask, offs_c, c_mask, H, W
        )
        tap = tl.load(WD_ptr + offs_c * stride_wc + t * stride_wt, mask=c_mask, other=0.0)
        acc += x * tap.to(tl.float32)[None, :]
    center = _shifted_tile(X_ptr, stride_c, stride_h, stride_w, h, w, 0, 0, n_mask, offs_c, c_mask, H, W)  # cached
    if HAS_BD:
        acc += tl.load(BD_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(n_mask[:, None], acc, 0.0), center


@triton.jit
def _pointwise_matrix_t(WP_ptr, offs_c, c_mask, D):
    """The group's pointwise weight transposed, Wp^T[i, o] = WP[o, i], fp32 (BLOCK_D, BLOCK_D)."""
    ptrs = WP_ptr + offs_c[None, :] * D + offs_c[:, None]
    return tl.load(ptrs, mask=c_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _aggregate_tile(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, BD_ptr, WP_ptr, BP_ptr, h, w, n_mask, offs_c,
    c_mask, H, W, D, KSIZE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """y = Wp (dwconv(x) + bd) + bp for one group at positions (h, w), and x there: fp32 (BLOCK_N, BLOCK_D)
    tiles (y, x), zero in rows outside.

    Pointers are at the group's first channel (X_ptr, WD_ptr, BD_ptr, BP_ptr) and first row (WP_ptr)."""
    t, x = _dwconv_tile(
        X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, BD_ptr, h, w, n_mask, offs_c, c_mask, H, W,
        KSIZE, HAS_BD,
    )  # fmt: skip
    # fp32 weights beside fp16/bf16 qkv are rounded too (the interpreter multiplies them in full: only a GPU truncates)
    wp_t = round_tf32(_pointwise_matrix_t(WP_ptr, offs_c, c_mask, D), PRECISION)
    y = tl.dot(round_tf32(t, PRECISION), wp_t, input_precision=PRECISION)
    if HAS_BP:
        y += tl.load(BP_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(n_mask[:, None], y, 0.0), x


@triton.jit
def _program(GROUPS, N, BLOCK_N: tl.constexpr):
    """(batch*group, group's first position tile, tiles) of this program. The grid is one axis of B*GROUPS*tiles
    programs (2^31 - 1 fit; a second axis takes 65535, a map of 4M positions in tiles of 64), groups varying
    fastest: adjacent programs read the same positions of a head's other groups."""
    tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    bgs = tl.num_programs(0) // tiles
    return (pid % bgs).to(tl.int64), pid // bgs, tiles


@triton.jit
def _multiscale_aggregate_fwd_kernel(
    Y_ptr,  # (B, C, H, W) this scale's slice of the output
    stride_yb,
    stride_yc,
    stride_yh,
    stride_yw,
    X0_ptr,  # (B, C, H, W) the output's first slice, written with x when WRITE_X
    stride_x0b,
    stride_x0c,
    stride_x0h,
    stride_x0w,
    X_ptr,  # (B, C, H, W) qkv
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    WD_ptr,  # (C, 1, K, K) depthwise weight (TAP_MAJOR: tap t of channel c at c + t*stride_wdt)
    stride_wdt,
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    GROUPS,
    H,
    W,
    D,
    KSIZE: tl.constexpr,
    TAP_MAJOR: tl.constexpr,  # the depthwise weight tap-major (else contiguous; tap_layout)
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WRITE_X: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE  # channel stride of the depthwise weight
    pid_bg, pid_n, _ = _program(GROUPS, H * W, BLOCK_N)
    b = pid_bg // GROUPS
    c0 = (pid_bg % GROUPS) * D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H * W
    h = offs_n // W
    w = offs_n % W
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    X_ptr += b * stride_xb + c0 * stride_xc
    y, x = _aggregate_tile(
        X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr + c0 * stride_wdc, stride_wdc, stride_wdt, BD_ptr + c0,
        WP_ptr + c0 * D, BP_ptr + c0, h, w, n_mask, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, PRECISION,
    )  # fmt: skip
    mask = n_mask[:, None] & c_mask[None, :]
    y_ptrs = (
        Y_ptr + b * stride_yb + (c0 + offs_c[None, :]) * stride_yc + h[:, None] * stride_yh + w[:, None] * stride_yw
    )
    tl.store(y_ptrs, y.to(Y_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        x0_ptrs = X0_ptr + b * stride_x0b + (c0 + offs_c[None, :]) * stride_x0c
        tl.store(x0_ptrs + h[:, None] * stride_x0h + w[:, None] * stride_x0w, x.to(X0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _multiscale_aggregate_bwd_dt_kernel(
    DT_ptr,  # fp32 (B, C, H*W) contiguous: dt = dy @ Wp per group
    DWP_ptr,  # fp32 (B*GROUPS*TILES, BLOCK_D, BLOCK_D) partial dWp^T[i, o]
    DBP_ptr,  # fp32 (B*GROUPS*TILES, BLOCK_D) partial dbp
    DY_ptr,  # (B, C, H, W) this scale's slice of the output gradient
    stride_dyb,
    stride_dyc,
    stride_dyh,
    stride_dyw,
    X_ptr,  # (B, C, H, W) qkv
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    WD_ptr,  # as the forward's
    stride_wdt,
    BD_ptr,
    WP_ptr,
    GROUPS,
    H,
    W,
    D,
    KSIZE: tl.constexpr,
    TAP_MAJOR: tl.constexpr,  # the depthwise weight tap-major (else contiguous; tap_layout)
    HAS_BD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE  # channel stride of the depthwise weight
    pid_bg, pid_n, tiles = _program(GROUPS, H * W, BLOCK_N)
    b = pid_bg // GROUPS
    c0 = (pid_bg % GROUPS) * D
    N = H * W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    h = offs_n // W
    w = offs_n % W
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    mask = n_mask[:, None] & c_mask[None, :]
    dy_ptrs = DY_ptr + b * stride_dyb + (c0 + offs_c[None, :]) * stride_dyc
    dy = tl.load(dy_ptrs + h[:, None] * stride_dyh + w[:, None] * stride_dyw, mask=mask, other=0.0).to(tl.float32)
    wp_t = round_tf32(_pointwise_matrix_t(WP_ptr + c0 * D, offs_c, c_mask, D), PRECISION)
    dt = tl.dot(dy, tl.trans(wp_t), input_precision=PRECISION)
    tl.store(DT_ptr + (b * GROUPS * D + c0 + offs_c[None, :]) * N + offs_n[:, None], dt, mask=mask)
    t, _ = _dwconv_tile(
        X_ptr + b * stride_xb + c0 * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + c0 * stride_wdc, stride_wdc,
        stride_wdt, BD_ptr + c0, h, w, n_mask, offs_c, c_mask, H, W, KSIZE, HAS_BD,
    )  # fmt: skip
    part = pid_bg * tiles + pid_n
    offs_dd = offs_c[:, None] * BLOCK_D + offs_c[None, :]
    dwp = tl.dot(tl.trans(round_tf32(t, PRECISION)), dy, input_precision=PRECISION)
    tl.store(DWP_ptr + part * BLOCK_D * BLOCK_D + offs_dd, dwp)
    tl.store(DBP_ptr + part * BLOCK_D + offs_c, tl.sum(dy, axis=0))


@triton.jit
def _multiscale_aggregate_bwd_dx_kernel(
    DX_ptr,  # fp32 (B, C, H*W) contiguous, accumulated into
    DWD_ptr,  # fp32 (B*GROUPS*TILES, K*K, BLOCK_D) partial dWd
    DBD_ptr,  # fp32 (B*GROUPS*TILES, BLOCK_D) partial dbd
    DT_ptr,  # fp32 (B, C, H*W) from _multiscale_aggregate_bwd_dt_kernel
    X_ptr,  # (B, C, H, W) qkv
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    WD_ptr,  # as the forward's
    stride_wdt,
    GROUPS,
    H,
    W,
    D,
    KSIZE: tl.constexpr,
    TAP_MAJOR: tl.constexpr,  # the depthwise weight tap-major (else contiguous; tap_layout)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE  # channel stride of the depthwise weight
    pid_bg, pid_n, tiles = _program(GROUPS, H * W, BLOCK_N)
    b = pid_bg // GROUPS
    c0 = (pid_bg % GROUPS) * D
    N = H * W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    h = offs_n // W
    w = offs_n % W
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    mask = n_mask[:, None] & c_mask[None, :]
    # dt as a (C, H, W) map in (c, h, w) strides, for the shifted loads of the transposed conv
    DT_ptr += (b * GROUPS * D + c0) * N
    X_ptr += b * stride_xb + c0 * stride_xc
    WD_ptr += c0 * stride_wdc
    dt = tl.load(DT_ptr + offs_c[None, :] * N + offs_n[:, None], mask=mask, other=0.0)
    part = pid_bg * tiles + pid_n
    dx = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for t in range(KSIZE * KSIZE):  # a loop, not static_range: unrolled, the hoisted tile loads spill
        i = t // KSIZE
        j = t % KSIZE
        tap = tl.load(WD_ptr + offs_c * stride_wdc + t * stride_wdt, mask=c_mask, other=0.0)
        shifted_dt = _shifted_tile(DT_ptr, N, W, 1, h, w, PAD - i, PAD - j, n_mask, offs_c, c_mask, H, W)
        dx += shifted_dt * tap.to(tl.float32)[None, :]
        x = _shifted_tile(X_ptr, stride_xc, stride_xh, stride_xw, h, w, i - PAD, j - PAD, n_mask, offs_c, c_mask, H, W)
        tl.store(DWD_ptr + (part * KSIZE * KSIZE + t) * BLOCK_D + offs_c, tl.sum(dt * x, axis=0))
    tl.store(DBD_ptr + part * BLOCK_D + offs_c, tl.sum(dt, axis=0))
    dx_ptrs = DX_ptr + (b * GROUPS * D + c0 + offs_c[None, :]) * N + offs_n[:, None]
    tl.store(dx_ptrs, tl.load(dx_ptrs, mask=mask, other=0.0) + dx, mask=mask)


def aggregate_config(dev: Device, D: int) -> dict:
    """Tiles and launch options for groups of D channels. 4 warps over a 64 x 32 tile: 16 fp32 values per
    thread for each live tile. num_stages=1: the tap loop is not pipelined (its K*K shifted loads would
    each take a shared-memory buffer per stage)."""
    block_d = max(16, next_pow2(D))
    block_n = (64 if block_d <= 32 else 32) if dev.gpu else 256  # interpreter: few, large tiles
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=1)


def taps_in_rows(wd) -> bool:
    """Whether the kernels read this depthwise weight (C, 1, K, K) as it is: contiguous, or tap-major (tap
    t = i*K + j of channel c at c + t times one stride: strides (1, C, K*C, C), as linattn.nn.LiteMLA packs its
    weights in eval; one tap of consecutive channels is then one vector load, where contiguous weights take a
    scalar load per channel)."""
    K = wd.shape[3]
    return wd.is_contiguous() or (wd.stride(0) == 1 and (K == 1 or wd.stride(2) == K * wd.stride(3)))


def tap_layout(wd) -> tuple[int, bool]:
    """(tap stride, TAP_MAJOR) of a depthwise weight taps_in_rows takes. The kernels take the channel stride as a
    constant (contiguous: K*K, so that a tap's loads have constant offsets)."""
    if not taps_in_rows(wd):
        raise ValueError(f"depthwise weight strides {wd.stride()}: neither contiguous nor tap-major")
    return (1, False) if wd.is_contiguous() else (wd.stride(3), True)


def _bias_args(biases, s, like):
    """(pointer, HAS flag) for scale s of a bias list that is empty or has one tensor per scale;
    when absent, any tensor stands in for the pointer (never read)."""
    return (biases[s], True) if biases else (like, False)


def multiscale_aggregate_fwd(qkv, dw_weights, pw_weights, heads: int, dw_biases, pw_biases, out, config=None):
    """Write cat([qkv, y_1, ..., y_S], 1) into out (B, (1+S)*C, H, W); depthwise weights as tap_layout takes
    them, pointwise weights contiguous, bias lists empty or one contiguous (C,) tensor per scale. config:
    aggregate_config()'s dict, to launch another device's choice."""
    B, C, H, W = qkv.shape
    D = C // (3 * heads)
    cfg = config or aggregate_config(device_of(qkv), D)
    groups = 3 * heads
    grid = (B * groups * cdiv(H * W, cfg["BLOCK_N"]),)
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        bd, has_bd = _bias_args(dw_biases, s, wd)
        bp, has_bp = _bias_args(pw_biases, s, wp)
        wdt, tap_major = tap_layout(wd)
        y = out[:, (1 + s) * C : (2 + s) * C]
        x0 = out[:, :C]
        _multiscale_aggregate_fwd_kernel[grid](
            y, *y.stride(), x0, *x0.stride(), qkv, *qkv.stride(), wd, wdt, bd, wp, bp, groups, H, W, D,
            KSIZE=wd.shape[-1], TAP_MAJOR=tap_major, HAS_BD=has_bd, HAS_BP=has_bp, WRITE_X=s == 0,
            PRECISION=dot_precision(qkv), **cfg,
        )  # fmt: skip
    return out


def multiscale_aggregate_bwd(grad_out, qkv, dw_weights, pw_weights, heads: int, dw_biases, config=None):
    """Gradients (dqkv, [dWd_s], [dWp_s], [dbd_s], [dbp_s]) of multiscale_aggregate, weights' grads in fp32.
    config: aggregate_config()'s dict, to launch another device's choice."""
    B, C, H, W = qkv.shape
    N = H * W
    D = C // (3 * heads)
    cfg = config or aggregate_config(device_of(qkv), D)
    block_d = cfg["BLOCK_D"]
    groups = 3 * heads
    tiles = cdiv(N, cfg["BLOCK_N"])
    grid = (B * groups * tiles,)
    parts = B * groups * tiles
    # dy_0, the identity branch; a private fp32 copy that every scale accumulates into
    dx = grad_out[:, :C].to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(B, C, N)
    dt = torch.empty((B, C, N), device=qkv.device, dtype=torch.float32)
    d_wd, d_wp, d_bd, d_bp = [], [], [], []
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        K = wd.shape[-1]
        wdt, tap_major = tap_layout(wd)
        bd, has_bd = _bias_args(dw_biases, s, wd)
        dy = grad_out[:, (1 + s) * C : (2 + s) * C]
        dwp_parts = torch.empty((parts, block_d, block_d), device=qkv.device, dtype=torch.float32)
        dbp_parts = torch.empty((parts, block_d), device=qkv.device, dtype=torch.float32)
        _multiscale_aggregate_bwd_dt_kernel[grid](
            dt, dwp_parts, dbp_parts, dy, *dy.stride(), qkv, *qkv.stride(), wd, wdt, bd, wp, groups, H, W, D,
            KSIZE=K, TAP_MAJOR=tap_major, HAS_BD=has_bd, PRECISION=dot_precision(qkv), **cfg,
        )  # fmt: skip
        dwd_parts = torch.empty((parts, K * K, block_d), device=qkv.device, dtype=torch.float32)
        dbd_parts = torch.empty((parts, block_d), device=qkv.device, dtype=torch.float32)
        _multiscale_aggregate_bwd_dx_kernel[grid](
            dx, dwd_parts, dbd_parts, dt, qkv, *qkv.stride(), wd, wdt, groups, H, W, D, KSIZE=K,
            TAP_MAJOR=tap_major, **cfg,
        )  # fmt: skip
        # per-group partials -> (C, ...) weight layouts
        dwp = dwp_parts.view(B, groups, tiles, block_d, block_d).sum((0, 2))[:, :D, :D]  # [g, i, o]
        d_wp.append(dwp.transpose(1, 2).reshape(C, D, 1, 1))
        d_bp.append(dbp_parts.view(B, groups, tiles, block_d).sum((0, 2))[:, :D].reshape(C))
        dwd = dwd_parts.view(B, groups, tiles, K * K, block_d).sum((0, 2))[..., :D]  # [g, tap, c]
        d_wd.append(dwd.transpose(1, 2).reshape(C, 1, K, K))
        d_bd.append(dbd_parts.view(B, groups, tiles, block_d).sum((0, 2))[:, :D].reshape(C))
    return dx.view(B, C, H, W).to(qkv.dtype), d_wd, d_wp, d_bd, d_bp
