"""Reference encoders in plain PyTorch (official module names, so official checkpoints load with strict=True)."""

from .checkpoint import CheckpointMismatchError, load_checkpoint
from .efficientsam import efficientsam_encoder, efficientsam_preprocess
from .efficientvit_sam import efficientvit_sam_encoder, preprocess
from .squeezesam import SqueezeSAM, squeezesam

__all__ = [
    "CheckpointMismatchError",
    "efficientsam_encoder",
    "efficientsam_preprocess",
    "efficientvit_sam_encoder",
    "load_checkpoint",
    "preprocess",
    "SqueezeSAM",
    "squeezesam",
]
