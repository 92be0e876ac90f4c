"""Triton kernels for the fused conv + BatchNorm + activation block (docs/design.md 3.4).

Forward, per output channel co of group g and output position (b, ho, wo):

    z  = sum_{ci, kh, kw} x[b, g*Cin_g + ci, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw] * W[co, ci, kh, kw] + bias[co]
    y  = act(z) * post_scale[co] + post_shift[co] + residual[b, co, ho, wo]

Dense, 1x1 and grouped convs are an implicit GEMM per group: M = B*Ho*Wo
positions, N = Cout/G channels, K = (Cin/G)*KH*KW, one tl.dot per (tap,
block of input channels), never materialising im2col. Depthwise convs
(Cin/G = 1, any channel multiplier) take a direct kernel: per tap, a
(positions x channels) tile times a vector of taps. With SHUFFLE the store
writes channel co at position (ho, wo) to channel co // 4, position
(2*ho + (co // 2) % 2, 2*wo + co % 2): the 2x pixel shuffle of the SqueezeSAM
upsample block, done in the store.

Backward, with dz = g * post_scale * act'(z) (g the output gradient):

    dpost_scale = sum g * act(z)    dpost_shift = sum g    dbias = sum dz    dresidual = g
    dW[co, ci, kh, kw] = sum_{b, ho, wo} dz[b, co, ho, wo] x[b, ci', ho*sh - ph + kh*dh, wo*sw - pw + kw*dw]
    dx[b, ci', h, w]   = sum_{co, kh, kw : h = ho*sh - ph + kh*dh, w = ...} dz[b, co, ho, wo] W[co, ci, kh, kw]

Three launches: the dz kernel recomputes z (no activation is saved by the
forward) and writes dz in fp32 plus per-tile partial sums of the per-channel
gradients; the dx kernel is the transposed conv as an implicit GEMM (a tap
contributes where (h + ph - kh*dh) is a non-negative multiple of the stride);
the dW kernel reduces over positions, split into chunks whose fp32 partials are
summed afterwards: deterministic, no atomics.

On Hopper, dense stride-1 fp16/bf16 convs over channels_last maps have a second
forward kernel, timed by measured dispatch beside the first: both operands come
through tensor descriptors (TMA), a program's positions are a rectangle of one
image, and each tap's input window is that rectangle shifted, the padding the
copy engine's zero fill (_conv_bn_act_fwd_tma_kernel, tma_configs).

3x3 depthwise convs of stride 1 or 2 have a second forward kernel too, timed
beside the direct one: a program slides down the rows of a strip, reads each
input row as three column-shifted tiles and adds them into the output rows it
still holds, so an input row is read three times, not nine (the direct kernel's
taps; the H100 pass had both PyTorch's depthwise kernel and the direct one at
about 20% of copy bandwidth) (_conv_bn_act_fwd_dw3_kernel, dw3_configs).

Every tensor is addressed through its (b, c, h, w) strides, so NCHW and
channels_last are read and written in place; weights are addressed through
their strides too. Products accumulate in fp32 (`input_precision="ieee"` for
fp32 inputs, docs/design.md 8) and results are cast on store.
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from ._device import Device, KernelLaunch, cdiv, device_of, next_pow2
from ._math import exp2, rcp, round_tf32, widen

ACTIVATIONS = ("identity", "relu", "relu6", "gelu", "gelu_tanh", "hardswish", "silu")


@triton.jit
def _act_constants():
    """(sqrt(2/pi), 1/sqrt(2), 1/sqrt(2 pi), log2 e). Local constants, not module globals: the GPU compiler rejects
    a global that is not a tl.constexpr, and the interpreter cannot multiply a tensor by a tl.constexpr one."""
    return 0.7978845608028654, 0.7071067811865476, 0.3989422804014327, 1.4426950408889634


@triton.jit
def _tanh(x):
    """tanh through exp (no libdevice under the interpreter); exact limits at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """The activation, index into ACTIVATIONS, on an fp32 tile."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 3:
        _, inv_sqrt_2, _, _ = _act_constants()
        z = 0.5 * z * (1.0 + tl.erf(z * inv_sqrt_2))
    elif ACT == 4:
        # 0.5 z (1 + tanh u) = z sigmoid(2u) = z / (1 + 2^(-2 u log2 e)), u = sqrt(2/pi) (z + 0.044715 z^3): one
        # exp2 and one reciprocal, fewer instructions than tanh (the row-sliding depthwise kernel is
        # instruction-bound, kernels/_math.py). The polynomial as z (k + k' z^2): other orders made ptxas spill 8
        # bytes in a generic sm_80 conv (compile gate)
        sqrt_2_over_pi, _, _, log2e = _act_constants()
        k = -2.0 * log2e * sqrt_2_over_pi
        z = z * rcp(1.0 + exp2(z * (k + (k * 0.044715) * z * z)))
    elif ACT == 5:
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 6:
        _, _, _, log2e = _act_constants()
        z = z * rcp(1.0 + exp2(-log2e * z))
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz on an fp32 tile, with PyTorch's conventions at the kinks (reference.activation_grad)."""
    if ACT == 0:
        d = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where((z > 0.0) & (z < 6.0), 1.0, 0.0)
    elif ACT == 3:
        _, inv_sqrt_2, inv_sqrt_2pi, _ = _act_constants()
        d = 0.5 * (1.0 + tl.erf(z * inv_sqrt_2)) + z * inv_sqrt_2pi * tl.exp(-0.5 * z * z)
    elif ACT == 4:
        sqrt_2_over_pi, _, _, _ = _act_constants()
        t = _tanh(sqrt_2_over_pi * (z + 0.044715 * z * z * z))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * sqrt_2_over_pi * (1.0 + 3.0 * 0.044715 * z * z)
    elif ACT == 5:
        d = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z / 3.0 + 0.5, 1.0))
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _out_channels(pid_n, COUT, COUT_G, TILES_N, BLOCK_N: tl.constexpr, DEPTHWISE: tl.constexpr):
    """(output channels, their mask, group index) of column tile pid_n.

    Depthwise tiles run over all Cout channels (each has its own input channel);
    grouped tiles stay inside one group of Cout_g channels."""
    if DEPTHWISE:
        co = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        return co, co < COUT, 0
    g = pid_n // TILES_N
    local = (pid_n % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    return g.to(tl.int64) * COUT_G + local, local < COUT_G, g


@triton.jit
def _positions(pid_m, M, HO, WO, BLOCK_M: tl.constexpr):
    """(b, ho, wo, mask) of the BLOCK_M flattened positions m = (b*HO + ho)*WO + wo of row tile pid_m."""
    offs = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    wo = offs % WO
    t = offs // WO
    return t // HO, t % HO, wo, offs < M


@triton.jit
def _conv_tile(
    X_ptr, sxb, sxc, sxh, sxw,  # input (B, Cin, H, W) and its strides
    W_ptr, swo, swi, swh, sww,  # weight (Cout, Cin_g, KH, KW) and its strides
    b, ho, wo, m_mask, co, n_mask, g, k_start, k_end,
    CIN_G, COUT_G, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, DEPTHWISE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The conv without bias at positions (b, ho, wo) x channels co: an fp32 (BLOCK_M, BLOCK_N) tile.

    Dense and grouped convs run one flat reduction loop over (tap, block of BLOCK_K input channels),
    iterations [k_start, k_end) of KH*KW*cdiv(CIN_G, BLOCK_K) (a split-K program takes a range): one loop,
    so the compiler pipelines the loads of every tap, not only those of the channel blocks within one. With
    channels_last inputs and K-contiguous (Cout, KH, KW, Cin) weights both operands are read along
    contiguous channels."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_b = X_ptr + b * sxb
    h0 = ho * STRIDE_H - PAD_H
    w0 = wo * STRIDE_W - PAD_W
    if DEPTHWISE:
        x_c = (co // COUT_G) * sxc  # each output channel reads input channel co // multiplier
        for r in range(KH * KW):
            kh = r // KW
            kw = r % KW
            hi = h0 + kh * DIL_H
            wi = w0 + kw * DIL_W
            inside = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            x_pos = x_b + hi * sxh + wi * sxw
            x = tl.load(x_pos[:, None] + x_c[None, :], mask=inside[:, None] & n_mask[None, :], other=0.0)
            tap = tl.load(W_ptr + co * swo + kh * swh + kw * sww, mask=n_mask, other=0.0)
            acc += x.to(tl.float32) * tap.to(tl.float32)[None, :]
    else:
        x_g = x_b + (g * CIN_G).to(tl.int64) * sxc
        w_n = W_ptr + co[None, :] * swo  # (1, BLOCK_N)
        tiles_c = tl.cdiv(CIN_G, BLOCK_K)
        for kk in range(k_start, k_end):
            r = kk // tiles_c
            ci = (kk - r * tiles_c) * BLOCK_K + tl.arange(0, BLOCK_K)
            kh = r // KW
            kw = r - kh * KW
            hi = h0 + kh * DIL_H
            wi = w0 + kw * DIL_W
            inside = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            k_mask = ci < CIN_G
            x = tl.load(
                (x_g + hi * sxh + wi * sxw)[:, None] + ci[None, :] * sxc,
                mask=inside[:, None] & k_mask[None, :],
                other=0.0,
            )
            w_k = w_n + ci[:, None] * swi + kh * swh + kw * sww
            w = tl.load(w_k, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:  # the interpreter's low-precision dot is wrong: products in fp32 there
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _out_offsets(b, ho, wo, co, sb, sc, sh, sw, SHUFFLE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) offsets of output element (b, co, ho, wo) in a tensor with strides (sb, sc, sh, sw);
    with SHUFFLE, of its place after the 2x pixel shuffle."""
    if SHUFFLE:
        c = co // 4
        h = 2 * ho[:, None] + ((co // 2) % 2)[None, :]
        w = 2 * wo[:, None] + (co % 2)[None, :]
        return b[:, None] * sb + c[None, :] * sc + h * sh + w * sw
    return b[:, None] * sb + co[None, :] * sc + ho[:, None] * sh + wo[:, None] * sw


@triton.jit
def _epilogue(
    z, Y_ptr, syb, syc, syh, syw, BIAS_ptr, SCALE_ptr, SHIFT_ptr, R_ptr, srb, src, srh, srw,
    b, ho, wo, m_mask, co, n_mask,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, SHUFFLE: tl.constexpr,
):  # fmt: skip
    """Store act(z + bias) * post_scale + post_shift + residual for the tile's positions x channels."""
    bias, scale, shift = _channel_rows(BIAS_ptr, SCALE_ptr, SHIFT_ptr, co, n_mask, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    _finish(
        z, bias, scale, shift, Y_ptr, syb, syc, syh, syw, R_ptr, srb, src, srh, srw, b, ho, wo, m_mask, co, n_mask,
        ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, SHUFFLE,
    )  # fmt: skip


@triton.jit
def _channel_rows(
    BIAS_ptr, SCALE_ptr, SHIFT_ptr, co, n_mask, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):  # fmt: skip
    """The epilogue's per-channel terms as fp32 (1, BLOCK_N) rows: bias, post_scale, post_shift (zero, and never
    read, where the flag is unset). Loaded once by a kernel whose loop stores several tiles: inside the loop the
    compiler cannot hoist them past the stores, which may alias."""
    bias = tl.zeros((1, co.shape[0]), tl.float32)
    scale = bias
    shift = bias
    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        scale = tl.load(SCALE_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        shift = tl.load(SHIFT_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return bias, scale, shift


@triton.jit
def _finish(
    z, bias, scale, shift, Y_ptr, syb, syc, syh, syw, R_ptr, srb, src, srh, srw, b, ho, wo, m_mask, co, n_mask,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, SHUFFLE: tl.constexpr,
):  # fmt: skip
    """_epilogue with its per-channel rows given (_channel_rows)."""
    if HAS_BIAS:
        z += bias
    y = _act(z, ACT)
    if HAS_SCALE:
        y *= scale
    if HAS_SHIFT:
        y += shift
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r_offs = _out_offsets(b, ho, wo, co, srb, src, srh, srw, SHUFFLE)
        y += tl.load(R_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
    y_offs = _out_offsets(b, ho, wo, co, syb, syc, syh, syw, SHUFFLE)
    tl.store(Y_ptr + y_offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bn_act_fwd_kernel(
    Y_ptr, syb, syc, syh, syw,  # output (B, Cout, Ho, Wo), or (B, Cout/4, 2*Ho, 2*Wo) with SHUFFLE
    X_ptr, sxb, sxc, sxh, sxw,  # input (B, Cin, H, W)
    W_ptr, swo, swi, swh, sww,  # weight (Cout, Cin/G, KH, KW)
    BIAS_ptr, SCALE_ptr, SHIFT_ptr,  # (Cout,) each, read when the HAS_ flag is set
    R_ptr, srb, src, srh, srw,  # residual, shaped as the output
    PART_ptr,  # fp32 (SPLIT, M, Cout) with SPLIT_K: this program's partial sums, no epilogue
    M, COUT, CIN_G, COUT_G, TILES_N, K_PER_SPLIT, H, W, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    SHUFFLE: tl.constexpr, DEPTHWISE: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, ho, wo, m_mask = _positions(pid_m, M, HO, WO, BLOCK_M)
    co, n_mask, g = _out_channels(tl.program_id(1), COUT, COUT_G, TILES_N, BLOCK_N, DEPTHWISE)
    split = tl.program_id(2)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, KH * KW * tl.cdiv(CIN_G, BLOCK_K))
    z = _conv_tile(
        X_ptr, sxb, sxc, sxh, sxw, W_ptr, swo, swi, swh, sww, b, ho, wo, m_mask, co, n_mask, g, k_start, k_end,
        CIN_G, COUT_G, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        KH, KW, DEPTHWISE, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if SPLIT_K:
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        part = PART_ptr + (split.to(tl.int64) * M + rows)[:, None] * COUT + co[None, :]
        tl.store(part, z, mask=m_mask[:, None] & n_mask[None, :])
    else:
        _epilogue(
            z, Y_ptr, syb, syc, syh, syw, BIAS_ptr, SCALE_ptr, SHIFT_ptr, R_ptr, srb, src, srh, srw,
            b, ho, wo, m_mask, co, n_mask, ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, SHUFFLE,
        )  # fmt: skip


@triton.jit
def _conv_bn_act_fwd_tma_kernel(
    Y_ptr, syb, syc, syh, syw,  # output (B, Cout, Ho, Wo), or (B, Cout/4, 2*Ho, 2*Wo) with SHUFFLE
    x_desc,  # (B, H, W, Cin): the channels_last input, blocks (1, BLOCK_H, BLOCK_W, BLOCK_K)
    w_desc,  # (Cout, KH, KW, Cin): the packed weights, blocks (BLOCK_N, 1, 1, BLOCK_K)
    BIAS_ptr, SCALE_ptr, SHIFT_ptr,  # (Cout,) each, read when the HAS_ flag is set
    R_ptr, srb, src, srh, srw,  # residual, shaped as the output
    COUT, CIN, HO, WO, TILES_H, TILES_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    SHUFFLE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The stride-1 dense conv with both operands fetched by tensor descriptors (TMA on Hopper): a program
    computes a BLOCK_H x BLOCK_W rectangle of one image's output positions; the tap's input window is the
    rectangle shifted by (kh*DIL_H - PAD_H, kw*DIL_W - PAD_W), and the copy engine fills what falls outside
    the image (the padding) and past Cin with zeros: no index math or masks in the loop."""
    pid = tl.program_id(0)
    tw = pid % TILES_W
    t = pid // TILES_W
    oh0 = (t % TILES_H) * BLOCK_H
    ow0 = tw * BLOCK_W
    b = t // TILES_H
    n0 = tl.program_id(1) * BLOCK_N
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tiles_c = tl.cdiv(CIN, BLOCK_K)
    for kk in range(KH * KW * tiles_c):
        r = kk // tiles_c
        k0 = (kk - r * tiles_c) * BLOCK_K
        kh = r // KW
        kw = r - kh * KW
        a = x_desc.load([b, oh0 + kh * DIL_H - PAD_H, ow0 + kw * DIL_W - PAD_W, k0]).reshape(BLOCK_M, BLOCK_K)
        w = w_desc.load([n0, kh, kw, k0]).reshape(BLOCK_N, BLOCK_K)
        if UPCAST:  # the interpreter's low-precision dot is wrong: products in fp32 there
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
    offs = tl.arange(0, BLOCK_M)
    ho = oh0 + offs // BLOCK_W
    wo = ow0 + offs % BLOCK_W
    co = n0 + tl.arange(0, BLOCK_N)
    bb = tl.full((BLOCK_M,), b, tl.int64)
    _epilogue(
        acc, Y_ptr, syb, syc, syh, syw, BIAS_ptr, SCALE_ptr, SHIFT_ptr, R_ptr, srb, src, srh, srw,
        bb, ho, wo, (ho < HO) & (wo < WO), co.to(tl.int64), co < COUT,
        ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, SHUFFLE,
    )  # fmt: skip


@triton.jit
def _shifted_row(x_row, wi, W, sxw, c_off, c_mask, row_ok):
    """Input row x_row (the pointer of its (b, h)) at columns wi - 1, wi, wi + 1 (wi: the input column under each
    output column's kernel centre): three (BLOCK_W, BLOCK_C) fp32 tiles, zero outside the map (the padding)."""
    left, right = wi - 1, wi + 1
    cols = c_off[None, :]
    m_l = (row_ok & (left >= 0) & (left < W))[:, None] & c_mask[None, :]
    m_c = (row_ok & (wi < W))[:, None] & c_mask[None, :]
    m_r = (row_ok & (right < W))[:, None] & c_mask[None, :]
    x_l = widen(tl.load(x_row + (left.to(tl.int64) * sxw)[:, None] + cols, mask=m_l, other=0.0))
    x_c = widen(tl.load(x_row + (wi.to(tl.int64) * sxw)[:, None] + cols, mask=m_c, other=0.0))
    x_r = widen(tl.load(x_row + (right.to(tl.int64) * sxw)[:, None] + cols, mask=m_r, other=0.0))
    return x_l, x_c, x_r


@triton.jit
def _kernel_row(W_ptr, c, c_mask, swo, swh, sww, KH: tl.constexpr):
    """Row KH of the (C, 1, 3, 3) depthwise weight: three (1, BLOCK_C) fp32 tap vectors."""
    w = W_ptr + c * swo + KH * swh
    w0 = tl.load(w, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w + sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w + 2 * sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return w0, w1, w2


@triton.jit
def _conv_bn_act_fwd_dw3_kernel(
    Y_ptr, syb, syc, syh, syw,  # output (B, C, HO, WO)
    X_ptr, sxb, sxc, sxh, sxw,  # input (B, C, H, W)
    W_ptr, swo, swh, sww,  # depthwise weight (C, 1, 3, 3)
    BIAS_ptr, SCALE_ptr, SHIFT_ptr,  # (C,) each, read when the HAS_ flag is set
    R_ptr, srb, src, srh, srw,  # residual, shaped as the output
    C, H, W, HO, WO, ROWS, TILES_H, TILES_W,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, STRIDE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The 3x3 depthwise conv (stride 1 or 2, padding 1), sliding down the rows: a program owns ROWS output rows
    of a BLOCK_W-wide strip of one image and BLOCK_C channels, and reads each input row once per kernel column
    (three shifted tiles), not once per tap (nine, the direct kernel's).
    Stride 1: input row r completes output row r - 1 with the kernel's last row (then stored), adds its middle
    row to output row r and starts output row r + 1 with its first row: two fp32 accumulators roll down with r.
    Stride 2: output row o takes input rows 2o - 1, 2o and 2o + 1; the last starts output row o + 1 too, so one
    accumulator rolls down, two input rows a step."""
    pid = tl.program_id(0)
    tw = pid % TILES_W
    t = pid // TILES_W
    r0 = (t % TILES_H) * ROWS
    b = (t // TILES_H).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    wo = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    w00, w01, w02 = _kernel_row(W_ptr, c, c_mask, swo, swh, sww, 0)
    w10, w11, w12 = _kernel_row(W_ptr, c, c_mask, swo, swh, sww, 1)
    w20, w21, w22 = _kernel_row(W_ptr, c, c_mask, swo, swh, sww, 2)
    bias, scale, shift = _channel_rows(BIAS_ptr, SCALE_ptr, SHIFT_ptr, c, c_mask, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    x_b = X_ptr + b * sxb
    c_off = c * sxc
    bb = tl.zeros((BLOCK_W,), tl.int64) + b
    r1 = tl.minimum(r0 + ROWS, HO)
    if STRIDE == 1:
        above = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)  # output row r - 1
        here = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)  # output row r
        x_row = x_b + (r0 - 1).to(tl.int64) * sxh  # input row r
        for r in range(r0 - 1, r1 + 1):
            x_l, x_c, x_r = _shifted_row(x_row, wo, W, sxw, c_off, c_mask, (r >= 0) & (r < H))
            x_row += sxh
            above += x_l * w20 + x_c * w21 + x_r * w22
            ho = tl.zeros((BLOCK_W,), tl.int64) + (r - 1)
            _finish(
                above, bias, scale, shift, Y_ptr, syb, syc, syh, syw, R_ptr, srb, src, srh, srw,
                bb, ho, wo, (wo < WO) & (r - 1 >= r0), c, c_mask, ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, False,
            )  # fmt: skip
            above = here + x_l * w10 + x_c * w11 + x_r * w12
            here = x_l * w00 + x_c * w01 + x_r * w02
    else:
        wi = 2 * wo
        x_row = x_b + (2 * r0 - 1).to(tl.int64) * sxh  # input row 2 * r0 - 1: the kernel's first row for row r0
        x_l, x_c, x_r = _shifted_row(x_row, wi, W, sxw, c_off, c_mask, r0 > 0)
        top = x_l * w00 + x_c * w01 + x_r * w02  # output row o's first kernel row
        for o in range(r0, r1):
            x_row += sxh  # input row 2o: inside the map for every output row
            x_l, x_c, x_r = _shifted_row(x_row, wi, W, sxw, c_off, c_mask, True)
            acc = top + x_l * w10 + x_c * w11 + x_r * w12
            x_row += sxh  # input row 2o + 1: past the map's last row when H is odd
            x_l, x_c, x_r = _shifted_row(x_row, wi, W, sxw, c_off, c_mask, 2 * o + 1 < H)
            acc += x_l * w20 + x_c * w21 + x_r * w22
            top = x_l * w00 + x_c * w01 + x_r * w02
            ho = tl.zeros((BLOCK_W,), tl.int64) + o
            _finish(
                acc, bias, scale, shift, Y_ptr, syb, syc, syh, syw, R_ptr, srb, src, srh, srw,
                bb, ho, wo, wo < WO, c, c_mask, ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, False,
            )  # fmt: skip


@triton.jit
def _conv_bn_act_splitk_epilogue_kernel(
    Y_ptr, syb, syc, syh, syw,  # output, as the forward kernel's
    PART_ptr,  # fp32 (SPLIT, M, Cout): the forward's split-K partial sums
    BIAS_ptr, SCALE_ptr, SHIFT_ptr,
    R_ptr, srb, src, srh, srw,
    M, COUT, SPLIT, HO, WO,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, SHUFFLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Sum the split-K partials in a fixed order (deterministic, no atomics) and apply the fused epilogue."""
    pid_m = tl.program_id(0)
    b, ho, wo, m_mask = _positions(pid_m, M, HO, WO, BLOCK_M)
    co = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = co < COUT
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = m_mask[:, None] & n_mask[None, :]
    part = PART_ptr + rows[:, None] * COUT + co[None, :]
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    step = M.to(tl.int64) * COUT  # M and COUT are i32: their product wraps past 2^31 elements a split
    for _ in range(SPLIT):
        z += tl.load(part, mask=mask, other=0.0)
        part += step
    _epilogue(
        z, Y_ptr, syb, syc, syh, syw, BIAS_ptr, SCALE_ptr, SHIFT_ptr, R_ptr, srb, src, srh, srw,
        b, ho, wo, m_mask, co, n_mask, ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, SHUFFLE,
    )  # fmt: skip


@triton.jit
def _separable_conv_bn_act_fwd_kernel(
    Y_ptr, syb, syc, syh, syw,  # output (B, Cout, Ho, Wo)
    X_ptr, sxb, sxc, sxh, sxw,  # input (B, C, H, W)
    DW_ptr, sdc, sdh, sdw,  # depthwise weight (C, 1, KH, KW)
    DB_ptr,  # depthwise bias (C,), read with HAS_DW_BIAS
    PW_ptr, spo, spi,  # pointwise weight (Cout, C, 1, 1)
    BIAS_ptr, SCALE_ptr, SHIFT_ptr,  # the pointwise conv's (Cout,) vectors, read when the HAS_ flag is set
    R_ptr, srb, src, srh, srw,  # residual, shaped as the output
    M, C, COUT, H, W, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, DW_ACT: tl.constexpr, HAS_DW_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A depthwise conv block feeding a 1x1 conv block, the depthwise output never written: per block of
    BLOCK_K channels, the depthwise tile d = dw_act(dwconv(x) + dw_bias) of the tile's positions is computed
    in registers, cast to x's dtype (as the unfused pair stores it) and multiplied into the 1x1 conv's tile."""
    b, ho, wo, m_mask = _positions(tl.program_id(0), M, HO, WO, BLOCK_M)
    co = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = co < COUT
    x_b = X_ptr + b * sxb
    h0 = ho * STRIDE_H - PAD_H
    w0 = wo * STRIDE_W - PAD_W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        ci = c0 + tl.arange(0, BLOCK_K)
        k_mask = ci < C
        d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r in range(KH * KW):
            kh = r // KW
            kw = r % KW
            hi = h0 + kh * DIL_H
            wi = w0 + kw * DIL_W
            inside = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            x_pos = x_b + hi * sxh + wi * sxw
            x = tl.load(x_pos[:, None] + ci[None, :] * sxc, mask=inside[:, None] & k_mask[None, :], other=0.0)
            tap = tl.load(DW_ptr + ci * sdc + kh * sdh + kw * sdw, mask=k_mask, other=0.0)
            d += x.to(tl.float32) * tap.to(tl.float32)[None, :]
        if HAS_DW_BIAS:
            d += tl.load(DB_ptr + ci, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        d = tl.where(k_mask[None, :], _act(d, DW_ACT), 0.0).to(X_ptr.dtype.element_ty)
        w = tl.load(PW_ptr + co[None, :] * spo + ci[:, None] * spi, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's low-precision dot is wrong: products in fp32 there
            d = d.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(d, w, acc, input_precision=PRECISION)
    _epilogue(
        acc, Y_ptr, syb, syc, syh, syw, BIAS_ptr, SCALE_ptr, SHIFT_ptr, R_ptr, srb, src, srh, srw,
        b, ho, wo, m_mask, co, n_mask, ACT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_RES, False,
    )  # fmt: skip


@triton.jit
def _conv_bn_act_bwd_dz_kernel(
    DZ_ptr,  # fp32 (B, Cout, Ho*Wo) contiguous: g * post_scale * act'(z)
    PART_ptr,  # fp32 (3, TILES_M, Cout) partial sums over this tile's positions of dz, g*act(z), g
    G_ptr, sgb, sgc, sgh, sgw,  # output gradient, shaped as the output (shuffled with SHUFFLE)
    X_ptr, sxb, sxc, sxh, sxw,
    W_ptr, swo, swi, swh, sww,
    BIAS_ptr, SCALE_ptr,
    M, COUT, CIN_G, COUT_G, TILES_N, H, W, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    SHUFFLE: tl.constexpr, DEPTHWISE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, ho, wo, m_mask = _positions(pid_m, M, HO, WO, BLOCK_M)
    co, n_mask, g = _out_channels(tl.program_id(1), COUT, COUT_G, TILES_N, BLOCK_N, DEPTHWISE)
    z = _conv_tile(
        X_ptr, sxb, sxc, sxh, sxw, W_ptr, swo, swi, swh, sww, b, ho, wo, m_mask, co, n_mask, g,
        0, KH * KW * tl.cdiv(CIN_G, BLOCK_K), CIN_G, COUT_G, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        KH, KW, DEPTHWISE, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        z += tl.load(BIAS_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    grad = tl.load(G_ptr + _out_offsets(b, ho, wo, co, sgb, sgc, sgh, sgw, SHUFFLE), mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    ga = tl.sum(grad * _act(z, ACT), axis=0)
    gsum = tl.sum(grad, axis=0)
    if HAS_SCALE:
        grad *= tl.load(SCALE_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dz = tl.where(mask, grad * _act_grad(z, ACT), 0.0)
    hw = HO * WO
    dz_offs = (b * COUT)[:, None] * hw + co[None, :] * hw + (ho * WO + wo)[:, None]
    # stored rounded where the dx and dW kernels multiply it in TF32 dots (the depthwise ones take it in FMAs)
    tl.store(DZ_ptr + dz_offs, dz if DEPTHWISE else round_tf32(dz, PRECISION), mask=mask)
    part = PART_ptr + pid_m.to(tl.int64) * COUT + co
    stride_part = tl.num_programs(0).to(tl.int64) * COUT
    tl.store(part, tl.sum(dz, axis=0), mask=n_mask)
    tl.store(part + stride_part, ga, mask=n_mask)
    tl.store(part + 2 * stride_part, gsum, mask=n_mask)


@triton.jit
def _conv_bn_act_bwd_dx_kernel(
    DX_ptr, sdb, sdc, sdh, sdw,  # input gradient (B, Cin, H, W), any strides
    DZ_ptr,  # fp32 (B, Cout, Ho*Wo) contiguous
    W_ptr, swo, swi, swh, sww,
    M, CIN, CIN_G, COUT, COUT_G, TILES_N, H, W, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, DEPTHWISE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows: input positions (b, h, w); columns: input channels (of one group, or any with DEPTHWISE);
    reduction over the group's output channels and the taps that reach (h, w)."""
    b, h, w, m_mask = _positions(tl.program_id(0), M, H, W, BLOCK_M)
    pid_n = tl.program_id(1)
    if DEPTHWISE:
        ci = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = ci < CIN
        g = ci
    else:
        g = pid_n // TILES_N
        ci_local = (pid_n % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = ci_local < CIN_G
        ci = g.to(tl.int64) * CIN_G + ci_local
    hw = HO * WO
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(KH * KW):
        kh = r // KW
        kw = r % KW
        hn = h + PAD_H - kh * DIL_H
        wn = w + PAD_W - kw * DIL_W
        hn_pos = tl.maximum(hn, 0)
        wn_pos = tl.maximum(wn, 0)
        ho = hn_pos // STRIDE_H
        wo = wn_pos // STRIDE_W
        hit = m_mask & (hn >= 0) & (wn >= 0) & (hn_pos % STRIDE_H == 0) & (wn_pos % STRIDE_W == 0)
        hit = hit & (ho < HO) & (wo < WO)
        dz_pos = DZ_ptr + b * COUT * hw + ho * WO + wo  # (BLOCK_M,) pointers at output channel 0
        if DEPTHWISE:
            for j in range(COUT_G):  # the channel multiplier: output channels g*COUT_G + j read channel g
                co = g * COUT_G + j
                d = tl.load(dz_pos[:, None] + co[None, :] * hw, mask=hit[:, None] & n_mask[None, :], other=0.0)
                tap = tl.load(W_ptr + co * swo + kh * swh + kw * sww, mask=n_mask, other=0.0)
                acc += d * tap.to(tl.float32)[None, :]
        else:
            for c0 in range(0, COUT_G, BLOCK_K):
                co_local = c0 + tl.arange(0, BLOCK_K)
                k_mask = co_local < COUT_G
                co = g * COUT_G + co_local
                d = tl.load(
                    dz_pos[:, None] + co[None, :].to(tl.int64) * hw, mask=hit[:, None] & k_mask[None, :], other=0.0
                )
                wt = tl.load(
                    W_ptr + co[:, None] * swo + ci_local[None, :] * swi + kh * swh + kw * sww,
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.dot(d, wt, input_precision=PRECISION)
    offs = b[:, None] * sdb + ci[None, :] * sdc + h[:, None] * sdh + w[:, None] * sdw
    tl.store(DX_ptr + offs, acc.to(DX_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _conv_bn_act_bwd_dw_kernel(
    PART_ptr,  # fp32 (SPLIT, KH*KW, Cout, Cin/G) partial dW[co, ci, tap]
    DZ_ptr,  # fp32 (B, Cout, Ho*Wo) contiguous
    X_ptr, sxb, sxc, sxh, sxw,
    M, COUT, CIN_G, COUT_G, TILES_N, TILES_CI, CHUNK, H, W, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KW: tl.constexpr, DEPTHWISE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (channel tile, tap, split): sum over positions [split*CHUNK, (split+1)*CHUNK) of
    dz[co, m] x[ci, m shifted by the tap]; the split partials are summed by the launcher."""
    pid_n = tl.program_id(0)
    r = tl.program_id(1)
    split = tl.program_id(2)
    kh = r // KW
    kw = r % KW
    if DEPTHWISE:
        co = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = co < COUT
        x_c = (co // COUT_G) * sxc
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        g = pid_n // (TILES_N * TILES_CI)
        tn = (pid_n // TILES_CI) % TILES_N
        co_local = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = co_local < COUT_G
        co = g.to(tl.int64) * COUT_G + co_local
        ci_local = (pid_n % TILES_CI) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_mask = ci_local < CIN_G
        x_c = (g.to(tl.int64) * CIN_G + ci_local) * sxc
        acc = tl.zeros((BLOCK_N, BLOCK_CI), dtype=tl.float32)
    hw = HO * WO
    start = split.to(tl.int64) * CHUNK
    for m0 in range(0, CHUNK, BLOCK_K):
        offs = start + m0 + tl.arange(0, BLOCK_K)
        wo = offs % WO
        b = offs // hw
        ho = (offs // WO) % HO
        m_mask = offs < tl.minimum(M, start + CHUNK)
        hi = ho * STRIDE_H - PAD_H + kh * DIL_H
        wi = wo * STRIDE_W - PAD_W + kw * DIL_W
        inside = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_pos = X_ptr + b * sxb + hi * sxh + wi * sxw  # (BLOCK_K,)
        dz_pos = DZ_ptr + b * COUT * hw + ho * WO + wo
        dz = tl.load(dz_pos[:, None] + co[None, :] * hw, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if DEPTHWISE:
            x = tl.load(x_pos[:, None] + x_c[None, :], mask=inside[:, None] & n_mask[None, :], other=0.0)
            acc += tl.sum(dz * x.to(tl.float32), axis=0)
        else:
            x = tl.load(x_pos[:, None] + x_c[None, :], mask=inside[:, None] & ci_mask[None, :], other=0.0)
            acc += tl.dot(tl.trans(dz), x.to(tl.float32), input_precision=PRECISION)
    base = PART_ptr + ((split.to(tl.int64) * tl.num_programs(1) + r) * COUT) * CIN_G
    if DEPTHWISE:
        tl.store(base + co, acc, mask=n_mask)
    else:
        tl.store(base + co[:, None] * CIN_G + ci_local[None, :], acc, mask=n_mask[:, None] & ci_mask[None, :])


def _pow2(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, next_pow2(n)))


def conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int):
    """Output size (Ho, Wo) and whether the depthwise kernel takes the conv."""
    H, W = x.shape[-2:]
    KH, KW = weight.shape[-2:]
    Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return Ho, Wo, weight.shape[1] == 1 and groups > 1


# the largest tile (rows, columns) of each implicit-GEMM kernel, (tensor-core products, full fp32 products), from
# the compile gate (python -m linattn audit) under triton 3.6 and 3.8: beyond these a configuration spills. What
# else is live beside the accumulator sets them: the pixel-shuffle store's indices, dz's output-gradient tile, dx's
# index math; full fp32 products keep both operands in registers beside 64-bit address tiles
MAX_TILES = {
    "fwd": ((128, 128), (64, 32)),
    "shuffle": ((128, 64), (64, 64)),
    "dz": ((128, 32), (64, 32)),
    "dx": ((64, 64), (64, 32)),
}


def _shrink(dev: Device, bm: int, bn: int, rows: int, cols: int, groups: int) -> tuple[int, int]:
    """Halve the wider side of a (bm, bn) tile, down to 64, while the grid does not fill the GPU once."""
    while max(bm, bn) > 64 and cdiv(rows, bm) * groups * cdiv(cols, bn) < dev.sms:
        if bn >= bm:
            bn //= 2
        else:
            bm //= 2
    return bm, bn


def _split_k(dev: Device, bm: int, bn: int, rows: int, cols: int, groups: int, k_iters: int) -> int:
    """Programs per output tile along the reduction: when the grid is under half the GPU and each program
    keeps at least 4 iterations (small maps at batch 1)."""
    tiles = cdiv(rows, bm) * groups * cdiv(cols, bn)
    if not dev.gpu or 2 * tiles > dev.sms or k_iters < 8:
        return 1
    return max(1, min(cdiv(dev.sms, tiles), k_iters // 4, 8))


def conv_config(
    dev: Device, rows: int, cols: int, red: int, depthwise: bool, low_precision: bool, kernel: str = "fwd",
    groups: int = 1, taps: int = 1, packed: bool = False, aligned: bool = True,
):  # fmt: skip
    """The heuristic configuration of the implicit-GEMM kernel `kernel` (a key of MAX_TILES): the first of
    conv_configs(), which says how it is chosen."""
    return conv_configs(dev, rows, cols, red, depthwise, low_precision, kernel, groups, taps, packed, aligned)[0]


# the other tiles (rows, columns) measured dispatch times beside the heuristic's (linattn/_tune.py) for packed
# tensor-core forwards, pruned to the problem and MAX_TILES
ALTERNATIVES = ((128, 128), (128, 64), (64, 128), (64, 64))
# the depthwise forward's, (rows, columns, warps, stages), pruned to the problem: it is memory-bound (the H100
# pass: Triton's 64 x 64 tiles and cuDNN both at 19-20% of copy bandwidth), so more loads in flight: more warps
# per tile, a taller tile, a deeper pipeline (8 warps on 128 x 64 or 64 x 128 spill on sm_90: the gate)
DW_ALTERNATIVES = ((64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3))


def conv_configs(
    dev: Device, rows: int, cols: int, red: int, depthwise: bool, low_precision: bool, kernel: str = "fwd",
    groups: int = 1, taps: int = 1, packed: bool = False, aligned: bool = True,
) -> list[dict]:  # fmt: skip
    """The configurations worth timing for one call of `kernel` with rows positions, cols channels per group (of
    `groups`) and red reduction channels per tap (of `taps`), the deterministic heuristic first.

    The interpreter runs programs one by one, each op vectorised, so on CPU the tiles are large and few. On a
    GPU (numbers from the compile gate, python -m linattn audit): the largest tile within MAX_TILES, halved
    while the grid does not fill the GPU once. `packed`: both operands are read along contiguous channels
    (channels_last x, K-contiguous weights), so every load is a 128-bit cp.async and deep pipelines cost
    shared memory, not registers: 64 channels per step, 3-4 stages, 8 warps from 64 x 64 up, the reduction
    split over programs when the grid stays under half the GPU, and ALTERNATIVES to time. Otherwise the loads
    of future steps wait in registers: 32 channels per step, 2 stages (3 at 128 columns), 8 warps from 64 x 32
    up. Full fp32 products 16 channels at a time, unpipelined. The backward's dz and dx kernels
    (fp32 dz tiles, more index math) keep the unpacked rule, unpipelined: 2 stages spill there. Depthwise
    convs: 64 x 64 tiles, 4 warps, 2 stages, and on a GPU's forward DW_ALTERNATIVES to time.

    `aligned` (_aligned()): Triton compiles the call's launch with its sizes divisible by 16 and its pointers
    16-byte aligned. Where not (SqueezeSAM's 164-channel convs, maps under 16 wide), it proves no 16-element run
    of addresses contiguous: loads and stores go element by element, each address live in registers, and no
    load is a cp.async. Such a call takes the unpacked rule with half the rows, on 8 warps (the compile gate,
    which compiles each specialization: the packed tiles spilled 0.2-2.6 KB there, the unpacked 8-300 bytes)."""
    if depthwise:
        block_n = _pow2(cols, 16, 64 if dev.gpu else 32)
        block_m = _pow2(rows, 16, 64 if dev.gpu else 256)
        if kernel == "dx":  # fp32 dz tiles in a loop over the channel multiplier: 8 warps, unpipelined
            return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, num_warps=8 if dev.gpu else 4, num_stages=1)]
        configs = [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, num_warps=4, num_stages=2 if dev.gpu else 1)]
        for bm, bn, warps, stages in DW_ALTERNATIVES if dev.gpu and kernel == "fwd" else ():
            cfg = dict(BLOCK_M=min(bm, _pow2(rows, 16, bm)), BLOCK_N=min(bn, _pow2(cols, 16, bn)), BLOCK_K=16,
                       num_warps=warps, num_stages=stages)  # fmt: skip
            if cfg not in configs:
                configs.append(cfg)
        return configs
    if not dev.gpu:
        return [dict(BLOCK_M=_pow2(rows, 16, 256), BLOCK_N=_pow2(cols, 16, 64), BLOCK_K=_pow2(red, 16, 64))]
    max_m, max_n = MAX_TILES[kernel][0 if low_precision else 1]
    if not aligned:
        max_m, packed = max_m // 2, False
    block_m = _pow2(rows, 16, max_m)
    block_n = _pow2(cols, 16, max_n if block_m == 128 or max_n <= 64 else 64)
    forward = kernel in ("fwd", "shuffle")
    if forward:
        block_m, block_n = _shrink(dev, block_m, block_n, rows, cols, groups)
    if not (forward and packed and low_precision):
        warps = 8 if block_m * block_n >= 64 * 32 or not aligned else 4
        if not low_precision:
            return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, num_warps=warps, num_stages=1)]
        stages = 1 if not forward else 3 if block_n == 128 else 2
        return [dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_pow2(red, 16, 32), num_warps=warps, num_stages=stages)]
    block_k = _pow2(red, 16, 64)
    big = 64 * 64  # 4 warps from 64 x 64 spill on sm_80 (its HMMA operands live in registers)
    configs = []
    for bm, bn in ((block_m, block_n), *ALTERNATIVES):
        bm, bn = min(bm, _pow2(rows, 16, max_m)), min(bn, _pow2(cols, 16, max_n))
        if not any(c["BLOCK_M"] == bm and c["BLOCK_N"] == bn for c in configs):
            warps = 8 if bm * bn >= big else 4
            stages = 3 if bm * bn >= 128 * 128 else 4
            configs.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, num_warps=warps, num_stages=stages, split=1))
    configs[0]["split"] = split = _split_k(dev, block_m, block_n, rows, cols, groups, taps * cdiv(red, block_k))
    if split > 1:  # the same tile without the split: the partials' traffic may cost more than it gains
        configs.append(dict(configs[0], split=1))
    return configs


def _dw_programs(cfg: dict, cout: int, cin_g: int, groups: int, depthwise: bool) -> int:
    """Programs per tap of the weight-gradient kernel: its channel tiles."""
    if depthwise:
        return cdiv(cout, cfg["BLOCK_N"])
    return groups * cdiv(cout // groups, cfg["BLOCK_N"]) * cdiv(cin_g, cfg["BLOCK_CI"])


def conv_dw_config(
    dev: Device, positions: int, cout: int, cin_g: int, groups: int, depthwise: bool, taps: int, low_precision: bool
) -> dict:
    """Tiles of the weight-gradient kernel and the split of its positions into chunks: enough programs to
    fill the GPU four times over (one chunk under the interpreter). Its reduction runs over positions:
    with full fp32 products 16 at a time, unpipelined, into at most 64 x 32 tiles (compile gate)."""
    if depthwise:
        cfg = dict(BLOCK_N=_pow2(cout, 16, 64 if dev.gpu else 32), BLOCK_CI=1)
    else:
        cfg = dict(BLOCK_N=_pow2(cout // groups, 16, 64), BLOCK_CI=_pow2(cin_g, 16, 64 if low_precision else 32))
    programs = _dw_programs(cfg, cout, cin_g, groups, depthwise) * taps
    split = max(1, 4 * dev.sms // programs) if dev.gpu else 1
    block_k = _pow2(positions, 16, (64 if low_precision else 16) if dev.gpu else 256)
    big = cfg["BLOCK_N"] * cfg["BLOCK_CI"] >= (64 * 64 if low_precision else 64 * 32)
    warps = 8 if dev.gpu and big else 4  # 4 warps spill from there (compile gate)
    return dict(cfg, BLOCK_K=block_k, split=split, num_warps=warps, num_stages=2 if low_precision else 1)


def _precision(x: torch.Tensor) -> dict:
    """UPCAST: fp16/bf16 products in fp32 under the interpreter (its low-precision dot is wrong; fp32 runs there as
    on a GPU). fp32 inputs take full fp32 products (docs/design.md 8); input_precision does not apply to fp16/bf16
    operands."""
    upcast = not x.is_cuda and x.dtype != torch.float32
    return dict(UPCAST=upcast, PRECISION="ieee" if (x.dtype == torch.float32 or upcast) else "tf32")


def _or(t, like):
    """t, or for an absent optional tensor any tensor of the call (its pointer is never read: its HAS_ flag is off)."""
    return like if t is None else t


def _epilogue_args(weight, bias, post_scale, post_shift, residual, out) -> tuple:
    """The forward kernels' epilogue operands: the three per-channel vectors, then the residual and its strides."""
    r = _or(residual, out)
    return (_or(bias, weight), _or(post_scale, weight), _or(post_shift, weight), r, *r.stride())


def _base_aligned(t: torch.Tensor) -> bool:
    """Whether t's data pointer is 16-byte aligned (fake tensors, the compile gate's, by their storage offset
    alone: the caching allocator's blocks are 512-byte aligned)."""
    if t.is_meta or isinstance(t, FakeTensor):
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


def _aligned(x: torch.Tensor, weight: torch.Tensor, Ho: int, Wo: int, groups: int) -> bool:
    """Whether the implicit-GEMM kernels see this call as the encoders' power-of-two calls: channels (per group
    too) and map sizes multiples of 16, x's strides 1 or multiples of 16, x and weight 16-byte aligned. Triton
    specializes on each (its outputs are fresh, and follow)."""
    Cout, cin_g = weight.shape[:2]
    sizes = (cin_g, Cout, Cout // groups, *x.shape[2:], Ho, Wo)
    if any(n % 16 for n in sizes) or any(s != 1 and s % 16 for s in x.stride()):
        return False
    return _base_aligned(x) and _base_aligned(weight)


def _problem(x, weight, stride, padding, dilation, groups: int, kernel: str) -> tuple:
    """conv_configs()'s arguments for a call (rows, columns, reduction per tap, taps, groups, packed, aligned)."""
    Cout, cin_g, KH, KW = weight.shape
    Ho, Wo, depthwise = conv_geometry(x, weight, stride, padding, dilation, groups)
    M = x.shape[0] * Ho * Wo
    low = x.dtype != torch.float32
    if depthwise:
        return (device_of(x), M, Cout, cin_g * KH * KW, True, low, kernel)
    packed = x.stride(1) == 1 and weight.stride(1) == 1
    aligned = _aligned(x, weight, Ho, Wo, groups)
    return (device_of(x), M, Cout // groups, cin_g, False, low, kernel, groups, KH * KW, packed, aligned)


def fwd_configs(x, weight, stride, padding, dilation, groups: int, shuffle: bool = False) -> list[dict]:
    """The forward's candidate configurations for this call on x's device, the heuristic first, then the
    tensor-descriptor kernel's and the row-sliding depthwise kernel's where they take the call."""
    problem = _problem(x, weight, stride, padding, dilation, groups, "shuffle" if shuffle else "fwd")
    conv = (x, weight, stride, padding, dilation, groups)
    rows = [] if shuffle else dw3_configs(problem[0], *conv)  # the row kernel stores in place only
    return conv_configs(*problem) + tma_configs(problem[0], *conv) + rows


def _desc_strides(t: torch.Tensor, dims: tuple[int, ...]) -> list[int]:
    """t's strides along dims for a tensor descriptor: a dim of size 1 is never stepped along, and takes the
    16 bytes a descriptor asks of every outer stride whatever t's (a 1x1 weight's taps, say)."""
    return [t.stride(d) if t.shape[d] > 1 else 16 // t.element_size() for d in dims]


def _tma_ready(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether a tensor descriptor can address t along dims (innermost last): that one contiguous, the others'
    strides and the base 16-byte aligned."""
    size, strides = t.element_size(), _desc_strides(t, dims)
    return strides[-1] == 1 and not any(stride * size % 16 for stride in strides[:-1]) and _base_aligned(t)


def tma_configs(dev: Device, x, weight, stride, padding, dilation, groups: int) -> list[dict]:
    """The tensor-descriptor forward's configurations (_conv_bn_act_fwd_tma_kernel) on a GPU with TMA, for the
    calls it takes: dense stride-1 convs of fp16/bf16 tensors read along contiguous, 16-byte aligned channels
    (channels_last x, packed weights, Cin a multiple of 8). Position tiles are rectangles of one image, 16
    wide (8 for narrower maps), of 128 or 64 positions. No 128-position tile on 8 warps with 3 or 4 stages: the
    fourth H100 pass had it wrong (triton 3.6), mostly in the lower rows of its tiles, whenever a grid held
    more than one wave, and exact at one wave; 2 stages on 8 warps, or 4 warps at any depth, were exact."""
    Cout, cin, _, _ = weight.shape
    takes = dev.tma and groups == 1 and tuple(stride) == (1, 1) and x.dtype in (torch.float16, torch.bfloat16)
    if not (takes and _tma_ready(x, (0, 2, 3, 1)) and _tma_ready(weight, (0, 2, 3, 1))):
        return []
    _, Wo, _ = conv_geometry(x, weight, stride, padding, dilation, groups)
    bw, bn, bk = _pow2(Wo, 8, 16), _pow2(Cout, 16, 128), _pow2(cin, 16, 64)
    return [
        dict(tma=True, BLOCK_H=128 // bw, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, num_warps=8, num_stages=2),
        dict(tma=True, BLOCK_H=128 // bw, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3),
        dict(tma=True, BLOCK_H=64 // bw, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4),
    ]


def dw3_configs(dev: Device, x, weight, stride, padding, dilation, groups: int) -> list[dict]:
    """The row-sliding depthwise forward's configurations (_conv_bn_act_fwd_dw3_kernel) on a GPU, for the calls it
    takes: 3x3 depthwise convs, one filter per channel, stride 1 or 2, padding 1, no dilation (the MBConv blocks'
    at every stage; stride 2: the downsampling MBConvs', whose direct kernel took 235 us a call at L0 and 465 at
    XL1 on the ninth H100 pass, 16 images: 11% of L0's kernel time, 4% of XL1's). Strips of 64 channels, 16
    columns on 4 warps or 32 on 8 (8 registers per thread for each of the six live fp32 tiles: 32 x 128 tiles
    took 200 registers in the gate); ROWS output rows per program, the most (up to 16) that still gives every SM
    four programs. Then the same with strips of 32 channels: a thread holds 4 channels, not 8, so its nine taps'
    fp32 weights take 36 registers, not 72 (L0's bf16 channels_last calls: 80-96 registers, 16-24 warps an SM,
    where the 64-channel strips take 150-155, 8-12; sm_90 compile gate), which won at most stride-1 calls on the
    ninth H100 pass. Stride 2 not yet timed on a GPU."""
    C, cin_g, KH, KW = weight.shape
    geometry = (tuple(padding), tuple(dilation), (KH, KW))
    takes = tuple(stride) in ((1, 1), (2, 2)) and geometry == ((1, 1), (1, 1), (3, 3))
    if not (dev.gpu and takes and cin_g == 1 and groups == C == x.shape[1]):
        return []
    B = x.shape[0]
    Ho, Wo, _ = conv_geometry(x, weight, stride, padding, dilation, groups)
    configs = []
    strips = (_pow2(C, 16, 64), _pow2(C, 16, 32))
    if stride[0] == 2 and x.dtype == torch.float32:
        strips = strips[1:]  # fp32 64-channel strips on 4 warps spill 8-16 bytes there (sm_90 compile gate)
    for bc in strips:
        for bw, warps in ((16, 4), (32, 8)):
            bw = _pow2(Wo, 8, bw)
            programs = B * cdiv(Wo, bw) * cdiv(C, bc)
            rows = next(r for r in (16, 8, 4, 2, 1) if r == 1 or programs * cdiv(Ho, r) >= 4 * dev.sms)
            cfg = dict(dw3=True, BLOCK_W=bw, BLOCK_C=bc, ROWS=rows, num_warps=warps, num_stages=2)
            if cfg not in configs:
                configs.append(cfg)
    return configs


def _launch_dw3(x, weight, stride, Ho, Wo, epilogue: dict, out, cfg: dict) -> Callable:
    """The forward on _conv_bn_act_fwd_dw3_kernel (cfg: one of dw3_configs(), without its "dw3" key), prepared."""
    B, C, H, W = x.shape
    rows = cfg.pop("ROWS")
    tiles_h, tiles_w = cdiv(Ho, rows), cdiv(Wo, cfg["BLOCK_W"])
    grid = (B * tiles_h * tiles_w, cdiv(C, cfg["BLOCK_C"]))
    flags = {k: v for k, v in epilogue.items() if k != "SHUFFLE"}  # the row kernel stores in place only
    flags["STRIDE"] = stride[0]
    os, xs, ws = out.stride(), x.stride(), (weight.stride(0), *weight.stride()[2:])
    sizes = (C, H, W, Ho, Wo, rows, tiles_h, tiles_w)
    kernel = KernelLaunch(_conv_bn_act_fwd_dw3_kernel, grid, **flags, **cfg)

    def launch(x, weight, bias, post_scale, post_shift, residual, out, compile_only=False):
        kernel(
            out, *os, x, *xs, weight, *ws, *_epilogue_args(weight, bias, post_scale, post_shift, residual, out),
            *sizes, compile_only=compile_only,
        )  # fmt: skip
        return out

    return launch


def _launch_tma(x, weight, padding, dilation, Ho, Wo, epilogue: dict, out, cfg: dict) -> Callable:
    """The forward on _conv_bn_act_fwd_tma_kernel (cfg: one of tma_configs(), without its "tma" key), prepared; the
    tensor descriptors are made per call (they hold the tensors' addresses)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    bh, bw, bn, bk = cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x_desc = ([B, H, W, cin], _desc_strides(x, (0, 2, 3, 1)), [1, bh, bw, bk])
    w_desc = ([Cout, KH, KW, cin], _desc_strides(weight, (0, 2, 3, 1)), [bn, 1, 1, bk])
    tiles_h, tiles_w = cdiv(Ho, bh), cdiv(Wo, bw)
    grid = (B * tiles_h * tiles_w, cdiv(Cout, bn))
    os = out.stride()
    sizes = (Cout, cin, Ho, Wo, tiles_h, tiles_w, *padding, *dilation)
    flags = dict(KH=KH, KW=KW, **epilogue, **_precision(x), **cfg)
    kernel = KernelLaunch(_conv_bn_act_fwd_tma_kernel, grid, **flags)

    def launch(x, weight, bias, post_scale, post_shift, residual, out, compile_only=False):
        kernel(
            out, *os, TensorDescriptor(x, *x_desc), TensorDescriptor(weight, *w_desc),
            *_epilogue_args(weight, bias, post_scale, post_shift, residual, out), *sizes, compile_only=compile_only,
        )  # fmt: skip
        return out

    return launch


def conv_bn_act_fwd(
    x, weight, bias, stride, padding, dilation, groups: int, act: str, post_scale, post_shift, residual, out,
    shuffle: bool = False, config: dict | None = None, compile_only: bool = False,
):  # fmt: skip
    """Write act(conv2d(x, weight, bias) ...) * post_scale + post_shift + residual into out.

    out is (B, Cout, Ho, Wo), or (B, Cout/4, 2*Ho, 2*Wo) with shuffle (residual shaped as out);
    any strides for x, weight, residual and out (weights read fastest K-contiguous: channels_last
    (Cout, KH, KW, Cin) strides). config: one of fwd_configs(), to launch another configuration or
    another device's choice (the tests run a GPU's tiles under the interpreter); None: the heuristic.
    With config["split"] > 1 the reduction is split over that many programs, whose fp32 partials a
    second kernel sums before the epilogue; config["tma"]: the tensor-descriptor kernel (tma_configs());
    config["dw3"]: the row-sliding depthwise kernel (dw3_configs()).
    compile_only: compile the kernels this call launches, launch nothing."""
    launch = fwd_launch(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out,
                        shuffle, config)  # fmt: skip
    return launch(x, weight, bias, post_scale, post_shift, residual, out, compile_only)


def fwd_launch(
    x, weight, bias, stride, padding, dilation, groups: int, act: str, post_scale, post_shift, residual, out,
    shuffle: bool = False, config: dict | None = None,
) -> Callable:  # fmt: skip
    """conv_bn_act_fwd for calls like this one, prepared: the geometry, configuration, grids, strides and flags
    worked out once, into `launch(x, weight, bias, post_scale, post_shift, residual, out, compile_only=False)`,
    which launches the kernels on those tensors. They must be laid out as this call's (sizes, strides, dtypes and
    devices, which optional ones are given; linattn/_tune.py `plan` keys a call so): the launch holds no tensor,
    only what their layout decides. A call plan keeps it, so a planned call does no host work but the launch's."""
    B, _, H, W = x.shape
    Cout, cin_g, KH, KW = weight.shape
    Ho, Wo, depthwise = conv_geometry(x, weight, stride, padding, dilation, groups)
    cout_g = Cout // groups
    M = B * Ho * Wo
    cfg = dict(config or fwd_configs(x, weight, stride, padding, dilation, groups, shuffle)[0])
    epilogue = dict(
        ACT=ACTIVATIONS.index(act), HAS_BIAS=bias is not None, HAS_SCALE=post_scale is not None,
        HAS_SHIFT=post_shift is not None, HAS_RES=residual is not None, SHUFFLE=shuffle,
    )  # fmt: skip
    if cfg.pop("tma", False):
        return _launch_tma(x, weight, padding, dilation, Ho, Wo, epilogue, out, cfg)
    if cfg.pop("dw3", False):
        return _launch_dw3(x, weight, stride, Ho, Wo, epilogue, out, cfg)
    k_iters = KH * KW * cdiv(cin_g, cfg["BLOCK_K"])
    split = 1 if depthwise else max(1, min(cfg.pop("split", 1), k_iters))
    k_per_split = cdiv(k_iters, split)
    split = cdiv(k_iters, k_per_split)
    tiles_n = cdiv(cout_g, cfg["BLOCK_N"])
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(Cout, cfg["BLOCK_N"]) if depthwise else groups * tiles_n, split)
    os, xs, ws = out.stride(), x.stride(), weight.stride()
    sizes = (M, Cout, cin_g, cout_g, tiles_n, k_per_split, H, W, Ho, Wo, *stride, *padding, *dilation)
    flags = dict(KH=KH, KW=KW, DEPTHWISE=depthwise, SPLIT_K=split > 1, **epilogue, **_precision(x), **cfg)
    block_m, block_n = 32, _pow2(Cout, 16, 128)  # the split-K epilogue's tiles
    sum_grid = (cdiv(M, block_m), cdiv(Cout, block_n))
    sum_flags = dict(**epilogue, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    kernel = KernelLaunch(_conv_bn_act_fwd_kernel, grid, **flags)
    epilogue_kernel = KernelLaunch(_conv_bn_act_splitk_epilogue_kernel, sum_grid, **sum_flags)

    def launch(x, weight, bias, post_scale, post_shift, residual, out, compile_only=False):
        epi = _epilogue_args(weight, bias, post_scale, post_shift, residual, out)
        parts = torch.empty((split, M, Cout), device=x.device, dtype=torch.float32) if split > 1 else out
        kernel(out, *os, x, *xs, weight, *ws, *epi, parts, *sizes, compile_only=compile_only)
        if split > 1:
            epilogue_kernel(out, *os, parts, *epi, M, Cout, split, Ho, Wo, compile_only=compile_only)
        return out

    return launch


def separable_config(dev: Device, rows: int, channels: int, cout: int, low_precision: bool) -> dict:
    """Tiles of the separable kernel: every output channel in one tile where it fits (up to 256, so the
    depthwise tile is computed once per position tile), 32 channels per step: the depthwise tile accumulates
    in fp32 registers beside the output tile, so the steps are not pipelined; full fp32 products 16 at a time.
    The ninth H100 pass timed two more candidates at the 16 L0 and XL1 calls (bf16, 16 images and 1): the steps
    pipelined over two stages under 168 registers, and 64-channel steps. Both were slower at every call (by
    5-42%), and the kernel itself 2.0-14x slower than the pair unfused (dispatch's reference), so the
    configurations were dropped: measured dispatch keeps the pair unfused there."""
    if not dev.gpu:
        return dict(BLOCK_M=_pow2(rows, 16, 128), BLOCK_N=_pow2(cout, 16, 64), BLOCK_K=_pow2(channels, 16, 32))
    block_n = _pow2(cout, 16, 256 if low_precision else 64)
    block_m = 64 if block_n <= 128 else 32
    block_k = _pow2(channels, 16, 32 if low_precision else 16)
    warps = 8 if block_m * block_n >= 64 * 64 else 4  # 4 warps spill there on sm_80 (compile gate)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1)


def separable_conv_bn_act_fwd(
    x, dw_weight, dw_bias, stride, padding, dilation, dw_act: str, weight, bias, act: str, post_scale, post_shift,
    residual, out, config: dict | None = None,
):  # fmt: skip
    """Write act(conv1x1(dw_act(depthwise_conv(x, dw_weight) + dw_bias), weight) + bias) * post_scale + post_shift
    + residual into out (B, Cout, Ho, Wo); any strides. config: separable_config()'s dict (None: this
    device's)."""
    call = (x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale, post_shift)
    launch = separable_launch(*call, residual, out, config)
    return launch(x, dw_weight, dw_bias, weight, bias, post_scale, post_shift, residual, out)


def separable_launch(
    x, dw_weight, dw_bias, stride, padding, dilation, dw_act: str, weight, bias, act: str, post_scale, post_shift,
    residual, out, config: dict | None = None,
) -> Callable:  # fmt: skip
    """separable_conv_bn_act_fwd for calls like this one, prepared (as fwd_launch): `launch(x, dw_weight, dw_bias,
    weight, bias, post_scale, post_shift, residual, out)` for tensors laid out as these."""
    B, C, H, W = x.shape
    Cout = weight.shape[0]
    KH, KW = dw_weight.shape[-2:]
    Ho, Wo, _ = conv_geometry(x, dw_weight, stride, padding, dilation, C)
    M = B * Ho * Wo
    cfg = config or separable_config(device_of(x), M, C, Cout, x.dtype != torch.float32)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(Cout, cfg["BLOCK_N"]))
    os, xs = out.stride(), x.stride()
    dws, ws = (dw_weight.stride(0), *dw_weight.stride()[2:]), (weight.stride(0), weight.stride(1))
    sizes = (M, C, Cout, H, W, Ho, Wo, *stride, *padding, *dilation)
    kernel = KernelLaunch(
        _separable_conv_bn_act_fwd_kernel, grid,
        KH=KH, KW=KW, DW_ACT=ACTIVATIONS.index(dw_act), HAS_DW_BIAS=dw_bias is not None, ACT=ACTIVATIONS.index(act),
        HAS_BIAS=bias is not None, HAS_SCALE=post_scale is not None, HAS_SHIFT=post_shift is not None,
        HAS_RES=residual is not None, **_precision(x), **cfg,
    )  # fmt: skip

    def launch(x, dw_weight, dw_bias, weight, bias, post_scale, post_shift, residual, out):
        kernel(
            out, *os, x, *xs, dw_weight, *dws, _or(dw_bias, dw_weight), weight, *ws,
            *_epilogue_args(weight, bias, post_scale, post_shift, residual, out), *sizes,
        )  # fmt: skip
        return out

    return launch


def conv_bn_act_bwd(
    grad_out, x, weight, bias, stride, padding, dilation, groups: int, act: str, post_scale, shuffle: bool = False,
    config: dict | None = None,
):  # fmt: skip
    """Gradients (dx, dweight, dbias, dpost_scale, dpost_shift) of conv_bn_act_fwd (without the residual,
    whose gradient is grad_out). dx has x's dtype and memory format; the others are fp32.

    config: {"dz": conv_config(...), "dx": conv_config(...), "dw": conv_dw_config(...)}, any of
    them, to launch another device's choice; the rest are this device's."""
    B, Cin, H, W = x.shape
    Cout, cin_g, KH, KW = weight.shape
    Ho, Wo, depthwise = conv_geometry(x, weight, stride, padding, dilation, groups)
    cout_g = Cout // groups
    M = B * Ho * Wo
    dev = device_of(x)
    config = config or {}
    bias_t, has_bias = _or(bias, weight), bias is not None
    scale_t, has_scale = _or(post_scale, weight), post_scale is not None
    geometry = (H, W, Ho, Wo, *stride, *padding, *dilation)
    precision = _precision(x)

    # 1. dz = g * post_scale * act'(z), recomputing z; per-tile partial sums of the per-channel gradients
    low = x.dtype != torch.float32
    cfg = config.get("dz") or conv_configs(*_problem(x, weight, stride, padding, dilation, groups, "dz"))[0]
    tiles_n = cdiv(cout_g, cfg["BLOCK_N"])
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(Cout, cfg["BLOCK_N"]) if depthwise else groups * tiles_n)
    dz = torch.empty((B, Cout, Ho * Wo), device=x.device, dtype=torch.float32)
    parts = torch.empty((3, grid[0], Cout), device=x.device, dtype=torch.float32)
    _conv_bn_act_bwd_dz_kernel[grid](
        dz, parts, grad_out, *grad_out.stride(), x, *x.stride(), weight, *weight.stride(), bias_t, scale_t,
        M, Cout, cin_g, cout_g, tiles_n, *geometry,
        KH=KH, KW=KW, ACT=ACTIVATIONS.index(act), HAS_BIAS=has_bias, HAS_SCALE=has_scale, SHUFFLE=shuffle,
        DEPTHWISE=depthwise, **precision, **cfg,
    )  # fmt: skip
    dbias, dscale, dshift = (p.sum(0) for p in parts)  # three tensors, not views of one

    # 2. dx: the transposed conv, rows are input positions, columns the group's input channels
    Mx = B * H * W
    aligned = _aligned(x, weight, Ho, Wo, groups)
    cfg = config.get("dx") or conv_config(
        dev, Mx, Cin if depthwise else cin_g, cout_g, depthwise, low, "dx", aligned=aligned
    )
    tiles_n = cdiv(cin_g, cfg["BLOCK_N"])
    grid = (cdiv(Mx, cfg["BLOCK_M"]), cdiv(Cin, cfg["BLOCK_N"]) if depthwise else groups * tiles_n)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    dx = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _conv_bn_act_bwd_dx_kernel[grid](
        dx, *dx.stride(), dz, weight, *weight.stride(),
        Mx, Cin, cin_g, Cout, cout_g, tiles_n, *geometry,
        KH=KH, KW=KW, DEPTHWISE=depthwise, **precision, **cfg,
    )  # fmt: skip

    # 3. dW: reduction over positions in SPLIT chunks of fp32 partials
    cfg = dict(config.get("dw") or conv_dw_config(dev, M, Cout, cin_g, groups, depthwise, KH * KW, low))
    block_k = cfg["BLOCK_K"]
    split = max(1, min(cdiv(M, block_k), cfg.pop("split")))
    chunk = cdiv(cdiv(M, split), block_k) * block_k
    split = cdiv(M, chunk)
    tiles_n = 1 if depthwise else cdiv(cout_g, cfg["BLOCK_N"])
    tiles_ci = 1 if depthwise else cdiv(cin_g, cfg["BLOCK_CI"])
    dw_parts = torch.empty((split, KH * KW, Cout, cin_g), device=x.device, dtype=torch.float32)
    _conv_bn_act_bwd_dw_kernel[(_dw_programs(cfg, Cout, cin_g, groups, depthwise), KH * KW, split)](
        dw_parts, dz, x, *x.stride(),
        M, Cout, cin_g, cout_g, tiles_n, tiles_ci, chunk, *geometry,
        KW=KW, DEPTHWISE=depthwise, **precision, **cfg,
    )  # fmt: skip
    dweight = dw_parts.sum(0).permute(1, 2, 0).reshape(Cout, cin_g, KH, KW)
    return dx, dweight, dbias, dscale, dshift
