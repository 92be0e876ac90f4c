"""EfficientViT-SAM image encoders (L0, L1, L2, XL0, XL1) in plain PyTorch, with the official module names.

The module tree and parameter names follow the official EfficientViT code
(`EfficientViTSamImageEncoder` = `EfficientViTLargeBackbone` + `SamNeck` +
`LayerNorm2d`), so the `image_encoder.*` part of an official EfficientViT-SAM
checkpoint loads with strict=True (see `linattn.models.load_checkpoint`), e.g.

    backbone.stages.4.op_list.1.context_module.main.qkv.conv.weight
    backbone.stages.4.op_list.1.context_module.main.aggreg.0.0.weight
    backbone.stages.4.op_list.1.local_module.main.inverted_conv.conv.bias
    neck.input_ops.0.op_list.0.conv.weight
    neck.middle.op_list.0.main.spatial_conv.norm.running_var
    neck.output_ops.0.op_list.0.conv.bias
    norm.weight

Everything is eager PyTorch, as the official code computes it (the `eager`
baseline of the benchmarks): stock nn.Conv2d / nn.BatchNorm2d /
nn.GELU(approximate="tanh") grouped in ConvLayer containers (`conv`, `norm`,
`act`), and the official LiteMLA's attention (`linattn.eager`); `linattn.optimize` recognises
both and swaps in the fused modules. Norms use eps 1e-6, as the official
SAM model zoo sets them.

Input (B, 3, 512, 512) for L, (B, 3, 1024, 1024) for XL, normalised with SAM's
pixel mean/std (`preprocess`); output (B, 256, 64, 64). The neck upsamples its
three inputs to `neck.embed_size` (64, as the official code); with
`embed_size=None` it follows the finest neck input instead, so other input
sizes give (B, 256, H/8, W/8) for L and (B, 256, H/16, W/16) for XL.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import eager

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "VARIANTS",
    "EfficientViTLargeBackbone",
    "EfficientViTSamImageEncoder",
    "SamNeck",
    "efficientvit_sam_encoder",
    "input_size",
    "preprocess",
    "preprocess_shape",
]

# SAM's pixel statistics, on the 0..255 scale
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

NORM_EPS = 1e-6

# The official configurations (efficientvit/models/efficientvit/sam.py, backbone.py).
_L_BACKBONE = dict(
    width_list=(32, 64, 128, 256, 512),
    block_list=("res", "fmb", "fmb", "mb", "att"),
    expand_list=(1, 4, 4, 4, 6),
    fewer_norm_list=(False, False, False, True, True),
)
_XL_BACKBONE = dict(
    width_list=(32, 64, 128, 256, 512, 1024),
    block_list=("res", "fmb", "fmb", "fmb", "att@3", "att@3"),
    expand_list=(1, 4, 4, 4, 4, 6),
    fewer_norm_list=(False, False, False, False, True, True),
)
_L_NECK = dict(fid_list=("stage4", "stage3", "stage2"), in_channel_list=(512, 256, 128), expand_ratio=1)
_XL_NECK = dict(fid_list=("stage5", "stage4", "stage3"), in_channel_list=(1024, 512, 256), expand_ratio=4)

VARIANTS = {
    "l0": dict(input_size=512, backbone=dict(_L_BACKBONE, depth_list=(1, 1, 1, 4, 4)), neck=dict(_L_NECK, depth=4)),
    "l1": dict(input_size=512, backbone=dict(_L_BACKBONE, depth_list=(1, 1, 1, 6, 6)), neck=dict(_L_NECK, depth=8)),
    "l2": dict(input_size=512, backbone=dict(_L_BACKBONE, depth_list=(1, 2, 2, 8, 8)), neck=dict(_L_NECK, depth=12)),
    "xl0": dict(
        input_size=1024, backbone=dict(_XL_BACKBONE, depth_list=(0, 1, 1, 2, 3, 3)), neck=dict(_XL_NECK, depth=6)
    ),
    "xl1": dict(
        input_size=1024, backbone=dict(_XL_BACKBONE, depth_list=(1, 2, 2, 4, 6, 6)), neck=dict(_XL_NECK, depth=12)
    ),
}


def _check_variant(variant: str) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"linattn.models: unknown EfficientViT-SAM variant {variant!r}; use one of {list(VARIANTS)}")
    return VARIANTS[variant]


# ----------------------------------------------------------------------------------------------
# layers (official names: ConvLayer.conv/norm/act, ResidualBlock.main/shortcut, OpSequential.op_list)
# ----------------------------------------------------------------------------------------------


class ConvLayer(nn.Module):
    """conv (kxk, "same" padding) -> norm (BatchNorm2d or None) -> act (GELU-tanh or None)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool = False,
        norm: bool = True,
        act: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=use_bias
        )
        self.norm = nn.BatchNorm2d(out_channels, eps=NORM_EPS) if norm else None
        self.act = nn.GELU(approximate="tanh") if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class ResBlock(nn.Module):
    """conv1 (3x3, stride) -> conv2 (3x3); mid channels = in * expand_ratio."""

    def __init__(self, in_channels, out_channels, stride=1, expand_ratio=1.0, use_bias=(False, False),
                 norm=(True, True), act=(True, False)):  # fmt: skip
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.conv1 = ConvLayer(in_channels, mid, 3, stride, use_bias=use_bias[0], norm=norm[0], act=act[0])
        self.conv2 = ConvLayer(mid, out_channels, 3, 1, use_bias=use_bias[1], norm=norm[1], act=act[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    """spatial_conv (3x3, stride, expand) -> point_conv (1x1)."""

    def __init__(self, in_channels, out_channels, stride=1, expand_ratio=6.0, use_bias=(False, False),
                 norm=(True, True), act=(True, False)):  # fmt: skip
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.spatial_conv = ConvLayer(in_channels, mid, 3, stride, use_bias=use_bias[0], norm=norm[0], act=act[0])
        self.point_conv = ConvLayer(mid, out_channels, 1, use_bias=use_bias[1], norm=norm[1], act=act[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    """inverted_conv (1x1, expand) -> depth_conv (3x3 depthwise, stride) -> point_conv (1x1)."""

    def __init__(self, in_channels, out_channels, stride=1, expand_ratio=6.0, use_bias=(False, False, False),
                 norm=(True, True, True), act=(True, True, False)):  # fmt: skip
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.inverted_conv = ConvLayer(in_channels, mid, 1, use_bias=use_bias[0], norm=norm[0], act=act[0])
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, use_bias=use_bias[1], norm=norm[1], act=act[1])
        self.point_conv = ConvLayer(mid, out_channels, 1, use_bias=use_bias[2], norm=norm[2], act=act[2])

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class IdentityLayer(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class ResidualBlock(nn.Module):
    """main(x) + shortcut(x); without a shortcut, main(x)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut is None:
            return self.main(x)
        return self.main(x) + self.shortcut(x)


class OpSequential(nn.Module):
    """The official sequential container (children under `op_list`)."""

    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class LiteMLA(nn.Module):
    """The official LiteMLA as the SAM encoders configure it, in eager PyTorch (what `linattn.optimize` replaces).

    qkv (1x1 conv) -> cat([qkv, aggreg[i](qkv) ...]) (depthwise kxk, then 1x1 with 3*heads groups) -> ReLU
    linear attention per head of `dim` channels (EfficientViT's quadratic attention for maps of at most
    `dim` tokens) -> proj (1x1 conv, BatchNorm). No biases, no activations; heads = in_channels // dim.
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int = 32, scales: tuple[int, ...] = (5,)):
        super().__init__()
        heads = in_channels // dim
        total_dim = heads * dim
        self.dim = dim
        self.eps = 1.0e-15
        self.qkv = ConvLayer(in_channels, 3 * total_dim, 1, norm=False, act=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, k, padding=k // 2, groups=3 * total_dim, bias=False),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False),
            )
            for k in scales
        )
        self.kernel_func = nn.ReLU()
        self.proj = ConvLayer(total_dim * (1 + len(scales)), out_channels, 1, norm=True, act=False)

    def relu_quadratic_att(self, qkv: Tensor) -> Tensor:
        return eager.relu_quadratic_attention(qkv, self.dim, self.eps)

    def relu_linear_att(self, qkv: Tensor) -> Tensor:
        # EfficientViT computes fp16 in fp32 (its bf16 matmuls stay bf16, the division in fp32)
        wide = qkv.float() if qkv.dtype == torch.float16 else qkv
        return eager.lite_mla_attention(wide, self.dim, self.eps).to(qkv.dtype)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        H, W = qkv.shape[-2:]
        out = self.relu_linear_att(qkv) if H * W > self.dim else self.relu_quadratic_att(qkv)
        return self.proj(out)


class EfficientViTBlock(nn.Module):
    """context_module = x + LiteMLA(x); local_module = x + MBConv(x) (biased 1x1 and depthwise, BN last)."""

    def __init__(self, channels: int, dim: int = 32, expand_ratio: float = 4.0, scales: tuple[int, ...] = (5,)):
        super().__init__()
        attention = LiteMLA(channels, channels, dim=dim, scales=scales)
        self.context_module = ResidualBlock(attention, IdentityLayer())
        local = MBConv(
            channels,
            channels,
            expand_ratio=expand_ratio,
            use_bias=(True, True, False),
            norm=(False, False, True),
            act=(True, True, False),
        )
        self.local_module = ResidualBlock(local, IdentityLayer())

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


def _local_block(kind: str, in_channels: int, out_channels: int, stride: int, expand_ratio: float, fewer_norm: bool):
    """The official EfficientViTLargeBackbone.build_local_block: "res", "fmb" or "mb"."""
    if kind == "res":
        return ResBlock(in_channels, out_channels, stride, expand_ratio, (fewer_norm, False), (not fewer_norm, True))
    if kind == "fmb":
        return FusedMBConv(in_channels, out_channels, stride, expand_ratio, (fewer_norm, False), (not fewer_norm, True))
    if kind == "mb":
        return MBConv(
            in_channels,
            out_channels,
            stride,
            expand_ratio,
            (fewer_norm, fewer_norm, False),
            (not fewer_norm, not fewer_norm, True),
        )
    raise ValueError(f"linattn.models: unknown block kind {kind!r}")


class EfficientViTLargeBackbone(nn.Module):
    """EfficientViT-L backbone: stage 0 (stride-2 conv + ResBlocks), then per stage a stride-2 downsampling block
    followed by local blocks or EfficientViTBlocks ("att", "att@3": LiteMLA scales (5,) or (3,)).

    forward returns a dict {"input", "stage0", ..., "stage{S}", "stage_final"}, as the official code.
    """

    def __init__(self, width_list, depth_list, block_list, expand_list, fewer_norm_list, in_channels=3, qkv_dim=32):
        super().__init__()
        self.width_list = []
        stages = []
        w0 = width_list[0]
        stage0 = [ConvLayer(in_channels, w0, 3, stride=2)]
        for _ in range(depth_list[0]):
            block = _local_block(block_list[0], w0, w0, 1, expand_list[0], fewer_norm_list[0])
            stage0.append(ResidualBlock(block, IdentityLayer()))
        stages.append(OpSequential(stage0))
        self.width_list.append(w0)

        channels = w0
        for sid in range(1, len(width_list)):
            width, depth, kind = width_list[sid], depth_list[sid], block_list[sid]
            down_kind = kind if kind in ("mb", "fmb") else "mb"
            down = _local_block(down_kind, channels, width, 2, expand_list[sid] * 4, fewer_norm_list[sid])
            stage = [ResidualBlock(down, None)]
            channels = width
            for _ in range(depth):
                if kind.startswith("att"):
                    scales = (3,) if kind == "att@3" else (5,)
                    stage.append(EfficientViTBlock(channels, qkv_dim, expand_list[sid], scales))
                else:
                    block = _local_block(kind, channels, channels, 1, expand_list[sid], fewer_norm_list[sid])
                    stage.append(ResidualBlock(block, IdentityLayer()))
            stages.append(OpSequential(stage))
            self.width_list.append(channels)
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"input": x}
        for sid, stage in enumerate(self.stages):
            out[f"stage{sid}"] = x = stage(x)
        out["stage_final"] = x
        return out


class UpSampleLayer(nn.Module):
    """Bicubic resize (align_corners=False) to `size`, computed in fp32 as the official layer computes it, and cast
    back to x's dtype (the official layer's newer versions return it in fp32; see linattn.optimize.FusedNeck)."""

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return eager.upsample_sum([x], size)


class _NeckInput(OpSequential):
    """OpSequential([ConvLayer 1x1 + BN, UpSampleLayer]) taking the target size."""

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        conv, up = self.op_list
        return up(conv(x), size)


class SamNeck(nn.Module):
    """The official SamNeck (a DAGBlock): input_ops (1x1 conv + BN, bicubic upsample) summed, middle (FusedMBConv
    residual blocks), output_ops (1x1 conv with bias to out_dim).

    embed_size: side of the upsampled maps; 64 as the official code, None to follow the finest neck input.
    """

    def __init__(self, fid_list, in_channel_list, head_width=256, depth=4, expand_ratio=1.0, out_dim=256,
                 embed_size: int | None = 64):  # fmt: skip
        super().__init__()
        self.input_keys = list(fid_list)
        self.embed_size = embed_size
        self.input_ops = nn.ModuleList(
            _NeckInput([ConvLayer(c, head_width, 1, act=False), UpSampleLayer()]) for c in in_channel_list
        )
        middle = [
            ResidualBlock(FusedMBConv(head_width, head_width, 1, expand_ratio), IdentityLayer()) for _ in range(depth)
        ]
        self.middle = OpSequential(middle)
        self.output_keys = ["sam_encoder"]
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(head_width, out_dim, 1, use_bias=True, norm=False, act=False)])]
        )

    def merge_size(self, features: dict[str, Tensor]) -> tuple[int, int]:
        """The (H, W) that the input maps are resized to before they are summed."""
        if self.embed_size is None:
            return max((tuple(features[k].shape[-2:]) for k in self.input_keys), key=lambda hw: hw[0] * hw[1])
        return self.embed_size, self.embed_size

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        size = self.merge_size(features)
        x = None
        for key, op in zip(self.input_keys, self.input_ops):
            y = op(features[key], size)
            x = y if x is None else x + y
        x = self.middle(x)
        features = dict(features)
        for key, op in zip(self.output_keys, self.output_ops):
            features[key] = op(x)
        return features


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (parameters `weight`, `bias` as nn.LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x - x.mean(dim=1, keepdim=True)
        x = x / torch.sqrt(x.square().mean(dim=1, keepdim=True) + self.eps)
        if self.elementwise_affine:
            x = x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return x


class EfficientViTSamImageEncoder(nn.Module):
    """backbone -> neck -> norm (LayerNorm2d): (B, 3, S, S) -> (B, 256, 64, 64)."""

    def __init__(self, backbone: EfficientViTLargeBackbone, neck: SamNeck, variant: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.norm = LayerNorm2d(256, eps=NORM_EPS)
        self.variant = variant
        self.input_size = VARIANTS[variant]["input_size"] if variant in VARIANTS else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W), normalised (see `preprocess`); returns (B, 256, 64, 64)."""
        return self.norm(self.neck(self.backbone(x))["sam_encoder"])


def efficientvit_sam_encoder(variant: str = "l0", *, embed_size: int | None = 64) -> EfficientViTSamImageEncoder:
    """The EfficientViT-SAM image encoder `variant` ("l0", "l1", "l2", "xl0", "xl1"), randomly initialised.

    Load official weights with `linattn.models.load_checkpoint(model, path)`. Input 512 (L) or 1024 (XL)
    square images from `preprocess`; output (B, 256, 64, 64). embed_size: side of the neck's maps (64, the
    official value; None follows the input size, for smaller test inputs).
    """
    cfg = _check_variant(variant)
    if embed_size is not None and (type(embed_size) is not int or embed_size < 1):
        raise ValueError(f"linattn.models.efficientvit_sam_encoder: embed_size must be a positive int or None, "
                         f"got {embed_size!r}")  # fmt: skip
    backbone = EfficientViTLargeBackbone(**cfg["backbone"])
    neck_cfg = dict(cfg["neck"])
    neck = SamNeck(neck_cfg.pop("fid_list"), neck_cfg.pop("in_channel_list"), embed_size=embed_size, **neck_cfg)
    return EfficientViTSamImageEncoder(backbone, neck, variant)


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------


def input_size(variant: str) -> int:
    """Side of the square input of `variant`: 512 for L, 1024 for XL."""
    return _check_variant(variant)["input_size"]


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing the long side to `long_side` (rounded half up, as SAM's ResizeLongestSide)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image, variant: str = "l0") -> Tensor:
    """An image as EfficientViT-SAM's transform prepares it: resize, normalise, pad.

    image: RGB with values in 0..255, a uint8/float numpy array (H, W, 3) or a tensor (3, H, W) or (B, 3, H, W).
    Steps (official `SamResize`, `Normalize`, `SamPad`): the long side is resized to `input_size(variant)`
    (bilinear with antialiasing, as PIL; uint8 images are rounded back to uint8 as PIL does), the pixels
    normalised with SAM's mean/std, the bottom and right padded with zeros to a square.
    Returns float32 (B, 3, S, S) (B = 1 for a single image); the image occupies the top-left
    `preprocess_shape(H, W, S)`.
    """
    size = input_size(variant)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"linattn.models.preprocess: a numpy image must be (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"linattn.models.preprocess: expected a numpy array or a tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"linattn.models.preprocess: expected (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    is_uint8 = image.dtype == torch.uint8
    x = image.float()
    h, w = x.shape[-2:]
    if max(h, w) != size:
        x = F.interpolate(x, size=preprocess_shape(h, w, size), mode="bilinear", align_corners=False, antialias=True)
        if is_uint8:
            x = x.round().clamp_(0, 255)
    mean = x.new_tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(PIXEL_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h), value=0.0)
