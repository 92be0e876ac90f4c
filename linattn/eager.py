"""EfficientViT's LiteMLA as the official code computes it in eager PyTorch: the "eager" baseline.

The official EfficientViT formulation, in the input dtype: ReLU linear attention
with v padded by a column of ones and two matmuls (a bf16 result is divided in
fp32), the quadratic attention of small maps, and the multi-scale aggregation
as a depthwise conv, a grouped 1x1 conv and a concat.
Each function takes the arguments of the linattn op of the same name and is
differentiable by autograd.

Who uses it: the unoptimized EfficientViT-SAM encoder (linattn.models), the
`eager` provider of the benchmarks (and their torch.compile providers, which
compile it), and the yardstick of the fp16/bf16 tolerances (docs/design.md 8:
a kernel's error at most twice eager's) in the tests and `python -m linattn
check`. The oracle that every result is measured against is linattn.reference.
"""

import torch
import torch.nn.functional as F

from .reference import merge_heads, split_packed_qkv


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """EfficientViT's ReLU linear attention on (B, H, N, D) q, k and (B, H, N, E) v, in the input dtype."""
    qr, kr = F.relu(q), F.relu(k)
    v1 = F.pad(v, (0, 1), mode="constant", value=1.0)  # ones column: the last output is the denominator
    vk = kr.transpose(-1, -2) @ v1  # (B, H, D, E+1)
    out = qr @ vk
    if out.dtype == torch.bfloat16:
        out = out.float()
    return (out[..., :-1] / (out[..., -1:] + eps)).to(q.dtype)


def lite_mla_attention(qkv: torch.Tensor, dim: int, eps: float = 1e-15) -> torch.Tensor:
    """relu_linear_attention on the packed (B, G*3*dim, H, W) layout -> (B, G*dim, H, W), in the input dtype."""
    q, k, v = split_packed_qkv(qkv, dim)
    return merge_heads(relu_linear_attention(q, k, v, eps), *qkv.shape[-2:])


def relu_quadratic_attention(qkv: torch.Tensor, dim: int, eps: float = 1e-15) -> torch.Tensor:
    """EfficientViT's quadratic attention (maps of at most `dim` tokens) on the packed layout.

    Its precision: both matmuls in the input dtype, only the normalisation over keys in fp32.
    """
    q, k, v = split_packed_qkv(qkv, dim)
    scores = F.relu(q) @ F.relu(k).transpose(-1, -2)  # (B, G, N queries, N keys)
    wide = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    scores = (wide / (wide.sum(-1, keepdim=True) + eps)).to(qkv.dtype)
    return merge_heads(scores @ v, *qkv.shape[-2:])


def multiscale_aggregate(
    qkv: torch.Tensor,
    dw_weights: list[torch.Tensor],
    pw_weights: list[torch.Tensor],
    heads: int,
    dw_biases: list[torch.Tensor | None] | None = None,
    pw_biases: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """EfficientViT's aggregation in the input dtype: per scale its `aggreg[s]` (a depthwise conv, then a 1x1
    conv with 3*heads groups), then `torch.cat([qkv, y_1, ..., y_S], 1)`."""
    outs = [qkv]
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        y = F.conv2d(qkv, wd, dw_biases[s] if dw_biases else None, padding=wd.shape[-1] // 2, groups=qkv.shape[1])
        outs.append(F.conv2d(y, wp, pw_biases[s] if pw_biases else None, groups=3 * heads))
    return torch.cat(outs, 1)


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
    """EfficientViT's LiteMLA context in the input dtype: aggregation, concat, attention."""
    multi_scale = multiscale_aggregate(qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases)
    return lite_mla_attention(multi_scale, dim, eps)


def upsample_sum(inputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """EfficientViT-SAM's neck merge: each input through the official UpSampleLayer (returned as it is at `size`,
    else bicubic in fp32), then list_sum's adds; cast back to the inputs' dtype (as linattn.models' layer does:
    the official one keeps fp32)."""
    out = None
    for x in inputs:
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False).to(x.dtype)
        out = x if out is None else out + x
    return out
