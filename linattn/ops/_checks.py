"""Argument checks shared by the ops: every error names the op and the argument."""

from torch import Tensor


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
