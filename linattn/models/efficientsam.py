"""EfficientSAM image encoders (ViT-Ti, ViT-S) in plain PyTorch, attention via F.scaled_dot_product_attention.

The baseline of the profile table: no fused linattn op applies. Module and
parameter names follow the public EfficientSAM code (`ImageEncoderViT`:
`patch_embed.proj`, `pos_embed`, `blocks.{i}.norm1/attn.qkv/attn.proj/norm2/
mlp.fc1/mlp.fc2`, `neck.{0..3}`), so the `image_encoder.*` part of an official
EfficientSAM checkpoint loads with strict=True (`linattn.models.load_checkpoint`).

ViT, depth 12, patch 16, MLP ratio 4, exact GELU, LayerNorm eps 1e-6, an
absolute position embedding learnt at 224x224 (14x14 patches + a class token)
and resized bicubically to the token grid, global attention in every block;
neck 1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d to 256 channels.
Input (B, 3, 1024, 1024) -> (B, 256, 64, 64); any size divisible by 16 works
((B, 256, H/16, W/16)).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .efficientvit_sam import LayerNorm2d

__all__ = ["EFFICIENTSAM_VARIANTS", "EfficientSamImageEncoder", "efficientsam_encoder", "efficientsam_preprocess"]

EFFICIENTSAM_VARIANTS = {"vitt": dict(embed_dim=192, num_heads=3), "vits": dict(embed_dim=384, num_heads=6)}

# EfficientSAM normalises with the ImageNet statistics on the 0..1 scale
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    """proj: patch x patch conv with stride patch, (B, 3, H, W) -> (B, C, H/p, W/p)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Global multi-head self-attention on (B, N, C) tokens: qkv Linear, SDPA, proj Linear."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale head_dim ** -0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EfficientSamImageEncoder(nn.Module):
    """EfficientSAM's ImageEncoderViT: (B, 3, H, W) -> (B, neck_dim, H/16, W/16), (B, 256, 64, 64) at 1024."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int = 12, patch_size: int = 16, img_size: int = 1024,
                 mlp_ratio: float = 4.0, neck_dim: int = 256, pretrain_img_size: int = 224):  # fmt: skip
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        grid = pretrain_img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))  # + the class token's slot
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, neck_dim, 1, bias=False),
            LayerNorm2d(neck_dim, eps=1e-6),
            nn.Conv2d(neck_dim, neck_dim, 3, padding=1, bias=False),
            LayerNorm2d(neck_dim, eps=1e-6),
        )

    def abs_pos(self, h: int, w: int) -> Tensor:
        """The position embedding without the class token, resized (bicubic) to (1, h, w, C)."""
        pos = self.pos_embed[:, 1:]
        size = math.isqrt(pos.shape[1])
        pos = pos.reshape(1, size, size, -1)
        if (size, size) == (h, w):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W), H and W divisible by 16, normalised (`efficientsam_preprocess`)."""
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"linattn.models.EfficientSamImageEncoder: expected (B, 3, H, W) with H, W divisible by "
                f"{self.patch_size}, got {tuple(x.shape)}"
            )
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        B, h, w, C = x.shape
        x = (x + self.abs_pos(h, w)).reshape(B, h * w, C)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.reshape(B, h, w, C).permute(0, 3, 1, 2))


def efficientsam_encoder(variant: str = "vitt") -> EfficientSamImageEncoder:
    """The EfficientSAM image encoder: "vitt" (ViT-Ti, 192 wide, 3 heads) or "vits" (ViT-S, 384, 6 heads).

    Randomly initialised; load official weights with `linattn.models.load_checkpoint(model, path)`.
    """
    if variant not in EFFICIENTSAM_VARIANTS:
        raise ValueError(
            f"linattn.models: unknown EfficientSAM variant {variant!r}; use one of {list(EFFICIENTSAM_VARIANTS)}"
        )
    return EfficientSamImageEncoder(**EFFICIENTSAM_VARIANTS[variant])


def efficientsam_preprocess(image: Tensor, img_size: int = 1024) -> Tensor:
    """EfficientSAM's preprocessing: (B, 3, H, W) or (3, H, W) RGB in 0..1, bilinear resize to img_size x img_size
    (no aspect preservation, no padding, as the official `Sam.preprocess`), ImageNet mean/std. Returns float32."""
    x = image.unsqueeze(0) if image.ndim == 3 else image
    x = x.float()
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(x, (img_size, img_size), mode="bilinear", align_corners=False)
    mean = x.new_tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std
