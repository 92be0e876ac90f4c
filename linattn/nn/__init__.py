"""Drop-in modules built on linattn's fused ops (the module layer: forward is one op call per stage)."""

from .conv_bn_act import ConvBNAct
from .lite_mla import LiteMLA

__all__ = ["ConvBNAct", "LiteMLA"]
