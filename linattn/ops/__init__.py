"""Op registration (`torch.ops.linattn.*`) and the functional API, one module per op."""

from .conv_bn_act import conv_bn_act, fold_bn, separable_conv_bn_act, upsample_block
from .linear_attention import lite_mla_attention, relu_linear_attention
from .lite_mla_context import lite_mla_context
from .multiscale_aggregate import multiscale_aggregate
from .upsample_sum import upsample_sum

__all__ = [
    "conv_bn_act",
    "fold_bn",
    "lite_mla_attention",
    "lite_mla_context",
    "multiscale_aggregate",
    "relu_linear_attention",
    "separable_conv_bn_act",
    "upsample_block",
    "upsample_sum",
]
