"""linattn.optimize on timm's efficientvit_mit models and modules and on SqueezeSAM: report, parity, keys, compile.

Parity (docs/design.md 8): the oracle is the original model in float64 (eager PyTorch, no linattn op).
fp32: relative error under 1e-5 (or twice eager fp32's own error where that is larger); bf16: at
most twice the error of the original model run eagerly in bf16. Weights and BatchNorm statistics
are random so that a wrong fold or a swapped key shows.
"""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close, randomize, rel_err, tolerance

import linattn
from linattn._backend import unavailable
from linattn.benchmarks.bench_e2e import OpCounter
from linattn.models import efficientsam_encoder, efficientvit_sam_encoder
from linattn.models.efficientvit_sam import LiteMLA as EagerLiteMLA
from linattn.models.squeezesam import SqueezeSAM, squeezesam
from linattn.nn import ConvBNAct, LiteMLA
from linattn.optimize import (
    FusedLayerNorm2d,
    FusedNeck,
    FusedResidualBlock,
    FusedSequential,
    FusedUpsampleBlock,
    OptimizeReport,
)

timm_mit = pytest.importorskip("timm.models.efficientvit_mit", reason="timm is a test dependency (pip install timm)")

_WHY = unavailable("triton", torch.device("cpu"))
BACKENDS = [  # the models run on CPU tensors: the reference, and the Triton kernels under the interpreter
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton-interpreter", marks=[pytest.mark.skip(reason=f"triton: {_WHY}")] if _WHY else []),
]

SQUEEZESAM_PARAMS = 10_269_807  # derived from docs/design.md 5's widths, a 256-wide depth-2 transformer (MLP 512)


def tiny_efficientvit() -> nn.Module:
    """timm's EfficientVit (the B-series backbone) at toy widths: 2 LiteMLA blocks, 22 ConvNormAct."""
    return timm_mit.EfficientVit(
        widths=(8, 16, 16, 32, 32), depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(32, 32), num_classes=10
    )


def tiny_squeezesam() -> SqueezeSAM:
    return squeezesam(
        widths=(8, 8, 8, 8, 8), transformer_dim=16, transformer_heads=2, transformer_mlp_dim=32, embed_dim=8
    )


def timm_blocks() -> nn.Sequential:
    """timm modules side by side in a Sequential, plus a plain conv -> BN -> GELU(tanh) run."""
    return nn.Sequential(
        timm_mit.ConvNormAct(4, 16, 3, act_layer=timm_mit.GELUTanh),
        timm_mit.LiteMLA(16, 16, dim=8, scales=(3,), eps=1e-15),
        nn.Conv2d(16, 8, 1),
        nn.BatchNorm2d(8),
        nn.GELU(approximate="tanh"),
    )


def outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare_eval(model, optimized, x, dtype, what):
    """Optimized vs a float64 oracle of the original, in `dtype`, against eager's error in `dtype`."""
    with torch.no_grad():
        oracle = outputs(copy.deepcopy(model).double()(x.double()))
        eager = outputs(copy.deepcopy(model).to(dtype)(x.to(dtype)))
        got = outputs(optimized.to(dtype)(x.to(dtype)))
    errors = []
    for i, (g, e, o) in enumerate(zip(got, eager, oracle)):
        eager_err = rel_err(e, o)
        assert_close(g, o, tolerance(dtype, eager_err), f"{what}, output {i}")
        errors.append((rel_err(g, o), eager_err))
    return errors


# --- report and structure ---


def test_report_on_timm_efficientvit():
    model = tiny_efficientvit()
    optimized, report = linattn.optimize(model, return_report=True)
    assert isinstance(report, OptimizeReport)
    assert report.counts() == {"ConvBNAct": 22, "FusedResidualBlock": 9, "LiteMLA": 2}
    # every residual add is fused: the MBConvs' into their last conv, the attention's into its projection; the
    # 4 downsampling blocks (no shortcut) too, for their MBConv's depthwise -> 1x1 pair
    assert report.skipped == []
    fused = optimized.stages[2].blocks[1].local_module
    assert isinstance(fused, FusedResidualBlock) and type(fused.main).__name__ == "MBConv"
    context = optimized.stages[2].blocks[1].context_module
    assert isinstance(context, FusedResidualBlock) and isinstance(context.main, LiteMLA)
    names = {r.name: (r.old, r.new) for r in report.replaced}
    assert names["stages.2.blocks.1.context_module.main"] == ("LiteMLA", "LiteMLA")
    assert names["stem.in_conv"] == ("ConvNormAct", "ConvBNAct")
    lite = optimized.stages[2].blocks[1].context_module.main
    assert isinstance(lite, LiteMLA) and not lite.quadratic_small_maps  # timm's attention is always linear
    assert isinstance(optimized.stem.in_conv, ConvBNAct)
    assert list(optimized.state_dict()) == list(model.state_dict())
    text = str(report)
    assert "stem.in_conv" in text and "ConvNormAct -> ConvBNAct" in text and "LiteMLA" in text


def test_report_left_alone_with_reasons():
    model = nn.Sequential(
        timm_mit.ConvNormAct(4, 8, 3, dropout=0.1),  # dropout p > 0
        timm_mit.ConvNormAct(8, 8, 3, act_layer=nn.ELU),  # activation without a kernel
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),  # not a BatchNorm
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),  # conv -> act -> BN
        nn.Conv2d(8, 8, 1),  # lone conv: not a candidate
    )
    optimized, report = linattn.optimize(model, return_report=True)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "dropout (p=0.1)" in reasons["0"]
    assert "ELU" in reasons["1"]
    assert "GroupNorm" in reasons["2"]
    assert [(r.name, r.new) for r in report.replaced] == [("", "FusedSequential")]
    assert isinstance(optimized, FusedSequential) and optimized._runs == [(4, 7)]
    assert optimized._blocks[0].order == "conv_act_bn"
    assert "1 replaced, 3 left alone" in str(report) and "GroupNorm" in str(report)


def test_report_on_squeezesam():
    model = squeezesam()
    optimized, report = linattn.optimize(model, return_report=True)
    # 8 encoder + 7 decoder DoubleConvs of 2 conv -> ReLU -> BN runs each, 7 upsample blocks
    assert report.counts() == {"ConvBNAct": 30, "FusedUpsampleBlock": 7}
    assert [s.name for s in report.skipped] == ["patch_embed.0"]  # conv + GroupNorm
    assert isinstance(optimized.up[0].up, FusedUpsampleBlock)
    assert all(isinstance(level, FusedSequential) for level in optimized.down)
    assert list(optimized.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("variant, attention", [("l0", 4), ("xl1", 12)])
def test_report_on_efficientvit_sam(variant, attention):
    with torch.device("meta"):
        model = efficientvit_sam_encoder(variant)
    optimized, report = linattn.optimize(model, return_report=True)
    # every ConvLayer outside the attention becomes a ConvBNAct (those inside are LiteMLA's qkv and proj)
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "ConvLayer"]
    blocks = sum(1 for n in layers if not n.endswith(("main.qkv", "main.proj")))
    assert blocks == len(layers) - 2 * attention
    # every residual block: around MBConv / FusedMBConv / ResBlock / LiteMLA with an identity shortcut, and the
    # downsampling ones without (shortcut None), whose MBConv depthwise -> 1x1 pair is fused too
    residual = sum(1 for m in model.modules() if type(m).__name__ == "ResidualBlock")
    counts = {"ConvBNAct": blocks, "FusedResidualBlock": residual, "LiteMLA": attention, "FusedNeck": 1}
    counts["FusedLayerNorm2d"] = 1
    assert report.counts() == counts
    assert report.skipped == []  # the attention's add too: its projection's epilogue
    assert isinstance(optimized.neck, FusedNeck)  # the resizes and their sum: one upsample_sum
    assert not any(isinstance(m, EagerLiteMLA) for m in optimized.modules())
    mlas = [m for m in optimized.modules() if isinstance(m, LiteMLA)]
    assert len(mlas) == attention and all(m.quadratic_small_maps for m in mlas)  # the official small-map path
    assert list(optimized.state_dict()) == list(model.state_dict())


def test_residual_needs_an_efficientvit_block():
    class MBConv(nn.Module):  # an MBConv by name only: other children, another forward
        def __init__(self):
            super().__init__()
            self.expand = timm_mit.ConvNormAct(4, 4, 1)
            self.mix = timm_mit.ConvNormAct(4, 4, 3)

        def forward(self, x):
            return self.mix(self.expand(x)) * 2

    model = randomize(timm_mit.ResidualBlock(MBConv(), nn.Identity()), seed=30).eval()
    optimized, report = linattn.optimize(model, backend="reference", return_report=True)
    assert report.counts() == {"ConvBNAct": 2}
    assert [s.kind for s in report.skipped] == ["residual"] and "conv blocks" in report.skipped[0].reason
    compare_eval(model, optimized, torch.randn(1, 4, 5, 5), torch.float32, "MBConv look-alike")


def test_inplace_semantics():
    model = timm_blocks()
    before = copy.deepcopy(model.state_dict())
    optimized = linattn.optimize(model)  # docs/design.md 2: the default returns the model alone
    assert isinstance(optimized, nn.Module) and optimized is not model
    assert isinstance(model[1], timm_mit.LiteMLA)  # a copy was optimized: the model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    optimized = linattn.optimize(model, inplace=True)
    assert isinstance(model[1], LiteMLA) and isinstance(model[0], ConvBNAct)  # children swapped in place
    assert isinstance(optimized, FusedSequential)  # the root Sequential itself holds a run: a new root
    assert optimized[1] is model[1]
    again, report = linattn.optimize(optimized, return_report=True)
    assert not report.replaced  # already optimized: nothing to do


def test_backend_argument():
    model = timm_blocks().eval()
    optimized, report = linattn.optimize(model, backend="reference", return_report=True)
    assert report.backend == "reference"
    seen = []
    optimized[1].register_forward_pre_hook(lambda m, a: seen.append(linattn.get_backend()))
    with linattn.backend("auto"):
        optimized(torch.randn(1, 4, 5, 5))
        assert linattn.get_backend() == "auto"  # restored after the forward
    assert seen == ["reference"]
    assert not report.training and "backend 'reference', eval mode" in str(report)
    with linattn.backend("auto"):
        with pytest.raises(ValueError):
            optimized(torch.randn(1, 3, 5, 5))  # the wrong number of channels
        assert linattn.get_backend() == "auto"  # restored after a forward that raised too
    with pytest.raises(ValueError, match="unknown backend"):
        linattn.optimize(model, backend="tpu")
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        linattn.optimize(lambda x: x)


def test_backend_argument_twice_in_place():
    """Optimized in place again with another backend: the forward runs under the latest, and the caller's
    backend is restored after it (the hooks restore in the reverse order of setting)."""
    model = linattn.optimize(timm_blocks().eval(), backend="reference")
    model = linattn.optimize(model, backend="triton", inplace=True)
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(linattn.get_backend()))
    with linattn.backend("auto"):
        model(torch.randn(1, 4, 5, 5))
        assert linattn.get_backend() == "auto"
    assert seen == ["triton"]


# --- parity ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_efficientvit_eval_fp32_bf16(backend):
    model = randomize(tiny_efficientvit(), seed=1).eval()
    optimized = linattn.optimize(model, backend=backend)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # LiteMLA maps 2x2 and 1x1
    compare_eval(model, optimized, x, torch.float32, f"timm EfficientVit fp32, {backend}")
    if backend == "reference":  # bf16 on the interpreter is covered by the smaller models below
        compare_eval(model, optimized, x, torch.bfloat16, f"timm EfficientVit bf16, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_timm_blocks_eval(backend, dtype):
    model = randomize(timm_blocks(), seed=3).eval()
    optimized = linattn.optimize(model, backend=backend)
    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(4))
    compare_eval(model, optimized, x, dtype, f"timm blocks {dtype}, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_squeezesam_eval(backend, dtype):
    model = randomize(tiny_squeezesam(), seed=5).eval()
    optimized = linattn.optimize(model, backend=backend)
    x = torch.randn(1, 5, 32, 32, generator=torch.Generator().manual_seed(6))
    compare_eval(model, optimized, x, dtype, f"SqueezeSAM {dtype}, {backend}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_efficientvit_sam_l0_eval(dtype):
    """Our eager encoder (official-style attention) against its optimized copy, full width. At 192 the
    LiteMLA maps are 6x6 (36 tokens > dim 32: linear attention, the fused context op)."""
    model = randomize(efficientvit_sam_encoder("l0", embed_size=None), seed=20).eval()
    optimized = linattn.optimize(model, backend="reference")
    x = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(21))
    compare_eval(model, optimized, x, dtype, f"EfficientViT-SAM l0 {dtype}")


def test_efficientvit_sam_l0_small_maps():
    """At 64 the LiteMLA maps are 2x2: EfficientViT's quadratic attention on the fused aggregation."""
    model = randomize(efficientvit_sam_encoder("l0", embed_size=None), seed=22).eval()
    optimized = linattn.optimize(model, backend="reference")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(23))
    compare_eval(model, optimized, x, torch.float32, "EfficientViT-SAM l0 64x64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_efficientvit_sam_attention_block(backend):
    """One full-width l0 attention block (512 channels, 16 heads of 32, scale 5) on a 6x6 map: the Triton
    kernels under the interpreter (the whole encoder there takes minutes)."""
    model = randomize(efficientvit_sam_encoder("l0", embed_size=None), seed=28).eval()
    block = model.backbone.stages[4].op_list[1].context_module
    optimized, report = linattn.optimize(block, backend=backend, return_report=True)
    assert report.counts() == {"LiteMLA": 1, "FusedResidualBlock": 1}  # the block's add: the projection's epilogue
    x = torch.randn(1, 512, 6, 6, generator=torch.Generator().manual_seed(29))
    compare_eval(block, optimized, x, torch.float32, f"EfficientViT-SAM l0 attention block, {backend}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_timm_efficientvit_l1_eval(dtype):
    """timm's efficientvit_l1 (random init), as the issue asks; 192x192: stage-4 maps 6x6, linear attention."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(24)
    model = randomize(timm.create_model("efficientvit_l1", pretrained=False), seed=24).eval()
    optimized, report = linattn.optimize(model, backend="reference", return_report=True)
    assert report.counts()["LiteMLA"] == 6 and not any(isinstance(m, timm_mit.LiteMLA) for m in optimized.modules())
    x = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(25))
    compare_eval(model, optimized, x, dtype, f"timm efficientvit_l1 {dtype}")


def test_squeezesam_full_width_eval_small_input():
    model = randomize(squeezesam(), seed=7).eval()
    optimized = linattn.optimize(model, backend="reference")
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    box = torch.zeros(1, 1, 64, 64)
    box[..., 8:40, 16:48] = 1
    clicks = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        masks, iou = model(image, box, clicks)
        got_masks, got_iou = optimized(image, box, clicks)
    assert masks.shape == (1, 3, 32, 32) and iou.shape == (1, 3)
    assert_close(got_masks, masks, 1e-5, "SqueezeSAM masks")
    assert_close(got_iou, iou, 1e-5, "SqueezeSAM IoU")


def run_train(model, x, seed):
    model.train()
    x = x.detach().clone().requires_grad_(True)
    outs = outputs(model(x))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.dtype)).sum() for o in outs)
    loss.backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return outs, grads


def compare_train(model, optimized, x, what, fused_only: bool = False):
    """Train-mode outputs and gradients (input and every parameter; fused_only: the input and the parameters of
    the modules optimize put in, see fused_parameters) and the BatchNorm running-stat updates."""
    oracle_outs, oracle = run_train(copy.deepcopy(model).double(), x.double(), 11)
    eager_model = copy.deepcopy(model)
    eager_outs, eager = run_train(eager_model, x, 11)
    outs, got = run_train(optimized, x, 11)
    for i, (g, e, o) in enumerate(zip(outs, eager_outs, oracle_outs)):
        assert_close(g, o, tolerance(torch.float32, rel_err(e, o)), f"{what}: train output {i}")
    assert got.keys() == oracle.keys()
    compared = {"x", *fused_parameters(optimized)} if fused_only else oracle.keys()
    assert len(compared) > 1
    for key, ref in oracle.items():
        if ref.abs().max() < 1e-12 or key not in compared:  # e.g. a conv bias under a train-mode BatchNorm
            continue
        assert_close(got[key], ref, tolerance(torch.float32, rel_err(eager[key], ref)), f"{what}: grad {key}")
    stats = {k: v for k, v in optimized.state_dict().items() if "running_" in k}
    assert stats
    for key, value in stats.items():
        assert_close(value, eager_model.state_dict()[key], 1e-4, f"{what}: {key}")


def fused_parameters(optimized: nn.Module) -> set[str]:
    """The names of the parameters held by the modules optimize put in (their gradients are linattn's kernels')."""
    ours = ("linattn.optimize", "linattn.nn.conv_bn_act", "linattn.nn.lite_mla")
    return {
        f"{name}.{p}" if name else p
        for name, module in optimized.named_modules()
        if type(module).__module__ in ours
        for p, _ in module.named_parameters()
    }


def test_timm_efficientvit_train_reference():
    model = randomize(tiny_efficientvit(), seed=12)
    optimized = linattn.optimize(model, backend="reference")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    compare_train(model, optimized, x, "timm EfficientVit")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_gradients_small(backend):
    model = randomize(timm_blocks(), seed=14)
    optimized = linattn.optimize(model, backend=backend)
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(15))
    compare_train(model, optimized, x, f"timm blocks, {backend}")
    # three levels, 16x16 .. 4x4 maps at 32x32: train-mode BatchNorm over a few values (tiny maps of batch 2)
    # makes the gradients ill-conditioned, so the input is large enough to keep docs/design.md 8's bound meaningful
    # for the convs'. The gradients of the small two-way transformer's parameters (eager modules, which optimize
    # leaves alone) are ill-conditioned whatever the size: eager fp32's own error against float64 reaches 7e-4,
    # and changes with the thread count, so a bound of twice it is noise there. Compared: the input's gradient
    # and those of the fused modules' parameters, whose backward linattn's kernels compute (the encoder's take the
    # gradient that flowed back through the decoder's fused blocks and the transformer)
    model = randomize(squeezesam(widths=(8, 8, 8), transformer_dim=16, transformer_heads=2, embed_dim=8), seed=16)
    optimized = linattn.optimize(model, backend=backend)
    x = torch.randn(2, 5, 32, 32, generator=torch.Generator().manual_seed(17))
    compare_train(model, optimized, x, f"SqueezeSAM, {backend}", fused_only=True)


# --- compile, size ---


COMPILE_CASES = {  # model, input shape (XL0 has every block type of XL1, fewer of them; 8x8 maps at stage 5)
    "SqueezeSAM": (tiny_squeezesam, (1, 5, 16, 16)),
    "EfficientViT-SAM l0": (lambda: efficientvit_sam_encoder("l0", embed_size=None), (1, 3, 192, 192)),
    "EfficientViT-SAM xl0": (lambda: efficientvit_sam_encoder("xl0", embed_size=None), (1, 3, 256, 256)),
    "EfficientSAM vitt": (lambda: efficientsam_encoder("vitt"), (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_fullgraph(name):
    build, shape = COMPILE_CASES[name]
    model = randomize(build(), seed=18).eval()
    optimized = linattn.optimize(model, backend="reference")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(19))
    torch._dynamo.reset()
    # aot_eager: dynamo's full graph and AOTAutograd's trace through the custom ops, without inductor's
    # C++ code generation (over a minute on this CI's two cores)
    compiled = torch.compile(optimized, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), linattn.backend("reference"):
        got = outputs(compiled(x))
        want = outputs(model(x))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-5, f"compiled optimized {name}")


@pytest.mark.parametrize("name", ["SqueezeSAM", "EfficientViT-SAM l0"])
def test_export_and_aoti_package(name, tmp_path):
    """torch.export of an optimized encoder with a dynamic batch, and its AOTInductor package run from the file:
    the deployment path without the model's Python code. Both call linattn's ops (the package through its proxy
    executor, which once handed the context an empty bias list as None) and match the optimized model."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ for AOTInductor's C++ wrapper")
    build, shape = COMPILE_CASES[name]
    optimized = linattn.optimize(randomize(build(), seed=20).eval(), backend="reference")
    x = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(21))
    program = torch.export.export(optimized, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    fused = {str(n.target).split(".")[1] for n in program.graph.nodes if str(n.target).startswith("linattn.")}
    assert fused >= ({"upsample_block"} if name == "SqueezeSAM" else {"lite_mla_context", "upsample_sum"})
    package = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "encoder.pt2"))
    )
    with torch.no_grad(), linattn.backend("reference"):
        for batch in (1, 3):
            x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(22 + batch))
            want = outputs(optimized(x))
            for how, run in (("exported", program.module()), ("AOTInductor package", package)):
                for g, w in zip(outputs(run(x)), want, strict=True):
                    assert_close(g, w, 1e-5, f"{how} optimized {name}, batch {batch}")


def test_squeezesam_size_and_shapes():
    model = squeezesam()
    assert sum(p.numel() for p in model.parameters()) == SQUEEZESAM_PARAMS
    assert abs(SQUEEZESAM_PARAMS - 10e6) / 10e6 < 0.05  # "about 10 M" (docs/design.md 5)
    with torch.device("meta"):
        model = squeezesam().eval()
        masks, iou = model(torch.empty(2, 3, 512, 512), torch.empty(2, 1, 512, 512), torch.empty(2, 1, 512, 512))
        fused = model.fuse_inputs(torch.empty(2, 5, 512, 512))
    assert masks.shape == (2, 3, 256, 256) and iou.shape == (2, 3)
    assert fused.shape == (2, 5, 512, 512)
    widths = [level[0].out_channels for level in model.down]
    assert widths == [64, 128, 128, 128, 128, 164, 256, 256]


class _ToNCHW(nn.Module):
    """An op that drops channels_last, as CUDA's GroupNorm does."""

    def forward(self, x):
        return x.contiguous()


def _conv_inputs(model, x) -> list[bool]:
    """Whether each linattn conv call of model(x) read a channels_last input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("linattn::conv_bn_act", "linattn::upsample_block"):
                seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Mode():
        model(x)
    return seen


def test_channels_last_end_to_end():
    """optimize(channels_last=True): conv weights packed K-contiguous once, the model's NCHW input and the input of
    a fused conv after an op that drops channels_last converted, every conv call channels_last, same outputs."""
    torch.manual_seed(31)
    seq = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _ToNCHW(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
    )  # fmt: skip
    model = randomize(seq, seed=32).eval()
    optimized, report = linattn.optimize(model, backend="reference", channels_last=True, return_report=True)
    assert report.channels_last and "channels_last" in str(report)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in optimized if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 4, 7, 9)
    assert _conv_inputs(optimized, x) == [True, True]
    assert _conv_inputs(linattn.optimize(model, backend="reference"), x) == [False, False]  # CPU default: as given
    compare_eval(model, optimized, x, torch.float32, "channels_last Sequential")

    timm_model = tiny_efficientvit()
    timm_optimized = linattn.optimize(timm_model, backend="reference", channels_last=True)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(33))
    assert all(_conv_inputs(timm_optimized, image))
    compare_eval(timm_model, timm_optimized, image, torch.float32, "channels_last timm EfficientViT")

    # a residual block after an op that drops channels_last converts its input itself (no hook: see its forward)
    block = randomize(efficientvit_sam_encoder("l0", embed_size=None), seed=35).eval().backbone.stages[3].op_list[1]
    wrapped = nn.Sequential(_ToNCHW(), block)
    wrapped_optimized = linattn.optimize(wrapped, backend="reference", channels_last=True)
    assert not wrapped_optimized[1]._forward_pre_hooks and wrapped_optimized[1].channels_last
    assert not any(m._forward_pre_hooks for m in wrapped_optimized[1].modules())  # its blocks: no hook either
    fmap = torch.randn(1, block.main.inverted_conv.conv.in_channels, 5, 6)
    assert _conv_inputs(wrapped_optimized, fmap) == [True]
    assert _conv_inputs(linattn.optimize(wrapped, backend="reference"), fmap) == [False]
    compare_eval(wrapped, wrapped_optimized, fmap, torch.float32, "channels_last residual block after NCHW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mbconv_depthwise_pointwise_pair_is_one_call(backend):
    """An l0 stage-3 MBConv block in eval (and its downsampling block, no shortcut): the depthwise -> 1x1 pair runs
    as one separable_conv_bn_act (the residual in its epilogue); train mode keeps the pair apart."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Mode(TorchDispatchMode):  # the linattn ops a call runs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.startswith("linattn::"):
                calls.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    model = randomize(efficientvit_sam_encoder("l0", embed_size=None), seed=34).eval()
    stage = model.backbone.stages[3].op_list
    for block, side in ((stage[1], 6), (stage[0], 12)):
        optimized = linattn.optimize(block, backend=backend)
        calls.clear()
        x = torch.randn(1, block.main.inverted_conv.conv.in_channels, side, side)
        with torch.no_grad(), Mode():
            optimized(x)
        assert calls == ["linattn::conv_bn_act", "linattn::separable_conv_bn_act"]
        compare_eval(block, optimized, x, torch.float32, f"l0 MBConv {side}x{side}, {backend}")
        calls.clear()
        with Mode():
            optimized.train()(x)
        assert "linattn::separable_conv_bn_act" not in calls


class UpSampleLayer(nn.Module):
    """The official EfficientViT UpSampleLayer (bicubic to `size` in fp32, or by `factor`)."""

    def __init__(self, mode="bicubic", size=None, factor=2, align_corners=False):
        super().__init__()
        self.mode, self.size, self.factor, self.align_corners = mode, size, factor, align_corners

    def forward(self, x):
        if (self.size is not None and tuple(x.shape[-2:]) == self.size) or self.factor == 1:
            return x
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.interpolate(x, self.size, None if self.size else self.factor, self.mode, self.align_corners)


class OpSequential(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x):
        for op in self.op_list:
            x = op(x)
        return x


class DAGBlock(nn.Module):
    """The official EfficientViT DAGBlock (SamNeck's base): input ops merged by add or cat, then middle, outputs."""

    def __init__(self, inputs: dict, merge: str, post_input, middle, outputs: dict):
        super().__init__()
        self.input_keys, self.input_ops = list(inputs), nn.ModuleList(inputs.values())
        self.merge, self.post_input, self.middle = merge, post_input, middle
        self.output_keys, self.output_ops = list(outputs), nn.ModuleList(outputs.values())

    def forward(self, feature_dict):
        feat = [op(feature_dict[key]) for key, op in zip(self.input_keys, self.input_ops)]
        feat = sum(feat[1:], feat[0]) if self.merge == "add" else torch.cat(feat, 1)
        feat = self.middle(feat if self.post_input is None else self.post_input(feat))
        for key, op in zip(self.output_keys, self.output_ops):
            feature_dict[key] = op(feat)
        return feature_dict


def _official_neck(merge="add", size=(16, 16)):
    def conv(c):
        return nn.Sequential(nn.Conv2d(c, 8, 1, bias=False), nn.BatchNorm2d(8))

    inputs = {f"stage{i}": OpSequential([conv(c), UpSampleLayer(size=size)]) for i, c in ((4, 12), (3, 6), (2, 4))}
    middle = nn.Sequential(nn.Conv2d(8 * (3 if merge == "cat" else 1), 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return randomize(DAGBlock(inputs, merge, None, middle, {"sam_encoder": nn.Conv2d(8, 5, 1)}), 3).eval()


@pytest.mark.parametrize("size", [(16, 16), 16], ids=["pair", "int"])
def test_official_neck_is_one_upsample_sum(size):
    """The official DAGBlock neck: its bicubic resizes and their sum become one upsample_sum, same outputs; the
    resizes' size as a pair (official) or an int (which interpolate takes as a square)."""
    neck = _official_neck(size=size)
    features = {f"stage{i}": torch.randn(2, c, s, s) for i, c, s in ((4, 12, 4), (3, 6, 8), (2, 4, 16))}
    optimized, report = linattn.optimize(neck, return_report=True)
    assert isinstance(optimized, FusedNeck) and report.counts()["FusedNeck"] == 1
    assert list(optimized.state_dict()) == list(neck.state_dict())
    with torch.no_grad(), OpCounter() as counter:
        got = optimized(dict(features))["sam_encoder"]
    assert counter.per_op.get("linattn.upsample_sum") == 1 and "aten.upsample_bicubic2d" not in counter.per_op
    want = neck.double()(dict((k, v.double()) for k, v in features.items()))["sam_encoder"]
    assert_close(got, want, 1e-5, "neck output")


def _edited_neck(**changes):
    """_official_neck with `post_input` set or its resizes' attributes changed (a list: one value per resize)."""
    neck = _official_neck()
    if "post_input" in changes:
        neck.post_input = changes.pop("post_input")
    for name, values in changes.items():
        for op, value in zip(neck.input_ops, values, strict=True):
            setattr(op.op_list[1], name, value)
    return neck


@pytest.mark.parametrize(
    "neck, reason",
    [
        (_official_neck(merge="cat"), "merge 'cat'"),
        (_official_neck(size=None), "do not share one output size"),
        (_edited_neck(size=[(16, 16), (16, 16), (8, 8)]), "do not share one output size"),
        (_edited_neck(post_input=nn.Conv2d(8, 8, 1)), "post_input Conv2d"),
        (_edited_neck(mode=["bicubic", "bilinear", "bicubic"]), "resize mode 'bilinear'"),
        (_edited_neck(align_corners=[False, False, True]), "align_corners True"),
    ],
    ids=["cat", "factor", "two-sizes", "post-input", "bilinear", "align-corners"],
)
def test_neck_left_alone(neck, reason):
    _, report = linattn.optimize(neck, return_report=True)
    assert [(s.kind, reason in s.reason) for s in report.skipped] == [("neck", True)]


def test_optimizing_again_changes_nothing():
    """An optimized model (its neck included) optimized again: nothing replaced or left alone, and no hook
    registered twice (each costs host time on every call)."""
    once = linattn.optimize(_official_neck(), channels_last=True, backend="reference")
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in once.modules()]
    twice, report = linattn.optimize(once, channels_last=True, backend="triton", inplace=True, return_report=True)
    assert not report.replaced and not report.skipped
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in twice.modules()] == hooks


class LayerNorm2d(nn.LayerNorm):
    """The official EfficientViT LayerNorm2d: the channels' statistics as separate ops."""

    def forward(self, x):
        out = x - torch.mean(x, dim=1, keepdim=True)
        out = out / torch.sqrt(torch.square(out).mean(dim=1, keepdim=True) + self.eps)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) if self.elementwise_affine else out


@pytest.mark.parametrize(
    "model_dtype, x_dtype, autocast, layout",
    [
        (torch.float32, torch.float32, False, "nchw"),
        (torch.float32, torch.float32, False, "channels_last"),
        (torch.bfloat16, torch.bfloat16, False, "channels_last"),
        (torch.float32, torch.bfloat16, False, "nchw"),  # eager's `* weight` promotes to float32
        (torch.float32, torch.bfloat16, True, "channels_last"),  # layer_norm under autocast: float32
    ],
)
def test_layer_norm_2d_is_one_layer_norm(model_dtype, x_dtype, autocast, layout):
    """EfficientViT's LayerNorm2d becomes one aten layer_norm over the NHWC view: the same values, dtype and
    memory format as the official module's, and the same parameters and keys."""
    norm = randomize(LayerNorm2d(24, eps=1e-6), 11).to(model_dtype)
    fused, report = linattn.optimize(norm, return_report=True)
    assert isinstance(fused, FusedLayerNorm2d) and list(fused.state_dict()) == list(norm.state_dict())
    assert fused.weight is not norm.weight and torch.equal(fused.weight, norm.weight)  # a deep copy: optimize's
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, 24, 5, 7) * 3 + 1).to(x_dtype).contiguous(memory_format=fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with OpCounter() as counter:
            got = fused(x)
        want = norm(x)
    assert got.dtype == want.dtype and got.is_contiguous(memory_format=fmt)
    oracle = norm.double()(x.double())
    assert_close(got, oracle, tolerance(got.dtype, rel_err(want, oracle)), "layer norm")
    assert counter.per_op.get("aten.native_layer_norm") == 1 and "aten.mean" not in counter.per_op


def test_batchnorm_mode_is_the_batchnorms_own():
    """Whether a BatchNorm is folded follows its own mode, as its forward does, not the fused module's: BN
    re-estimation (model in eval, BatchNorms in train, running statistics reset) uses batch statistics and updates
    the running ones; fine-tuning with frozen BatchNorms (model in train, BatchNorms in eval) uses the running ones.
    Conv runs, the Up block and LiteMLA's projection alike."""
    from linattn.models.squeezesam import UpsampleBlock

    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(UpsampleBlock(8, 4)),
        nn.Sequential(timm_mit.LiteMLA(16, 16, heads=2, dim=8, scales=(3,))),
    ]
    for eager in blocks:
        channels = next(eager.parameters()).shape[1] if not isinstance(eager[0], timm_mit.LiteMLA) else 16
        x = torch.randn(4, channels, 6, 6) * 3 + 1
        fused = linattn.optimize(eager)
        norms = [[m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] for model in (eager, fused)]
        assert len(norms[0]) == len(norms[1]) >= 1
        for model, bns in zip((eager, fused), norms, strict=True):
            model.eval()
            for bn in bns:
                bn.train()
                bn.reset_running_stats()
                bn.momentum = None
        with torch.no_grad():
            assert_close(fused(x), eager(x), 1e-5, f"{type(eager[0]).__name__}: BatchNorms re-estimated")
        for a, b in zip(*norms, strict=True):
            assert a.running_mean.abs().sum() > 0 and torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        for model, bns in zip((eager, fused), norms, strict=True):
            model.train()
            for bn in bns:
                bn.eval()
        assert_close(fused(x), eager(x), 1e-5, f"{type(eager[0]).__name__}: BatchNorms frozen in training")


def test_lite_mla_keeps_a_batchnorm_subclass_unfolded():
    """A norm that subclasses BatchNorm with its own forward (timm's BatchNormAct2d: BN then its activation) is
    not folded as a plain BatchNorm: it runs as it is, and the activation is kept."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    eager = timm_mit.LiteMLA(16, 16, heads=2, dim=8, scales=(3,), norm_layer=(None, BatchNormAct2d)).eval()
    with torch.no_grad():
        eager.proj.norm.bias.normal_()
    fused = linattn.optimize(nn.Sequential(eager))
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        want = eager(x)
        assert_close(fused(x), want, 1e-5, "LiteMLA with a BatchNormAct2d projection norm")
    assert want.min() == 0  # the activation ran


def test_structure_alone_is_not_enough():
    """A module with a ConvLayer's children (conv, norm, act) but a forward of its own (a skip inside, the
    activation before the norm) is left alone, and the report says why. The same children in EfficientViT's
    ConvLayer are fused."""
    from linattn.models.efficientvit_sam import ConvLayer

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

        def forward(self, x):
            return x + self.act(self.norm(self.conv(x)))

    class ActFirst(Skip):
        def forward(self, x):
            return self.norm(self.act(self.conv(x)))

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for block in (Skip(), ActFirst()):
        model = randomize(nn.Sequential(block, ConvLayer(8, 8, 3)), seed=1).eval()
        fused, report = linattn.optimize(model, return_report=True)
        name = type(block).__name__
        assert [r.name for r in report.replaced] == ["1"] and type(fused[0]) is type(block)
        assert [(s.name, s.reason) for s in report.skipped] == [
            ("0", f"{name}'s forward is not known to be conv -> norm -> act (recognised: ConvLayer, ConvNormAct)")
        ]
        with torch.no_grad():
            assert_close(fused(x), model(x), 1e-5, name)


def test_hooked_modules_are_left_alone():
    """A conv with hooks (pruning's forward pre-hook, which recomputes its weight; a feature hook) is not fused:
    a fused module calls no conv forward, so the hooks would stop running and a pruned weight go stale. The
    report says why; training the result tracks the eager model."""
    import torch.nn.utils.prune as prune

    from linattn.models.efficientvit_sam import ConvLayer

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), ConvLayer(8, 8, 3))
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        return model

    eager, fused = build(), build()
    seen = []
    fused[3].conv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    fused, report = linattn.optimize(fused, inplace=True, return_report=True)
    assert report.replaced == [] and {s.name for s in report.skipped} == {"0", "3"}
    assert all("hooks (forward" in s.reason for s in report.skipped), report.skipped
    x = torch.randn(2, 4, 6, 6)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, fused)]
    for _ in range(2):
        for model, opt in zip((eager, fused), optimizers, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert seen and len(seen) == 2
    with torch.no_grad():
        assert_close(fused.eval()(x), eager.eval()(x), 1e-5, "pruned conv after two steps")


def test_fused_sequential_slices_and_fixed_runs():
    """A FusedSequential's slice is a plain nn.Sequential of its children (the same function as the original's
    slice); replacing, deleting or adding a child raises instead of being ignored by the fixed runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    model = randomize(model, seed=3)
    fused = linattn.optimize(model.eval())
    assert isinstance(fused, FusedSequential) and type(fused[:3]) is nn.Sequential and len(fused[:3]) == 3
    assert fused._runs == [(0, 3)] and fused._blocks[0].act == "relu"  # the activation in the run, not after it
    assert fused[0] is fused[:1][0] and isinstance(fused[1], nn.BatchNorm2d)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert_close(fused[:3](x), model[:3](x), 1e-5, "slice")
    for change in (
        lambda: fused.__setitem__(0, nn.Conv2d(4, 8, 3, padding=1)),
        lambda: fused.__delitem__(2),
        lambda: fused.append(nn.ReLU()),
        lambda: fused.insert(0, nn.ReLU()),
    ):
        with pytest.raises(TypeError, match="fused runs are fixed"):
            change()
    with torch.no_grad():
        assert_close(fused(x), model(x), 1e-5, "unchanged")


def test_hooked_sequential_is_not_replaced():
    """A Sequential with a hook of its own keeps it: a FusedSequential would be a new module without the hook, so
    the Sequential is left alone (the report says why) and the hook keeps running."""
    seq = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    seen = []
    seq.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    fused, report = linattn.optimize(seq, inplace=True, return_report=True)
    assert fused is seq and report.replaced == []
    assert [(s.kind, s.reason) for s in report.skipped] == [
        ("Sequential", "Sequential has hooks (forward_hooks), which the fused module would not run")
    ]
    fused(torch.randn(1, 4, 5, 5))
    assert seen == [(1, 8, 5, 5)]


def test_sequential_subclass_is_left_alone_and_reported():
    """A subclass of nn.Sequential (torchvision's Conv2dNormActivation, say) is not replaced by a FusedSequential,
    which would drop its class and attributes: the report lists it with its fusable runs; a subclass with a forward
    of its own, which the runs need not describe, is not listed."""

    class ConvNormAct(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.out_channels = 8

    class OwnForward(ConvNormAct):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(ConvNormAct(), OwnForward()).eval()
    fused, report = linattn.optimize(model, return_report=True)
    assert type(fused[0]) is ConvNormAct and fused[0].out_channels == 8 and report.replaced == []
    assert [(s.name, s.kind) for s in report.skipped] == [("0", "Sequential")]
    assert "ConvNormAct, a subclass of nn.Sequential with 1 fusable runs" in report.skipped[0].reason


def test_each_modules_own_mode_is_kept():
    """optimize keeps every module's mode as the user set it before: a BatchNorm frozen in a model fine-tuned in
    train mode, a BatchNorm re-estimating in a model in eval mode (test-time adaptation), a dropout kept on in
    eval (MC dropout); the fused modules' constructors set their sources' modes and must not leave them so."""
    from linattn.models.efficientvit_sam import ConvLayer
    from linattn.models.squeezesam import UpsampleBlock

    torch.manual_seed(0)
    x = torch.randn(4, 4, 6, 6) * 3 + 1
    builds = [
        lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        lambda: nn.Sequential(ConvLayer(4, 8, 3)),
        lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)),
        lambda: nn.Sequential(UpsampleBlock(4, 4)),
    ]
    for build in builds:
        for model_mode, bn_mode in ((True, False), (False, True)):
            eager = randomize(build(), seed=4).train(model_mode)
            for bn in (m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.train(bn_mode)
            modes = [m.training for m in eager.modules()]
            fused = linattn.optimize(eager)
            assert [m.training for m in eager.modules()] == modes  # the original, untouched
            kept = dict(eager.named_modules())  # the fused modules under the original names: their modes too
            fused_modes = {n: m.training for n, m in fused.named_modules() if n in kept}
            assert fused_modes == {n: kept[n].training for n in fused_modes}
            assert [m.training for m in fused.modules() if isinstance(m, nn.BatchNorm2d)] == [bn_mode]
            with torch.set_grad_enabled(model_mode):
                assert_close(fused(x), eager(x), 1e-5, f"{type(eager[0]).__name__}, BatchNorm train={bn_mode}")
    mc = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)).eval()
    mc[3].train()
    fused = linattn.optimize(mc, inplace=True)
    assert fused[3].training and not fused[1].training
    # the fused modules' own constructors, called directly, leave the modules they adopt in their modes too
    conv, frozen = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8).eval()
    assert ConvBNAct.from_modules(conv, frozen).training and not frozen.training
    attention = timm_mit.LiteMLA(16, 16, heads=2, dim=8, scales=(3,))
    attention.proj.norm.eval()
    assert LiteMLA.from_module(attention).training and not attention.proj.norm.training


def test_hooks_on_modules_a_fused_block_bypasses_are_kept():
    """A fused residual block calls its main block's convs, not main's forward nor the shortcut's; the fused neck
    calls neither its input ops nor their resizes: a hook there (feature extraction, a module that edits an
    output) would be dropped, so the block is left alone and the report says why."""
    from linattn.models.efficientvit_sam import IdentityLayer, MBConv, ResidualBlock

    x = torch.randn(2, 8, 6, 6)
    for where in ("main", "shortcut"):
        eager = randomize(ResidualBlock(MBConv(8, 8, expand_ratio=2), IdentityLayer()), seed=5).eval()
        getattr(eager, where).register_forward_hook(lambda m, args, out: out * 0.5)
        fused, report = linattn.optimize(eager, return_report=True)
        assert not isinstance(fused, FusedResidualBlock), where
        assert [s.kind for s in report.skipped] == ["residual"] and "has hooks" in report.skipped[0].reason
        with torch.no_grad():
            assert_close(fused(x), eager(x), 1e-5, f"hook on {where}")
    neck = randomize(efficientvit_sam_encoder("l0").neck, seed=6).eval()
    neck.input_ops[0].register_forward_hook(lambda m, args, out: out * 0.5)
    fused, report = linattn.optimize(neck, return_report=True)
    assert not isinstance(fused, FusedNeck) and "has hooks" in next(
        s.reason for s in report.skipped if s.kind == "neck"
    )


def test_a_block_whose_children_do_not_fit_its_name_is_left_alone():
    """A ConvLayer by name whose children are registered in another order (pre-activation: norm -> act -> conv)
    is left alone, whether or not its widths would let a fused block be built; a residual container by another
    class name than EfficientViT's ResidualBlock too."""
    from linattn.models.efficientvit_sam import IdentityLayer, MBConv

    class ConvLayer(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.norm, self.act, self.conv = nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1)

        def forward(self, x):
            return self.conv(self.act(self.norm(x)))

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.main, self.shortcut = MBConv(8, 8, expand_ratio=2), IdentityLayer()

        def forward(self, x):
            return self.main(x) * torch.sigmoid(self.shortcut(x))

    x = torch.randn(2, 8, 6, 6)
    for eager in (ConvLayer(8, 8), ConvLayer(8, 16), Gated()):
        eager = randomize(eager, seed=7).eval()
        fused, report = linattn.optimize(nn.Sequential(eager), return_report=True)
        assert type(fused[0]) is type(eager), report
        with torch.no_grad():
            assert_close(fused(x), eager(x), 1e-5, type(eager).__name__)
    reasons = [s.reason for s in linattn.optimize(nn.Sequential(ConvLayer(8, 16)), return_report=True)[1].skipped]
    assert reasons == ["children registered as norm, act, conv, not in the order dropout, conv, norm, act"]


def test_a_gelu_subclass_or_an_instance_forward_is_not_fused():
    """A GELU subclass with a forward of its own (QuickGELU) is not taken for GELU: the run stops before it; a conv
    whose forward was set on the instance is left alone."""

    class QuickGELU(nn.GELU):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    conv = nn.Conv2d(4, 8, 3, padding=1)
    conv.forward = lambda x: nn.Conv2d.forward(conv, x) * 2
    x = torch.randn(2, 4, 6, 6)
    gelu = randomize(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), QuickGELU()), seed=8).eval()
    fused = linattn.optimize(gelu)
    assert [blk.act for blk in fused._blocks] == ["identity"]
    patched = randomize(nn.Sequential(conv, nn.BatchNorm2d(8)), seed=8).eval()
    unfused, report = linattn.optimize(patched, inplace=True, return_report=True)
    assert report.replaced == [] and "a forward of its own, set on the instance" in report.skipped[0].reason
    with torch.no_grad():
        assert_close(fused(x), gelu(x), 1e-5, "QuickGELU")
        assert_close(unfused(x), patched[1](patched[0](x)), 1e-5, "patched forward")


def test_a_model_that_cannot_be_copied_says_how_to_optimize_it():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8))
    torch.nn.utils.weight_norm(model[0])  # (the older weight_norm: a weight computed in a pre-hook)
    model(torch.randn(1, 4, 5, 5))  # its weight is now not a graph leaf
    with pytest.raises(RuntimeError, match="cannot copy the model .*pass inplace=True"):
        linattn.optimize(model)
    fused, report = linattn.optimize(model, inplace=True, return_report=True)
    assert report.replaced == [] and "hooks" in report.skipped[0].reason


def test_a_conv_padding_changed_after_optimize_is_followed():
    eager = randomize(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), seed=9).eval()
    fused = linattn.optimize(eager, inplace=True)
    x = torch.randn(2, 4, 6, 6)
    fused(x)
    eager[0].padding = (2, 0)
    with torch.no_grad():
        want = F.relu(eager[1](F.conv2d(x, eager[0].weight, eager[0].bias, padding=(2, 0))))
        assert fused(x).shape == want.shape == (2, 8, 8, 4)
        assert_close(fused(x), want, 1e-5, "padding (2, 0)")


def test_copies_leave_the_folded_constants_behind():
    """torch.save and deepcopy of a model that has run carry its weights, not a second, folded copy of them (the
    copy folds again on its first call, and gives the same output)."""
    import io

    model = efficientvit_sam_encoder("l0", embed_size=None).eval()
    fused = linattn.optimize(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = fused(x)
    holders = [m for m in fused.modules() if "_linattn_constants" in m.__dict__]
    assert holders  # the run kept its fold
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer, weights_only=False), copy.deepcopy(fused)):
        assert not any("_linattn_constants" in m.__dict__ for m in copy_.modules())
        with torch.no_grad():
            torch.testing.assert_close(copy_(x), want, rtol=0, atol=0)


def test_a_residual_block_with_more_than_main_and_an_identity_is_left_alone():
    """A residual block whose forward does more than main(x) + x (timm's pre_norm, a conv shortcut) or whose main
    holds a layer that was not fused (an activation without a kernel, last) is left alone: the fused block would
    drop the pre-norm, add x for the shortcut, or call the unfused layer with a residual."""
    from linattn.models.efficientvit_sam import MBConv, ResidualBlock

    x = torch.randn(2, 8, 6, 6)
    elu_last = MBConv(8, 8, expand_ratio=2)
    elu_last.point_conv.act = nn.ELU()
    cases = [
        (timm_mit.ResidualBlock(timm_mit.MBConv(8, 8), nn.Identity(), pre_norm=nn.BatchNorm2d(8)), "pre_norm"),
        (timm_mit.ResidualBlock(timm_mit.MBConv(8, 8), nn.Conv2d(8, 8, 1)), "shortcut Conv2d is not an identity"),
        (ResidualBlock(elu_last, nn.Identity()), "holds layers that were not fused"),
    ]
    for eager, reason in cases:
        eager = randomize(eager, seed=36).eval()
        fused, report = linattn.optimize(eager, backend="reference", return_report=True)
        assert not isinstance(fused, FusedResidualBlock), reason
        assert [s.kind for s in report.skipped if s.name == ""] == ["residual"] and reason in report.skipped[-1].reason
        compare_eval(eager, fused, x, torch.float32, reason)


@pytest.mark.parametrize("geometry", [{"stride": (2, 2)}, {"padding": (1, 1)}], ids=["stride", "padding"])
def test_a_pointwise_conv_with_its_own_geometry_is_not_fused_into_the_depthwise(geometry):
    """An MBConv whose 1x1 point conv has a stride or a padding: the depthwise -> 1x1 pair is not one
    separable_conv_bn_act (its 1x1 conv has stride 1, padding 0), and the output keeps the 1x1 conv's geometry."""
    from linattn.models.efficientvit_sam import MBConv, ResidualBlock

    eager = randomize(ResidualBlock(MBConv(8, 8, expand_ratio=2), None), seed=37).eval()
    for name, value in geometry.items():
        setattr(eager.main.point_conv.conv, name, value)
    fused, report = linattn.optimize(eager, backend="reference", return_report=True)
    assert isinstance(fused, FusedResidualBlock)
    compare_eval(eager, fused, torch.randn(2, 8, 6, 6), torch.float32, f"point conv {geometry}")


def test_layer_norm_2d_keeps_its_eps_and_a_norm_over_more_than_the_channels_is_left_alone():
    """The fused LayerNorm2d normalises with the source's eps (a large one shows); a LayerNorm2d whose
    normalized_shape is not the channels alone is left alone and still runs."""
    norm = randomize(LayerNorm2d(8, eps=0.5), 12).eval()
    x = torch.randn(2, 8, 5, 7) * 0.5
    fused = linattn.optimize(norm)
    assert isinstance(fused, FusedLayerNorm2d) and fused.eps == 0.5 and not fused.training
    with torch.no_grad():
        assert_close(fused(x), norm.double()(x.double()), 1e-5, "layer norm, eps 0.5")
    wide = randomize(LayerNorm2d((8, 1)), 13).float()
    kept, report = linattn.optimize(wide, return_report=True)
    assert type(kept) is LayerNorm2d and "normalized_shape (8, 1)" in report.skipped[0].reason
    with torch.no_grad():
        assert_close(kept(x), wide(x), 0, "LayerNorm2d over (8, 1)")


def test_an_upsample_block_the_kernel_cannot_run_is_left_alone():
    """SqueezeSAM's UpsampleBlock with a 3x3 linear or a pixel shuffle by 3 is left alone (upsample_block does a 1x1
    linear and a shuffle by 2), and so is a subclass with another forward; the report says why and the output is the
    original's."""
    from linattn.models.squeezesam import UpsampleBlock

    class ActLast(UpsampleBlock):  # the same children, another forward
        def forward(self, x):
            return self.act(self.norm(self.shuffle(self.linear(x))))

    wide = UpsampleBlock(4, 3)
    wide.linear = nn.Conv2d(4, 12, 3, padding=1)
    by_three = UpsampleBlock(4, 3)
    by_three.linear, by_three.shuffle = nn.Conv2d(4, 27, 1), nn.PixelShuffle(3)
    x = torch.randn(2, 4, 5, 5)
    cases = ((wide, "not a 1x1 conv"), (by_three, "pixel shuffle factor 3"), (ActLast(4, 3), "forward is not known"))
    for block, reason in cases:
        eager = randomize(block, seed=38).eval()
        fused, report = linattn.optimize(eager, backend="reference", return_report=True)
        assert type(fused) is type(block) and [(s.kind, reason in s.reason) for s in report.skipped] == [
            ("upsample", True)
        ]
        compare_eval(eager, fused, x, torch.float32, reason)


def test_a_batchnorm_subclass_in_a_sequential_run_is_not_folded():
    """A Sequential run whose norm subclasses BatchNorm2d with a forward of its own (timm's BatchNormAct2d: BN then
    its activation) is not folded as a plain BatchNorm: the run stops at the conv and the activation is kept."""
    from timm.layers import BatchNormAct2d

    eager = randomize(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), BatchNormAct2d(8)), seed=39).eval()
    fused, report = linattn.optimize(eager, backend="reference", return_report=True)
    assert report.replaced == [] and "BatchNormAct2d is not nn.BatchNorm2d" in report.skipped[0].reason
    x = torch.randn(2, 4, 6, 6)
    compare_eval(eager, fused, x, torch.float32, "conv -> BatchNormAct2d")
    with torch.no_grad():
        assert fused(x).min() == 0  # the activation ran
