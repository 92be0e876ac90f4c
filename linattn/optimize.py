"""`linattn.optimize(model)`: swap linattn's fused modules into any nn.Module (docs/design.md 6).

Patterns recognised by structure, not by class name, while walking the module tree top-down
(a replaced module is not descended into):

- LiteMLA-like modules (attributes `qkv`, `aggreg`, `proj`, `dim`, `eps` and a ReLU `kernel_func`:
  the official EfficientViT `LiteMLA`, timm's `efficientvit_mit.LiteMLA`) -> `linattn.nn.LiteMLA`
  via `LiteMLA.from_module` (same state_dict keys);
- conv/norm/act containers (children `conv`, `norm`, `act` and optionally `dropout`, forward
  conv -> norm -> act: timm's `ConvNormAct`, EfficientViT's `ConvLayer`) -> `linattn.nn.ConvBNAct`
  sharing the container's conv and BatchNorm (same keys `conv.*`, `norm.*`);
- runs inside a plain `nn.Sequential`: Conv2d [-> BatchNorm2d] [-> act] (order "conv_bn_act") and
  Conv2d -> act -> BatchNorm2d (SqueezeSAM's order, "conv_act_bn"). The Sequential becomes a
  `FusedSequential`: the same children under the same indices (so the same state_dict keys),
  run as fused `ConvBNAct` blocks;
- SqueezeSAM's upsampling (children `linear` (1x1 Conv2d), `act`, `shuffle` (PixelShuffle(2)),
  `norm` (BatchNorm2d)) -> `FusedUpsampleBlock`, one `linattn.upsample_block` call;
- EfficientViT's residual blocks (children `main`, an identity `shortcut`, no `pre_norm` / `post_act`;
  official, timm and ours) whose main is one of EfficientViT's conv blocks, recognised by class name
  and child names (MBConv: inverted_conv, depth_conv, point_conv; FusedMBConv: spatial_conv,
  point_conv; ResBlock / timm's ConvBlock: conv1, conv2; DSConv: depth_conv, point_conv; their
  forward runs the children in order), made only of fused ConvBNActs, or whose main is a (fused) LiteMLA
  -> `FusedResidualBlock`: the add is the last conv's residual epilogue (the LiteMLA projection's), one
  tensor fewer written and read and no aten add left in an EfficientViT block.

- EfficientViT's LayerNorm2d (an nn.LayerNorm named so, over the channels of a map: official, timm's, ours)
  -> `FusedLayerNorm2d`: one aten layer_norm over the map's NHWC view (a view of a channels_last map) where the
  official forward makes six passes (mean, centring, square, mean, sqrt and division, affine);
- EfficientViT-SAM's neck (a DAGBlock summing its input ops, each a conv block then a bicubic
  `UpSampleLayer`: the official code's and linattn.models' SamNeck) -> `FusedNeck`: the resizes and the
  sum are one `linattn.upsample_sum` call, its conv blocks and middle converted as above.

Candidates that cannot be fused (dropout p > 0, GroupNorm or another norm, an unsupported
activation, a conv subclass with its own forward, padding modes, hooks or a forward set on an
instance, on the candidate or on a module whose forward the fused module bypasses: a residual
block's `main` and `shortcut`, the neck's input ops and resizes) are left as they are and the
report says why. Every module keeps the mode (train / eval) it had: a BatchNorm's own mode decides
whether it is folded.

The backend: `backend="auto"` (the default) leaves linattn's global backend alone. Any other name
is applied around every eager forward of the returned model by a forward pre-hook and an
always-called forward hook on its root (`with linattn.backend(name)` semantics, restored even when
the forward raises). The hooks do nothing while torch.compile traces the model, so a compiled
optimized model has no graph break and no traced global side effect; linattn's ops read the
backend when they run, so call a compiled model under `with linattn.backend(name):` (or
`linattn.set_backend`) to force a backend there. Per-module backend attributes were not chosen:
the ops take no backend argument, and a global switched inside a compiled forward would not be
seen by the ops at run time.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import BACKENDS, get_backend, set_backend
from .nn._cache import EvalConstants
from .nn.conv_bn_act import ConvBNAct, activation_name, bn_affine, cast_to, fold_sources, member
from .nn.lite_mla import LiteMLA
from .ops.conv_bn_act import module_separable, module_upsample_block, upsample_block
from .ops.upsample_sum import upsample_sum
from .reference import _pair

__all__ = [
    "FusedLayerNorm2d",
    "FusedNeck",
    "FusedResidualBlock",
    "FusedSequential",
    "FusedUpsampleBlock",
    "OptimizeReport",
    "optimize",
]

# EfficientViT's conv blocks (official names and timm's) and their children, which forward applies in order
SEQUENTIAL_BLOCKS = {
    "MBConv": ("inverted_conv", "depth_conv", "point_conv"),
    "FusedMBConv": ("spatial_conv", "point_conv"),
    "ResBlock": ("conv1", "conv2"),
    "ConvBlock": ("conv1", "conv2"),
    "DSConv": ("depth_conv", "point_conv"),
}


# --- report ---


@dataclass
class Replaced:
    name: str  # qualified module name ("" is the root)
    old: str  # old type name
    new: str  # new type name
    detail: str = ""


@dataclass
class Skipped:
    name: str
    kind: str  # what it looked like: "LiteMLA", "conv/norm/act", "Sequential run", "upsample"
    reason: str


@dataclass
class OptimizeReport:
    """What `linattn.optimize` replaced and what it left alone (and why). `str(report)` is a table."""

    backend: str
    training: bool
    channels_last: bool = False
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Replacements per new module type (runs in a FusedSequential counted one each as ConvBNAct)."""
        out: dict[str, int] = {}
        for r in self.replaced:
            if r.new == "FusedSequential":
                runs = int(r.detail.split(" ")[0])
                out["ConvBNAct"] = out.get("ConvBNAct", 0) + runs
            else:
                out[r.new] = out.get(r.new, 0) + 1
        return out

    def __str__(self) -> str:
        mode = "train" if self.training else "eval"
        layout = ", channels_last" if self.channels_last else ""
        lines = [f"linattn.optimize: backend {self.backend!r}, {mode} mode{layout}, {len(self.replaced)} replaced, "]
        lines[0] += f"{len(self.skipped)} left alone; fused blocks: {self.counts()}"
        if self.replaced:
            rows = [(r.name or "<root>", f"{r.old} -> {r.new}", r.detail) for r in self.replaced]
            lines += _table(("replaced module", "type", "detail"), rows)
        if self.skipped:
            rows = [(s.name or "<root>", s.kind, s.reason) for s in self.skipped]
            lines += _table(("left alone", "looks like", "why"), rows)
        return "\n".join(lines)


def _table(header, rows) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return [""] + [line.rstrip() for line in lines]


# --- fused modules that optimize builds ---


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose conv [-> BN] [-> act] and conv -> act -> BN runs run as fused ConvBNAct blocks.

    The children are the original modules under their original indices (state_dict keys unchanged);
    each fused block shares its run's conv and BatchNorm. The plan of runs is fixed when optimize builds
    it: a slice is a plain nn.Sequential of those children (unfused); item assignment and deletion, append,
    insert, extend, pop, += and *= raise (build the nn.Sequential anew and optimize it). Children changed
    through setattr or add_module are not followed either.
    """

    def __init__(self, seq: nn.Sequential, runs: list[tuple[int, int, ConvBNAct]]):
        super().__init__(OrderedDict(seq._modules))
        self.training = seq.training  # its own mode: its children (the Sequential's) keep theirs
        children = list(self._modules.values())
        steps, i = [], 0
        for start, stop, block in runs:
            steps += children[i:start] + [block]
            i = stop
        steps += children[i:]
        # plain list: the blocks' conv/BN are already registered as children, no duplicate keys
        self._steps = steps
        self._blocks = [block for _, _, block in runs]
        self._runs = [(start, stop) for start, stop, _ in runs]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def _fixed(self, *args, **kwargs):
        raise TypeError(
            "linattn FusedSequential: its fused runs are fixed when optimize builds it; change an nn.Sequential "
            "of the same children and optimize that"
        )

    __setitem__ = __delitem__ = append = insert = extend = pop = __iadd__ = __imul__ = _fixed

    def train(self, mode: bool = True):
        super().train(mode)
        for block in self.__dict__.get("_blocks", ()):
            block.train(mode)
        return self

    def extra_repr(self) -> str:
        runs = (f"[{a}:{b}] {blk.order}/{blk.act}" for (a, b), blk in zip(self._runs, self._blocks))
        return "fused runs: " + ", ".join(runs)

    def forward(self, x):
        for step in self._steps:
            x = step(x)
        return x


def _shuffled_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A BatchNorm after a 2x pixel shuffle as (scale, shift) in the pre-shuffle channel order."""
    scale, shift = bn_affine(bn)
    return scale.repeat_interleave(4), shift.repeat_interleave(4)


class FusedUpsampleBlock(EvalConstants):
    """SqueezeSAM's upsampling (1x1 linear -> act -> pixel shuffle 2 -> BatchNorm2d) as `linattn.upsample_block`.

    Keeps the source's children `linear`, `norm` (and so its state_dict keys). Eval: one kernel, the
    BatchNorm as the per-channel epilogue (repeated 4x in the pre-shuffle channel order), the weights cast and
    the affine kept while their sources are unchanged (linattn/nn/_cache.py eval_constants: after writes into a
    parameter's `.data`, call `.eval()` again). Train: the fused linear + act + shuffle, then the BatchNorm with
    batch statistics (running statistics updated).
    """

    def __init__(self, linear: nn.Conv2d, act: str, norm: nn.BatchNorm2d | None):
        super().__init__()
        self.linear = linear
        self.act = act
        self.norm = norm
        self.training = linear.training  # (not .train(): the adopted modules keep their own modes)

    def extra_repr(self) -> str:
        return f"act={self.act!r}"

    def forward(self, x: Tensor) -> Tensor:
        linear, bn = self._modules["linear"], self._modules.get("norm")  # (the members' reads: see member)
        dtype = getattr(x, "dtype", None)
        if bn is None or (not bn.training and member(bn, "running_mean") is not None):  # one call, constants kept

            def compute() -> tuple:
                weight, bias = cast_to(dtype, member(linear, "weight").flatten(1), member(linear, "bias"))
                scale, shift = (None, None) if bn is None else _shuffled_affine(bn)
                return weight[:, :, None, None], bias, scale, shift  # the 1x1 conv weight upsample_block makes

            sources = fold_sources(linear, bn) if bn is not None else [member(linear, n) for n in ("weight", "bias")]
            constants = self.eval_constants(sources, compute, (None if bn is None else bn.eps, dtype))
            return module_upsample_block(self.call_site(), constants, x, self.act)
        weight, bias = cast_to(dtype, linear.weight.flatten(1), linear.bias)
        return bn(upsample_block(x, weight, bias, act=self.act))  # train: the BatchNorm on batch statistics


class FusedResidualBlock(nn.Module):
    """main(x) + x for an EfficientViT conv block of ConvBNActs or a LiteMLA, the add fused into the last conv.

    Keeps the source's `main` (its children under their names) and `shortcut`, so state_dict keys
    are unchanged. channels_last: an NCHW input is converted first (optimize sets it on a channels_last model).
    """

    channels_last = False  # a class default: blocks pickled before the attribute existed read it

    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main = main
        self.shortcut = shortcut
        self.training = main.training  # (not .train(): the adopted modules keep their own modes)

    def forward(self, x: Tensor) -> Tensor:
        # the layout check inline, not a forward pre-hook as on the other fused modules: any hook sends every call
        # through nn.Module's slow path (about 2 us of host time; L0 has 23 of these blocks), and the members are
        # read from the module's dicts (see linattn/nn/conv_bn_act.py `member`)
        if self.channels_last and _nchw(x):
            x = x.contiguous(memory_format=torch.channels_last)
        main = self._modules["main"]
        blocks = [main] if isinstance(main, LiteMLA) else [m for m in main._modules.values() if m is not None]
        if self._modules.get("shortcut") is None:  # a downsampling block: no add
            return _run_blocks(blocks, x, None)
        if _wider_than_autocast(x):
            # eager's main(x) + x promotes to x's dtype, where the fused add would give the autocast dtype
            return _run_blocks(blocks, x, None) + x
        return _run_blocks(blocks, x, x)  # the add is the last conv's epilogue (the LiteMLA projection's)


class FusedNeck(nn.Module):
    """EfficientViT-SAM's neck with its bicubic resizes and their sum as one `linattn.upsample_sum` call.

    Keeps the source's `input_ops` (each a conv block, then the resize that upsample_sum replaces), `middle`
    and `output_ops` (and so its state_dict keys); `size(features)` is the size the maps are resized to.
    Under autocast the sum is in the maps' dtype (fp16 or bf16), and so is the middle's residual stream, where
    the official UpSampleLayer's newer versions return their resize in fp32 and the official middle adds in
    fp32: the output's error against float64 stays within the same bound (1.11x the official's at a small
    neck under CPU bf16 autocast).
    """

    def __init__(self, source: nn.Module, size):
        super().__init__()
        self.input_keys, self.output_keys = list(source.input_keys), list(source.output_keys)
        self.input_ops, self.middle, self.output_ops = source.input_ops, source.middle, source.output_ops
        self.size = size
        self.training = source.training  # (not .train(): the adopted modules keep their own modes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        maps = [op.op_list[0](features[key]) for key, op in zip(self.input_keys, self.input_ops)]
        x = self.middle(upsample_sum(maps, self.size(features)))
        features = dict(features)
        for key, op in zip(self.output_keys, self.output_ops):
            features[key] = op(x)
        return features


class FusedLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map as one aten layer_norm of its NHWC view, which is a view
    of a channels_last map (an NCHW map is copied into that layout and the result back). Its own parameters are
    the source's (same keys). The result has eager's dtype, under autocast too: the official forward's
    `* weight` promotes x's dtype and the parameters'."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype if self.weight is None else torch.promote_types(x.dtype, self.weight.dtype)
        y = F.layer_norm(x.to(dtype).permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        y = y.to(dtype).permute(0, 3, 1, 2)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


def _run_blocks(blocks: list[nn.Module], x: Tensor, residual: Tensor | None) -> Tensor:
    """The blocks in order, `residual` added by the last; a depthwise ConvBNAct followed by a 1x1 one (MBConv's
    and DSConv's depth_conv -> point_conv) runs as one separable_conv_bn_act where both fold (eval)."""
    i = 0
    while i < len(blocks):
        block, last = blocks[i], i == len(blocks) - 1
        pair = None if last else _separable_pair(block, blocks[i + 1], x)
        if pair is not None:
            x = module_separable(*pair, x, residual if i + 2 == len(blocks) else None)
            i += 2
            continue
        x = block(x, residual=residual) if last and residual is not None else block(x)
        i += 1
    return x


def _separable_pair(dw: nn.Module, pw: nn.Module, x: Tensor) -> tuple | None:
    """module_separable's arguments before x for depthwise block `dw` feeding 1x1 block `pw` (the pair's call site
    is dw's "separable" one), or None when they do not form that pair or one of them does not fold (train mode)."""
    if not (isinstance(dw, ConvBNAct) and isinstance(pw, ConvBNAct)):
        return None
    c, p = dw._modules["conv"], pw._modules["conv"]
    depthwise = c.groups == c.in_channels == c.out_channels and dw.order == "conv_bn_act"
    pointwise = p.kernel_size == (1, 1) and p.stride == (1, 1) and pw.geometry()[1] == (0, 0) and p.groups == 1
    if not (depthwise and pointwise):
        return None
    dtype = getattr(x, "dtype", None)
    first, second = dw.fused_arguments(dtype), pw.fused_arguments(dtype)
    if first is None or second is None:
        return None
    sites = (dw.call_site("separable"), dw.call_site(), pw.call_site())
    return sites, (first, *dw.geometry(), dw.act), (second, *pw.geometry(), pw.act)


def _wider_than_autocast(x: Tensor) -> bool:
    """Whether autocast is on for x's device and x is a floating tensor wider than its dtype."""
    if not torch._C._is_any_autocast_enabled():  # first: every residual block asks, and autocast is mostly off
        return False
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.device.type not in ("cpu", "cuda"):
        return False  # autocast has no state for other devices (meta: the compile gate's trace)
    if not torch.is_autocast_enabled(x.device.type):
        return False
    return torch.promote_types(x.dtype, torch.get_autocast_dtype(x.device.type)) != torch.get_autocast_dtype(
        x.device.type
    )


# --- recognisers: each returns (new module, detail) or raises _Skip(reason); None = not this pattern ---


class _Skip(Exception):
    pass


def _act(module: nn.Module | None) -> str:
    """linattn's activation name for an activation module; _Skip when the kernels do not have it."""
    if module is not None and type(module).__name__ == "GELUTanh":  # timm's tanh GELU
        return "gelu_tanh"
    try:
        return activation_name(module)
    except ValueError:
        raise _Skip(f"activation {type(module).__name__} is not supported") from None


def _is_act(module: nn.Module) -> bool:
    try:
        _act(module)
    except _Skip:
        return False
    return not isinstance(module, nn.Identity)


HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _check_plain(module: nn.Module | None, subtree: bool = True) -> None:
    """_Skip where replacing `module` (and, with subtree, its descendants, whose forwards the fused module does not
    call) would drop what runs besides their forwards: hooks (pruning's, the older weight_norm's, observers and
    feature hooks), or a weight that is not a parameter (pruning recomputes it in a hook)."""
    if module is None:
        return
    for m in module.modules() if subtree else [module]:
        if hooks := [name.strip("_") for name in HOOKS if getattr(m, name, None)]:
            raise _Skip(f"{type(m).__name__} has hooks ({', '.join(hooks)}), which the fused module would not run")
        if "forward" in m.__dict__:
            raise _Skip(f"{type(m).__name__} has a forward of its own, set on the instance")
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._NormBase)) and getattr(m, "weight", None) is not None:
            if "weight" not in m._parameters:
                raise _Skip(f"{type(m).__name__}'s weight is not a parameter (computed by a hook: pruning?)")


def _hooks_of(module: nn.Module) -> str | None:
    """_check_plain's reason for `module` alone, or None."""
    try:
        _check_plain(module, subtree=False)
    except _Skip as why:
        return str(why)
    return None


def _known_forward(module: nn.Module, classes: tuple[str, ...], what: str) -> None:
    """_Skip unless `module`'s class is one whose forward is known to be `what`: its children's names alone
    do not say in which order, or with what else, its forward calls them."""
    if type(module).__name__ not in classes:
        raise _Skip(f"{type(module).__name__}'s forward is not known to be {what} (recognised: {', '.join(classes)})")


def _check_conv(conv: nn.Module) -> None:
    if type(conv) is not nn.Conv2d:
        raise _Skip(f"conv {type(conv).__name__} is not a plain nn.Conv2d")
    if conv.padding_mode != "zeros":
        raise _Skip(f"conv padding_mode {conv.padding_mode!r}")
    if conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
        raise _Skip("conv padding 'same' with an even kernel")


def _check_bn(norm: nn.Module | None) -> nn.BatchNorm2d | None:
    if norm is None or isinstance(norm, nn.Identity):
        return None
    if type(norm) is not nn.BatchNorm2d:
        raise _Skip(f"norm {type(norm).__name__} is not nn.BatchNorm2d")
    return norm


def _is_lite_mla(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("qkv", "aggreg", "proj", "dim", "eps"))


def _convert_lite_mla(module: nn.Module):
    if not isinstance(getattr(module, "kernel_func", None), nn.ReLU):
        raise _Skip(f"kernel_func {type(getattr(module, 'kernel_func', None)).__name__} is not ReLU")
    try:
        new = LiteMLA.from_module(module)
    except (TypeError, ValueError) as err:
        raise _Skip(str(err)) from None
    path = "quadratic attention for maps <= dim tokens" if new.quadratic_small_maps else "linear attention always"
    return new, f"heads={new.heads}, dim={new.dim}, scales={new.scales}; {path}"


def _is_conv_norm_act(module: nn.Module) -> bool:
    """Children within {dropout, conv, norm, act}, `norm` and `act` attributes (None allowed: EfficientViT's
    ConvLayer keeps an absent norm/act as a plain None attribute)."""
    return (
        isinstance(getattr(module, "conv", None), nn.Conv2d)
        and set(module._modules) <= {"dropout", "conv", "norm", "act"}
        and hasattr(module, "norm")
        and hasattr(module, "act")
    )


# EfficientViT's ConvLayer (the official code's and linattn.models') and timm's efficientvit_mit.ConvNormAct:
# dropout -> conv -> norm -> act
CONV_NORM_ACT_CLASSES = ("ConvLayer", "ConvNormAct")


def _convert_conv_norm_act(module: nn.Module):
    _known_forward(module, CONV_NORM_ACT_CLASSES, "conv -> norm -> act")
    order = [n for n in module._modules if module._modules[n] is not None]
    if order != [n for n in ("dropout", "conv", "norm", "act") if n in order]:
        # the known classes register their children in the order their forward applies them
        raise _Skip(f"children registered as {', '.join(order)}, not in the order dropout, conv, norm, act")
    dropout = getattr(module, "dropout", None)
    if dropout is not None and not (isinstance(dropout, nn.modules.dropout._DropoutNd) and dropout.p == 0):
        what = f"p={dropout.p}" if isinstance(dropout, nn.modules.dropout._DropoutNd) else type(dropout).__name__
        raise _Skip(f"dropout ({what}) before the conv")
    _check_conv(module.conv)
    bn = _check_bn(module.norm)
    act = _act(module.act)
    block = _block(module.conv, bn, act, "conv_bn_act")
    block.training = module.training
    return block, f"conv {tuple(module.conv.kernel_size)}, {'BN, ' if bn is not None else ''}{act}"


def _block(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: str | None, order: str) -> ConvBNAct:
    """ConvBNAct.from_modules, its refusals as _Skip (a BatchNorm of another width than the conv's output: the
    module's forward is not what its children's names say)."""
    try:
        return ConvBNAct.from_modules(conv, bn, act, order=order)
    except (TypeError, ValueError) as err:
        raise _Skip(str(err).removeprefix("linattn.nn.ConvBNAct: ")) from None


def _is_layer_norm_2d(module: nn.Module) -> bool:
    return type(module).__name__ == "LayerNorm2d" and isinstance(module, nn.LayerNorm)


def _convert_layer_norm_2d(module: nn.LayerNorm):
    if len(module.normalized_shape) != 1:
        raise _Skip(f"normalized_shape {tuple(module.normalized_shape)} is not the channels alone")
    new = FusedLayerNorm2d(module.normalized_shape, module.eps, elementwise_affine=False)
    new.weight, new.bias = module.weight, module.bias  # the same parameters (None without the affine)
    new.train(module.training)
    return new, f"{module.normalized_shape[0]} channels, eps {module.eps}"


def _is_upsample(module: nn.Module) -> bool:
    return set(module._modules) == {"linear", "act", "shuffle", "norm"} and isinstance(module.shuffle, nn.PixelShuffle)


def _convert_upsample(module: nn.Module):
    _known_forward(module, ("UpsampleBlock",), "linear -> act -> shuffle -> norm")  # linattn.models.squeezesam's
    conv = module.linear
    _check_conv(conv)
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
        raise _Skip("linear is not a 1x1 conv with stride 1, padding 0, groups 1")
    if module.shuffle.upscale_factor != 2:
        raise _Skip(f"pixel shuffle factor {module.shuffle.upscale_factor} (the kernel does 2)")
    bn = _check_bn(module.norm)
    act = _act(module.act)
    return FusedUpsampleBlock(conv, act, bn), f"{conv.in_channels} -> {conv.out_channels // 4}, {act}, BN"


def _is_residual(module: nn.Module) -> bool:
    """EfficientViT's ResidualBlock: `main` and `shortcut` (None in downsampling blocks: main alone)."""
    return (
        module._modules.get("main") is not None
        and hasattr(module, "shortcut")
        and set(module._modules)
        <= {
            "pre_norm",
            "main",
            "shortcut",
            "post_act",
        }
    )


def _convert_residual(module: nn.Module):
    """Called after the children were converted."""
    _known_forward(module, ("ResidualBlock",), "main(x) + shortcut(x)")  # official, timm's and linattn.models'
    for extra in ("pre_norm", "post_act"):
        if not isinstance(getattr(module, extra, None), (type(None), nn.Identity)):
            raise _Skip(f"{extra} {type(getattr(module, extra)).__name__}")
    if module.shortcut is not None and type(module.shortcut).__name__ not in ("Identity", "IdentityLayer"):
        raise _Skip(f"shortcut {type(module.shortcut).__name__} is not an identity")
    main = module.main
    _check_plain(module.shortcut, subtree=False)  # the fused block calls neither
    if isinstance(main, LiteMLA):
        return FusedResidualBlock(main, module.shortcut), "LiteMLA + identity"
    _check_plain(main, subtree=False)  # (it calls main's blocks, not main)
    kind = type(main).__name__
    if tuple(main._modules) != SEQUENTIAL_BLOCKS.get(kind):
        raise _Skip(f"main {kind} is not one of EfficientViT's conv blocks {tuple(SEQUENTIAL_BLOCKS)}")
    if not all(isinstance(child, ConvBNAct) for child in main.children()):
        raise _Skip(f"main {type(main).__name__} holds layers that were not fused")
    detail = type(main).__name__ + (" + identity" if module.shortcut is not None else "")
    return FusedResidualBlock(main, module.shortcut), detail


def _is_neck(module: nn.Module) -> bool:
    """A DAGBlock-like module (input_keys, input_ops, middle, output_keys, output_ops) whose input ops are each
    a block and an `UpSampleLayer` (`op_list` of two)."""
    attrs = ("input_keys", "input_ops", "middle", "output_keys", "output_ops")
    if not all(hasattr(module, a) for a in attrs) or not isinstance(module.input_ops, nn.ModuleList):
        return False
    ops = list(module.input_ops)
    return bool(ops) and all(
        len(getattr(op, "op_list", ())) == 2 and type(op.op_list[1]).__name__ == "UpSampleLayer" for op in ops
    )


def _convert_neck(module: nn.Module):
    """Called after the children were converted. The size: linattn.models' SamNeck says it (`merge_size`);
    the official DAGBlock's UpSampleLayers each hold it."""
    if (merge := getattr(module, "merge", "add")) != "add":
        raise _Skip(f"merge {merge!r} (upsample_sum sums)")
    if getattr(module, "post_input", None) is not None:
        raise _Skip(f"post_input {type(module.post_input).__name__}")
    resizes = [op.op_list[1] for op in module.input_ops]
    for op in (*module.input_ops, *resizes):  # the fused neck calls neither the input ops nor their resizes
        _check_plain(op, subtree=False)
    for r in resizes:
        if getattr(r, "mode", "bicubic") != "bicubic" or getattr(r, "align_corners", False):
            raise _Skip(f"resize mode {r.mode!r}, align_corners {r.align_corners} (the kernel is bicubic, False)")
    if hasattr(module, "merge_size"):
        size = module.merge_size
    else:
        sizes = {_pair(r.size) if getattr(r, "size", None) is not None else None for r in resizes}
        if len(sizes) != 1 or None in sizes:
            raise _Skip("its UpSampleLayers do not share one output size (a resize by factor)")
        fixed = list(sizes.pop())
        size = lambda features: fixed  # noqa: E731
    return FusedNeck(module, size), f"{len(resizes)} inputs resized and summed by upsample_sum"


def _sequential_runs(seq: nn.Sequential, name: str, report: OptimizeReport):
    """The fusable runs of a Sequential's children: (start, stop, ConvBNAct)."""
    children = list(seq._modules.values())
    keys = list(seq._modules)
    runs, i = [], 0
    while i < len(children):
        conv = children[i]
        if not isinstance(conv, nn.Conv2d):
            i += 1
            continue
        nxt = children[i + 1 : i + 3]
        try:
            _check_conv(conv)
            first = nxt[0] if nxt else None
            if isinstance(first, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                bn = _check_bn(first)
                act_mod = nxt[1] if len(nxt) > 1 and _is_act(nxt[1]) else None
                order, stop = "conv_bn_act", i + 2 + (act_mod is not None)
            elif nxt and _is_act(nxt[0]):
                act_mod = nxt[0]
                bn = nxt[1] if len(nxt) > 1 and isinstance(nxt[1], nn.modules.batchnorm._NormBase) else None
                if bn is not None:
                    bn = _check_bn(bn)
                order, stop = "conv_act_bn", i + 2 + (bn is not None)
            else:
                i += 1  # a lone conv: nothing to fuse
                continue
            for part in (conv, bn, act_mod):  # (a pattern's whole subtree is checked in _replace)
                _check_plain(part)
            block = _block(conv, bn, _act(act_mod) if act_mod is not None else None, order)
            block.training = seq.training
            runs.append((i, stop, block))
            i = stop
        except _Skip as why:
            report.skipped.append(Skipped(f"{name}.{keys[i]}" if name else keys[i], "Sequential run", str(why)))
            i += 1
    return runs


# (kind, matches, convert): patterns replaced whole, before their children are looked at
LEAF_PATTERNS = (
    ("LiteMLA", _is_lite_mla, _convert_lite_mla),
    ("conv/norm/act", _is_conv_norm_act, _convert_conv_norm_act),
    ("upsample", _is_upsample, _convert_upsample),
    ("LayerNorm2d", _is_layer_norm_2d, _convert_layer_norm_2d),
)
# patterns replaced after their children are converted
CONTAINER_PATTERNS = (("residual", _is_residual, _convert_residual), ("neck", _is_neck, _convert_neck))


def _replace(module: nn.Module, name: str, report: OptimizeReport, patterns) -> tuple[bool, nn.Module | None]:
    """The first of `patterns` that matches `module`: (True, its replacement, or None where its conversion was
    skipped, which the report says), else (False, None)."""
    for kind, matches, convert in patterns:
        if matches(module):
            try:
                _check_plain(module, subtree=patterns is LEAF_PATTERNS)  # a container's children: converted
                new, detail = convert(module)
            except _Skip as why:
                report.skipped.append(Skipped(name, kind, str(why)))
                return True, None
            report.replaced.append(Replaced(name, type(module).__name__, type(new).__name__, detail))
            return True, new
    return False, None


def _convert(module: nn.Module, name: str, report: OptimizeReport) -> nn.Module | None:
    """The fused replacement of `module` (its children converted first where it is not replaced), or None."""
    if isinstance(module, (*CONV_CALLERS, FusedSequential, FusedNeck)):
        return None  # already linattn's
    _, new = _replace(module, name, report, LEAF_PATTERNS)
    if new is not None:
        return new  # a skipped one is left alone, but its children may still hold patterns
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _convert(child, f"{name}.{child_name}" if name else child_name, report)
        if new is not None:
            module._modules[child_name] = new
    matched, new = _replace(module, name, report, CONTAINER_PATTERNS)
    if matched:
        return new
    if type(module) is nn.Sequential:
        runs = _sequential_runs(module, name, report)
        if runs and (hooked := _hooks_of(module)):  # a FusedSequential is a new module: they would be dropped
            report.skipped.append(Skipped(name, "Sequential", hooked))
        elif runs:
            detail = f"{len(runs)} runs: " + ", ".join(f"[{a}:{b}] {blk.order}" for a, b, blk in runs)
            report.replaced.append(Replaced(name, "Sequential", "FusedSequential", detail))
            return FusedSequential(module, runs)
    elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        if runs := _sequential_runs(module, name, OptimizeReport(report.backend, report.training)):
            cls = type(module).__name__  # (the runs' own skips are not reported: nothing of it is replaced)
            why = f"{cls}, a subclass of nn.Sequential with {len(runs)} fusable runs: a FusedSequential drops its class"
            report.skipped.append(Skipped(name, "Sequential", why))
    return None


# --- backend hooks ---


class _BackendHooks:
    """Forward pre-hook + always-called forward hook running the root's eager forward under one backend."""

    def __init__(self, name: str):
        self.name = name
        self.saved: list[str] = []

    def pre(self, module, args):
        if not torch.compiler.is_compiling():
            self.saved.append(get_backend())
            set_backend(self.name)

    def post(self, module, args, output):
        if not torch.compiler.is_compiling() and self.saved:
            set_backend(self.saved.pop())


def _is_backend_hook(hook) -> bool:
    return isinstance(getattr(hook, "__self__", None), _BackendHooks)


def _hook_once(module: nn.Module, hook) -> None:
    """Register forward pre-hook `hook` unless `module` has it (optimizing an optimized model again): every hook
    costs host time on every call."""
    if hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(hook)


# the fused modules that call the convs themselves: with channels_last, each converts an NCHW input
CONV_CALLERS = (LiteMLA, ConvBNAct, FusedUpsampleBlock, FusedResidualBlock)


def _channels_last_inputs(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: 4-D floating tensor arguments in channels_last (a copy only where they are not)."""
    if not any(_nchw(a) for a in args):
        return None
    return tuple(a.contiguous(memory_format=torch.channels_last) if _nchw(a) else a for a in args)


def _nchw(a) -> bool:
    """A 4-D floating tensor not laid out channels_last (one contiguous in both formats, such as a 1x1 map,
    reads the same either way and is left alone)."""
    is_4d = isinstance(a, Tensor) and a.dim() == 4 and a.is_floating_point()
    return is_4d and not a.is_contiguous(memory_format=torch.channels_last)


def optimize(
    model: nn.Module,
    backend: str = "auto",
    inplace: bool = False,
    return_report: bool = False,
    channels_last: bool | None = None,
    cuda_graph: bool = False,
) -> nn.Module | tuple[nn.Module, OptimizeReport]:
    """Swap linattn's fused modules into `model`; returns the optimized model, or (model, report).

    Args:
        model: any nn.Module (EfficientViT / timm efficientvit_mit models, SqueezeSAM, ...).
        backend: "auto" | "triton" | "cuda" | "reference": the linattn backend the returned model's
            eager forward runs under ("auto" leaves the global setting alone). See the module docstring
            for torch.compile.
        inplace: modify `model` itself; by default a deep copy is optimized and `model` is untouched.
        return_report: also return an `OptimizeReport`: what was replaced, what was left alone and why.
        channels_last: run the model channels_last: its 4-D parameters (the conv weights, so K-contiguous
            (Cout, kh, kw, Cin) and read with 128-bit loads) are converted once, and the model's input and
            every fused module's input are converted when they arrive in NCHW (after an op that does not
            keep channels_last, such as CUDA's GroupNorm). None (default): when the model's parameters are on
            a GPU. NCHW inputs work either way; the fused modules' outputs are channels_last.
        cuda_graph: return a `linattn.graphs.CUDAGraphModule` around the optimized model: on CUDA inputs in
            eval mode without autograd it captures one forward per input signature into a CUDA graph (after
            eager warm-up runs, so measured dispatch fills its table first) and replays it; it returns fresh
            output tensors and keeps the model's state_dict keys. Other calls run the model as it is.

    The optimized model computes the same function: in eval mode BatchNorms are folded into the
    convs (or become the epilogue for conv -> act -> BN); in train mode the BatchNorms keep batch
    statistics and update their running statistics, and the fused attention and convs have autograd.
    State_dict keys are unchanged. `print(report)` shows what was replaced and what was left and why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"linattn.optimize: unknown backend {backend!r}; choose one of {BACKENDS}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"linattn.optimize: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as err:  # tensors that are not graph leaves (the older torch.nn.utils.weight_norm's)
            raise RuntimeError(
                f"linattn.optimize: cannot copy the model ({err}); pass inplace=True to optimize it in place"
            ) from err
    if channels_last is None:
        channels_last = any(p.is_cuda for p in model.parameters())
    report = OptimizeReport(backend=backend, training=model.training, channels_last=bool(channels_last))
    new = _convert(model, "", report)
    if new is not None:
        model = new
    if channels_last:
        model.to(memory_format=torch.channels_last)
        _hook_once(model, _channels_last_inputs)
        # a residual block's own modules take its converted input or fused outputs (which keep the layout): no
        # hook of their own (each costs about 1.6 us of host time a call, L0 has about 45 of them)
        inside = {id(m) for b in model.modules() if isinstance(b, FusedResidualBlock) for m in b.main.modules()}
        for module in model.modules():
            blocks = module._blocks if isinstance(module, FusedSequential) else [module]  # not registered children
            for block in blocks:
                if block is model or id(block) in inside or not isinstance(block, CONV_CALLERS):
                    continue
                if isinstance(block, FusedResidualBlock):
                    block.channels_last = True  # its forward checks (see there)
                else:
                    _hook_once(block, _channels_last_inputs)
    if backend != "auto":
        hooks = next((h.__self__ for h in model._forward_pre_hooks.values() if _is_backend_hook(h)), None)
        if hooks is not None:  # optimized before with a backend: its hooks now set this one
            hooks.name = backend
        else:
            hooks = _BackendHooks(backend)
            model.register_forward_pre_hook(hooks.pre)
            model.register_forward_hook(hooks.post, always_call=True)
    if cuda_graph:
        from .graphs import CUDAGraphModule

        model = CUDAGraphModule(model)
    return (model, report) if return_report else model
