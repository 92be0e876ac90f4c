"""SqueezeSAM: a convolutional UNet Segment-Anything model with early fusion of the prompts (reference, pure PyTorch).

The published design (docs/design.md 5), built here as a reference network for
`linattn.optimize` and the end-to-end benchmarks (random init; no official
checkpoint is published):

- input: 5 channels at 512x512, RGB + a box mask + a click map (disks), "early fusion";
- patch embed: conv 2x2 stride 2 to 64 channels + GroupNorm(1, 64) -> 64 x 256 x 256;
- encoder: 8 DoubleConv levels (each unit conv3x3 with bias -> ReLU -> BatchNorm) of widths
  64, 128, 128, 128, 128, 164, 256, 256 at 256^2 ... 2^2, MaxPool 2 between levels;
- bottleneck: a two-way transformer (depth 2, width 256, 8 heads) between the bottom map and
  4 learned output tokens (1 IoU token + 3 mask tokens);
- decoder: Up blocks (per-pixel linear C -> 4*C/2, ReLU, pixel shuffle 2x, BatchNorm; concat the
  encoder skip; DoubleConv) back to a 64 x 256 x 256 embedding;
- head: SAM's hypernetwork (an MLP per mask token gives 64 weights, dotted with the embedding)
  for 3 masks and an MLP on the IoU token for 3 IoU scores.

About 10.3 M parameters. Every conv block is plain `nn.Conv2d` / `nn.ReLU` / `nn.BatchNorm2d` in
an `nn.Sequential` (conv -> act -> BN runs that `linattn.optimize` fuses into
`linattn.nn.ConvBNAct(order="conv_act_bn")`) and the Up block's upsampling is `UpsampleBlock`,
which optimize maps to `linattn.upsample_block`.

Sizes: any H, W divisible by 2 (not only 512): the pools use ceil_mode and the decoder crops each
upsampled map to its skip's size, so small inputs (64x64 in tests) work; at 512 every level is
exactly half the one above and nothing is cropped.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SqueezeSAM", "UpsampleBlock", "squeezesam", "WIDTHS"]

WIDTHS = (64, 128, 128, 128, 128, 164, 256, 256)


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two units of conv3x3 (bias) -> ReLU -> BatchNorm, as one Sequential (keys `0.weight` ... `5.running_var`)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_channels),
    )


class UpsampleBlock(nn.Module):
    """SqueezeSAM's learned 2x upsampling: per-pixel linear C -> 4*Co, ReLU, pixel shuffle 2, BatchNorm2d(Co).

    (B, C, H, W) -> (B, Co, 2H, 2W). The linear is a 1x1 conv with bias (`linear.weight` (4*Co, C, 1, 1)).
    `linattn.optimize` swaps it for a module calling `linattn.upsample_block` (one kernel, the shuffle
    done in the store; the BatchNorm becomes the per-channel epilogue in eval mode).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv2d(in_channels, 4 * out_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.shuffle = nn.PixelShuffle(2)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.shuffle(self.act(self.linear(x))))


class Up(nn.Module):
    """Upsample the deeper map (C -> C//2 channels), crop it to the skip's size, concat the skip, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = UpsampleBlock(in_channels, in_channels // 2)
        self.conv = double_conv(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        x = x[..., : skip.shape[-2], : skip.shape[-1]]  # no-op when sizes are powers of two (512 input)
        return self.conv(torch.cat([x, skip], dim=1))


class MLP(nn.Module):
    """SAM's MLP: Linear layers with ReLU between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Attention(nn.Module):
    """SAM's attention with an optional internal downsampling of the width (SDPA)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B = q.shape[0]

        def split(t: Tensor) -> Tensor:
            return t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v)))
        return self.out_proj(out.transpose(1, 2).reshape(B, q.shape[1], -1))


class TwoWayBlock(nn.Module):
    """SAM's TwoWayAttentionBlock: token self-attention, tokens -> image, MLP, image -> tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample=2)
        self.norm4 = nn.LayerNorm(dim)
        self.skip_first_pe = skip_first_pe

    def forward(self, tokens: Tensor, image: Tensor, token_pe: Tensor, image_pe: Tensor):
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(q, k, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norm4(image + self.cross_attn_image_to_token(k, q, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """Depth-`depth` two-way transformer between tokens (B, T, dim) and an image map (B, dim, h, w)."""

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 8, mlp_dim: int = 1024):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm_final = nn.LayerNorm(dim)
        # SAM's random Fourier position encoding: a fixed Gaussian matrix, any map size
        self.register_buffer("pe_gaussian", torch.randn(2, dim // 2), persistent=True)

    def position_encoding(self, h: int, w: int, like: Tensor) -> Tensor:
        """(h*w, dim) Fourier features of the normalised pixel centres."""
        ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
        xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
        proj = (2 * coords - 1) @ self.pe_gaussian.to(like.dtype) * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def forward(self, image: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        B, C, h, w = image.shape
        image_pe = self.position_encoding(h, w, image)[None]
        img = image.flatten(2).transpose(1, 2)  # (B, h*w, C)
        token_pe, out = tokens, tokens
        for layer in self.layers:
            out, img = layer(out, img, token_pe, image_pe)
        q, k = out + token_pe, img + image_pe
        out = self.norm_final(out + self.final_attn_token_to_image(q, k, img))
        return out, img.transpose(1, 2).reshape(B, C, h, w)


class SqueezeSAM(nn.Module):
    """SqueezeSAM (see the module docstring). Build with `squeezesam(...)`.

    forward(image, box_mask=None, clicks=None):
        image: (B, 3, H, W) RGB (normalised), or (B, 5, H, W) with the prompts already stacked;
        box_mask: (B, 1, H, W) 1 inside the box, 0 outside (zeros when None);
        clicks: (B, 1, H, W) click disks, +1 positive / -1 negative (zeros when None).
    Returns (masks, iou): masks (B, num_masks, H/2, W/2) logits at the embedding's resolution
    (upsample to H, W bilinearly for full-size masks, as SAM does with its low-res masks),
    iou (B, num_masks) predicted IoU scores. H and W must be even.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = WIDTHS,
        in_channels: int = 5,
        embed_dim: int = 64,
        transformer_dim: int = 256,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 512,
        num_masks: int = 3,
    ):
        super().__init__()
        sizes = dict(in_channels=in_channels, embed_dim=embed_dim, transformer_dim=transformer_dim,
                     transformer_depth=transformer_depth, transformer_heads=transformer_heads,
                     transformer_mlp_dim=transformer_mlp_dim, num_masks=num_masks)  # fmt: skip
        sizes.update({f"widths[{i}]": w for i, w in enumerate(widths)})
        for name, value in sizes.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"linattn.models.squeezesam: {name} must be a positive int, got {value!r}")
        if not widths:
            raise ValueError("linattn.models.squeezesam: widths must name at least one encoder level")
        if transformer_dim % transformer_heads:
            raise ValueError(f"linattn.models.squeezesam: transformer_dim {transformer_dim} is not divisible by "
                             f"transformer_heads {transformer_heads}")  # fmt: skip
        self.in_channels = in_channels
        self.num_masks = num_masks
        self.patch_embed = nn.Sequential(nn.Conv2d(in_channels, widths[0], 2, stride=2), nn.GroupNorm(1, widths[0]))
        ins = (widths[0],) + tuple(widths[:-1])
        self.down = nn.ModuleList(double_conv(a, b) for a, b in zip(ins, widths))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        bottom = widths[-1]
        self.bottleneck_in = nn.Identity() if bottom == transformer_dim else nn.Conv2d(bottom, transformer_dim, 1)
        self.transformer = TwoWayTransformer(transformer_dim, transformer_depth, transformer_heads, transformer_mlp_dim)
        self.output_tokens = nn.Embedding(1 + num_masks, transformer_dim)  # IoU token, then the mask tokens
        ups, deeper = [], transformer_dim
        for i in range(len(widths) - 2, -1, -1):  # skips from the second deepest level up to the first
            ups.append(Up(deeper, widths[i], widths[i]))
            deeper = widths[i]
        self.up = nn.ModuleList(ups)
        self.embed = nn.Identity() if widths[0] == embed_dim else nn.Conv2d(widths[0], embed_dim, 1)
        self.hypernetworks = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, embed_dim, 3) for _ in range(num_masks)
        )
        self.iou_head = MLP(transformer_dim, transformer_dim, num_masks, 3)

    def fuse_inputs(self, image: Tensor, box_mask: Tensor | None = None, clicks: Tensor | None = None) -> Tensor:
        """(B, 5, H, W): image, box mask and click map stacked on channels (zeros for missing prompts)."""
        bare = self.in_channels - 2  # the image's channels when the prompts come apart
        odd = image.ndim == 4 and (image.shape[-2] % 2 or image.shape[-1] % 2)
        if image.ndim != 4 or image.shape[1] not in (bare, self.in_channels) or odd:
            raise ValueError(f"linattn.models.SqueezeSAM: image must be (B, {bare} or {self.in_channels}, H, W) "
                             f"with H and W even, got {tuple(image.shape)}")  # fmt: skip
        if image.shape[1] == self.in_channels:
            if box_mask is None and clicks is None:
                return image
            raise ValueError(f"linattn.models.SqueezeSAM: an image of {self.in_channels} channels holds the prompts "
                             f"already; pass box_mask and clicks with an image of {bare}")  # fmt: skip
        B, _, H, W = image.shape
        for name, prompt in (("box_mask", box_mask), ("clicks", clicks)):
            if prompt is not None and tuple(prompt.shape) != (B, 1, H, W):
                raise ValueError(f"linattn.models.SqueezeSAM: {name} must be (B, 1, H, W) = {(B, 1, H, W)}, "
                                 f"got {tuple(prompt.shape)}")  # fmt: skip
        zeros = image.new_zeros(B, 1, H, W)
        return torch.cat([image, zeros if box_mask is None else box_mask, zeros if clicks is None else clicks], 1)

    def forward(self, image: Tensor, box_mask: Tensor | None = None, clicks: Tensor | None = None):
        x = self.patch_embed(self.fuse_inputs(image, box_mask, clicks))
        skips = []
        for i, level in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = level(x)
            skips.append(x)
        tokens = self.output_tokens.weight[None].expand(x.shape[0], -1, -1)
        tokens, x = self.transformer(self.bottleneck_in(x), tokens)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        embedding = self.embed(x)  # (B, 64, H/2, W/2)
        weights = torch.stack([mlp(tokens[:, 1 + i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        masks = (weights @ embedding.flatten(2)).reshape(x.shape[0], self.num_masks, *embedding.shape[-2:])
        return masks, self.iou_head(tokens[:, 0])


def squeezesam(widths: tuple[int, ...] = WIDTHS, **kwargs) -> SqueezeSAM:
    """SqueezeSAM with the published widths (about 10.3 M parameters), random init.

    `widths` (one per encoder level, the last = the transformer input) and the SqueezeSAM keyword
    arguments (`transformer_dim`, `transformer_mlp_dim`, `embed_dim`, `num_masks`, ...) may be shrunk
    for tests.
    """
    return SqueezeSAM(widths=tuple(widths), **kwargs)
