"""`linattn.nn.ConvBNAct`: a conv + BatchNorm + activation block on `linattn.conv_bn_act`.

A drop-in for conv/BN/act containers in either order:

- "conv_bn_act" (EfficientViT's ConvLayer, timm's ConvNormAct): in eval mode the
  BatchNorm is folded into the conv (`linattn.fold_bn`) and the block is one
  kernel launch;
- "conv_act_bn" (SqueezeSAM's conv -> ReLU -> BN): the BatchNorm cannot be
  folded into the conv; in eval mode it becomes the kernel's post_scale /
  post_shift epilogue, again one launch.

In train mode the BatchNorm keeps its semantics (batch statistics, running
statistics and num_batches_tracked updated): the conv (with the activation
fused for "conv_act_bn") is the fused op and BN runs as torch's BatchNorm2d,
everything differentiable. Submodules are named `conv` and `norm` as in
EfficientViT's ConvLayer, so its state_dict keys load unchanged.
"""

import torch
from torch import Tensor, nn

from .. import reference
from ..ops.conv_bn_act import ACTIVATIONS, conv_bn_act, fold_bn, module_conv_bn_act
from ._cache import EvalConstants

__all__ = ["ConvBNAct"]

ORDERS = ("conv_bn_act", "conv_act_bn")


def activation_name(act) -> str:
    """linattn's name of an activation given as None, a name, or a torch.nn activation module."""
    if act is None or isinstance(act, nn.Identity):
        return "identity"
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"linattn.nn.ConvBNAct: act {act!r} is not supported; use one of {ACTIVATIONS}")
        return act
    if type(act) is nn.GELU:  # (a subclass may compute something else: QuickGELU)
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    for cls, name in ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.Hardswish, "hardswish"), (nn.SiLU, "silu")):
        if type(act) is cls:
            return name
    raise ValueError(
        f"linattn.nn.ConvBNAct: activation module {type(act).__name__} is not supported; use None, "
        "nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.Hardswish or nn.SiLU"
    )


def _int_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv.padding as a pair of ints ("same" with stride 1 and an even total padding, "valid")."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"linattn.nn.ConvBNAct: padding_mode {conv.padding_mode!r} is not supported; use 'zeros'")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("linattn.nn.ConvBNAct: padding 'same' with an even kernel is asymmetric, not supported")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


def member(module: nn.Module, name: str):
    """module.<name>, a parameter's or buffer's read from the module's own dicts first: every eval forward of a
    fused block reads its folding sources, and nn.Module.__getattr__ costs about 0.4 us a read there (a
    parametrized weight, a property of the module's class, takes the attribute path)."""
    for members in (module._parameters, module._buffers):
        if name in members:
            return members[name]
    return getattr(module, name)


def fold_sources(conv: nn.Module | None, bn: nn.Module) -> list[Tensor | None]:
    """The tensors an eval-mode fold of `bn` (into `conv`, when given) depends on.

    num_batches_tracked stands for the running statistics: BatchNorm updates those in train mode
    without bumping their version counters, but the add_ on its counter bumps the counter's (so a
    BatchNorm shared with a module that runs in train mode is seen to change). Read from the modules' own
    dicts (see member) where they are there: every eval forward of a fused block asks.
    """
    try:
        params, buffers = bn._parameters, bn._buffers
        bn_state = [buffers[_STATS[0]], buffers[_STATS[1]], buffers[_STATS[2]], params["weight"], params["bias"]]
        return bn_state if conv is None else [conv._parameters["weight"], conv._parameters["bias"], *bn_state]
    except KeyError:  # a parametrized or unregistered member: the attribute's read
        bn_state = [member(bn, n) for n in (*_STATS, "weight", "bias")]
        return bn_state if conv is None else [member(conv, "weight"), member(conv, "bias"), *bn_state]


_STATS = ("running_mean", "running_var", "num_batches_tracked")


def cast_to(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in `dtype` (None stays None): folded or conv weights follow the activation's dtype, so an
    fp32 block fed bf16 activations (autocast, or mixed dtypes between blocks) runs in bf16, not a TypeError.
    Floating activations only (dtype None or not floating: unchanged, for the op to reject)."""
    if dtype is None or not dtype.is_floating_point:
        return tensors
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as a per-channel (scale, shift)."""
    gamma, beta = (bn.weight, bn.bias) if bn.affine else (None, None)
    return reference.bn_affine(bn.running_mean, bn.running_var, gamma, beta, bn.eps)


class ConvBNAct(EvalConstants):
    """conv -> BN -> act (order "conv_bn_act") or conv -> act -> BN ("conv_act_bn"), optionally + residual.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: as nn.Conv2d.
        padding: as nn.Conv2d; None gives "same" padding dilation * (kernel_size - 1) // 2.
        norm: whether there is a BatchNorm2d (eps, momentum as nn.BatchNorm2d).
        act: None or one of "identity", "relu", "relu6", "gelu", "gelu_tanh", "hardswish", "silu",
            or an activation module.
        order: "conv_bn_act" or "conv_act_bn".

    forward(x, residual=None): x (B, Cin, H, W); residual (B, Cout, Ho, Wo) added last.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=None,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act="relu",
        order: str = "conv_bn_act",
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding is None:
            k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
            d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
            padding = tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
        factory = dict(device=device, dtype=dtype)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory)
        bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory) if norm else None
        self._adopt(conv, bn, act, order)

    def _adopt(self, conv: nn.Module, bn: nn.Module | None, act, order: str) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"linattn.nn.ConvBNAct: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if bn is not None and not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"linattn.nn.ConvBNAct: bn must be an nn.BatchNorm2d or None, got {type(bn).__name__}")
        if bn is not None and bn.num_features != conv.out_channels:
            raise ValueError(
                f"linattn.nn.ConvBNAct: bn has {bn.num_features} features, conv {conv.out_channels} output channels"
            )
        if order not in ORDERS:
            raise ValueError(f"linattn.nn.ConvBNAct: order must be one of {ORDERS}, got {order!r}")
        self.padding, self._padding_of = _int_padding(conv), conv.padding
        self.conv = conv
        self.norm = bn  # None stays a plain attribute: forward reads _modules.get("norm")
        self.act = activation_name(act)
        self.order = order

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act=None, order: str = "conv_bn_act"):
        """The block around existing modules (their parameters and buffers are shared, not copied)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(conv, bn, act, order)
        # its own mode alone: .train() would set the adopted conv's and BatchNorm's too (a BatchNorm frozen in a
        # model fine-tuned in train mode would run on batch statistics)
        module.training = conv.training
        return module

    def extra_repr(self) -> str:
        return f"act={self.act!r}, order={self.order!r}"

    def fused_arguments(self, dtype: torch.dtype | None) -> tuple | None:
        """(weight, bias, post_scale, post_shift) of the whole block as one conv_bn_act call on activations of
        `dtype` (the BatchNorm folded or turned into the affine, the weights cast), or None when its BatchNorm
        uses batch statistics (train mode). Cached (eval_constants): the same tuple while its sources are
        unchanged, so the module's call site can key it by identity (ops/conv_bn_act.py module_conv_bn_act)."""
        conv, bn = self._modules["conv"], self._modules.get("norm")  # (nn.Module.__getattr__: see member)
        if bn is None:
            weights = (member(conv, "weight"), member(conv, "bias"))
            return self.eval_constants(weights, lambda: (*cast_to(dtype, *weights), None, None), (dtype,))
        if bn.training or member(bn, "running_mean") is None:  # the BatchNorm's own mode, as its forward
            return None
        if self.order == "conv_bn_act":
            fold = lambda: (*cast_to(dtype, *fold_bn(conv, bn)), None, None)  # noqa: E731
        else:
            fold = lambda: (*cast_to(dtype, member(conv, "weight"), member(conv, "bias")), *bn_affine(bn))  # noqa: E731
        return self.eval_constants(fold_sources(conv, bn), fold, (bn.eps, dtype, self.order))

    _padding_of = None  # the conv.padding that self.padding was made from (a class default: older pickles)

    def geometry(self) -> tuple:
        """The conv's (stride, padding, dilation, groups), as conv_bn_act takes them: the conv's own, read at each
        call (its padding as ints, made again when the conv's padding is replaced)."""
        conv = self._modules["conv"]
        if conv.padding is not self._padding_of:
            self.padding, self._padding_of = _int_padding(conv), conv.padding
        return conv.stride, self.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        conv, bn, act = self._modules["conv"], self._modules.get("norm"), self.act
        geometry = self.geometry()
        # the conv's weight and bias follow the activation's dtype (mixed dtypes between blocks)
        dtype = getattr(x, "dtype", None)
        if (fused := self.fused_arguments(dtype)) is not None:  # eval (or no BN): one call
            return module_conv_bn_act(self.call_site(), fused, x, *geometry, act, residual)
        # train (or BN without running statistics): batch statistics, running statistics updated
        weight, bias = cast_to(dtype, conv.weight, conv.bias)
        if self.order == "conv_bn_act":
            y = reference.activation(bn(conv_bn_act(x, weight, bias, *geometry)), act)
        else:
            y = bn(conv_bn_act(x, weight, bias, *geometry, act=act))
        return y if residual is None else y + residual
