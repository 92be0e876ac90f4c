"""Op registration (`torch.ops.linattn.*`) and the functional API, one module per op."""

from .linear_attention import lite_mla_attention, relu_linear_attention

# op -> the linattn._C kernel behind its cuda backend (what `info` looks for)
CUDA_KERNELS = {
    "relu_linear_attention": "linear_attention_fwd_cuda",
    "lite_mla_attention": "linear_attention_fwd_cuda",
}

__all__ = ["CUDA_KERNELS", "lite_mla_attention", "relu_linear_attention"]
