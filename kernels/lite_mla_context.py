"""Triton kernels for LiteMLA's context: multi-scale aggregation fused into ReLU linear attention.

lite_mla_context(qkv) = lite_mla_attention(multiscale_aggregate(qkv)) without
the aggregated tensor ever reaching memory. Per (batch b, head g) and scale s,
with x the head's q, k or v group of qkv (D channels), taps w_t of the depthwise
weight, Wp the group's pointwise (D x D) matrix:

    agg(x) = sum_t x_t M_t + (Wp bd + bp)      x_t: x shifted by tap t (zero padded),
                                               M_t = diag(w_t) Wp^T  (D x D)
    S = sum_n relu(agg(k))_n^T agg(v)_n        z = sum_n relu(agg(k))_n
    out_n = relu(agg(q))_n S / (relu(agg(q))_n . z + eps)

and the same with x itself in place of agg(x) for the heads over qkv (output
slice 0), computed by the first scale's programs in loops of their own just
ahead of the taps' loops, which then find those tiles in cache: qkv is read
from memory once (as long as a head's slice of it stays in L2 between loops).

One pass (grid B*heads): a program reduces S and z over the whole map in
registers, then recomputes agg(q) and writes its output; nothing but the output
is written. When B*heads programs cannot fill the GPU (batch 1) the map is split:
_lite_mla_context_state_kernel writes fp32 partial states per split of N and
_lite_mla_context_fwd_kernel sums them; each pass reads only its own groups.
_lite_mla_context_rows_state_kernel and _lite_mla_context_rows_kernel are the
same pair (the latter also one pass) with tiles of rows of adjacent columns, so
that the stencil's loads serve several columns. _lite_mla_context_band_kernel
(one pass, fp16/bf16, maps up to 16 wide) runs the depthwise conv on tensor cores
too, as a dot with a banded matrix per channel and kernel row (_band_dwconv).

Precision. fp32 inputs: the depthwise taps as fp32 FMAs, every dot with IEEE
fp32 products (docs/design.md 8). fp16/bf16 inputs (TAP_MMA): the stencil is a
GEMM over (tap, channel) on tensor cores, x_t (as loaded) times M_t rounded to
the input dtype, fp32 accumulation; agg(k), agg(v), agg(q) and S enter their dots
in the input dtype (bf16 x bf16 and fp16 x fp16 products are exact in fp32), as
eager PyTorch rounds them. fp16 S is scaled per column into fp16's range first
(the scale is divided out in fp32): the state does not overflow. With FMA taps,
the depthwise conv's fp32 tile enters the pointwise dot in the input dtype, fp16
rows scaled by a power of two into its range first (_pointwise). Under the Triton
interpreter (UPCAST) the low-precision dots run on fp32 copies of the same
rounded operands, since its fp16/bf16 dot is wrong.

Layout: qkv, out any strides; channels_last makes a tile's channels contiguous
and its stencil loads 128-bit wide. Depthwise weights contiguous or tap-major
(multiscale_aggregate.tap_layout), whose taps load as vectors too. The backward is not fused: it recomputes the
aggregation and composes the two ops' backward kernels (linattn/ops/lite_mla_context.py).
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._device import Device, KernelLaunch, cdiv, device_of, next_pow2
from ._math import widen
from .linear_attention import _sum_partials, split_rows
from .multiscale_aggregate import _bias_args, _pointwise_matrix_t, tap_layout


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST: on fp32 copies (the interpreter's fp16/bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dt: tl.constexpr, UPCAST: tl.constexpr):
    """x in dtype dt, rounded to nearest even. The interpreter truncates fp32 to bf16: there (UPCAST) the
    rounding is done on the bits first, so that the interpreter computes what the GPU does."""
    if UPCAST and dt == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _tap_tile(X_ptr, stride_c, stride_h, stride_w, h, w, dh, dw, n_mask, offs_c, c_mask, H, W):
    """x[c, h + dh, w + dw] as a (BLOCK_N, BLOCK_D) tile in x's dtype, zero outside the image (the padding)."""
    hh = h + dh
    ww = w + dw
    mask = n_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    ptrs = X_ptr + offs_c[None, :] * stride_c + hh[:, None] * stride_h + ww[:, None] * stride_w
    return tl.load(ptrs, mask=mask[:, None] & c_mask[None, :], other=0.0)


@triton.jit
def _tap(
    acc, X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, wp_t, t, dh, dw, h, w, n_mask, offs_c,
    c_mask, H, W, TAP_MMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc plus tap t of the stencil, at offset (dh, dw) (see _aggregate)."""
    x = _tap_tile(X_ptr, stride_c, stride_h, stride_w, h, w, dh, dw, n_mask, offs_c, c_mask, H, W)
    tap = tl.load(WD_ptr + offs_c * stride_wc + t * stride_wt, mask=c_mask, other=0.0).to(tl.float32)
    if TAP_MMA:
        return _dot(x, _cast(tap[:, None] * wp_t, x.dtype, UPCAST), acc, UPCAST, PRECISION)
    return acc + widen(x) * tap[None, :]


@triton.jit
def _pointwise(
    a, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, valid, dt: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """Wp (a + bd) + bp for a depthwise tile a (fp32, its FMA taps' sum), a entering the dot in dtype dt; zero in
    rows not valid (MASK; else as they come). fp16: rows of a at 2^15 or over enter scaled by a power of two
    into fp16's range (exact), and their products are scaled back: the depthwise conv may exceed fp16's range
    where the aggregated tensor does not (eager PyTorch's fp16 tensor between the two convs overflows there)."""
    if HAS_BD:
        a += tl.load(BD_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if dt == tl.float16:
        # floor(log2 max|a|) of each row from its exponent bits; rows under 2^15 keep scale 1, exactly as before
        top = (tl.max(tl.abs(a), axis=1).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127
        shift = tl.maximum(top - 14, 0)
        a *= ((127 - shift) << 23).to(tl.float32, bitcast=True)[:, None]
    y = _dot(_cast(a, dt, UPCAST), wp_t.to(dt), tl.zeros_like(a), UPCAST, PRECISION)
    if dt == tl.float16:
        y *= ((127 + shift) << 23).to(tl.float32, bitcast=True)[:, None]
    if HAS_BP:
        y += tl.load(BP_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if MASK:
        y = tl.where(valid[:, None], y, 0.0)
    return y


@triton.jit
def _aggregate(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, BD_ptr, WP_ptr, BP_ptr, h, w, n_mask, offs_c,
    c_mask, H, W, D, TAPS, KSIZE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr, TAP_MMA: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROW_TAPS: tl.constexpr, TAP_STAGES: tl.constexpr,
):  # fmt: skip
    """agg(x) = Wp (dwconv(x) + bd) + bp, an fp32 (BLOCK_N, BLOCK_D) tile of one group at positions (h, w), zero
    in rows outside. Pointers at the group's first channel (X_ptr, WD_ptr, BD_ptr, BP_ptr) and first row (WP_ptr).

    TAP_MMA: each tap is a dot, x_t @ (diag(w_t) Wp^T) in x's dtype, the pointwise conv folded in. Else the taps
    are fp32 FMAs and the pointwise conv one dot of their sum, in x's dtype.
    ROW_TAPS: the taps of a kernel row unrolled, so that their KSIZE loads are in flight together (the fourth
    H100 pass had the one-pass kernel latency-bound, 2 programs of 8 warps per SM waiting on one tap's load at a
    time, at 2-8% of copy bandwidth; all KSIZE^2 taps unrolled spilled kilobytes in the gate: ptxas hoists every
    load). Else one tap's tile in registers at a time. The loop counts are known at run time only (TAPS = KSIZE^2):
    ptxas unrolls a constant loop and hoists its loads.
    TAP_STAGES: the tap loop software-pipelined over that many stages (1: not): Triton turns the next taps' tile
    loads into cp.async copies to shared memory (LDGSTS in the sm_90 SASS, channels_last), issued while the
    current tap computes, so a program no longer waits on one tap's load at a time."""
    wp_t = _pointwise_matrix_t(WP_ptr, offs_c, c_mask, D)  # fp32 [i, o] = Wp[o, i]
    acc = tl.zeros((h.shape[0], offs_c.shape[0]), dtype=tl.float32)
    # each tap's tile addresses are computed in the loop (a pointer tile hoisted out of it costs 16-50 registers
    # in NCHW, whose loads are not vectors)
    PAD: tl.constexpr = KSIZE // 2
    if ROW_TAPS:
        for r in range(TAPS // KSIZE):
            for c in tl.static_range(KSIZE):
                acc = _tap(
                    acc, X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, wp_t, r * KSIZE + c,
                    r - PAD, c - PAD, h, w, n_mask, offs_c, c_mask, H, W, TAP_MMA, UPCAST, PRECISION,
                )  # fmt: skip
    else:
        for t in tl.range(TAPS, num_stages=TAP_STAGES):
            acc = _tap(
                acc, X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, wp_t, t, t // KSIZE - PAD,
                t % KSIZE - PAD, h, w, n_mask, offs_c, c_mask, H, W, TAP_MMA, UPCAST, PRECISION,
            )  # fmt: skip
    if not TAP_MMA:
        dt: tl.constexpr = X_ptr.dtype.element_ty
        return _pointwise(
            acc, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, n_mask, dt, HAS_BD, HAS_BP, UPCAST, PRECISION, True
        )
    y = acc
    if HAS_BD:
        bd = tl.load(BD_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        y += tl.sum(bd[:, None] * wp_t, axis=0)[None, :]
    if HAS_BP:
        y += tl.load(BP_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(n_mask[:, None], y, 0.0)


@triton.jit
def _raw_state(
    X_ptr, stride_xc, stride_xh, stride_xw, ck, n_lo, n_hi, H, W, D, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(S0, z0) over positions [n_lo, n_hi) of the head over qkv itself whose k group starts at channel ck."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    s0 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        h = offs_n // W
        w = offs_n % W
        k0 = _tap_tile(X_ptr + ck * stride_xc, stride_xc, stride_xh, stride_xw, h, w, 0, 0, n_mask, offs_c, c_mask,
                       H, W)  # fmt: skip
        v0 = _tap_tile(X_ptr + (ck + D) * stride_xc, stride_xc, stride_xh, stride_xw, h, w, 0, 0, n_mask, offs_c,
                       c_mask, H, W)  # fmt: skip
        k0r = tl.maximum(k0, 0.0).to(dt)  # exact: qkv's own values
        s0 = _dot(tl.trans(k0r), v0, s0, UPCAST, PRECISION)
        z0 += tl.sum(k0r.to(tl.float32), axis=0)
    return s0, z0


@triton.jit
def _kv_state(
    X_ptr, stride_xc, stride_xh, stride_xw, ck, WD_ptr, stride_wc, stride_wt, BD_ptr, WP_ptr, BP_ptr, n_lo, n_hi, H,
    W, D, TAPS, KSIZE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr, WITH_RAW: tl.constexpr,
    TAP_MMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROW_TAPS: tl.constexpr,
    TAP_STAGES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(S, z, S0, z0) over positions [n_lo, n_hi) of the head whose k group starts at channel ck: fp32 sums of
    relu(k)^T v and relu(k), aggregated (S, z) and over qkv itself (S0, z0, if WITH_RAW). k and v enter the
    products in qkv's dtype, and z sums the same rounded relu(k).

    The heads over qkv itself take a loop of their own, ahead of the taps' loop (which then finds the centre
    tiles in cache): in one loop body the two state dots hold twice the registers (Triton lays chained dots out
    with every warp on all 32 rows) and the forward kernel no longer fits 128 registers."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    cv = ck + D
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    s0 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if WITH_RAW:
        s0, z0 = _raw_state(X_ptr, stride_xc, stride_xh, stride_xw, ck, n_lo, n_hi, H, W, D, UPCAST, PRECISION,
                            BLOCK_N, BLOCK_D)  # fmt: skip
    s = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        h = offs_n // W
        w = offs_n % W
        k = _aggregate(
            X_ptr + ck * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + ck * stride_wc, stride_wc, stride_wt,
            BD_ptr + ck, WP_ptr + ck * D, BP_ptr + ck, h, w, n_mask, offs_c, c_mask, H, W, D, TAPS, KSIZE, HAS_BD,
            HAS_BP, TAP_MMA, UPCAST, PRECISION, ROW_TAPS, TAP_STAGES,
        )  # fmt: skip
        kr = _cast(tl.maximum(k, 0.0), dt, UPCAST)  # before v's taps: k held in the input dtype
        v = _aggregate(
            X_ptr + cv * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + cv * stride_wc, stride_wc, stride_wt,
            BD_ptr + cv, WP_ptr + cv * D, BP_ptr + cv, h, w, n_mask, offs_c, c_mask, H, W, D, TAPS, KSIZE, HAS_BD,
            HAS_BP, TAP_MMA, UPCAST, PRECISION, ROW_TAPS, TAP_STAGES,
        )  # fmt: skip
        s = _dot(tl.trans(kr), _cast(v, dt, UPCAST), s, UPCAST, PRECISION)
        z += tl.sum(kr.to(tl.float32), axis=0)
    return s, z, s0, z0


@triton.jit
def _state_operand(s, dt: tl.constexpr, UPCAST: tl.constexpr):
    """(S in dtype dt, per-column fp32 scale): fp16 columns scaled to at most 2^14 (S grows with N and fp16
    overflows at 65504); other dtypes unscaled."""
    if dt == tl.float16:
        col = tl.max(tl.abs(s), axis=0)
        scale = tl.where(col > 0.0, col * (1.0 / 16384.0), 1.0)
        return _cast(s / scale[None, :], dt, UPCAST), scale
    return _cast(s, dt, UPCAST), tl.full((s.shape[1],), 1.0, tl.float32)


@triton.jit
def _store_attention(
    O_ptr, stride_oc, stride_oh, stride_ow, q, s_op, s_scale, z, eps, h, w, valid, offs_c, c_mask,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Store relu(q) S / (relu(q) . z + eps) at positions (h, w) where valid: relu(q) enters the dot in S's dtype
    (s_op, its columns scaled by s_scale: _state_operand), z and the division in fp32."""
    qr = _cast(tl.maximum(q, 0.0), s_op.dtype, UPCAST)
    num = _dot(qr, s_op, tl.zeros((q.shape[0], q.shape[1]), dtype=tl.float32), UPCAST, PRECISION)
    den = tl.sum(qr.to(tl.float32) * z[None, :], axis=1) + eps
    out = num * s_scale[None, :] / den[:, None]
    o_ptrs = O_ptr + offs_c[None, :] * stride_oc + h[:, None] * stride_oh + w[:, None] * stride_ow
    tl.store(o_ptrs, _cast(out, O_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & c_mask[None, :])


@triton.jit
def _write_out(
    O_ptr, stride_oc, stride_oh, stride_ow, X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wc, stride_wt,
    BD_ptr, WP_ptr, BP_ptr, s, z, eps, n_lo, n_hi, H, W, D, TAPS, KSIZE: tl.constexpr, HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr, AGGREGATE: tl.constexpr, TAP_MMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ROW_TAPS: tl.constexpr, TAP_STAGES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Store relu(q) S / (relu(q) . z + eps) over positions [n_lo, n_hi) of one head, for q = agg(q) (AGGREGATE)
    or q itself; S and z fp32. Pointers at the head's first output channel and its q group (and the group's
    weights, if AGGREGATE)."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    s_op, s_scale = _state_operand(s, dt, UPCAST)
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        h = offs_n // W
        w = offs_n % W
        if AGGREGATE:
            q = _aggregate(
                X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wc, stride_wt, BD_ptr, WP_ptr, BP_ptr, h, w,
                n_mask, offs_c, c_mask, H, W, D, TAPS, KSIZE, HAS_BD, HAS_BP, TAP_MMA, UPCAST, PRECISION, ROW_TAPS,
                TAP_STAGES,
            )  # fmt: skip
        else:
            q = _tap_tile(X_ptr, stride_xc, stride_xh, stride_xw, h, w, 0, 0, n_mask, offs_c, c_mask, H, W)
        _store_attention(O_ptr, stride_oc, stride_oh, stride_ow, q, s_op, s_scale, z, eps, h, w, n_mask, offs_c,
                         c_mask, UPCAST, PRECISION)  # fmt: skip


@triton.jit
def _store_state(S_ptr, Z_ptr, part, s, z, BLOCK_D: tl.constexpr):
    """Store partial (S, z) number `part` (batch*head * SPLITS + split) of fp32 (.., BLOCK_D, BLOCK_D), (.., BLOCK_D)
    partials."""
    offs_c = tl.arange(0, BLOCK_D)
    tl.store(S_ptr + part * BLOCK_D * BLOCK_D + offs_c[:, None] * BLOCK_D + offs_c[None, :], s)
    tl.store(Z_ptr + part * BLOCK_D + offs_c, z)


@triton.jit
def _load_state(S_ptr, Z_ptr, pid_bh, SPLITS, BLOCK_D: tl.constexpr):
    """(S, z) of batch*head pid_bh: its SPLITS partials (_store_state) summed in a fixed order."""
    offs_c = tl.arange(0, BLOCK_D)
    offs_s = offs_c[:, None] * BLOCK_D + offs_c[None, :]
    s = _sum_partials(S_ptr + pid_bh * SPLITS * BLOCK_D * BLOCK_D, offs_s, BLOCK_D * BLOCK_D, SPLITS)
    z = _sum_partials(Z_ptr + pid_bh * SPLITS * BLOCK_D, offs_c, BLOCK_D, SPLITS)
    return s, z


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
    WD_ptr,  # (C, 1, K, K) this scale's depthwise weight (TAP_MAJOR: tap t of channel c at c + t*stride_wdt)
    stride_wdt,
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    HEADS,
    H,
    W,
    D,
    TAPS,  # K*K, at run time (see _aggregate)
    CHUNK,  # positions per split, a multiple of BLOCK_N
    SPLITS,
    KSIZE: tl.constexpr,
    TAP_MAJOR: tl.constexpr,  # the depthwise weight tap-major (else contiguous; tap_layout)
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,  # also reduce the state of the heads over qkv itself
    TAP_MMA: tl.constexpr,  # the stencil as dots on tensor cores (fp16/bf16)
    UPCAST: tl.constexpr,  # low-precision dots on fp32 copies (interpreter)
    PRECISION: tl.constexpr,
    ROW_TAPS: tl.constexpr,  # the taps unrolled (see _aggregate)
    TAP_STAGES: tl.constexpr,  # the tap loop's pipeline stages (see _aggregate)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The split path's first pass: the partial states of one (batch*head, split of N)."""
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE  # channel stride of the depthwise weight
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    ck = (3 * (pid_bh % HEADS) + 1) * D  # first channel of this head's k group; v follows
    n_lo = pid_s * CHUNK
    s, z, s0, z0 = _kv_state(
        X_ptr + b * stride_xb, stride_xc, stride_xh, stride_xw, ck, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr,
        BP_ptr, n_lo, tl.minimum(n_lo + CHUNK, H * W), H, W, D, TAPS, KSIZE, HAS_BD, HAS_BP, WITH_RAW, TAP_MMA,
        UPCAST, PRECISION, ROW_TAPS, TAP_STAGES, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    _store_state(S_ptr, Z_ptr, pid_bh * SPLITS + pid_s, s, z, BLOCK_D)
    if WITH_RAW:
        _store_state(S0_ptr, Z0_ptr, pid_bh * SPLITS + pid_s, s0, z0, BLOCK_D)


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
    WD_ptr,  # (C, 1, K, K) this scale's depthwise weight (TAP_MAJOR: tap t of channel c at c + t*stride_wdt)
    stride_wdt,
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    S_ptr,  # fp32 partials from _lite_mla_context_state_kernel (unless ONE_PASS)
    Z_ptr,
    S0_ptr,
    Z0_ptr,
    HEADS,
    H,
    W,
    D,
    TAPS,  # K*K, at run time (see _aggregate)
    CHUNK,  # positions per split, a multiple of BLOCK_N (ONE_PASS: all of them)
    SPLITS,
    eps,
    KSIZE: tl.constexpr,
    TAP_MAJOR: tl.constexpr,  # the depthwise weight tap-major (else contiguous; tap_layout)
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,
    ONE_PASS: tl.constexpr,  # reduce the state here, over the whole map (grid (B*heads, 1)): no partials
    TAP_MMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW_TAPS: tl.constexpr,  # the taps unrolled (see _aggregate)
    TAP_STAGES: tl.constexpr,  # the tap loop's pipeline stages (see _aggregate)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The output of one (batch*head, split of N); with ONE_PASS, of the whole map after reducing its state."""
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE  # channel stride of the depthwise weight
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    head = pid_bh % HEADS
    cq = 3 * head * D  # first channel of this head's q group; k and v follow
    X_ptr += b * stride_xb
    N = H * W
    if ONE_PASS:
        s, z, s0, z0 = _kv_state(
            X_ptr, stride_xc, stride_xh, stride_xw, cq + D, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr, BP_ptr, 0,
            N, H, W, D, TAPS, KSIZE, HAS_BD, HAS_BP, WITH_RAW, TAP_MMA, UPCAST, PRECISION, ROW_TAPS, TAP_STAGES,
            BLOCK_N, BLOCK_D,
        )  # fmt: skip
    else:
        s, z = _load_state(S_ptr, Z_ptr, pid_bh, SPLITS, BLOCK_D)
        s0 = s
        z0 = z
        if WITH_RAW:
            s0, z0 = _load_state(S0_ptr, Z0_ptr, pid_bh, SPLITS, BLOCK_D)
    n_lo = pid_s * CHUNK
    n_hi = tl.minimum(n_lo + CHUNK, N)
    if WITH_RAW:  # a loop of its own, as in _kv_state: one state operand in registers at a time
        _write_out(
            O0_ptr + b * stride_o0b + head * D * stride_o0c, stride_o0c, stride_o0h, stride_o0w,
            X_ptr + cq * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr,
            BP_ptr, s0, z0, eps, n_lo, n_hi, H, W, D, TAPS, KSIZE, HAS_BD, HAS_BP, False, TAP_MMA, UPCAST, PRECISION,
            ROW_TAPS, TAP_STAGES, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    _write_out(
        O_ptr + b * stride_ob + head * D * stride_oc, stride_oc, stride_oh, stride_ow, X_ptr + cq * stride_xc,
        stride_xc, stride_xh, stride_xw, WD_ptr + cq * stride_wdc, stride_wdc, stride_wdt, BD_ptr + cq, WP_ptr + cq * D,
        BP_ptr + cq, s, z, eps, n_lo, n_hi, H, W, D, TAPS, KSIZE, HAS_BD, HAS_BP, True, TAP_MMA, UPCAST, PRECISION,
        ROW_TAPS, TAP_STAGES, BLOCK_N, BLOCK_D,
    )  # fmt: skip


MAX_ROWS_KERNEL = 7  # the largest depthwise kernel the row-blocked stencil takes (_rows_dwconv's taps)


@triton.jit
def _pick(t: tl.constexpr, w0, w1, w2, w3, w4, w5, w6):
    """w<t>, t a compile-time tap index."""
    w = w0
    if t == 1:
        w = w1
    if t == 2:
        w = w2
    if t == 3:
        w = w3
    if t == 4:
        w = w4
    if t == 5:
        w = w5
    if t == 6:
        w = w6
    return w


@triton.jit
def _rows_dwconv(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, h, w0, i_mask, offs_c, c_mask, H, W,
    KSIZE: tl.constexpr, ROW_BLOCK: tl.constexpr,
):  # fmt: skip
    """A group's depthwise conv (no bias) at positions (h, w0 + r), r < ROW_BLOCK (2 or 4): four fp32 (BLOCK_I,
    BLOCK_D) tiles (the last two zero when ROW_BLOCK is 2). Per kernel row, each of the ROW_BLOCK + KSIZE - 1
    input columns w0 - PAD + j is loaded once and multiplied into every output column it reaches, where the
    flattened tiles (_aggregate) load one column per tap: at KSIZE 5, 8 loads (and bf16 -> fp32 conversions) per
    20 FMAs with 4 columns, 6 per 10 with 2, not one a FMA. KSIZE: odd, at most MAX_ROWS_KERNEL (7)."""
    tl.static_assert(KSIZE <= 7)
    PAD: tl.constexpr = KSIZE // 2
    a0 = tl.zeros((h.shape[0], offs_c.shape[0]), dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    for dh in range(KSIZE):  # a kernel row an iteration (ptxas keeps the loop, not unrolled)
        hh = h + (dh - PAD)
        row_ok = i_mask & (hh >= 0) & (hh < H)
        row = X_ptr + offs_c[None, :] * stride_c + hh[:, None] * stride_h
        taps = WD_ptr + offs_c * stride_wc + (dh * KSIZE) * stride_wt
        k0 = widen(tl.load(taps, mask=c_mask, other=0.0))[None, :]
        k1 = k0
        k2 = k0
        k3 = k0
        k4 = k0
        k5 = k0
        k6 = k0
        if KSIZE > 1:
            k1 = widen(tl.load(taps + stride_wt, mask=c_mask, other=0.0))[None, :]
            k2 = widen(tl.load(taps + 2 * stride_wt, mask=c_mask, other=0.0))[None, :]
        if KSIZE > 3:
            k3 = widen(tl.load(taps + 3 * stride_wt, mask=c_mask, other=0.0))[None, :]
            k4 = widen(tl.load(taps + 4 * stride_wt, mask=c_mask, other=0.0))[None, :]
        if KSIZE > 5:
            k5 = widen(tl.load(taps + 5 * stride_wt, mask=c_mask, other=0.0))[None, :]
            k6 = widen(tl.load(taps + 6 * stride_wt, mask=c_mask, other=0.0))[None, :]
        for j in tl.static_range(ROW_BLOCK + KSIZE - 1):
            ww = w0 + (j - PAD)
            m = row_ok & (ww >= 0) & (ww < W)
            x = widen(tl.load(row + ww[:, None] * stride_w, mask=m[:, None] & c_mask[None, :], other=0.0))
            # output column r takes input column j with tap j - r
            if j < KSIZE:
                a0 += x * _pick(j, k0, k1, k2, k3, k4, k5, k6)
            if j >= 1:
                if j < KSIZE + 1:
                    a1 += x * _pick(j - 1, k0, k1, k2, k3, k4, k5, k6)
            if ROW_BLOCK > 2:
                if j >= 2:
                    if j < KSIZE + 2:
                        a2 += x * _pick(j - 2, k0, k1, k2, k3, k4, k5, k6)
                if j >= 3:
                    if j < KSIZE + 3:
                        a3 += x * _pick(j - 3, k0, k1, k2, k3, k4, k5, k6)
    return a0, a1, a2, a3


@triton.jit
def _rows_aggregate(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, BD_ptr, WP_ptr, BP_ptr, h, w0, i_mask,
    offs_c, c_mask, H, W, D, KSIZE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, ROW_BLOCK: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """agg(x) of one group (as _aggregate, FMA taps) at positions (h, w0 + r), r < ROW_BLOCK: four fp32 tiles,
    zero in rows outside the map with MASK (the last two zero when ROW_BLOCK is 2). Pointers at the group's first
    channel (X_ptr, WD_ptr, BD_ptr, BP_ptr) and row (WP_ptr)."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    wp_t = _pointwise_matrix_t(WP_ptr, offs_c, c_mask, D)
    a0, a1, a2, a3 = _rows_dwconv(
        X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, h, w0, i_mask, offs_c, c_mask, H, W, KSIZE,
        ROW_BLOCK,
    )  # fmt: skip
    y0 = _pointwise(a0, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, i_mask & (w0 < W), dt, HAS_BD, HAS_BP, UPCAST,
                         PRECISION, MASK)  # fmt: skip
    y1 = _pointwise(a1, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, i_mask & (w0 + 1 < W), dt, HAS_BD, HAS_BP,
                         UPCAST, PRECISION, MASK)  # fmt: skip
    y2 = a2
    y3 = a3
    if ROW_BLOCK > 2:
        y2 = _pointwise(a2, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, i_mask & (w0 + 2 < W), dt, HAS_BD, HAS_BP,
                             UPCAST, PRECISION, MASK)  # fmt: skip
        y3 = _pointwise(a3, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, i_mask & (w0 + 3 < W), dt, HAS_BD, HAS_BP,
                             UPCAST, PRECISION, MASK)  # fmt: skip
    return y0, y1, y2, y3


@triton.jit
def _rows_gram(kr, v, s, dt: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """S + relu(k)^T v, relu(k) given in dtype dt and v entering in it (as _kv_state's)."""
    return _dot(tl.trans(kr), _cast(v, dt, UPCAST), s, UPCAST, PRECISION)


@triton.jit
def _rows_state(
    X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr, BP_ptr, cq, i_lo, i_hi,
    blocks_w, H, W, D, KSIZE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(S, z) of the aggregated head whose q group starts at channel cq, over row blocks [i_lo, i_hi) (block i:
    positions (i // blocks_w, (i % blocks_w) * ROW_BLOCK + r), r < ROW_BLOCK, those inside the map). Pointers at
    the batch's qkv and the scale's weights."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    s = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i0 in range(i_lo, i_hi, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_mask = i < i_hi
        h = i // blocks_w
        w0 = (i % blocks_w) * ROW_BLOCK
        c = cq + D  # k's aggregation, then v's
        k0, k1, k2, k3 = _rows_aggregate(
            X_ptr + c * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + c * stride_wdc, stride_wdc, stride_wdt,
            BD_ptr + c, WP_ptr + c * D, BP_ptr + c, h, w0, i_mask, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP,
            UPCAST, PRECISION, ROW_BLOCK, True,
        )  # fmt: skip
        # relu(k) held in the input dtype through v's stencil (as _kv_state), z summing the same rounded values
        k0 = _cast(tl.maximum(k0, 0.0), dt, UPCAST)
        k1 = _cast(tl.maximum(k1, 0.0), dt, UPCAST)
        k2 = _cast(tl.maximum(k2, 0.0), dt, UPCAST)  # zero when ROW_BLOCK is 2
        k3 = _cast(tl.maximum(k3, 0.0), dt, UPCAST)
        z += tl.sum(k0.to(tl.float32) + k1.to(tl.float32) + k2.to(tl.float32) + k3.to(tl.float32), axis=0)
        c = cq + 2 * D
        v0, v1, v2, v3 = _rows_aggregate(
            X_ptr + c * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + c * stride_wdc, stride_wdc, stride_wdt,
            BD_ptr + c, WP_ptr + c * D, BP_ptr + c, h, w0, i_mask, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP,
            UPCAST, PRECISION, ROW_BLOCK, True,
        )  # fmt: skip
        s = _rows_gram(k0, v0, s, dt, UPCAST, PRECISION)
        s = _rows_gram(k1, v1, s, dt, UPCAST, PRECISION)
        if ROW_BLOCK > 2:
            s = _rows_gram(k2, v2, s, dt, UPCAST, PRECISION)
            s = _rows_gram(k3, v3, s, dt, UPCAST, PRECISION)
    return s, z


@triton.jit
def _rows_out(
    O_ptr, stride_oc, stride_oh, stride_ow, X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt,
    BD_ptr, WP_ptr, BP_ptr, cq, s, z, eps, i_lo, i_hi, blocks_w, H, W, D, KSIZE: tl.constexpr, HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROW_BLOCK: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Store relu(agg(q)) S / (relu(agg(q)) . z + eps) over row blocks [i_lo, i_hi) (as _rows_state's) of the
    head whose q group starts at channel cq; S and z fp32. O_ptr at the head's first output channel."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    s_op, s_scale = _state_operand(s, dt, UPCAST)
    for i0 in range(i_lo, i_hi, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_mask = i < i_hi
        h = i // blocks_w
        w0 = (i % blocks_w) * ROW_BLOCK
        q0, q1, q2, q3 = _rows_aggregate(
            X_ptr + cq * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + cq * stride_wdc, stride_wdc,
            stride_wdt, BD_ptr + cq, WP_ptr + cq * D, BP_ptr + cq, h, w0, i_mask, offs_c, c_mask, H, W, D, KSIZE,
            HAS_BD, HAS_BP, UPCAST, PRECISION, ROW_BLOCK, False,  # q's rows outside: computed, not stored
        )  # fmt: skip
        _store_attention(O_ptr, stride_oc, stride_oh, stride_ow, q0, s_op, s_scale, z, eps, h, w0, i_mask & (w0 < W),
                    offs_c, c_mask, UPCAST, PRECISION)  # fmt: skip
        _store_attention(O_ptr, stride_oc, stride_oh, stride_ow, q1, s_op, s_scale, z, eps, h, w0 + 1,
                    i_mask & (w0 + 1 < W), offs_c, c_mask, UPCAST, PRECISION)  # fmt: skip
        if ROW_BLOCK > 2:
            _store_attention(O_ptr, stride_oc, stride_oh, stride_ow, q2, s_op, s_scale, z, eps, h, w0 + 2,
                        i_mask & (w0 + 2 < W), offs_c, c_mask, UPCAST, PRECISION)  # fmt: skip
            _store_attention(O_ptr, stride_oc, stride_oh, stride_ow, q3, s_op, s_scale, z, eps, h, w0 + 3,
                        i_mask & (w0 + 3 < W), offs_c, c_mask, UPCAST, PRECISION)  # fmt: skip


@triton.jit
def _rows_chunk(pid_s, H, W, SPLITS, ROW_BLOCK: tl.constexpr, BLOCK_I: tl.constexpr):
    """(i_lo, i_hi, blocks_w): the row blocks [i_lo, i_hi) of split pid_s of SPLITS (whole tiles of BLOCK_I, the
    last splits possibly empty), blocks_w of them a map row."""
    blocks_w = tl.cdiv(W, ROW_BLOCK)
    blocks = H * blocks_w
    chunk = tl.cdiv(tl.cdiv(blocks, SPLITS), BLOCK_I) * BLOCK_I
    i_lo = pid_s * chunk
    return i_lo, tl.minimum(i_lo + chunk, blocks), blocks_w


@triton.jit
def _lite_mla_context_rows_state_kernel(
    S_ptr,  # fp32 (B*heads, SPLITS, BLOCK_D, BLOCK_D) partial S of the aggregated heads
    Z_ptr,  # fp32 (B*heads, SPLITS, BLOCK_D) partial z of the aggregated heads
    S0_ptr,  # same, for the heads over qkv itself (if WITH_RAW)
    Z0_ptr,
    X_ptr,  # (B, 3*heads*D, H, W) qkv
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    WD_ptr,  # (C, 1, K, K) this scale's depthwise weight (TAP_MAJOR: tap t of channel c at c + t*stride_wdt)
    stride_wdt,
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    HEADS,
    H,
    W,
    D,
    TAPS,  # (the flattened kernels' argument; KSIZE here)
    CHUNK,  # positions per split of the heads over qkv itself, a multiple of BLOCK_N
    SPLITS,
    KSIZE: tl.constexpr,  # odd, at most MAX_ROWS_KERNEL
    TAP_MAJOR: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW_BLOCK: tl.constexpr,  # adjacent columns a tile row holds: 2 or 4
    BLOCK_N: tl.constexpr,  # positions per tile: BLOCK_N / ROW_BLOCK rows of ROW_BLOCK columns
    BLOCK_D: tl.constexpr,
):
    """The row-blocked kernel's split first pass: the partial states of one (batch*head, split), as
    _lite_mla_context_state_kernel's. A split takes CHUNK positions of the heads over qkv itself and
    SPLITS-th of the aggregated heads' row blocks (whole tiles)."""
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE
    BLOCK_I: tl.constexpr = BLOCK_N // ROW_BLOCK
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    cq = 3 * (pid_bh % HEADS) * D
    X_ptr += b * stride_xb
    if WITH_RAW:
        n_lo = pid_s * CHUNK
        s0, z0 = _raw_state(X_ptr, stride_xc, stride_xh, stride_xw, cq + D, n_lo, tl.minimum(n_lo + CHUNK, H * W),
                            H, W, D, UPCAST, PRECISION, BLOCK_N, BLOCK_D)  # fmt: skip
        _store_state(S0_ptr, Z0_ptr, pid_bh * SPLITS + pid_s, s0, z0, BLOCK_D)
    i_lo, i_hi, blocks_w = _rows_chunk(pid_s, H, W, SPLITS, ROW_BLOCK, BLOCK_I)
    s, z = _rows_state(
        X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr, BP_ptr, cq, i_lo, i_hi,
        blocks_w, H, W, D, KSIZE, HAS_BD, HAS_BP, UPCAST, PRECISION, ROW_BLOCK, BLOCK_I, BLOCK_D,
    )  # fmt: skip
    _store_state(S_ptr, Z_ptr, pid_bh * SPLITS + pid_s, s, z, BLOCK_D)


@triton.jit
def _lite_mla_context_rows_kernel(
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
    WD_ptr,  # (C, 1, K, K) this scale's depthwise weight (TAP_MAJOR: tap t of channel c at c + t*stride_wdt)
    stride_wdt,
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    S_ptr,  # fp32 partials from _lite_mla_context_rows_state_kernel (unless ONE_PASS)
    Z_ptr,
    S0_ptr,
    Z0_ptr,
    HEADS,
    H,
    W,
    D,
    TAPS,  # (the flattened kernels' argument; KSIZE here)
    CHUNK,  # positions per split of the heads over qkv itself, a multiple of BLOCK_N (ONE_PASS: all of them)
    SPLITS,
    eps,
    KSIZE: tl.constexpr,  # odd, at most MAX_ROWS_KERNEL
    TAP_MAJOR: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,
    ONE_PASS: tl.constexpr,  # reduce the state here, over the whole map (grid (B*heads, 1)): no partials
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW_BLOCK: tl.constexpr,  # adjacent columns a tile row holds: 2 or 4
    BLOCK_N: tl.constexpr,  # positions per tile: BLOCK_N / ROW_BLOCK rows of ROW_BLOCK columns
    BLOCK_D: tl.constexpr,
):
    """The output of one (batch*head, split), as _lite_mla_context_fwd_kernel's with FMA taps, but the
    aggregation's tiles are rows of ROW_BLOCK adjacent columns, whose stencil shares its loads between columns
    (_rows_dwconv); with ONE_PASS, of the whole map after reducing its state. The heads over qkv itself take the
    flattened tiles (no stencil), first, so that their state is not held through the aggregated heads' loops."""
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE
    BLOCK_I: tl.constexpr = BLOCK_N // ROW_BLOCK
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    head = pid_bh % HEADS
    cq = 3 * head * D  # first channel of this head's q group; k and v follow
    X_ptr += b * stride_xb
    n_lo = 0  # one pass: the whole map, bounds the compiler knows (XL1 32x32, bf16: 168 sm_90 registers, not 196)
    n_hi = H * W
    i_lo, i_hi, blocks_w = _rows_chunk(0, H, W, 1, ROW_BLOCK, BLOCK_I)
    if not ONE_PASS:
        n_lo = pid_s * CHUNK
        n_hi = tl.minimum(n_lo + CHUNK, H * W)
        i_lo, i_hi, blocks_w = _rows_chunk(pid_s, H, W, SPLITS, ROW_BLOCK, BLOCK_I)
    if WITH_RAW:
        if ONE_PASS:
            s0, z0 = _raw_state(X_ptr, stride_xc, stride_xh, stride_xw, cq + D, n_lo, n_hi, H, W, D, UPCAST,
                                PRECISION, BLOCK_N, BLOCK_D)  # fmt: skip
        else:
            s0, z0 = _load_state(S0_ptr, Z0_ptr, pid_bh, SPLITS, BLOCK_D)
        _write_out(
            O0_ptr + b * stride_o0b + head * D * stride_o0c, stride_o0c, stride_o0h, stride_o0w,
            X_ptr + cq * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr,
            BP_ptr, s0, z0, eps, n_lo, n_hi, H, W, D, KSIZE * KSIZE, KSIZE, HAS_BD, HAS_BP, False, False, UPCAST,
            PRECISION, False, 1, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    if ONE_PASS:
        s, z = _rows_state(
            X_ptr, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr, BP_ptr, cq, i_lo,
            i_hi, blocks_w, H, W, D, KSIZE, HAS_BD, HAS_BP, UPCAST, PRECISION, ROW_BLOCK, BLOCK_I, BLOCK_D,
        )  # fmt: skip
    else:
        s, z = _load_state(S_ptr, Z_ptr, pid_bh, SPLITS, BLOCK_D)
    _rows_out(
        O_ptr + b * stride_ob + head * D * stride_oc, stride_oc, stride_oh, stride_ow, X_ptr, stride_xc, stride_xh,
        stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr, BP_ptr, cq, s, z, eps, i_lo, i_hi, blocks_w, H, W,
        D, KSIZE, HAS_BD, HAS_BP, UPCAST, PRECISION, ROW_BLOCK, BLOCK_I, BLOCK_D,
    )  # fmt: skip


@triton.jit
def _band_dwconv(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, h0, offs_c, c_mask, H, W, KSIZE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """A group's depthwise conv (no bias) over map rows [h0, h0 + BLOCK_H), every column: an fp32 (BLOCK_D,
    BLOCK_H, BLOCK_W) tile [c, h, w], on tensor cores. Per kernel row dh, each channel's row conv is a product
    with a banded matrix, x[c, h + dh - PAD, :] @ T[c] with T[c][w', w] = w_dh[c, w' - w + PAD] (zero off the
    band): a batched dot over the channels, (BLOCK_H x BLOCK_W) @ (BLOCK_W x BLOCK_W) each. It multiplies
    BLOCK_W / KSIZE times the stencil's FMAs (16 / 5 at L0's stage), in a few tensor-core instructions where the
    FMA stencils issue one instruction (or more, with its loads and conversions) per FMA. Columns past W are
    zero in x (the padding on the right) and absent from T (on the left); taps enter in x's dtype (as TAP_MMA's
    folded matrices do)."""
    PAD: tl.constexpr = KSIZE // 2
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    band = offs_w[:, None] - offs_w[None, :] + PAD  # [w', w]: the tap input column w' takes for output column w
    t_mask = c_mask[:, None, None] & ((band >= 0) & (band < KSIZE))[None, :, :]
    t_ptrs = WD_ptr + offs_c[:, None, None] * stride_wc + band[None, :, :] * stride_wt
    x_ptrs = X_ptr + offs_c[:, None, None] * stride_c + offs_w[None, None, :] * stride_w
    x_cols = c_mask[:, None, None] & (offs_w < W)[None, None, :]
    acc = tl.zeros((offs_c.shape[0], BLOCK_H, BLOCK_W), dtype=tl.float32)
    for dh in range(KSIZE):
        hh = offs_h + (dh - PAD)
        x_mask = x_cols & ((hh >= 0) & (hh < H))[None, :, None]
        x = tl.load(x_ptrs + hh[None, :, None] * stride_h, mask=x_mask, other=0.0)
        t = tl.load(t_ptrs + (dh * KSIZE) * stride_wt, mask=t_mask, other=0.0)
        acc = _dot(x, _cast(t.to(tl.float32), x.dtype, UPCAST), acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _band_aggregate(
    X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, BD_ptr, WP_ptr, BP_ptr, h0, offs_c, c_mask, H,
    W, D, KSIZE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """agg(x) of one group over map rows [h0, h0 + BLOCK_H): an fp32 (BLOCK_H * BLOCK_W, BLOCK_D) tile whose row n
    is position (h0 + n // BLOCK_W, n % BLOCK_W), zero outside the map. Pointers as _aggregate's."""
    dt: tl.constexpr = X_ptr.dtype.element_ty
    BLOCK_D: tl.constexpr = offs_c.shape[0]
    a = _band_dwconv(
        X_ptr, stride_c, stride_h, stride_w, WD_ptr, stride_wc, stride_wt, h0, offs_c, c_mask, H, W, KSIZE, UPCAST,
        PRECISION, BLOCK_H, BLOCK_W,
    )  # fmt: skip
    a = tl.trans(tl.reshape(a, (BLOCK_D, BLOCK_H * BLOCK_W)))
    n = tl.arange(0, BLOCK_H * BLOCK_W)
    valid = (h0 + n // BLOCK_W < H) & (n % BLOCK_W < W)
    wp_t = _pointwise_matrix_t(WP_ptr, offs_c, c_mask, D)
    return _pointwise(a, BD_ptr, wp_t, BP_ptr, offs_c, c_mask, valid, dt, HAS_BD, HAS_BP, UPCAST, PRECISION, True)


@triton.jit
def _lite_mla_context_band_kernel(
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
    WD_ptr,  # (C, 1, K, K) this scale's depthwise weight (TAP_MAJOR: tap t of channel c at c + t*stride_wdt)
    stride_wdt,
    BD_ptr,  # (C,) depthwise bias (if HAS_BD)
    WP_ptr,  # (C, D, 1, 1) pointwise weight, contiguous
    BP_ptr,  # (C,) pointwise bias (if HAS_BP)
    S_ptr,  # (the other kernels' partials: unused, one pass)
    Z_ptr,
    S0_ptr,
    Z0_ptr,
    HEADS,
    H,
    W,  # at most BLOCK_W
    D,
    TAPS,  # (the flattened kernels' arguments, unused)
    CHUNK,
    SPLITS,
    eps,
    KSIZE: tl.constexpr,  # odd, at most BLOCK_W
    TAP_MAJOR: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BP: tl.constexpr,
    WITH_RAW: tl.constexpr,
    ONE_PASS: tl.constexpr,  # True: this kernel reduces the state over the whole map itself
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,  # map rows a tile holds (at least 16: the banded dots' rows)
    BLOCK_W: tl.constexpr,  # a power of two, at least W and 16
    BLOCK_N: tl.constexpr,  # positions per tile of the heads over qkv itself
    BLOCK_D: tl.constexpr,
):
    """One (batch, head) in one pass, as _lite_mla_context_rows_kernel's, with the depthwise conv on tensor cores
    (_band_dwconv) over tiles of BLOCK_H whole map rows."""
    tl.static_assert(ONE_PASS)
    stride_wdc: tl.constexpr = 1 if TAP_MAJOR else KSIZE * KSIZE
    dt: tl.constexpr = X_ptr.dtype.element_ty
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // HEADS
    head = pid_bh % HEADS
    cq = 3 * head * D
    X_ptr += b * stride_xb
    offs_c = tl.arange(0, BLOCK_D)
    c_mask = offs_c < D
    if WITH_RAW:
        s0, z0 = _raw_state(X_ptr, stride_xc, stride_xh, stride_xw, cq + D, 0, H * W, H, W, D, UPCAST, PRECISION,
                            BLOCK_N, BLOCK_D)  # fmt: skip
        _write_out(
            O0_ptr + b * stride_o0b + head * D * stride_o0c, stride_o0c, stride_o0h, stride_o0w,
            X_ptr + cq * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr, stride_wdc, stride_wdt, BD_ptr, WP_ptr,
            BP_ptr, s0, z0, eps, 0, H * W, H, W, D, KSIZE * KSIZE, KSIZE, HAS_BD, HAS_BP, False, False, UPCAST,
            PRECISION, False, 1, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    s = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ck = cq + D
    cv = ck + D
    for h0 in range(0, H, BLOCK_H):
        k = _band_aggregate(
            X_ptr + ck * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + ck * stride_wdc, stride_wdc, stride_wdt,
            BD_ptr + ck, WP_ptr + ck * D, BP_ptr + ck, h0, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, UPCAST,
            PRECISION, BLOCK_H, BLOCK_W,
        )  # fmt: skip
        kr = _cast(tl.maximum(k, 0.0), dt, UPCAST)  # held in the input dtype through v's (as _kv_state)
        z += tl.sum(kr.to(tl.float32), axis=0)
        v = _band_aggregate(
            X_ptr + cv * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + cv * stride_wdc, stride_wdc, stride_wdt,
            BD_ptr + cv, WP_ptr + cv * D, BP_ptr + cv, h0, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, UPCAST,
            PRECISION, BLOCK_H, BLOCK_W,
        )  # fmt: skip
        s = _dot(tl.trans(kr), _cast(v, dt, UPCAST), s, UPCAST, PRECISION)
    s_op, s_scale = _state_operand(s, dt, UPCAST)
    O_ptr += b * stride_ob + head * D * stride_oc
    n = tl.arange(0, BLOCK_H * BLOCK_W)
    for h0 in range(0, H, BLOCK_H):
        q = _band_aggregate(
            X_ptr + cq * stride_xc, stride_xc, stride_xh, stride_xw, WD_ptr + cq * stride_wdc, stride_wdc, stride_wdt,
            BD_ptr + cq, WP_ptr + cq * D, BP_ptr + cq, h0, offs_c, c_mask, H, W, D, KSIZE, HAS_BD, HAS_BP, UPCAST,
            PRECISION, BLOCK_H, BLOCK_W,
        )  # fmt: skip
        h = h0 + n // BLOCK_W
        w = n % BLOCK_W
        _store_attention(O_ptr, stride_oc, stride_oh, stride_ow, q, s_op, s_scale, z, eps, h, w, (h < H) & (w < W),
                         offs_c, c_mask, UPCAST, PRECISION)  # fmt: skip


# The banded stencil's tiles (_lite_mla_context_band_kernel): whole map rows of at most BAND_WIDTH columns,
# BAND_ROWS of them (a dot's smallest side, 16, both), for depthwise kernels of at least BAND_MIN_KERNEL. Each
# kernel row's banded dots multiply BAND_WIDTH / KSIZE times the stencil's FMAs; at L0's stage (16x16, k=5)
# the one-pass sm_90 compile is about 10k instructions a warp (4 warps) against the row-blocked kernel's 17k.
# At k=3 (XL1's stages) it is not fewer: 47k against 42k a program at 16x16, 166k against 163k at 32x32 (32
# columns, 8 warps; 4 warps spilled)
BAND_WIDTH = 16
BAND_ROWS = 16
BAND_MIN_KERNEL = 5


PIPELINED_TAPS = 3  # stages of a pipelined tap loop: the next two taps' tiles in flight behind the current one
# The largest map a one-pass program takes as one tile (fp16/bf16 tensor-core stencil, 8 warps): each tap's
# D x D matrix is then formed once per program instead of once per tile, and its dot is 256 rows deep. At 256
# rows the sm_90 compile is 191 registers, no spill (4 warps spilled 72 bytes).
WHOLE_MAP_ROWS = 256
# Splits of the 2-column row-blocked candidate where one pass would do (context_configs): its 144-166 registers
# let three programs share an SM, and B*heads programs (256 at L0's and XL1's 32x32 stage, B16) fill two of 132 x 3
ROWS_SPLITS = 3


def context_config(
    dev: Device, B: int, heads: int, N: int, dim: int, low_precision: bool, splits: int | None = None
) -> dict:
    """Tiles, launch options and the split of N for B*heads heads of `dim` channels over N positions.

    splits: programs per head (None: one, the one-pass kernel, when B*heads programs fill the GPU's SMs, and
    under the interpreter; else enough to fill it twice over). fp16/bf16 (TAP_MMA): the stencil on tensor
    cores, 64-row tiles over 4 warps (the fourth H100 pass: 4 warps 1.2-1.8x faster than 8 over channels_last
    maps, every LiteMLA stage; over 128 registers on sm_80, without spills). fp32 keeps IEEE fp32 products on
    FMAs, whose dot operands stay in registers: on a GPU 16-row tiles over 8 warps, and a register cap (ptxas
    otherwise trades a small spill for 64 registers on sm_80); the interpreter runs 64-row tiles. The loops are
    not pipelined (num_stages=1, TAP_STAGES=1): the programs of an SM hide each other's latency (the fourth pass's
    sweep; the pipelined tap loop is a measured candidate, context_configs)."""
    block_d = max(16, next_pow2(dim))
    if splits is None:
        splits = 1 if not dev.gpu or B * heads >= dev.sms else cdiv(2 * dev.sms, B * heads)
    cfg = dict(
        BLOCK_N=64, BLOCK_D=block_d, TAP_MMA=low_precision, ROW_TAPS=False, TAP_STAGES=1, num_warps=4, num_stages=1,
        splits=splits,
    )  # fmt: skip
    if dev.gpu and not low_precision:
        cfg.update(BLOCK_N=16, num_warps=8, maxnreg=96)
    return cfg


def context_configs(
    dev: Device, B: int, heads: int, N: int, dim: int, low_precision: bool, channels_last: bool = True,
    kernel: int | None = None, width: int | None = None,
) -> list[dict]:  # fmt: skip
    """The configurations measured dispatch times for a call (linattn._tune.choose_config), the heuristic's
    first; on a GPU also:
    - fp16/bf16: the stencil the other way, FMA taps and one pointwise dot, 32-row tiles (64 spilled 24 bytes
      on sm_80 over NCHW maps, compile gate), split over N on 8 warps;
    - one pass: FMA taps (fp16/bf16 on 8 warps) with a kernel row's taps in flight together (ROW_TAPS: the
      split's state kernel spilled 8-16 bytes at k=5, compile gate);
    - the other side of the one-pass / split-over-N choice (four splits), where the map has several row tiles;
    - fp16/bf16, one pass, a map of at most WHOLE_MAP_ROWS positions: the whole map as one tile on 8 warps;
    - over channels_last maps (qkv's channels contiguous), each of those but the ROW_TAPS one with its tap loop
      pipelined over PIPELINED_TAPS stages (TAP_STAGES: the unpipelined ones wait on one tap's load at a time;
      pipelined, the sm_90 and sm_80 compiles issue cp.async copies for the tap tiles, without spills; over NCHW
      maps the compile is the same as unpipelined: no copy is provably aligned). Not yet timed on a GPU;
    - over channels_last maps, fp16/bf16, one pass: FMA taps on 64-row tiles, 4 warps (a thread's two rows of
      eight channels are two 128-bit loads a tap: twice the loads in flight of the 32-row tiles, half the
      serial tap steps; without spills on sm_90 and sm_80). The eighth H100 pass: the fastest at both 16x16
      stages (L0 0.0875 ms, XL1 0.067), at 12% occupancy. At 143 registers (sm_90) three of its programs fit an
      SM, so L0's 512 (B16) take two waves of 396 and 116. So also the same tiles under a 128-register budget:
      four programs an SM, 528 at once, L0's in one wave (124-128 registers on sm_90 and sm_80, bf16 and fp16, no
      spill; ptxas takes 143 when free to). And, on Hopper, the same tiles on 8 warps: twice the warps, each
      with half the rows (123-126 registers on sm_90; on sm_80 159-161, one program an SM, and fp16 spills 16
      bytes);
    - over channels_last maps, fp16/bf16, depthwise kernels (`kernel`: the largest of the call's scales; None:
      unknown, none of these) of at most MAX_ROWS_KERNEL: the row-blocked kernels (_lite_mla_context_rows_kernel,
      one pass or split as the heuristic is) on 4 warps, rows of 4 columns (ROW_BLOCK), 128 positions a tile, and
      of 2, 64 positions, under a 168-register budget (dropped for contiguous depthwise weights, context_launch);
      where the heuristic runs one pass, also the 2 columns split in ROWS_SPLITS. Its
      stencil shares each load between the columns of a row: per kernel row of an L0 tile of 4-column rows,
      356-384 sm_90 instructions for 160 FMAs (412-436 before kernels/_math.py's widen), where the 64-row FMA
      candidate's tap loop takes 98-106 for 16 (the eighth pass put that kernel at 3-4 warps an SM scheduler,
      issuing about every cycle). 4 columns, one pass: 168-232 registers (bf16, fp16; sm_90 and sm_80, tap-major
      depthwise weights, no spill), two programs an SM (three at XL1's bf16 stages; 206-249 before the raw heads'
      pass moved first); under a 168-register budget they spill 16-32 bytes; split: the state kernel 190-227,
      the output kernel 148-182. 2 columns: one pass 142-166, split 146-163 and 116-141, three programs an SM or
      four. The ninth H100 pass: 4 columns the fastest at every LiteMLA stage (B16, bf16; L0 42 us, 2 columns
      56);
    - over channels_last maps, fp16/bf16, depthwise kernels of at least BAND_MIN_KERNEL over maps at most
      BAND_WIDTH wide (`width`: the map's; None: unknown, none of these), where the heuristic runs one pass: the
      banded stencil on tensor cores (_lite_mla_context_band_kernel, one pass only), on 4 warps (234-255
      registers, two programs an SM) and on 8 (176-195 on sm_90, 222-234 on sm_80, one); no spill; the raw heads
      on 128-position tiles (64: 3-6% more instructions, no fewer registers). Not yet timed on a GPU.
    The fourth H100 pass timed 32 of them per LiteMLA stage (B16, bf16): the tensor-core stencil on 4 warps
    was fastest over channels_last maps but at L0's (FMA taps on 4 warps, split in four, within 1%), the
    ROW_TAPS one over NCHW maps; the fastest ran at 7-18% of the memory floor
    (benchmarks/results/gpu/2026-11-26-h100-pass4)."""
    first = context_config(dev, B, heads, N, dim, low_precision)
    if not dev.gpu:
        return [first]
    found = [first]
    fma = first
    if low_precision:
        fma = dict(first, TAP_MMA=False, BLOCK_N=32)
        if split_rows(N, fma)[2] > 1:  # on 8 warps: the state kernel spilled 16 bytes on sm_80 on 4 (compile gate)
            fma["num_warps"] = 8
        found.append(fma)
    if split_rows(N, fma)[2] == 1:
        found.append(dict(fma, ROW_TAPS=True, num_warps=8))
    other = context_config(dev, B, heads, N, dim, low_precision, 1 if first["splits"] > 1 else 4)
    if split_rows(N, other)[2] != split_rows(N, first)[2]:
        found.append(other)
    whole = next_pow2(N)
    if low_precision and first["splits"] == 1 and first["BLOCK_N"] < whole <= WHOLE_MAP_ROWS:
        found.append(dict(first, BLOCK_N=whole, num_warps=8))
    if not channels_last:
        return found
    pipelined = [_pipelined(c) for c in found if not c["ROW_TAPS"]]
    if low_precision and split_rows(N, fma)[2] == 1:
        wide = dict(fma, BLOCK_N=64, num_warps=4)  # FMA taps, two rows' loads a thread each tap
        found += [wide, dict(wide, maxnreg=128)]  # the budget: four programs an SM, not three
        if dev.tma:  # Hopper: the same tiles, twice the warps in flight (sm_80: one program an SM, fp16 spills)
            found.append(dict(fma, BLOCK_N=64, num_warps=8))
    if low_precision and kernel is not None and kernel <= MAX_ROWS_KERNEL:
        rows = dict(fma, BLOCK_N=128, ROW_BLOCK=4, num_warps=4)
        found += [rows, dict(rows, BLOCK_N=64, ROW_BLOCK=2, maxnreg=168)]
        if first["splits"] == 1:  # 2 columns split in 3: B*heads programs fill two of the three an SM takes
            found.append(dict(rows, BLOCK_N=64, ROW_BLOCK=2, maxnreg=168, splits=ROWS_SPLITS))
    banded = kernel is not None and kernel >= BAND_MIN_KERNEL and width is not None and width <= BAND_WIDTH
    if low_precision and banded and first["splits"] == 1:  # one pass only: where B*heads programs fill the GPU
        band = dict(first, BLOCK_H=BAND_ROWS, BLOCK_W=BAND_WIDTH, BLOCK_N=128)  # (the raw heads' tiles)
        found += [dict(band, num_warps=4), dict(band, num_warps=8)]
    return found + pipelined


def _pipelined(config: dict) -> dict:
    """config with its tap loop pipelined; fp16/bf16 FMA taps with a register budget (ptxas otherwise holds them
    to 128 and spills 8 bytes on sm_90 in fp16; under this budget 166-168 registers, no spill). fp32's 96 rises
    to 128: triton 3.6 (the GPU machine's; not 3.8) spilled 8 bytes in the state kernel at k=5 with the depthwise
    weights contiguous (a training model's) under 96."""
    budget = {} if config["TAP_MMA"] else {"maxnreg": max(config.get("maxnreg", 168), 128)}
    return dict(config, TAP_STAGES=PIPELINED_TAPS, **budget)


def lite_mla_context_fwd(
    qkv, dw_weights, pw_weights, heads: int, dim: int, eps: float, dw_biases, pw_biases, out, config=None,
    compile_only: bool = False,
):  # fmt: skip
    """Write lite_mla_attention(multiscale_aggregate(qkv, ...)) into out (B, (1+S)*heads*dim, H, W); depthwise
    weights as tap_layout takes them, the other weights and biases contiguous.

    The first scale's passes also compute the heads over qkv itself, so qkv is read from memory once for both.
    config: context_config()'s dict, to launch another device's choice (its splits clamped to the map's row
    tiles; one split runs the one-pass kernel), or one of context_configs()' (ROW_BLOCK: the row-blocked
    kernel). compile_only: compile the kernels for these arguments without launching them (measured dispatch's
    candidates, compiled at once before they are timed)."""
    launch = context_launch(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases, out, config)
    return launch(qkv, dw_weights, pw_weights, dw_biases, pw_biases, out, compile_only)


def context_launch(
    qkv, dw_weights, pw_weights, heads: int, dim: int, eps: float, dw_biases, pw_biases, out, config=None
) -> Callable:  # fmt: skip
    """lite_mla_context_fwd for calls like this one, prepared (as kernels/conv_bn_act.py fwd_launch): the
    configuration, grid, strides and each scale's flags worked out once, into `launch(qkv, dw_weights, pw_weights,
    dw_biases, pw_biases, out, compile_only=False)`, which allocates the partials and launches. The tensors must be
    laid out as this call's, with heads, dim and eps the same (a call plan keys them so); it holds none of them."""
    B, C, H, W = qkv.shape
    low = qkv.dtype != torch.float32
    cfg, chunk, splits = split_rows(H * W, config or context_config(device_of(qkv), B, heads, H * W, dim, low))
    upcast = not qkv.is_cuda and low  # the interpreter's fp16/bf16 dot is wrong (fp32 runs there as on a GPU)
    precision = "ieee" if (upcast or not low) else "tf32"  # tf32 unused: fp16/bf16 operands stay as they are
    rows = bool(cfg.get("ROW_BLOCK"))
    band = bool(cfg.get("BLOCK_H"))
    state_kernel, out_kernel = (
        (None, _lite_mla_context_band_kernel)
        if band
        else (_lite_mla_context_rows_state_kernel, _lite_mla_context_rows_kernel)
        if rows
        else (_lite_mla_context_state_kernel, _lite_mla_context_fwd_kernel)
    )
    block_d = cfg["BLOCK_D"]
    one_pass = splits == 1
    if band and (not one_pass or W > cfg["BLOCK_W"]):
        raise ValueError(f"the banded stencil runs one pass over maps at most {cfg['BLOCK_W']} wide")
    grid = (B * heads, splits)
    width = heads * dim
    xs, os = qkv.stride(), out.stride()  # every head's slice of out has out's strides
    # fp16, the split's second pass: a register budget (ptxas otherwise holds it to 96 registers on sm_80 and
    # spills 8 bytes; under 128: 108, no spill). Not for bf16, which needs none: under a budget ptxas takes up
    # to it (sm_90: 68 -> 108 registers, 7 -> 4 programs an SM)
    fp16_split = qkv.dtype == torch.float16 and not one_pass and not rows and "maxnreg" not in cfg
    out_options = {"maxnreg": 128} if fp16_split else {}
    # fp16 with a kernel row's taps in flight (ROW_TAPS, one pass): the rows' scaling into fp16's range
    # (_pointwise) made ptxas hold it to 128 registers and spill 8 bytes on sm_90 (L0's k=5); under 168: 150, none
    if qkv.dtype == torch.float16 and cfg.get("ROW_TAPS") and one_pass and "maxnreg" not in cfg:
        out_options = {"maxnreg": 168}
    scales = []  # per scale: (depthwise weight's tap stride, sizes, its two kernels' launches)
    for s, wd in enumerate(dw_weights):
        K = wd.shape[-1]
        tap_stride, tap_major = tap_layout(wd)
        opts, state_options = cfg, {}
        if band:
            opts = {k: v for k, v in cfg.items() if k not in ("TAP_MMA", "ROW_TAPS", "TAP_STAGES")}
        elif rows:
            # the flattened kernels' keys left out. Contiguous depthwise weights (a tap's channels strided, scalar
            # loads) spill 8-48 bytes under a 168-register budget: those launch without it, but the split state
            # kernel spills 8-32 at the 168 ptxas then takes unasked (L0's k=5): it runs with the cap at 255 (compile
            # gate: 163-202 registers, no spill)
            dropped = ("TAP_MMA", "ROW_TAPS", "TAP_STAGES") + (() if tap_major else ("maxnreg",))
            opts = {k: v for k, v in cfg.items() if k not in dropped}
            state_options = {} if tap_major else {"maxnreg": 255}
        flags = dict(KSIZE=K, TAP_MAJOR=tap_major, HAS_BD=bool(dw_biases), HAS_BP=bool(pw_biases), WITH_RAW=s == 0,
                     UPCAST=upcast, PRECISION=precision, **opts)  # fmt: skip
        kernels = (
            KernelLaunch(state_kernel, grid, **flags, **state_options),
            KernelLaunch(out_kernel, grid, ONE_PASS=one_pass, **flags, **out_options),
        )
        scales.append((tap_stride, (heads, H, W, dim, K * K, chunk, splits), kernels))
    parts = ((B * heads, splits, block_d, block_d), (B * heads, splits, block_d))

    def launch(qkv, dw_weights, pw_weights, dw_biases, pw_biases, out, compile_only=False):
        raw_out = out[:, :width]
        if one_pass:
            s0 = z0 = qkv  # never read
        else:
            s0, z0 = (torch.empty(shape, device=qkv.device, dtype=torch.float32) for shape in parts)
        for s, (wdt, sizes, (state_kernel, out_kernel)) in enumerate(scales):
            wd, wp = dw_weights[s], pw_weights[s]
            bd, bp = _bias_args(dw_biases, s, wd)[0], _bias_args(pw_biases, s, wp)[0]
            if one_pass:
                state = z = qkv
            else:
                state, z = torch.empty_like(s0), torch.empty_like(z0)
                state_kernel(state, z, s0, z0, qkv, *xs, wd, wdt, bd, wp, bp, *sizes, compile_only=compile_only)
            o = out[:, (1 + s) * width : (2 + s) * width]
            out_kernel(
                o, *os, raw_out, *os, qkv, *xs, wd, wdt, bd, wp, bp, state, z, s0, z0, *sizes, eps,
                compile_only=compile_only,
            )  # fmt: skip
        return out

    return launch
