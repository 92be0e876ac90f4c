"""Op registration (`torch.ops.linattn.*`) and the functional API, one module per op."""

from .conv_bn_act import conv_bn_act, fold_bn, upsample_block
from .linear_attention import lite_mla_attention, relu_linear_attention
from .lite_mla_context import lite_mla_context
from .multiscale_aggregate import multiscale_aggregate

# op -> the linattn._C kernel behind its cuda backend (what `info` looks for)
CUDA_KERNELS = {
    "relu_linear_attention": "linear_attention_fwd_cuda",
    "lite_mla_attention": "linear_attention_fwd_cuda",
    "multiscale_aggregate": "multiscale_aggregate_fwd_cuda",
    "lite_mla_context": "lite_mla_context_fwd_cuda",
    # forward only, depthwise and 1x1 convs (see conv_bn_act.cuda_limit); upsample_block has no CUDA kernel yet
    "conv_bn_act": "conv_bn_act_fwd_cuda",
    "upsample_block": "upsample_block_fwd_cuda",
}

__all__ = [
    "CUDA_KERNELS",
    "conv_bn_act",
    "fold_bn",
    "lite_mla_attention",
    "lite_mla_context",
    "multiscale_aggregate",
    "relu_linear_attention",
    "upsample_block",
]
