"""Op registration (`torch.ops.linattn.*`) and the functional API, one module per op."""

from .linear_attention import lite_mla_attention, relu_linear_attention

__all__ = ["lite_mla_attention", "relu_linear_attention"]
