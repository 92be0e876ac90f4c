"""`linattn.nn.LiteMLA`: EfficientViT's lightweight multi-scale linear attention on linattn's fused ops.

A drop-in replacement for the official EfficientViT `LiteMLA` and for timm's
`efficientvit_mit.LiteMLA`: same constructor arguments, same submodule names and
state_dict keys (`qkv.conv.weight`, `aggreg.{i}.0.weight`, `aggreg.{i}.1.weight`,
`proj.conv.weight`, `proj.norm.*`), so their checkpoints load with strict=True.
The forward is three stages: the qkv 1x1 conv, one `linattn.lite_mla_context` call
(multi-scale aggregation and ReLU linear attention fused, the aggregated tensor
never written), the projection 1x1 conv with its BatchNorm folded in eval mode.
"""

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..ops import fold_bn, lite_mla_attention, lite_mla_context, multiscale_aggregate
from ..ops.conv_bn_act import module_conv_bn_act
from ..ops.lite_mla_context import OP as CONTEXT
from ..ops.lite_mla_context import module_lite_mla_context
from ..ops.multiscale_aggregate import bias_list, tap_major
from ._cache import EvalConstants
from .conv_bn_act import activation_name, cast_to, fold_sources, member

__all__ = ["LiteMLA"]

# EfficientViT's activation names; its "gelu" is the tanh approximation
ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hswish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": partial(nn.GELU, approximate="tanh"),
}
NORMS = ("bn2d",)


def _pair(value, name: str) -> tuple:
    """EfficientViT's per-stage arguments: one value for both stages, or a (qkv, proj) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (value[0], value[0])
        if len(value) == 2:
            return tuple(value)
        raise ValueError(f"linattn.nn.LiteMLA: {name} must be one value or a (qkv, proj) pair, got {value!r}")
    return (value, value)


def _build_norm(name: str | None, channels: int, eps: float) -> nn.Module | None:
    if name is None:
        return None
    if name != "bn2d":
        raise ValueError(f"linattn.nn.LiteMLA: norm {name!r} is not supported; use None or one of {NORMS}")
    return nn.BatchNorm2d(channels, eps=eps)


def _build_act(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    if name not in ACTIVATIONS:
        raise ValueError(
            f"linattn.nn.LiteMLA: act_func {name!r} is not supported; use None or one of {list(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


def _foldable(norm: nn.Module) -> bool:
    """A BatchNorm whose eval-mode output is an affine map of its input (it has running statistics). Of torch's
    own classes only: a subclass may add to the forward (timm's BatchNormAct2d applies its activation)."""
    plain = type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm)
    return plain and norm.track_running_stats and norm.running_var is not None


class _ConvLayer(EvalConstants):
    """EfficientViT's ConvLayer for LiteMLA's 1x1 stages: `conv`, then `norm` and `act` when configured (else None).

    In eval mode a BatchNorm `norm` is folded into the conv (one conv call); in
    train mode the conv and the BatchNorm run separately, so running statistics
    update and autograd reaches every parameter.
    """

    def __init__(self, in_channels: int, out_channels: int, use_bias: bool, norm, act_func, norm_eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=use_bias)
        self.norm = _build_norm(norm, out_channels, norm_eps)  # None: a plain attribute (forward's _modules.get)
        self.act = _build_act(act_func)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x: (B, in, H, W) -> (B, out, H, W), plus `residual` (the block's shortcut) when given. With the norm
        folded (eval) or absent and a fusable activation, the whole stage is one conv_bn_act call, residual
        included."""
        modules = self._modules  # (nn.Module.__getattr__ costs host time per call: conv_bn_act.member)
        conv, norm = modules["conv"], modules.get("norm")
        # the conv's (folded) weights follow the activation's dtype, as ConvBNAct's (mixed dtypes between blocks)
        dtype = getattr(x, "dtype", None)
        fold = norm is not None and not norm.training and _foldable(norm)  # the norm's own mode
        if fold:  # cached as ConvBNAct's: the same tuple while the sources are unchanged (the call site's key)
            compute = lambda: (*cast_to(dtype, *fold_bn(conv, norm)), None, None)  # noqa: E731
            fused = self.eval_constants(fold_sources(conv, norm), compute, (norm.eps, dtype))
        elif norm is None:
            weights = (member(conv, "weight"), member(conv, "bias"))
            fused = self.eval_constants(weights, lambda: (*cast_to(dtype, *weights), None, None), (dtype,))
        else:
            fused = (*cast_to(dtype, member(conv, "weight"), member(conv, "bias")), None, None)
        act = _fused_activation(modules.get("act"))
        if act is not None and (norm is None or fold):
            geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
            return module_conv_bn_act(self.call_site(), fused, x, *geometry, act, residual)
        weight, bias = fused[:2]
        x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if norm is not None and not fold:
            x = norm(x)
        if self.act is not None:
            x = self.act(x)
        return x if residual is None else x + residual


def _fused_activation(act: nn.Module | None) -> str | None:
    """conv_bn_act's name for a stage's activation module, or None when the kernels do not have it."""
    try:
        return activation_name(act)
    except ValueError:
        return None


def _stage_module(module: nn.Module | None) -> nn.Module | None:
    """A norm/act of another implementation's ConvLayer as LiteMLA holds it: nn.Identity (timm's "none") is None."""
    return None if isinstance(module, nn.Identity) else module


class LiteMLA(EvalConstants):
    """Lightweight multi-scale ReLU linear attention (EfficientViT), on linattn's fused kernels.

    Arguments are those of the official EfficientViT `LiteMLA`:

    Args:
        in_channels: C_in, channels of the input feature map.
        out_channels: C_out, channels of the output feature map.
        heads: heads per branch; None means int(in_channels // dim * heads_ratio).
        heads_ratio: scales the default number of heads.
        dim: head dimension D (32 in every EfficientViT-SAM stage). total_dim = heads * dim.
        use_bias: bias of the convs, one bool or a pair (qkv conv and aggregation convs, proj conv).
        norm: after the qkv conv and after the proj conv: "bn2d" (BatchNorm2d) or None, one value or a pair.
        act_func: after the qkv and proj stages (after the norm): None, "relu", "relu6", "hswish", "silu"
            or "gelu" (tanh approximation, as EfficientViT), one value or a pair.
        kernel_func: the attention's feature map; only "relu" is supported.
        scales: odd kernel sizes of the multi-scale aggregation, one branch per entry, e.g. (5,) or (3,).
        eps: added to the attention's denominator (official default 1e-15; timm's default is 1e-5).
        norm_eps: BatchNorm eps (keyword only; the SAM models use 1e-6).

    Submodules (EfficientViT's names, so its state_dicts load with strict=True):
        qkv: 1x1 conv C_in -> 3*total_dim (+ norm, act); packed per head as [q | k | v] (D channels each).
        aggreg[i]: nn.Sequential(depthwise kxk conv, padding k//2, groups 3*total_dim;
            1x1 conv, groups 3*heads) for scale i.
        proj: 1x1 conv (1+len(scales))*total_dim -> C_out (+ norm, act).

    Shape: (B, C_in, H, W) -> (B, C_out, H, W), NCHW or channels_last. Maps of more than `dim`
    tokens run `linattn.lite_mla_context` (backend chosen by `linattn.set_backend`); smaller ones
    EfficientViT's quadratic attention on `linattn.multiscale_aggregate`'s output,
    unless `quadratic_small_maps` is False (`from_module` sets it so for timm's module, which is
    always linear).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int | None = None,
        heads_ratio: float = 1.0,
        dim: int = 8,
        use_bias=False,
        norm=(None, "bn2d"),
        act_func=(None, None),
        kernel_func: str = "relu",
        scales: tuple[int, ...] = (5,),
        eps: float = 1.0e-15,
        *,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if kernel_func != "relu":
            raise ValueError(
                f"linattn.nn.LiteMLA: kernel_func must be 'relu' (the fused kernels' feature map), got {kernel_func!r}"
            )
        heads = int(in_channels // dim * heads_ratio) if heads is None else int(heads)
        if heads < 1 or dim < 1:
            raise ValueError(f"linattn.nn.LiteMLA: heads and dim must be >= 1, got heads={heads}, dim={dim}")
        scales = tuple(int(k) for k in scales)
        if any(k < 1 or k % 2 == 0 for k in scales):
            raise ValueError(f"linattn.nn.LiteMLA: scales must be odd kernel sizes, got {scales}")
        use_bias, norm, act_func = _pair(use_bias, "use_bias"), _pair(norm, "norm"), _pair(act_func, "act_func")

        self.eps = eps
        self.dim = dim
        # official EfficientViT: maps of at most `dim` tokens take the quadratic attention; timm's LiteMLA
        # always runs the linear one (from_module copies the source's behaviour)
        self.quadratic_small_maps = True
        self.heads = heads
        self.scales = scales
        total_dim = heads * dim
        self.qkv = _ConvLayer(in_channels, 3 * total_dim, use_bias[0], norm[0], act_func[0], norm_eps)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, k, padding=k // 2, groups=3 * total_dim, bias=use_bias[0]),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=use_bias[0]),
            )
            for k in scales
        )
        self.kernel_func = nn.ReLU()  # what the kernels compute; kept for the official module tree
        self.proj = _ConvLayer(total_dim * (1 + len(scales)), out_channels, use_bias[1], norm[1], act_func[1], norm_eps)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, scales={self.scales}, eps={self.eps}"

    def context(self, qkv: Tensor) -> Tensor:
        """Aggregation and attention: (B, 3*heads*dim, H, W) -> (B, (1+S)*heads*dim, H, W), qkv's dtype."""
        dtype = qkv.dtype  # under autocast the weights may be wider than qkv; the ops take one dtype

        def cast(t: Tensor | None) -> Tensor | None:
            return t if t is None or t.dtype == dtype else t.to(dtype)

        # each scale's (depthwise, pointwise) convs and their members, read from the modules' dicts: every eval
        # forward asks (nn.Module.__getattr__ and Sequential indexing cost host time: conv_bn_act.member)
        stages = [list(agg._modules.values())[:2] for agg in self._modules["aggreg"]._modules.values()]
        dws, pws = [member(dw, "weight") for dw, _ in stages], [member(pw, "weight") for _, pw in stages]
        dbs, pbs = [member(dw, "bias") for dw, _ in stages], [member(pw, "bias") for _, pw in stages]
        H, W = qkv.shape[-2:]
        linear = H * W > self.dim or not self.quadratic_small_maps
        if not stages:
            attention = lite_mla_attention if linear else reference.relu_quadratic_attention
            return attention(qkv, self.dim, self.eps)
        sources = [*dws, *pws, *dbs, *pbs]
        if self._packs(sources):
            # once, while the weights are unchanged: the depthwise ones tap-major (the Triton kernels' tap loads
            # are vectors), all cast, the biases as the ops take them; one tuple, the call site's key
            def compute() -> tuple:
                dw, pw = [cast(w) for w in dws], [cast(w) for w in pws]
                db = bias_list(CONTEXT, "dw_biases", [cast(b) for b in dbs], dw)
                pb = bias_list(CONTEXT, "pw_biases", [cast(b) for b in pbs], pw)
                return [tap_major(w) for w in dw], pw, db, pb

            constants = self.eval_constants(sources, compute, (dtype,))
            if linear:
                return module_lite_mla_context(self.call_site(), constants, qkv, self.heads, self.dim, self.eps)
            dws, pws, dbs, pbs = constants
        else:
            dws, pws, dbs, pbs = ([cast(t) for t in ts] for ts in (dws, pws, dbs, pbs))
        if linear:
            return lite_mla_context(qkv, dws, pws, self.heads, self.dim, self.eps, dbs, pbs)
        multi_scale = multiscale_aggregate(qkv, dws, pws, self.heads, dbs, pbs)
        return reference.relu_quadratic_attention(multi_scale, self.dim, self.eps)

    @staticmethod
    def _packs(weights: list[Tensor | None]) -> bool:
        """Whether the aggregation's weights and biases are kept, cast and packed, as inference constants (the
        depthwise ones tap-major: ops.multiscale_aggregate.tap_major): when no gradient reaches them, they are
        parameters (a parametrization's weight is a new tensor each read, no key for a cache) and torch.compile
        is not tracing (it sees the parameters as they are). On the cuda backend the op copies the depthwise
        weights back to contiguous, a small copy per scale and call."""
        given = [w for w in weights if w is not None]
        if torch.compiler.is_compiling() or not all(isinstance(w, nn.Parameter) for w in given):
            return False
        return not (torch.is_grad_enabled() and any(w.requires_grad for w in given))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, H, W) -> (B, out_channels, H, W), plus `residual` when given (an EfficientViT
        block's shortcut, added in the projection conv's epilogue)."""
        return self.proj(self.context(self.qkv(x)), residual=residual)

    @classmethod
    def from_module(cls, module: nn.Module) -> "LiteMLA":
        """A linattn LiteMLA equal to `module`, an official EfficientViT or timm `efficientvit_mit.LiteMLA`.

        Reads the configuration from its submodules (`qkv.conv`, `aggreg`, `proj.conv`, `dim`,
        `eps`), checks its state_dict against that configuration's (strict: keys and shapes), then adopts
        its convs, norms and activations (their parameters and buffers are shared, not copied, as
        ConvBNAct.from_modules shares them: an optimizer built on the original trains the new module, frozen
        weights stay frozen), and keeps its training mode.
        """
        missing = [name for name in ("qkv", "aggreg", "proj", "dim", "eps") if not hasattr(module, name)]
        if missing:
            raise TypeError(f"linattn.nn.LiteMLA.from_module: {type(module).__name__} is not a LiteMLA: no {missing}")
        kernel = getattr(module, "kernel_func", None)
        if not isinstance(kernel, nn.ReLU):
            raise ValueError(
                f"linattn.nn.LiteMLA.from_module: kernel_func must be nn.ReLU (the fused kernels' feature map), "
                f"got {type(kernel).__name__}"
            )
        for stage in ("qkv", "proj"):
            dropout = getattr(getattr(module, stage), "dropout", None)
            if isinstance(dropout, nn.modules.dropout._DropoutNd) and dropout.p > 0:
                raise ValueError(f"linattn.nn.LiteMLA.from_module: {stage}.dropout (p={dropout.p}) is not supported")
        qkv_conv, proj_conv = module.qkv.conv, module.proj.conv
        dim = int(module.dim)
        new = cls(
            qkv_conv.in_channels,
            proj_conv.out_channels,
            heads=qkv_conv.out_channels // (3 * dim),
            dim=dim,
            use_bias=(qkv_conv.bias is not None, proj_conv.bias is not None),
            norm=(None, None),
            act_func=(None, None),
            scales=tuple(int(agg[0].kernel_size[0]) for agg in module.aggreg),
            eps=float(module.eps),
        )
        like = qkv_conv.weight  # (on the meta device too: the compile gate traces meta models)
        new.to(device=like.device, dtype=like.dtype)
        for stage in ("qkv", "proj"):
            source, target = getattr(module, stage), getattr(new, stage)
            target.norm = copy.deepcopy(_stage_module(getattr(source, "norm", None)))  # for the check alone
        new.load_state_dict(module.state_dict(), strict=True)  # the check: these keys, these shapes
        for stage in ("qkv", "proj"):
            source, target = getattr(module, stage), getattr(new, stage)
            target.conv = source.conv
            target.norm = _stage_module(getattr(source, "norm", None))
            target.act = _stage_module(getattr(source, "act", None))
        new.aggreg = module.aggreg
        # the official module has relu_quadratic_att for small maps; timm's has only the linear path
        new.quadratic_small_maps = bool(getattr(module, "quadratic_small_maps", hasattr(module, "relu_quadratic_att")))
        adopted = [(m, m.training) for m in module.modules()]
        new.train(module.training)  # the modules it made; those it adopted keep their own modes (a frozen norm)
        for m, mode in adopted:
            m.training = mode
        return new
