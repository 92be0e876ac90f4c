"""Triton kernels for non-causal ReLU linear attention (EfficientViT's LiteMLA core).

Per (batch b, head h), with qr = relu(q), kr = relu(k):

    forward   S = sum_m kr_m^T v_m   (D x E)      z = sum_m kr_m   (D)
              out_n = qr_n S / (qr_n . z + eps)

    backward  den_n = qr_n . z + eps,  a_n = g_n / den_n,  c_n = -(g_n . out_n) / den_n
              dq_n = [q_n > 0] (S a_n + c_n z)
              dS = sum_n qr_n^T a_n            dz = sum_n c_n qr_n
              dk_m = [k_m > 0] (dS v_m + dz)   dv_m = kr_m dS

Layout: q, k (B, H, N, D), v, out (B, H, N, E), any strides, so the packed
(B, G*3*D, H, W) tensor of LiteMLA is read and written in place through strided
views. Every product and sum is fp32 (fp16/bf16 tiles are upcast, which is exact,
and multiplied with tf32 tensor cores, the fp32 states and scaled gradients
rounded to TF32 first: _math.round_tf32; fp32 inputs use IEEE fp32 products).

Work is split over N: grid (B*H, SPLITS), each program owns a contiguous chunk
of rows. Reductions over N (S, z, dS, dz) write one fp32 partial per split; the
pass that consumes them sums the SPLITS partials once and reuses the result for
every tile of its chunk. The order of every sum is fixed: results are
deterministic.
"""

import torch
import triton
import triton.language as tl

from ._device import Device, cdiv, device_of, dot_precision, next_pow2
from ._math import round_tf32


@triton.jit
def _relu_tile(ptr, stride_n, stride_d, offs_n, offs_d, N, D):
    """Load a (BLOCK_N, BLOCK_D) tile as fp32, zero outside (N, D), and its relu."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    x = tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    x = x.to(tl.float32)
    return x, tl.maximum(x, 0.0)


@triton.jit
def _sum_partials(ptr, offs, SIZE: tl.constexpr, SPLITS):
    """Sum the SPLITS consecutive fp32 partial blocks of SIZE elements at ptr."""
    acc = tl.load(ptr + offs)
    for s in range(1, SPLITS):
        acc += tl.load(ptr + s * SIZE + offs)
    return acc


@triton.jit
def _linear_attention_state_kernel(
    S_ptr,  # fp32 (B*H, SPLITS, BLOCK_D, BLOCK_E): partial sum_m kr_m^T v_m (or dS)
    Z_ptr,  # fp32 (B*H, SPLITS, BLOCK_D): partial sum_m kr_m (or dz)
    K_ptr,  # (B, H, N, D)
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    V_ptr,  # (B, H, N, E)
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ve,
    H,
    N,
    D,
    E,
    CHUNK,  # rows per split, a multiple of BLOCK_N
    SPLITS,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    K_ptr += b * stride_kb + h * stride_kh
    V_ptr += b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    s_acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    z_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_lo = pid_s * CHUNK
    n_hi = tl.minimum(n_lo + CHUNK, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        _, kr = _relu_tile(K_ptr, stride_kn, stride_kd, offs_n, offs_d, N, D)
        v, _ = _relu_tile(V_ptr, stride_vn, stride_ve, offs_n, offs_e, N, E)
        s_acc = tl.dot(tl.trans(kr), v, s_acc, input_precision=PRECISION)
        z_acc += tl.sum(kr, axis=0)
    part = pid_bh * SPLITS + pid_s
    offs_s = offs_d[:, None] * BLOCK_E + offs_e[None, :]
    tl.store(S_ptr + part * (BLOCK_D * BLOCK_E) + offs_s, s_acc)
    tl.store(Z_ptr + part * BLOCK_D + offs_d, z_acc)


@triton.jit
def _linear_attention_fwd_kernel(
    O_ptr,  # (B, H, N, E) output
    stride_ob,
    stride_oh,
    stride_on,
    stride_oe,
    Q_ptr,  # (B, H, N, D)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    S_ptr,  # fp32 partials from _linear_attention_state_kernel
    Z_ptr,
    H,
    N,
    D,
    E,
    CHUNK,
    SPLITS,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Q_ptr += b * stride_qb + h * stride_qh
    O_ptr += b * stride_ob + h * stride_oh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_s = offs_d[:, None] * BLOCK_E + offs_e[None, :]
    s = round_tf32(
        _sum_partials(S_ptr + pid_bh * SPLITS * (BLOCK_D * BLOCK_E), offs_s, BLOCK_D * BLOCK_E, SPLITS), PRECISION
    )
    z = _sum_partials(Z_ptr + pid_bh * SPLITS * BLOCK_D, offs_d, BLOCK_D, SPLITS)
    n_lo = pid_s * CHUNK
    n_hi = tl.minimum(n_lo + CHUNK, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        _, qr = _relu_tile(Q_ptr, stride_qn, stride_qd, offs_n, offs_d, N, D)
        num = tl.dot(qr, s, input_precision=PRECISION)
        den = tl.sum(qr * z[None, :], axis=1) + eps
        out = num / den[:, None]
        mask = (offs_n[:, None] < N) & (offs_e[None, :] < E)
        o_ptrs = O_ptr + offs_n[:, None] * stride_on + offs_e[None, :] * stride_oe
        tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_attention_bwd_dq_kernel(
    DQ_ptr,  # (B, H, N, D) gradient of q
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    DS_ptr,  # fp32 (B*H, SPLITS, BLOCK_D, BLOCK_E): partial dS
    DZ_ptr,  # fp32 (B*H, SPLITS, BLOCK_D): partial dz
    G_ptr,  # (B, H, N, E) gradient of the output
    stride_gb,
    stride_gh,
    stride_gn,
    stride_ge,
    Q_ptr,  # (B, H, N, D)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    S_ptr,  # fp32 partials of the forward state
    Z_ptr,
    H,
    N,
    D,
    E,
    CHUNK,
    SPLITS,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Q_ptr += b * stride_qb + h * stride_qh
    G_ptr += b * stride_gb + h * stride_gh
    DQ_ptr += b * stride_dqb + h * stride_dqh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_s = offs_d[:, None] * BLOCK_E + offs_e[None, :]
    s = round_tf32(
        _sum_partials(S_ptr + pid_bh * SPLITS * (BLOCK_D * BLOCK_E), offs_s, BLOCK_D * BLOCK_E, SPLITS), PRECISION
    )
    z = _sum_partials(Z_ptr + pid_bh * SPLITS * BLOCK_D, offs_d, BLOCK_D, SPLITS)
    ds_acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_lo = pid_s * CHUNK
    n_hi = tl.minimum(n_lo + CHUNK, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        q, qr = _relu_tile(Q_ptr, stride_qn, stride_qd, offs_n, offs_d, N, D)
        g, _ = _relu_tile(G_ptr, stride_gn, stride_ge, offs_n, offs_e, N, E)
        den = tl.sum(qr * z[None, :], axis=1) + eps
        out = tl.dot(qr, s, input_precision=PRECISION) / den[:, None]
        a = g / den[:, None]
        c = -tl.sum(g * out, axis=1) / den
        a_t = round_tf32(a, PRECISION)
        dq = tl.dot(a_t, tl.trans(s), input_precision=PRECISION) + c[:, None] * z[None, :]
        # select, not multiply: a masked row may hold inf (den == eps) and inf * 0 is NaN
        dq = tl.where(q > 0.0, dq, 0.0)
        mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        dq_ptrs = DQ_ptr + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, dq.to(DQ_ptr.dtype.element_ty), mask=mask)
        ds_acc = tl.dot(tl.trans(qr), a_t, ds_acc, input_precision=PRECISION)
        dz_acc += tl.sum(qr * c[:, None], axis=0)
    part = pid_bh * SPLITS + pid_s
    tl.store(DS_ptr + part * (BLOCK_D * BLOCK_E) + offs_s, ds_acc)
    tl.store(DZ_ptr + part * BLOCK_D + offs_d, dz_acc)


@triton.jit
def _linear_attention_bwd_dkv_kernel(
    DK_ptr,  # (B, H, N, D) gradient of k
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    DV_ptr,  # (B, H, N, E) gradient of v
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dve,
    K_ptr,  # (B, H, N, D)
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    V_ptr,  # (B, H, N, E)
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ve,
    DS_ptr,  # fp32 partials from _linear_attention_bwd_dq_kernel
    DZ_ptr,
    H,
    N,
    D,
    E,
    CHUNK,
    SPLITS,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    K_ptr += b * stride_kb + h * stride_kh
    V_ptr += b * stride_vb + h * stride_vh
    DK_ptr += b * stride_dkb + h * stride_dkh
    DV_ptr += b * stride_dvb + h * stride_dvh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_s = offs_d[:, None] * BLOCK_E + offs_e[None, :]
    ds = round_tf32(
        _sum_partials(DS_ptr + pid_bh * SPLITS * (BLOCK_D * BLOCK_E), offs_s, BLOCK_D * BLOCK_E, SPLITS), PRECISION
    )
    dz = _sum_partials(DZ_ptr + pid_bh * SPLITS * BLOCK_D, offs_d, BLOCK_D, SPLITS)
    n_lo = pid_s * CHUNK
    n_hi = tl.minimum(n_lo + CHUNK, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        k, kr = _relu_tile(K_ptr, stride_kn, stride_kd, offs_n, offs_d, N, D)
        v, _ = _relu_tile(V_ptr, stride_vn, stride_ve, offs_n, offs_e, N, E)
        dk = tl.dot(v, tl.trans(ds), input_precision=PRECISION) + dz[None, :]
        dk = tl.where(k > 0.0, dk, 0.0)
        dv = tl.dot(kr, ds, input_precision=PRECISION)
        mask_d = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        dk_ptrs = DK_ptr + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        tl.store(dk_ptrs, dk.to(DK_ptr.dtype.element_ty), mask=mask_d)
        mask_e = (offs_n[:, None] < N) & (offs_e[None, :] < E)
        dv_ptrs = DV_ptr + offs_n[:, None] * stride_dvn + offs_e[None, :] * stride_dve
        tl.store(dv_ptrs, dv.to(DV_ptr.dtype.element_ty), mask=mask_e)


def attention_config(dev: Device, B: int, H: int, N: int, D: int, E: int, splits: int | None = None) -> dict:
    """Tiles, launch options and the split of N for B*H attention problems with a D x E state.

    splits: programs per problem, each reducing a chunk of N into fp32 partials (None: enough programs to fill
    the GPU twice over; one under the interpreter). num_stages=2 double-buffers the row loop's loads."""
    block_d = max(16, next_pow2(D))
    block_e = max(16, next_pow2(E))
    block_n = 64 if block_d * block_e <= 64 * 64 else 32
    if splits is None:
        splits = cdiv(2 * dev.sms, B * H) if dev.gpu else 1
    return dict(
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_E=block_e,
        num_warps=4 if block_d * block_e <= 64 * 64 else 8,
        num_stages=2,
        splits=splits,
    )


def split_rows(N: int, config: dict) -> tuple[dict, int, int]:
    """(kernel keywords, rows per split, splits) of a config: splits clamped to the row tiles, each chunk a
    multiple of BLOCK_N."""
    cfg = dict(config)
    tiles = cdiv(N, cfg["BLOCK_N"])
    splits = max(1, min(cfg.pop("splits"), tiles))
    chunk = cdiv(tiles, splits) * cfg["BLOCK_N"]
    return cfg, chunk, cdiv(N, chunk)


def _state(k: torch.Tensor, v: torch.Tensor, cfg: dict, chunk: int, splits: int):
    """fp32 partials of S = sum relu(k)^T v and z = sum relu(k), one per (batch*head, split)."""
    B, H, N, D = k.shape
    E = v.shape[-1]
    s = torch.empty((B * H, splits, cfg["BLOCK_D"], cfg["BLOCK_E"]), device=k.device, dtype=torch.float32)
    z = torch.empty((B * H, splits, cfg["BLOCK_D"]), device=k.device, dtype=torch.float32)
    _linear_attention_state_kernel[(B * H, splits)](
        s, z, k, *k.stride(), v, *v.stride(), H, N, D, E, chunk, splits, PRECISION=dot_precision(k), **cfg,
    )  # fmt: skip
    return s, z


def linear_attention_fwd(q, k, v, eps: float, out, config: dict | None = None):
    """Write relu linear attention of q, k, v into out (all (B, H, N, *), any strides).
    config: attention_config()'s dict, to launch another device's choice."""
    B, H, N, D = q.shape
    E = v.shape[-1]
    cfg, chunk, splits = split_rows(N, config or attention_config(device_of(q), B, H, N, D, E))
    s, z = _state(k, v, cfg, chunk, splits)
    _linear_attention_fwd_kernel[(B * H, splits)](
        out, *out.stride(), q, *q.stride(), s, z, H, N, D, E, chunk, splits, eps, PRECISION=dot_precision(q), **cfg,
    )  # fmt: skip
    return out


def linear_attention_bwd(grad_out, q, k, v, eps: float, dq, dk, dv, config: dict | None = None):
    """Write the gradients of relu linear attention into dq, dk, dv (any strides).
    config: attention_config()'s dict, to launch another device's choice."""
    B, H, N, D = q.shape
    E = v.shape[-1]
    cfg, chunk, splits = split_rows(N, config or attention_config(device_of(q), B, H, N, D, E))
    grid = (B * H, splits)
    s, z = _state(k, v, cfg, chunk, splits)
    ds = torch.empty_like(s)
    dz = torch.empty_like(z)
    _linear_attention_bwd_dq_kernel[grid](
        dq, *dq.stride(), ds, dz, grad_out, *grad_out.stride(), q, *q.stride(), s, z,
        H, N, D, E, chunk, splits, eps, PRECISION=dot_precision(q), **cfg,
    )  # fmt: skip
    _linear_attention_bwd_dkv_kernel[grid](
        dk, *dk.stride(), dv, *dv.stride(), k, *k.stride(), v, *v.stride(), ds, dz,
        H, N, D, E, chunk, splits, PRECISION=dot_precision(q), **cfg,
    )  # fmt: skip
    return dq, dk, dv
