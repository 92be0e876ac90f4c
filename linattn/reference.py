"""Pure-PyTorch reference math of every linattn op: the float64 oracle.

Each op's forward and (written out) backward, the activations and the BatchNorm
folding. The tests, `python -m linattn check` and the benchmarks compare against
them, and they are the `reference` backend: the CPU kernels of the ops and, on
CUDA tensors, PyTorch's own path (cuDNN, cuBLAS). They favour clarity over
speed. fp16/bf16 inputs are computed in fp32 (float64 stays float64) and the
result is cast back to the input dtype, matching the kernels' contract of fp32
accumulation; except the convolutions on CUDA tensors (`conv_bn_act` and the
ops built on it), which run fp16/bf16 in their own dtype as eager PyTorch does
(cuDNN accumulates in fp32): there the reference is the baseline that measured
dispatch must never lose to, and an fp32 upcast made it up to 4x slower than
eager on an H100. The tests' oracle calls it on float64 inputs.

The packed LiteMLA layout (docs/design.md 3.2) is defined here too, by
`split_heads`, `merge_heads` and `split_packed_qkv`: the oracle computes through
them, and the ops hand the same views to their kernels. EfficientViT's own
eager formulation, in the input dtype, is `linattn.eager`.
"""

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """out_n = relu(q_n) S / (relu(q_n) . z + eps), S = sum_m relu(k_m)^T v_m, z = sum_m relu(k_m).

    q, k: (B, H, N, D); v: (B, H, N, E); returns (B, H, N, E) in q's dtype.
    """
    ct = _compute_dtype(q.dtype)
    qr, kr, v32 = q.to(ct).relu(), k.to(ct).relu(), v.to(ct)
    s = kr.transpose(-1, -2) @ v32
    z = kr.sum(-2)
    den = (qr @ z.unsqueeze(-1)) + eps
    return ((qr @ s) / den).to(q.dtype)


def relu_linear_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of relu_linear_attention, written out explicitly.

    den_n = relu(q_n) . z + eps, a_n = g_n / den_n, c_n = -(g_n . out_n) / den_n;
    dq_n = [q_n > 0](S a_n + c_n z); dS = sum_n relu(q_n)^T a_n; dz = sum_n c_n relu(q_n);
    dk_m = [k_m > 0](dS v_m + dz); dv_m = relu(k_m) dS.
    """
    ct = _compute_dtype(q.dtype)
    q32, k32, v32, g = q.to(ct), k.to(ct), v.to(ct), grad_out.to(ct)
    qr, kr = q32.relu(), k32.relu()
    s = kr.transpose(-1, -2) @ v32
    z = kr.sum(-2)
    den = (qr @ z.unsqueeze(-1)) + eps
    out = (qr @ s) / den
    a = g / den
    c = -(g * out).sum(-1, keepdim=True) / den
    dq = torch.where(q32 > 0, a @ s.transpose(-1, -2) + c * z.unsqueeze(-2), 0.0)
    ds = qr.transpose(-1, -2) @ a
    dz = (qr * c).sum(-2)
    dk = torch.where(k32 > 0, v32 @ ds.transpose(-1, -2) + dz.unsqueeze(-2), 0.0)
    dv = kr @ ds
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- the packed LiteMLA layout (docs/design.md 3.2): the oracle, linattn.eager and the ops' kernel views ---


def split_heads(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, G*dim, H, W) feature map -> (B, G, H*W, dim) per-head view (a copy only if H, W can't merge)."""
    B, C, H, W = x.shape
    return x.reshape(B, C // dim, dim, H * W).transpose(-1, -2)


def merge_heads(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, G, H*W, dim) per-head maps back to a (B, G*dim, H, W) feature map."""
    B, G, _, dim = x.shape
    return x.transpose(-1, -2).reshape(B, G * dim, H, W)


def split_packed_qkv(qkv: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v of shape (B, G, H*W, dim) into a packed (B, G*3*dim, H, W) tensor.

    Head g owns channels [3*dim*g, 3*dim*(g+1)) laid out [q | k | v]; the views
    share qkv's memory for NCHW and channels_last inputs.
    """
    heads = split_heads(qkv, 3 * dim)
    return heads[..., :dim], heads[..., dim : 2 * dim], heads[..., 2 * dim :]


# --- the LiteMLA ops on the packed layout (docs/design.md 3.2, 3.3) ---


def lite_mla_attention(qkv: torch.Tensor, dim: int, eps: float = 1e-15) -> torch.Tensor:
    """relu_linear_attention on the packed LiteMLA layout: (B, G*3*dim, H, W) -> (B, G*dim, H, W)."""
    q, k, v = split_packed_qkv(qkv, dim)
    return merge_heads(relu_linear_attention(q, k, v, eps), *qkv.shape[-2:])


def lite_mla_attention_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, dim: int, eps: float = 1e-15
) -> torch.Tensor:
    """Gradient of lite_mla_attention with respect to qkv, in the packed layout."""
    q, k, v = split_packed_qkv(qkv, dim)
    grads = relu_linear_attention_backward(split_heads(grad_out, dim), q, k, v, eps)
    return merge_heads(torch.cat(grads, dim=-1), *qkv.shape[-2:])


def relu_quadratic_attention(qkv: torch.Tensor, dim: int, eps: float = 1e-15) -> torch.Tensor:
    """EfficientViT's path for maps of at most `dim` tokens: the (N x N) map relu(q) relu(k)^T, normalised over keys.

    qkv: (B, G*3*dim, H, W) packed as in `lite_mla_attention`; returns (B, G*dim, H, W).
    Computed in fp32 for fp16/bf16 inputs (fp64 stays fp64), cast back.
    """
    ct = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = (t.to(ct) for t in split_packed_qkv(qkv, dim))
        scores = F.relu(q) @ F.relu(k).transpose(-1, -2)  # (B, G, N queries, N keys)
        scores = scores / (scores.sum(-1, keepdim=True) + eps)
        out = merge_heads(scores @ v, *qkv.shape[-2:])
    return out.to(qkv.dtype)


def multiscale_aggregate(
    qkv: torch.Tensor,
    dw_weights: list[torch.Tensor],
    pw_weights: list[torch.Tensor],
    heads: int,
    dw_biases: list[torch.Tensor | None] | None = None,
    pw_biases: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """cat([qkv, y_1, ..., y_S], 1) with y_s = conv1x1(dwconv_ks(qkv), groups=3*heads).

    qkv: (B, C, H, W) with C = 3*heads*D; dw_weights[s]: (C, 1, k_s, k_s), k_s odd,
    padding k_s // 2; pw_weights[s]: (C, D, 1, 1); optional biases (C,).
    """
    ct = _compute_dtype(qkv.dtype)
    x = qkv.to(ct)
    outs = [x]
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        bd = dw_biases[s] if dw_biases else None  # empty or None: no biases; a list may hold None
        bp = pw_biases[s] if pw_biases else None
        y = F.conv2d(x, wd.to(ct), None if bd is None else bd.to(ct), padding=wd.shape[-1] // 2, groups=x.shape[1])
        outs.append(F.conv2d(y, wp.to(ct), None if bp is None else bp.to(ct), groups=3 * heads))
    return torch.cat(outs, 1).to(qkv.dtype)


def multiscale_aggregate_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    dw_weights: list[torch.Tensor],
    pw_weights: list[torch.Tensor],
    heads: int,
    dw_biases: list[torch.Tensor | None] | None = None,
):
    """Gradients of multiscale_aggregate: (dqkv, [dWd_s], [dWp_s], [dbd_s], [dbp_s]), in the compute dtype.

    With t_s = dwconv(x) + bd_s and dt_s = the pointwise conv's input gradient:
    dx = dy_0 + sum_s dwconv^T(dt_s), dWp_s = dy_s (x) t_s, dWd_s = dt_s (x) shifted x.
    """
    ct = _compute_dtype(qkv.dtype)
    x, g = qkv.to(ct), grad_out.to(ct)
    C = x.shape[1]
    dx = g[:, :C].clone()
    grads = [], [], [], []
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        wd, wp = wd.to(ct), wp.to(ct)
        bd = dw_biases[s].to(ct) if dw_biases else None
        pad = wd.shape[-1] // 2
        t = F.conv2d(x, wd, bd, padding=pad, groups=C)
        dy = g[:, (1 + s) * C : (2 + s) * C]
        dt = torch.nn.grad.conv2d_input(t.shape, wp, dy, groups=3 * heads)
        dx += torch.nn.grad.conv2d_input(x.shape, wd, dt, padding=pad, groups=C)
        grads[0].append(torch.nn.grad.conv2d_weight(x, wd.shape, dt, padding=pad, groups=C))
        grads[1].append(torch.nn.grad.conv2d_weight(t, wp.shape, dy, groups=3 * heads))
        grads[2].append(dt.sum((0, 2, 3)))
        grads[3].append(dy.sum((0, 2, 3)))
    return dx, *grads


def lite_mla_context(
    qkv: torch.Tensor,
    dw_weights: list[torch.Tensor],
    pw_weights: list[torch.Tensor],
    heads: int,
    dim: int,
    eps: float = 1e-15,
    dw_biases: list[torch.Tensor | None] | None = None,
    pw_biases: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """lite_mla_attention(multiscale_aggregate(...)): (B, 3*heads*dim, H, W) -> (B, (1+S)*heads*dim, H, W)."""
    ct = _compute_dtype(qkv.dtype)
    agg = multiscale_aggregate(qkv.to(ct), dw_weights, pw_weights, heads, dw_biases, pw_biases)
    return lite_mla_attention(agg, dim, eps).to(qkv.dtype)


# --- conv + BatchNorm + activation (docs/design.md 3.4) ---

CONV_ACTIVATIONS = ("identity", "relu", "relu6", "gelu", "gelu_tanh", "hardswish", "silu")


def activation(z: torch.Tensor, act: str) -> torch.Tensor:
    """One of CONV_ACTIVATIONS, as torch.nn.functional computes it."""
    if act == "identity":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "relu6":
        return F.relu6(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "hardswish":
        return F.hardswish(z)
    if act == "silu":
        return F.silu(z)
    raise ValueError(f"linattn.reference.activation: unknown act {act!r}; choose one of {CONV_ACTIVATIONS}")


def activation_grad(z: torch.Tensor, act: str) -> torch.Tensor:
    """d activation(z) / dz, with PyTorch's conventions at the kinks (relu'(0) = 0, relu6'(6) = 0, hardswish'(-3) = 0
    and hardswish'(3) = 1)."""
    if act == "identity":
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5
    if act == "gelu_tanh":
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    if act == "hardswish":
        return torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0)).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise ValueError(f"linattn.reference.activation_grad: unknown act {act!r}; choose one of {CONV_ACTIVATIONS}")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _channel(t: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor | None:
    """A per-channel (C,) vector as (C, 1, 1) in the compute dtype."""
    return None if t is None else t.to(ct)[:, None, None]


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    act: str = "identity",
    post_scale: torch.Tensor | None = None,
    post_shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(conv2d(x, weight, bias, ...)) * post_scale + post_shift + residual, computed in fp32 (fp64 stays;
    fp16/bf16 CUDA tensors in their own dtype, as eager PyTorch: see the module's docstring).

    x: (B, Cin, H, W); weight: (Cout, Cin/groups, KH, KW); bias, post_scale, post_shift: (Cout,);
    residual: (B, Cout, Ho, Wo). Returns (B, Cout, Ho, Wo) in x's dtype.
    """
    low_on_gpu = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    ct = x.dtype if low_on_gpu else _compute_dtype(x.dtype)
    b = None if bias is None else bias.to(ct)
    y = F.conv2d(x.to(ct), weight.to(ct), b, _pair(stride), _pair(padding), _pair(dilation), groups)
    y = activation(y, act)
    if post_scale is not None and post_shift is not None:  # one pass, as eager's BatchNorm
        y = torch.addcmul(_channel(post_shift, ct), y, _channel(post_scale, ct))
    elif post_scale is not None:
        y = y * _channel(post_scale, ct)
    elif post_shift is not None:
        y = y + _channel(post_shift, ct)
    if residual is not None:
        y = y + residual.to(ct)
    return y.to(x.dtype)


def separable_conv_bn_act(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    stride,
    padding,
    dilation,
    dw_act: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "identity",
    post_scale: torch.Tensor | None = None,
    post_shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The depthwise conv block (its output in x's dtype, as the unfused pair stores it), then the 1x1 block."""
    mid = conv_bn_act(x, dw_weight, dw_bias, stride, padding, dilation, x.shape[1], dw_act)
    return conv_bn_act(mid, weight, bias, 1, 0, 1, 1, act, post_scale, post_shift, residual)


def conv_bn_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    act: str = "identity",
    post_scale: torch.Tensor | None = None,
):
    """Gradients (dx, dweight, dbias, dpost_scale, dpost_shift) of conv_bn_act, in the compute dtype.

    With z = conv2d(x, weight) + bias: dz = g * post_scale * act'(z); dbias = sum dz;
    dpost_scale = sum g * act(z); dpost_shift = sum g (sums over batch and positions);
    dx, dweight: the conv's input and weight gradients of dz. The residual's gradient is g itself.
    """
    ct = _compute_dtype(x.dtype)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x32, w32, g = x.to(ct), weight.to(ct), grad_out.to(ct)
    z = F.conv2d(x32, w32, None if bias is None else bias.to(ct), stride, padding, dilation, groups)
    gs = g if post_scale is None else g * _channel(post_scale, ct)
    dz = gs * activation_grad(z, act)
    dx = torch.nn.grad.conv2d_input(x.shape, w32, dz, stride, padding, dilation, groups)
    dw = torch.nn.grad.conv2d_weight(x32, weight.shape, dz, stride, padding, dilation, groups)
    sums = (0, 2, 3)
    return dx, dw, dz.sum(sums), (g * activation(z, act)).sum(sums), g.sum(sums)


def fold_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (eval) after a conv, folded into the conv: (weight * s, (bias - mean) * s + beta),
    s = gamma / sqrt(var + eps). Computed in fp32 (fp64 stays) and cast back to weight's dtype."""
    ct = _compute_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(ct) + eps)
    if gamma is not None:
        scale = scale * gamma.to(ct)
    shift = -running_mean.to(ct) * scale if bias is None else (bias.to(ct) - running_mean.to(ct)) * scale
    if beta is not None:
        shift = shift + beta.to(ct)
    w = weight.to(ct) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), shift.to(weight.dtype)


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (eval) as a per-channel affine (scale, shift), the post_scale/post_shift of conv_bn_act
    for BN after the activation; computed in fp32 (fp64 stays), returned in running_var's dtype."""
    ct = _compute_dtype(running_var.dtype)
    scale = torch.rsqrt(running_var.to(ct) + eps)
    if gamma is not None:
        scale = scale * gamma.to(ct)
    shift = -running_mean.to(ct) * scale
    if beta is not None:
        shift = shift + beta.to(ct)
    return scale.to(running_var.dtype), shift.to(running_var.dtype)


def upsample_block(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    post_shift: torch.Tensor | None = None,
    act: str = "relu",
) -> torch.Tensor:
    """SqueezeSAM's upsample block: pixel_shuffle(act(linear(x)) * post_scale + post_shift, 2).

    x: (B, C, H, W); weight: (4*Co, C) per-pixel linear (a 1x1 conv); bias, post_scale, post_shift:
    (4*Co,) in the pre-shuffle channel order (a BatchNorm2d(Co) after the shuffle is these with each
    entry repeated 4 times). Returns (B, Co, 2*H, 2*W) in x's dtype.
    """
    y = conv_bn_act(x, weight[:, :, None, None], bias, act=act, post_scale=post_scale, post_shift=post_shift)
    return F.pixel_shuffle(y, 2)


def upsample_sum(inputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """sum_i interpolate(inputs[i], size, mode="bicubic", align_corners=False); an input already at `size` is
    added as it is. inputs: (B, C, h_i, w_i) of one dtype; sums in fp32 (float64 stays float64), returns
    (B, C, *size) in the inputs' dtype and the first input's memory format."""
    ct = _compute_dtype(inputs[0].dtype)
    out = None
    for x in inputs:
        y = x.to(ct)
        if tuple(x.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="bicubic", align_corners=False)
        out = y if out is None else out + y
    fmt = torch.channels_last if channels_last(inputs[0]) else torch.contiguous_format
    out = out.to(inputs[0].dtype, memory_format=fmt)
    return out.clone() if out is inputs[0] else out  # one float input at `size`: never the input itself


def bicubic_matrix(n_in, n_out, dtype: torch.dtype, device) -> torch.Tensor:
    """The (n_out, n_in) matrix of PyTorch's bicubic resize along one axis (align_corners=False, no antialias):
    output o reads s = (o + 0.5) * n_in / n_out - 0.5 and weighs inputs floor(s) - 1 .. floor(s) + 2 by Keys'
    cubic (A = -0.75) of t = s - floor(s), indices clamped to the axis (clamped taps add up)."""
    A = -0.75
    s = (torch.arange(n_out, dtype=dtype, device=device) + 0.5) * (n_in / n_out) - 0.5
    first = torch.floor(s)
    t = s - first

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    matrix = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for j, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
        index = (first + (j - 1)).clamp(0, n_in - 1).long()
        matrix.scatter_add_(1, index[:, None], w[:, None])
    return matrix


def upsample_sum_backward(grad_out: torch.Tensor, shapes: list, dtypes: list) -> list[torch.Tensor]:
    """Gradients of upsample_sum for inputs of `shapes` and `dtypes`, one per input in its dtype: the bicubic
    resize's adjoint Ry^T grad_out Rx (bicubic_matrix); grad_out itself for an input at the output size. The
    products run in float64, which neither autocast around backward() nor TF32 or bf16 fp32 matmuls touch, so no
    setting changes their precision, as none changes aten's bicubic backward, which multiplies nothing; in fp32 they
    lost 3.5e-3 under autocast and 2.3e-3 under float32_matmul_precision("medium"). (Not aten's backward: it has no
    meta kernel for symbolic sizes, so torch.compile with dynamic shapes could not trace it, and none deterministic
    on CUDA.)"""
    H, W = grad_out.shape[-2:]
    grads = []
    for shape, dtype in zip(shapes, dtypes):
        h, w = shape[-2:]
        if (h, w) == (H, W):
            grads.append(grad_out.to(dtype))
            continue
        rows, cols = (bicubic_matrix(n, m, torch.float64, grad_out.device) for n, m in ((h, H), (w, W)))
        grads.append((rows.t() @ grad_out.double() @ cols).to(dtype))
    return grads


def channels_last(t: torch.Tensor) -> bool:
    """Whether t is a channels_last map and not also NCHW-contiguous (the layout new maps made like it keep)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
