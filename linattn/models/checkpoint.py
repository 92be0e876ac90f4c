"""`load_checkpoint(model, path)`: official EfficientViT-SAM / EfficientSAM weights from a local file, no network."""

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["CheckpointMismatchError", "load_checkpoint"]

PREFIX = "image_encoder."
_WRAPPERS = ("state_dict", "model")
_SHOWN = 20  # keys listed per kind in the error message


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model's; `missing`, `unexpected`, `mismatched` list them."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def _unwrap(obj) -> dict[str, Tensor]:
    """Follow "state_dict" / "model" wrappers (training checkpoints) down to a flat name -> tensor mapping."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TypeError(f"linattn.models.load_checkpoint: expected a state_dict (a mapping), got {type(obj).__name__}")
    return dict(obj)


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {kind}: [{shown}{more}]"


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in `path` into `model` with strict=True and return the model.

    The file is read with `torch.load(weights_only=True)` on the CPU (no network access). A
    training checkpoint's "state_dict" / "model" wrappers are unwrapped and a "module." (DDP)
    prefix on every key is stripped. When `model` is an image encoder (it has no
    `image_encoder.*` parameters of its own) and the checkpoint holds a whole SAM model, only
    the `image_encoder.*` entries are kept, with the prefix stripped; the other parts
    (prompt encoder, mask decoder) are dropped.

    Raises CheckpointMismatchError listing the missing keys, the unexpected keys and the keys
    whose shapes differ, before anything is copied into the model.
    """
    state = _unwrap(torch.load(os.fspath(path), map_location="cpu", weights_only=True))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    own = model.state_dict()
    is_encoder = not any(k.startswith(PREFIX) for k in own)
    if is_encoder and any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            _listing(kind, keys)
            for kind, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise CheckpointMismatchError(
            f"linattn.models.load_checkpoint: {os.fspath(path)} does not match {type(model).__name__}: "
            + "; ".join(parts),
            missing,
            unexpected,
            mismatched,
        )
    model.load_state_dict(state, strict=True)
    return model
