"""Benchmark of the fused conv + BatchNorm + activation blocks (linattn.conv_bn_act, linattn.upsample_block), inference.

    python benchmarks/bench_conv_bn_act.py     # GPU: every conv of docs/design.md 5, B=16 and 1, bf16, forward
    python benchmarks/bench_conv_bn_act.py --models squeezesam --dtype fp16 bf16 --providers eager triton
    python benchmarks/bench_conv_bn_act.py --list   # the shape table

Shapes (docs/design.md 5, one named entry per distinct conv; --models and --shapes pick some, --list prints them):
  sq.*   SqueezeSAM at input 512: patch embed 2x2/2 5->64 (no BN: GroupNorm follows); encoder DoubleConv units
         conv3x3+bias -> ReLU -> BN with widths 64,128,128,128,128,164,256,256 at 256^2 ... 2^2 (sq.enc<r>.c1 is
         the unit that changes width, sq.enc<r>.c2 the C -> C one); decoder Up blocks sq.up<r> (per-pixel linear
         C -> 4*C/2 at r, ReLU, BN, pixel shuffle to C/2 at 2r: linattn.upsample_block) and the first unit of
         each decoder DoubleConv, sq.dec<r>.c1, on the concat of the upsampled map and the skip
         (C/2 + C_skip -> C_skip; its C -> C unit is an encoder shape). docs/design.md 5 does not spell out the
         decoder's widths: these mirror the encoder.
  l0.*   EfficientViT-SAM-L0 at input 512, xl1.* XL1 at input 1024 (EfficientViT's EfficientViTLargeBackbone and
         SamNeck): conv -> BN -> GELU(tanh) (--act hardswish for EfficientViT-B's activation). Stem 3x3/2; the
         ResBlock (3x3 -> 3x3 + residual); every stage's stride-2 downsampling block (FusedMBConv 3x3/2 or
         MBConv 1x1 + depthwise 3x3/2, expand ratio 4 x the stage's: 16 or 24); the stage's repeated block
         (FusedMBConv 3x3 dense, expand 4; MBConv 1x1 expansion with bias, no BN -> depthwise 3x3 -> 1x1
         projection + BN + residual, expand 4 or 6; the 1x1 projection carries the block's residual); the
         LiteMLA aggregation depthwise conv (5x5 in L, 3x3 in XL: no BN, no activation; the depthwise 5x5 of
         these encoders); the neck's 1x1 input projections (+ BN) and FusedMBConv blocks. EfficientViT's
         MBConv depthwise is 3x3 in both encoders. <prefix>.sep is an MBConv's depthwise -> 1x1 projection pair
         as one block (linattn.separable_conv_bn_act, the depthwise output never written).
Names: <model>.s<stage>.<block>.<conv>, e.g. l0.s3.mb.dw3 (l0 stage 3 MBConv depthwise), l0.s4.down.pw_expand.
On a GPU every shape runs at B=16 and 1; without a GPU the default is a short run (four small shapes at B=1,
fp32, eager, eager-folded and reference), and --quick runs tiny shapes at B=2 (numbers not kept). Inputs and
weights are channels_last for every provider (--layout nchw, or both), as linattn.optimize runs a model on a GPU.

Providers (the same weights and inputs; modules in eval mode, forward only):
  eager                 nn.Conv2d, BatchNorm2d and the activation as separate modules in the block's order
                        (SqueezeSAM conv -> ReLU -> BN, EfficientViT conv -> BN -> act), + residual, pixel
                        shuffle for the Up block
  eager-folded          eager with the BatchNorm folded into the conv where it precedes the activation
                        (linattn.fold_bn); SqueezeSAM's BN after the ReLU stays (same module as eager there)
  compile               torch.compile of eager (default mode)
  compile-max-autotune  torch.compile of eager, mode="max-autotune" (slow to compile: --max-autotune-batch)
  triton, cuda          linattn.conv_bn_act / linattn.upsample_block / linattn.separable_conv_bn_act forced
                        onto that backend (the pair's reference: its two convs, each through conv_bn_act's
                        dispatch), the BN folded
                        once (fold_bn) or turned into post_scale/post_shift once (BN after the activation)
  auto                  the same linattn ops as users get them: auto, on a GPU the fastest implementation
                        measured on the call's first run; auto_choices records what it ran
  reference             the same linattn ops on the pure-PyTorch reference backend
  triton-module         linattn.nn.ConvBNAct.from_modules(conv, bn, act, order) on the triton backend: the
                        module (it re-folds its BatchNorm on every eval forward); not in the defaults

Work per call, s = element size: flops = 2 * B * Cout * Ho * Wo * (Cin / groups) * KH * KW (the conv's multiply-
adds, the pair's two convs'; the epilogue is not counted); bytes = (x read + weights read + output written (+
residual read)) * s. tflops = flops / time; gbs = bytes / time and pct_copy against the measured device-to-device
copy bandwidth; intensity = flops / bytes. Dense convs are judged by tflops, depthwise and other low-intensity ones
(small channel counts, the Up block) by pct_copy; depthwise ones also by pct_fma, their fp32 FMAs (every provider's
taps) in percent of the GPU's fp32 peak (common.py fma_peak_tflops): at 3x3 a tap's FMA per element read and
written makes them instruction-bound before memory-bound. Errors are against the eager module run in float64 on the same
input. Speedups: eager's, eager-folded's, compile's and compile-max-autotune's time over the provider's on the same
shape; after the table, the same summed over every shape of a model ("taken together").
Rows are appended to <out>/conv_bn_act*.jsonl (+ .csv) with the environment; the plot (speedups over eager, per
batch size) is drawn from that file. Only GPU runs are kept in git (.gitignore drops -cpu and -quick files).
"""

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import linattn
import linattn.nn
from linattn import reference
from linattn._table import dict_table
from linattn.benchmarks.common import (
    COMPILE_MODES,
    DTYPES,
    LAYOUTS,
    Skipped,
    add_benchmark_args,
    announce,
    check_backend,
    compiled,
    exit_status,
    max_autotune_skip,
    measuring,
    parse_benchmark_args,
    pct_fma,
    report,
    result_name,
    run_providers,
    speedup_column,
    totals,
)

OP = "conv_bn_act"
GPU_PROVIDERS = ("eager", "eager-folded", "compile", "compile-max-autotune", "triton", "cuda", "auto")
PROVIDERS = (*GPU_PROVIDERS, "reference", "triton-module")
CPU_PROVIDERS = ("eager", "eager-folded", "reference")
BACKEND_PROVIDERS = ("triton", "cuda", "auto", "reference")
BASELINES = ("eager", "eager-folded", "compile", "compile-max-autotune")
MODELS = ("squeezesam", "l0", "xl1")
EVIT_ACTS = ("gelu_tanh", "hardswish")
NORM_EPS = {"squeezesam": 1e-5, "l0": 1e-6, "xl1": 1e-6}  # torch's default; EfficientViT-SAM's 1e-6
# The default CPU run: small shapes of every kind (dense 3x3 + post-BN, Up block, depthwise, 1x1 + residual)
CPU_SHAPES = ("sq.enc16.c1", "sq.up8", "l0.s4.mb.dw3", "l0.s3.mb.pw_proj")
TABLE = (
    "dtype",
    "layout",
    "shape",
    "provider",
    "ms",
    "reps",
    "iqr_pct",
    "tflops",
    "gbs",
    "pct_copy",
    "pct_fma",
    *map(speedup_column, BASELINES),
    "max_abs_err",
    "auto_choices",
    "note",
)


@dataclass(frozen=True)
class ConvShape:
    """One conv (or Up block) of docs/design.md 5 at one batch size.

    order: "conv_bn_act" (BN before the activation, foldable), "conv_act_bn" (BN after it) or None (no BN).
    kind: "conv", "upsample" (1x1 conv Cin -> cout = 4*Co, act, BN, 2x pixel shuffle) or "separable" (the
    depthwise conv Cin -> Cin of kernel, stride, bias, order and act, then a 1x1 conv Cin -> cout + BN, no act,
    (+ residual): MBConv's pair).
    """

    name: str
    model: str
    batch: int
    cin: int
    cout: int
    kernel: int
    height: int  # input size
    width: int
    stride: int = 1
    groups: int = 1
    bias: bool = False
    order: str | None = "conv_bn_act"
    act: str = "gelu_tanh"
    residual: bool = False
    kind: str = "conv"
    padding: int | None = None  # None: kernel // 2

    @property
    def pad(self) -> int:
        return self.kernel // 2 if self.padding is None else self.padding

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.kind == "upsample":
            return 2 * self.height, 2 * self.width
        size = [(n + 2 * self.pad - self.kernel) // self.stride + 1 for n in (self.height, self.width)]
        return size[0], size[1]

    @property
    def out_channels(self) -> int:
        """Channels of the block's output (the Up block's after the pixel shuffle)."""
        return self.cout // 4 if self.kind == "upsample" else self.cout

    @property
    def conv_kind(self) -> str:
        if self.kind in ("upsample", "separable"):
            return self.kind
        if self.groups == 1:
            return "dense"
        return "depthwise" if self.groups == self.cin == self.cout else "grouped"

    @property
    def label(self) -> str:
        return f"{self.name} B{self.batch}"

    def flops(self) -> int:
        """2 x the conv's multiply-adds (the Up block's per-pixel linear at the input size)."""
        conv_hw = (self.height, self.width) if self.kind == "upsample" else self.out_hw
        if self.kind == "separable":
            return 2 * self.batch * conv_hw[0] * conv_hw[1] * self.cin * (self.kernel**2 + self.cout)
        macs = self.cout * conv_hw[0] * conv_hw[1] * (self.cin // self.groups) * self.kernel**2
        return 2 * self.batch * macs

    def bytes(self, element_size: int) -> int:
        """x read + weight read + output written (+ residual read), in elements of `element_size` bytes."""
        Ho, Wo = self.out_hw
        x = self.batch * self.cin * self.height * self.width
        weight = self.cout * (self.cin // self.groups) * self.kernel**2
        if self.kind == "separable":
            weight = self.cin * (self.kernel**2 + self.cout)
        out = self.batch * self.out_channels * Ho * Wo
        return (x + weight + out * (2 if self.residual else 1)) * element_size

    def columns(self) -> dict:
        """The shape as result-row columns."""
        Ho, Wo = self.out_hw
        return {
            "model": self.model,
            "name": self.name,
            "shape": self.label,
            "batch": self.batch,
            "kind": self.conv_kind,
            "cin": self.cin,
            "cout": self.out_channels,
            "kernel": self.kernel,
            "stride": self.stride,
            "groups": self.groups,
            "hw_in": f"{self.height}x{self.width}",
            "hw_out": f"{Ho}x{Wo}",
            "order": self.order,
            "act": self.act,
            "residual": self.residual,
        }


def squeezesam_table() -> list[dict]:
    """SqueezeSAM's convs at input 512 (docs/design.md 5), de-duplicated, in network order."""
    widths = (64, 128, 128, 128, 128, 164, 256, 256)
    sizes = (256, 128, 64, 32, 16, 8, 4, 2)
    unit = dict(kernel=3, bias=True, order="conv_act_bn", act="relu")
    table = [dict(name="sq.patch", cin=5, cout=64, kernel=2, stride=2, padding=0, size=512, bias=True, order=None)]
    seen = set()

    def add(name, cin, cout, size, **kw):
        key = (cin, cout, size, kw.get("kind", "conv"))
        if key not in seen:
            seen.add(key)
            table.append(dict(name=name, cin=cin, cout=cout, size=size, **kw))

    previous = 64  # the patch embedding's width
    for w, r in zip(widths, sizes, strict=True):  # encoder: DoubleConv(previous, w) at r
        add(f"sq.enc{r}.c1", previous, w, r, **unit)
        add(f"sq.enc{r}.c2", w, w, r, **unit)
        previous = w
    for i in range(len(sizes) - 1, 0, -1):  # decoder: Up from sizes[i] to sizes[i-1], concat skip, DoubleConv
        r, c, skip = sizes[i], widths[i], widths[i - 1]  # c: the bottom map's, then the last DoubleConv's
        add(f"sq.up{r}", c, 2 * c, r, kernel=1, bias=True, order="conv_act_bn", act="relu", kind="upsample")
        add(f"sq.dec{2 * r}.c1", c // 2 + skip, skip, 2 * r, **unit)
        add(f"sq.dec{2 * r}.c2", skip, skip, 2 * r, **unit)
    return table


def efficientvit_table(model: str) -> list[dict]:
    """EfficientViT-SAM-L0 (input 512) or XL1 (input 1024) convs: EfficientViTLargeBackbone + SamNeck."""
    if model == "l0":
        image, widths = 512, (32, 64, 128, 256, 512)
        blocks, expands, agg_k = ("res", "fmb", "fmb", "mb", "att"), (1, 4, 4, 4, 6), 5
        neck_in, neck_expand = (2, 3, 4), 1  # SamNeck: stages 2, 3, 4 -> 256 at 64x64, FusedMBConv expand 1
    else:
        image, widths = 1024, (32, 64, 128, 256, 512, 1024)
        blocks, expands, agg_k = ("res", "fmb", "fmb", "fmb", "att", "att"), (1, 4, 4, 4, 4, 6), 3
        neck_in, neck_expand = (3, 4, 5), 4
    fewer_norm = [b in ("mb", "att") for b in blocks]  # MBConv (None, None, bn) with biases in these stages
    table = []

    def add(name, cin, cout, kernel, size, **kw):
        table.append(dict(name=f"{model}.{name}", cin=cin, cout=cout, kernel=kernel, size=size, **kw))

    def fmb(prefix, cin, cout, expand, size, stride):  # FusedMBConv: 3x3 (stride) + BN + act, 1x1 + BN
        mid, res = cin * expand, stride == 1
        add(f"{prefix}.conv3", cin, mid, 3, size, stride=stride)
        add(f"{prefix}.pw_proj", mid, cout, 1, size // stride, act="identity", residual=res)

    def mb(prefix, cin, cout, expand, size, stride, fewer):  # MBConv: 1x1 + act, dw 3x3 + act, 1x1 + BN
        mid, res = cin * expand, stride == 1
        pre = dict(bias=True, order=None) if fewer else {}
        add(f"{prefix}.pw_expand", cin, mid, 1, size, **pre)
        add(f"{prefix}.dw3", mid, mid, 3, size, stride=stride, groups=mid, **pre)
        add(f"{prefix}.pw_proj", mid, cout, 1, size // stride, act="identity", residual=res)
        add(f"{prefix}.sep", mid, cout, 3, size, stride=stride, groups=mid, residual=res, kind="separable", **pre)

    size = image // 2
    add("stem", 3, widths[0], 3, image, stride=2)
    add("s0.res.conv1", widths[0], widths[0], 3, size)  # ResBlock, expand 1
    add("s0.res.conv2", widths[0], widths[0], 3, size, act="identity", residual=True)
    for stage in range(1, len(widths)):
        cin, w, block = widths[stage - 1], widths[stage], blocks[stage]
        down = "mb" if block not in ("mb", "fmb") else block
        if down == "fmb":
            fmb(f"s{stage}.down", cin, w, 4 * expands[stage], size, 2)
        else:
            mb(f"s{stage}.down", cin, w, 4 * expands[stage], size, 2, fewer_norm[stage])
        size //= 2
        if block == "fmb":
            fmb(f"s{stage}.fmb", w, w, expands[stage], size, 1)
        else:
            mb(f"s{stage}.mb", w, w, expands[stage], size, 1, fewer_norm[stage])
        if block == "att":  # LiteMLA's aggregation: depthwise on qkv (3 * w channels), no BN, no act
            add(f"s{stage}.att.agg.dw{agg_k}", 3 * w, 3 * w, agg_k, size, groups=3 * w, order=None, act="identity")
    for stage in neck_in:
        add(f"neck.in.s{stage}", widths[stage], 256, 1, image // 2 ** (stage + 1), act="identity")
    fmb("neck.fmb", 256, 256, neck_expand, 64, 1)  # the neck works at 64x64 for both
    return table


def model_table(model: str, act: str = "gelu_tanh") -> list[dict]:
    """The named conv entries of one model; EfficientViT's activation replaced by `act`."""
    if model == "squeezesam":
        return squeezesam_table()
    table = efficientvit_table(model)
    for entry in table:
        if entry.get("act", "gelu_tanh") == "gelu_tanh":
            entry["act"] = act
    return table


# --quick: tiny shapes of every kind; checks the harness end to end in seconds, numbers not kept
QUICK_TABLE = [
    dict(name="tiny.dense3", cin=5, cout=17, kernel=3, size=9, bias=True, order="conv_act_bn", act="relu"),
    dict(name="tiny.dw5.s2", cin=24, cout=24, kernel=5, size=11, stride=2, groups=24),
    dict(name="tiny.pw.res", cin=16, cout=24, kernel=1, size=7, act="identity", residual=True),
    dict(name="tiny.up", cin=8, cout=16, kernel=1, size=6, bias=True, order="conv_act_bn", act="relu", kind="upsample"),
    dict(name="tiny.sep.res", cin=24, cout=12, kernel=3, size=7, groups=24, residual=True, kind="separable"),
]


def make_shapes(entries, batches, model: str | None = None) -> list[ConvShape]:
    """ConvShapes of the table `entries` at every batch size, batch-major."""
    shapes = []
    for b in batches:
        for e in entries:
            e = dict(e)
            size = e.pop("size")
            owner = model or e.pop("model", e["name"].split(".")[0])
            shapes.append(ConvShape(model=owner, batch=b, height=size, width=size, **e))
    return shapes


def all_entries(models=MODELS, act: str = "gelu_tanh") -> list[dict]:
    return [{**e, "model": m} for m in models for e in model_table(m, act)]


def run_shapes(args, on_gpu: bool) -> list[ConvShape]:
    """--quick: the tiny shapes at B=2; on GPU every shape of --models at B=16 and 1; on CPU (a short run)
    CPU_SHAPES at B=1. --batch overrides the batch sizes, --shapes picks names (or name prefixes)."""
    if args.quick:
        return make_shapes(QUICK_TABLE, args.batch or (2,), model="quick")
    entries = all_entries(args.models or MODELS, args.act)
    wanted = args.shapes or (None if on_gpu or args.models else CPU_SHAPES)
    if wanted:
        if unknown := [w for w in wanted if not any(e["name"] == w or e["name"].startswith(w + ".") for e in entries)]:
            raise SystemExit(f"--shapes: no shape named {unknown} (or starting with it); see --list")
        entries = [e for e in entries if any(e["name"] == w or e["name"].startswith(w + ".") for w in wanted)]
    return make_shapes(entries, args.batch or ((16, 1) if on_gpu else (1,)))


_ACTS = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish,
}


class EagerBlock(nn.Module):
    """conv -> norm -> act ("conv_bn_act") or conv -> act -> norm ("conv_act_bn"), then (Up block) pixel shuffle
    and (+ residual): separate torch modules, as the models run them. forward(x, residual=None)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: str, order: str | None, shuffle: bool):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, _ACTS[act]()
        self.order, self.shuffle = order, shuffle

    def forward(self, x, residual=None):
        y = self.conv(x)
        y = self.norm(self.act(y)) if self.order == "conv_act_bn" else self.act(self.norm(y))
        if self.shuffle:
            y = nn.functional.pixel_shuffle(y, 2)
        return y if residual is None else y + residual


class SeparableBlock(nn.Module):
    """MBConv's pair as the models run it: the depthwise block, then the 1x1 block (+ residual)."""

    def __init__(self, dw: EagerBlock, pw: EagerBlock):
        super().__init__()
        self.dw, self.pw = dw, pw

    def forward(self, x, residual=None):
        return self.pw(self.dw(x), residual)


def _norm(shape: ConvShape, order: str | None, channels: int) -> nn.Module:
    """A BatchNorm with statistics away from identity (so folding matters), or none."""
    if order is None:
        return nn.Identity()
    norm = nn.BatchNorm2d(channels, eps=NORM_EPS.get(shape.model, 1e-5))
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    return norm


def make_eager(shape: ConvShape, dtype: torch.dtype, device: torch.device) -> EagerBlock | SeparableBlock:
    """The block with random weights and BatchNorm statistics away from identity, eval."""
    torch.manual_seed(0)
    conv_out = shape.cin if shape.kind == "separable" else shape.cout
    conv = nn.Conv2d(shape.cin, conv_out, shape.kernel, shape.stride, shape.pad, groups=shape.groups, bias=shape.bias)
    block = EagerBlock(conv, _norm(shape, shape.order, conv_out), shape.act, shape.order, shape.kind == "upsample")
    if shape.kind == "separable":
        pw = nn.Conv2d(shape.cin, shape.cout, 1, bias=False)
        pw_norm = _norm(shape, "conv_bn_act", shape.cout)
        block = SeparableBlock(block, EagerBlock(pw, pw_norm, "identity", "conv_bn_act", shuffle=False))
    return block.to(device, dtype).eval().requires_grad_(False)


class _TapConv(nn.Module):
    """A grouped or depthwise nn.Conv2d as unfold + einsum: the float64 reference on CPU, where torch's fp64
    grouped conv takes seconds per call (a naive loop); same result as conv(x)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        B, G, (Ho, Wo) = x.shape[0], c.groups, _conv_out_hw(x, c)
        cols = nn.functional.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)
        cols = cols.view(B, G, -1, Ho * Wo)  # (B, G, Cin/G * KH * KW, L)
        y = torch.einsum("bgkl,gok->bgol", cols, c.weight.view(G, c.out_channels // G, -1))
        y = y.reshape(B, c.out_channels, Ho, Wo)
        return y if c.bias is None else y + c.bias[:, None, None]


def _conv_out_hw(x, c: nn.Conv2d) -> tuple[int, int]:
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(x.shape[-2:], c.padding, c.dilation, c.kernel_size, c.stride, strict=True)
    ]
    return size[0], size[1]


def float64_reference(eager: EagerBlock | SeparableBlock, x, residual):
    """The eager block run in float64 on the same input (on CPU, grouped convs through _TapConv)."""
    block = copy.deepcopy(eager).double()
    if x.device.type == "cpu":
        for part in (block.dw, block.pw) if isinstance(block, SeparableBlock) else (block,):
            if part.conv.groups > 1:
                part.conv = _TapConv(part.conv)
    with torch.no_grad():
        return block(x.double(), None if residual is None else residual.double())


def make_folded(eager: EagerBlock | SeparableBlock) -> EagerBlock | SeparableBlock:
    """eager with a BatchNorm that precedes the activation folded into the conv (linattn.fold_bn)."""
    if isinstance(eager, SeparableBlock):
        return SeparableBlock(make_folded(eager.dw), make_folded(eager.pw))
    if eager.order != "conv_bn_act" or isinstance(eager.norm, nn.Identity):
        return eager  # nothing to fold: BN after the activation (SqueezeSAM) stays, or there is none
    folded = copy.deepcopy(eager)
    weight, bias = linattn.fold_bn(eager.conv, eager.norm)
    folded.conv.weight = nn.Parameter(weight, requires_grad=False)
    folded.conv.bias = nn.Parameter(bias, requires_grad=False)
    folded.norm = nn.Identity()
    return folded


def fused_call(shape: ConvShape, eager: EagerBlock | SeparableBlock):
    """f(x, residual) on linattn's op: the BN folded once (before the act) or as post_scale/post_shift (after)."""
    if shape.kind == "separable":
        dw, pw = make_folded(eager.dw).conv, make_folded(eager.pw).conv
        geometry = (dw.bias, pw.bias, shape.stride, shape.pad, 1, shape.act, "identity")
        return lambda x, residual: linattn.separable_conv_bn_act(x, dw.weight, pw.weight, *geometry, residual=residual)
    conv, norm = eager.conv, eager.norm
    weight, bias, scale, shift = conv.weight, conv.bias, None, None
    if shape.order == "conv_bn_act":
        weight, bias = linattn.fold_bn(conv, norm)
    elif shape.order == "conv_act_bn":
        scale, shift = reference.bn_affine(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    if shape.kind == "upsample":
        w2 = weight.flatten(1)
        return lambda x, residual: linattn.upsample_block(x, w2, bias, scale, shift, shape.act)
    geometry = (shape.stride, shape.pad, 1, shape.groups, shape.act, scale, shift)
    return lambda x, residual: linattn.conv_bn_act(x, weight, bias, *geometry, residual)


def shape_op(shape: ConvShape) -> str:
    """The linattn op a shape's block runs on."""
    return {"upsample": "upsample_block", "separable": "separable_conv_bn_act"}.get(shape.kind, OP)


def setup(provider: str, shape: ConvShape, eager: EagerBlock | SeparableBlock, x, residual) -> dict:
    """{"fwd": callable} of `provider` (inference: no autograd graph); raises Skipped when it cannot run here."""
    op = shape_op(shape)
    if provider in BACKEND_PROVIDERS or provider == "triton-module":
        backend = provider.removesuffix("-module")
        check_backend(op, backend, x.device)
        if provider == "triton-module":
            if shape.kind != "conv":
                raise Skipped(f"ConvBNAct is a conv block; this one is linattn.{op}")
            norm = None if isinstance(eager.norm, nn.Identity) else eager.norm
            fn = linattn.nn.ConvBNAct.from_modules(eager.conv, norm, eager.act, shape.order or "conv_bn_act").eval()
        else:
            fn = fused_call(shape, eager)

        def forward():
            with torch.no_grad(), linattn.backend(backend):
                return fn(x, residual)
    else:
        module = make_folded(eager) if provider == "eager-folded" else eager
        if provider in COMPILE_MODES:
            module = compiled(module, provider)

        def forward():
            with torch.no_grad():
                return module(x, residual)

    return {"fwd": forward}


def make_inputs(shape: ConvShape, dtype: torch.dtype, device, layout: str) -> tuple[EagerBlock, Tensor, Tensor]:
    """The eager block of a shape and its random input and residual (None when the block has none), in the
    layout (the block's weights too)."""
    fmt = LAYOUTS[layout]
    eager = make_eager(shape, dtype, device).to(memory_format=fmt)
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(shape.batch, shape.cin, shape.height, shape.width, device=device, generator=gen)
    x = x.to(dtype).contiguous(memory_format=fmt)
    residual = None
    if shape.residual:
        Ho, Wo = shape.out_hw
        residual = torch.randn(shape.batch, shape.out_channels, Ho, Wo, device=device, generator=gen)
        residual = residual.to(dtype).contiguous(memory_format=fmt)
    return eager, x, residual


def run_shape(shape, dtype_name, layout, providers, device, copy_gbs, bar, cuda_graph, skip) -> list[dict]:
    eager, x, residual = make_inputs(shape, DTYPES[dtype_name], device, layout)
    ref = float64_reference(eager, x, residual)
    nbytes = shape.bytes(x.element_size())
    base = {"op": shape_op(shape), "dtype": dtype_name, **shape.columns()}
    base.update(layout=layout, copy_gbs=copy_gbs)
    rows = run_providers(
        providers,
        lambda provider: setup(provider, shape, eager, x, residual),
        {"fwd": (ref, nbytes)},
        base,
        device,
        copy_gbs,
        bar,
        cuda_graph=cuda_graph,
        skip=skip,
        baselines=BASELINES,
    )
    work = shape.flops()
    for row in rows:
        row["flops"], row["intensity"] = work, work / nbytes
        row["tflops"] = None if row["ms"] is None else work / row["ms"] / 1e9
    if shape.conv_kind == "depthwise":
        pct_fma(rows, lambda row: work // 2, device)
    return rows


def print_totals(rows) -> None:
    """Per model, batch, dtype and layout: every provider's time summed over the shapes, and the speedups of the
    sums."""
    by = ("model", "batch", "dtype", "layout")
    print("\ntaken together (summed over each model's shapes; speedups over the shapes both providers timed):")
    columns = (*by, "provider", "shapes", "ms", "reps", "iqr_pct", *map(speedup_column, BASELINES))
    print(dict_table(totals(rows, by, BASELINES), columns))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_args(parser, PROVIDERS, stages=False, layouts=True)
    parser.add_argument("--models", nargs="+", help=f"some of {', '.join(MODELS)} (default: all on GPU)")
    parser.add_argument("--shapes", nargs="+", help="shape names or name prefixes, e.g. sq.up8 l0.s3 (see --list)")
    parser.add_argument(
        "--act", default="gelu_tanh", choices=EVIT_ACTS, help="EfficientViT's activation (default gelu_tanh)"
    )
    parser.add_argument("--list", action="store_true", help="print the shape table and exit")
    return parse_benchmark_args(parser, argv, dtype=DTYPES, providers=PROVIDERS, models=MODELS)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    shapes = run_shapes(args, on_gpu)
    if args.list:
        cols = ("model", "name", "kind", "cin", "cout", "kernel", "stride", "groups", "hw_in", "hw_out")
        shown = [s.columns() for s in shapes if s.batch == shapes[0].batch]
        print(dict_table(shown, (*cols, "order", "act", "residual")))
        return []
    if not on_gpu:
        what = "--quick: tiny shapes" if args.quick else f"by default a short CPU run ({', '.join(CPU_SHAPES)} at B=1)"
        print(
            f"No GPU: {what}; eager, eager-folded and reference, fp32, forward unless told otherwise. GPU numbers "
            "need a GPU: run this on a CUDA machine for the compile, triton, cuda and auto providers, fp16/bf16 and "
            "every conv shape of docs/design.md 5 at B=16 and 1."
        )
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    providers = args.providers or list(GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)

    env, copy_gbs = announce(device)
    rows = []
    cases = [(shape, d, layout) for shape in shapes for d in dtypes for layout in args.layout]
    with measuring(len(cases) * len(providers), OP) as bar:  # SIGTERM ends the loop, rows kept
        for shape, dtype_name, layout in cases:
            skip = max_autotune_skip(args, shape.batch)
            rows += run_shape(shape, dtype_name, layout, providers, device, copy_gbs, bar, args.cuda_graph, skip)
            if on_gpu:
                torch.cuda.empty_cache()
    plot = {
        "x": "name",
        "y": "speedup_vs_eager",
        "panel_rows": "batch",
        "hline": None,
        "ylabel": "speedup over eager (x)",
    }
    report(rows, TABLE, args.out, result_name(OP, args.quick, device), env, **plot)
    print_totals(rows)
    return rows


if __name__ == "__main__":
    sys.exit(exit_status(main()))
