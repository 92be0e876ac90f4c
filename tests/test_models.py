"""Reference encoders (linattn.models): structure, parameter counts, official key names, checkpoint loading,
forward shapes at small inputs (full-size models, CPU), preprocessing.

Shape and parameter checks of the full-resolution models run on the meta device (no memory, no compute).
"""

import numpy as np
import pytest
import torch
from torch import nn

from linattn.models import (
    CheckpointMismatchError,
    efficientsam_encoder,
    efficientsam_preprocess,
    efficientvit_sam_encoder,
    load_checkpoint,
    preprocess,
    squeezesam,
)
from linattn.models.efficientvit_sam import PIXEL_MEAN, PIXEL_STD, LiteMLA, input_size, preprocess_shape

EVIT_VARIANTS = ["l0", "l1", "l2", "xl0", "xl1"]

# Parameters of backbone + neck + norm, from the official configs (efficientvit/models/efficientvit/sam.py).
EVIT_PARAMS = {
    "l0": 30_728_224,
    "l1": 43_585_568,
    "l2": 57_264_032,
    "xl0": 112_893_344,
    "xl1": 199_281_568,
}
# Published whole-model sizes (EfficientViT-SAM paper / model zoo, millions), minus SAM's prompt encoder
# (6,220) and mask decoder (4,058,340) that the whole model adds to the image encoder.
SAM_PROMPT_AND_DECODER = 6_220 + 4_058_340
EVIT_PUBLISHED_M = {"l0": 34.8, "l1": 47.7, "l2": 61.3, "xl0": 117.0, "xl1": 203.3}
EFFICIENTSAM_PARAMS = {"vitt": 6_163_840, "vits": 22_353_664}
EFFICIENTSAM_PUBLISHED_M = {"vitt": 10.22, "vits": 26.41}  # whole model, same decoder size as SAM's


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_encoder(variant: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return efficientvit_sam_encoder(variant, **kwargs).eval()


_BUILT: dict[str, nn.Module] = {}


def built(variant: str) -> nn.Module:
    """Full-size model with real weights, built once per variant; neck follows the input size."""
    if variant not in _BUILT:
        torch.manual_seed(0)
        _BUILT[variant] = efficientvit_sam_encoder(variant, embed_size=None).eval()
    return _BUILT[variant]


# ----------------------------------------------------------------------------------------------
# EfficientViT-SAM structure
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", EVIT_VARIANTS)
def test_param_count(variant):
    model = meta_encoder(variant)
    count = n_params(model)
    assert count == EVIT_PARAMS[variant]
    published = EVIT_PUBLISHED_M[variant] * 1e6 - SAM_PROMPT_AND_DECODER
    assert abs(count - published) / published < 0.01, (count, published)


def test_param_count_l0_about_30_7m():
    assert abs(n_params(meta_encoder("l0")) / 1e6 - 30.7) < 0.307


@pytest.mark.parametrize("variant", EVIT_VARIANTS)
def test_official_key_names(variant):
    keys = set(meta_encoder(variant).state_dict())
    att = "backbone.stages.4.op_list.1.context_module.main"
    for key in (
        "backbone.stages.0.op_list.0.conv.weight",
        "backbone.stages.0.op_list.0.norm.running_var",
        f"{att}.qkv.conv.weight",
        f"{att}.aggreg.0.0.weight",
        f"{att}.aggreg.0.1.weight",
        f"{att}.proj.conv.weight",
        f"{att}.proj.norm.running_var",
        "backbone.stages.4.op_list.1.local_module.main.inverted_conv.conv.bias",
        "backbone.stages.4.op_list.1.local_module.main.depth_conv.conv.bias",
        "backbone.stages.4.op_list.1.local_module.main.point_conv.norm.weight",
        "neck.input_ops.0.op_list.0.conv.weight",
        "neck.input_ops.2.op_list.0.norm.running_mean",
        "neck.middle.op_list.0.main.spatial_conv.conv.weight",
        "neck.middle.op_list.0.main.point_conv.norm.bias",
        "neck.output_ops.0.op_list.0.conv.weight",
        "neck.output_ops.0.op_list.0.conv.bias",
        "norm.weight",
        "norm.bias",
    ):
        assert key in keys, key
    assert not any(k.startswith("image_encoder.") for k in keys)
    assert f"{att}.qkv.conv.bias" not in keys  # no bias before the attention, as the official LiteMLA


@pytest.mark.parametrize(
    "variant, scale, att_stages",
    [("l0", 5, (4,)), ("l2", 5, (4,)), ("xl0", 3, (4, 5)), ("xl1", 3, (4, 5))],
)
def test_lite_mla_config(variant, scale, att_stages):
    model = meta_encoder(variant)
    mlas = [(name, m) for name, m in model.named_modules() if isinstance(m, LiteMLA)]
    assert {int(name.split(".")[2]) for name, _ in mlas} == set(att_stages)
    for _, m in mlas:
        assert m.dim == 32 and m.eps == 1e-15 and isinstance(m.kernel_func, nn.ReLU)
        assert len(m.aggreg) == 1 and m.aggreg[0][0].kernel_size == (scale, scale)
        # 16 heads at 512 channels, 32 at 1024; grouped per head in the aggregation's 1x1 conv
        assert m.aggreg[0][1].groups * 32 == 3 * m.qkv.conv.in_channels
        assert m.proj.norm.eps == 1e-6
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-6 for m in bns)
    assert all(
        isinstance(m.act, nn.GELU) and m.act.approximate == "tanh"
        for m in model.modules()
        if hasattr(m, "act") and m.act is not None
    )


@pytest.mark.parametrize("variant", EVIT_VARIANTS)
def test_native_resolution_shape_meta(variant):
    model = meta_encoder(variant)
    size = input_size(variant)
    assert size == (512 if variant.startswith("l") else 1024)
    out = model(torch.empty(2, 3, size, size, device="meta"))
    assert out.shape == (2, 256, 64, 64)


def test_official_neck_size_is_fixed_meta():
    # the official neck resizes to 64x64 whatever the input size
    out = meta_encoder("l0")(torch.empty(1, 3, 256, 384, device="meta"))
    assert out.shape == (1, 256, 64, 64)


@pytest.mark.parametrize("variant", EVIT_VARIANTS)
def test_forward_small_input(variant):
    model = built(variant)
    size = 128
    stride = 8 if variant.startswith("l") else 16  # the neck's finest input: stage2 (L) or stage3 (XL)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 256, size // stride, size // stride)
    assert torch.isfinite(out).all()
    # LayerNorm2d output: zero mean, unit variance over channels (weight 1, bias 0 at init)
    torch.testing.assert_close(out.mean(1), torch.zeros_like(out.mean(1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant, size", [("l1", 192), ("l2", 64)])
def test_backbone_matches_timm(variant, size):
    """timm's efficientvit_l* (a port of the same official backbone): same parameter order and shapes, and the
    same features once its weights are copied in (eps values copied: they differ between the ports). In fp32
    (float64 grouped convs are very slow on CPU); the two sum in different orders, hence 1e-4. At 192 the last
    stage is 6x6 (36 tokens > 32: linear attention), at 64 it is 2x2 (EfficientViT's quadratic path)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    ref = timm.create_model(f"efficientvit_{variant}", pretrained=False).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    for key, value in state.items():  # non-trivial BatchNorm statistics
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith(("running_mean", "norm.bias")):
            value.normal_(0.0, 0.1)
        elif key.endswith("norm.weight"):
            value.uniform_(0.5, 1.5)
    ref.load_state_dict(state, strict=False)

    ours = efficientvit_sam_encoder(variant).backbone.eval()
    own = ours.state_dict()
    assert [tuple(v.shape) for v in own.values()] == [tuple(v.shape) for v in state.values()]
    ours.load_state_dict(dict(zip(own, state.values())), strict=True)
    ref_bns = [m for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.startswith("head")]
    our_bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    for a, b in zip(ref_bns, our_bns, strict=True):
        b.eps = a.eps
    ref_mlas = [m for m in ref.modules() if type(m).__name__ == "LiteMLA"]
    our_mlas = [m for m in ours.modules() if type(m).__name__ == "LiteMLA"]
    for a, b in zip(ref_mlas, our_mlas, strict=True):
        b.eps = a.eps

    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = ours(x)["stage_final"]
    assert got.shape == expected.shape
    err = ((got - expected).norm() / expected.norm()).item()
    assert err < 1e-4, err


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _perturbed(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every float tensor replaced by random values."""
    return {k: torch.rand_like(v) if v.is_floating_point() else v + 3 for k, v in model.state_dict().items()}


def test_roundtrip_official_layout(tmp_path):
    torch.manual_seed(0)
    source = efficientvit_sam_encoder("l0")
    state = _perturbed(source)
    wrapped = {"image_encoder." + k: v for k, v in state.items()}
    wrapped["prompt_encoder.x"] = torch.ones(3)
    wrapped["mask_decoder.iou_token.weight"] = torch.ones(1, 256)
    path = tmp_path / "l0.pt"
    torch.save({"state_dict": wrapped, "epoch": 3}, path)

    target = efficientvit_sam_encoder("l0")
    assert load_checkpoint(target, path) is target
    loaded = target.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_roundtrip_plain_state_dict(tmp_path):
    model = efficientsam_encoder("vitt")
    state = _perturbed(model)
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    target = load_checkpoint(efficientsam_encoder("vitt"), path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


def test_roundtrip_efficientsam_model_wrapper(tmp_path):
    # the official EfficientSAM files are {"model": whole-SAM state_dict}
    state = _perturbed(efficientsam_encoder("vitt"))
    full = {"image_encoder." + k: v for k, v in state.items()}
    full["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    path = tmp_path / "efficient_sam_vitt.pt"
    torch.save({"model": full}, path)
    target = load_checkpoint(efficientsam_encoder("vitt"), path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.BatchNorm2d(4)


class _TinySam(nn.Module):
    """A whole model: its own keys carry the image_encoder. prefix, so nothing is stripped or dropped."""

    def __init__(self):
        super().__init__()
        self.image_encoder = _TinyEncoder()
        self.prompt_encoder = nn.Linear(2, 2)


def test_whole_model_keeps_other_parts(tmp_path):
    state = _perturbed(_TinySam())
    path = tmp_path / "sam.pt"
    torch.save({"model": state}, path)
    target = load_checkpoint(_TinySam(), path)
    assert torch.equal(target.prompt_encoder.weight, state["prompt_encoder.weight"])
    assert torch.equal(target.image_encoder.conv.weight, state["image_encoder.conv.weight"])


def test_ddp_prefix_is_stripped(tmp_path):
    state = _perturbed(_TinyEncoder())
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    target = load_checkpoint(_TinyEncoder(), path)
    assert torch.equal(target.conv.weight, state["conv.weight"])


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = _TinyEncoder().state_dict()
    del state["norm.running_var"]
    state["norm.extra"] = torch.zeros(1)
    state["conv.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    target = _TinyEncoder()
    before = target.conv.weight.clone()
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(target, path)
    message = str(info.value)
    assert "linattn.models.load_checkpoint" in message and "_TinyEncoder" in message and "bad.pt" in message
    assert "1 missing keys: [norm.running_var]" in message
    assert "1 unexpected keys: [norm.extra]" in message
    assert "conv.bias (5,) vs model (4,)" in message
    assert info.value.missing == ["norm.running_var"] and info.value.unexpected == ["norm.extra"]
    assert torch.equal(target.conv.weight, before)  # nothing copied


def test_mismatch_between_variants(tmp_path):
    path = tmp_path / "l0.pt"
    torch.save(meta_encoder("l0").to_empty(device="cpu").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: \[backbone\.stages\.1\.op_list\.2"):
        load_checkpoint(meta_encoder("l2").to_empty(device="cpu"), path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(TypeError, match="expected a state_dict"):
        load_checkpoint(_TinyEncoder(), path)


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------


def test_preprocess_resize_normalise_pad():
    image = torch.full((3, 300, 600), 200, dtype=torch.uint8)
    out = preprocess(image, "l0")
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.float32
    h, w = preprocess_shape(300, 600, 512)
    assert (h, w) == (256, 512)
    expected = (200 - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    torch.testing.assert_close(out[0, :, :h, :w], expected.view(3, 1, 1).expand(3, h, w))
    assert (out[:, :, h:] == 0).all()  # padded at the bottom


def test_preprocess_numpy_xl_and_batch():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(700, 350, 3), dtype=np.uint8)
    out = preprocess(image, "xl1")
    assert out.shape == (1, 3, 1024, 1024)
    assert (out[..., 512:] == 0).all() and (out[..., :512] != 0).any()  # padded on the right
    raw = torch.rand(2, 3, 512, 256) * 255
    batch = preprocess(raw, "l1")  # long side already 512: no resize
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch[..., :256], (raw - mean) / std)
    assert batch.shape == (2, 3, 512, 512) and (batch[..., 256:] == 0).all()


def test_preprocess_bad_input():
    with pytest.raises(ValueError, match="unknown EfficientViT-SAM variant"):
        preprocess(torch.zeros(3, 8, 8), "l9")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        preprocess(torch.zeros(4, 8, 8), "l0")
    with pytest.raises(ValueError, match="unknown EfficientViT-SAM variant"):
        efficientvit_sam_encoder("b1")
    for size in (0, -2, 64.5, "64"):
        with pytest.raises(ValueError, match=f"embed_size must be a positive int or None, got {size!r}"):
            efficientvit_sam_encoder("l0", embed_size=size)


def test_squeezesam_bad_arguments_and_inputs():
    """Sizes that would build a model failing later (or never) are refused when it is built, each naming its
    argument; inputs the model cannot take (odd sides, which the stride-2 patch embedding would floor; prompts
    twice; prompts of another size) are refused at the call."""
    tiny = dict(transformer_dim=16, transformer_heads=2, transformer_mlp_dim=8, embed_dim=8)
    for kwargs, message in [
        (
            dict(tiny, transformer_dim=30, transformer_heads=8),
            "transformer_dim 30 is not divisible by transformer_heads 8",
        ),
        (dict(tiny, widths=()), "widths must name at least one encoder level"),
        (dict(tiny, widths=(8, 0)), r"widths\[1\] must be a positive int, got 0"),
        (dict(tiny, num_masks=2.0), "num_masks must be a positive int, got 2.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            squeezesam(**{"widths": (8, 8), **kwargs})
    model = squeezesam(widths=(8, 8), **tiny)
    image = torch.zeros(1, 3, 16, 16)
    for args, message in [
        ((torch.zeros(1, 3, 15, 16),), r"H and W even, got \(1, 3, 15, 16\)"),
        ((torch.zeros(1, 4, 16, 16),), r"image must be \(B, 3 or 5, H, W\)"),
        ((torch.zeros(1, 5, 16, 16), torch.zeros(1, 1, 16, 16)), "holds the prompts already"),
        ((image, torch.zeros(1, 1, 8, 8)), r"box_mask must be \(B, 1, H, W\) = \(1, 1, 16, 16\)"),
        ((image, None, torch.zeros(2, 1, 16, 16)), r"clicks must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            model(*args)
    masks, iou = model(image, torch.ones(1, 1, 16, 16))
    assert masks.shape == (1, 3, 8, 8) and iou.shape == (1, 3)


# ----------------------------------------------------------------------------------------------
# EfficientSAM
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vitt", "vits"])
def test_efficientsam_params_and_keys(variant):
    with torch.device("meta"):
        model = efficientsam_encoder(variant)
    count = n_params(model)
    assert count == EFFICIENTSAM_PARAMS[variant]
    published = EFFICIENTSAM_PUBLISHED_M[variant] * 1e6 - SAM_PROMPT_AND_DECODER
    assert abs(count - published) / published < 0.01
    keys = set(model.state_dict())
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "blocks.11.attn.qkv.bias",
                "blocks.0.attn.proj.weight", "blocks.0.mlp.fc2.bias", "blocks.0.norm2.weight",
                "neck.0.weight", "neck.1.weight", "neck.2.weight", "neck.3.bias"):  # fmt: skip
        assert key in keys, key
    width = {"vitt": 192, "vits": 384}[variant]
    assert model.pos_embed.shape == (1, 14 * 14 + 1, width)
    assert model.blocks[0].attn.num_heads == width // 64
    assert len(model.blocks) == 12
    out = model(torch.empty(1, 3, 1024, 1024, device="meta"))
    assert out.shape == (1, 256, 64, 64)


@pytest.mark.parametrize("variant", ["vitt", "vits"])
def test_efficientsam_forward_small(variant):
    torch.manual_seed(0)
    model = efficientsam_encoder(variant).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 96))
    assert out.shape == (2, 256, 8, 6) and torch.isfinite(out).all()


def test_efficientsam_attention_matches_eager():
    """SDPA attention equals the official eager softmax(q k^T * scale) v."""
    torch.manual_seed(0)
    attn = efficientsam_encoder("vitt").blocks[0].attn.double()
    x = torch.randn(2, 17, 192, dtype=torch.float64)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 3, C // 3).permute(2, 0, 3, 1, 4)
    eager = ((q @ k.transpose(-2, -1)) * (C // 3) ** -0.5).softmax(-1) @ v
    expected = attn.proj(eager.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), expected)


def test_efficientsam_bad_input_and_preprocess():
    model = efficientsam_encoder("vitt")
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match="unknown EfficientSAM variant"):
        efficientsam_encoder("vitb")
    out = efficientsam_preprocess(torch.ones(3, 20, 30), img_size=64)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out[0, 0], torch.full((64, 64), (1 - 0.485) / 0.229))
