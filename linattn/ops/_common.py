"""What the ops share: argument checks (every error names the op and the argument) and allocation."""

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_problem(t: Tensor) -> str | None:
    """Why the kernels cannot take tensors like t (the reference can), or None."""
    if t.dtype not in KERNEL_DTYPES:
        return f"dtype {t.dtype} runs on the reference backend only"
    return None


def new_feature_map(like: Tensor, channels: int) -> Tensor:
    """A (B, channels, H, W) tensor in `like`'s memory format (channels_last stays channels_last)."""
    B, _, H, W = like.shape
    channels_last = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((B, channels, H, W), dtype=like.dtype, device=like.device, memory_format=fmt)


def fail(op: str, arg: str, message: str, error: type[Exception] = ValueError):
    raise error(f"linattn.{op}: {arg} {message}")


def require_tensors(op: str, **tensors) -> None:
    """Type check before the dispatcher, whose own error would not name the op's API."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            fail(op, name, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)


def check_tensor(op: str, name: str, t: Tensor, ndim: int, layout: str) -> None:
    """A floating, non-empty tensor of rank ndim (layout names its dimensions in messages)."""
    if t.dim() != ndim:
        fail(op, name, f"must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        fail(op, name, f"must be float16, bfloat16 or float32 (float64: reference backend), got {t.dtype}", TypeError)
    if t.numel() == 0:
        fail(op, name, f"is empty: shape {tuple(t.shape)} {layout}")
