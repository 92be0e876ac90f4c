"""Command line: `python -m linattn info | check | tune | audit | bench`."""

import argparse
import platform
import sys

import torch

from . import __version__
from ._backend import KERNEL_BACKENDS, registered_ops, status
from ._table import table
from ._tune import describe


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def info() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = _device()
    print(f"linattn {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"triton {triton_version}  CUDA (torch) {torch.version.cuda or 'none'}")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU only (no CUDA device)'}")
    rows = [["op", "reference", *KERNEL_BACKENDS]]
    notes = {}
    for op in registered_ops():
        row = [op, "yes"]
        for name in KERNEL_BACKENDS:
            why = status(op, name, device)
            if why:
                mark = notes.setdefault(why, f"[{len(notes) + 1}]")
                row.append(f"no {mark}")
            else:
                row.append("yes")
        rows.append(row)
    print(f"\nops x backends on {device.type}:")
    print(table(rows))
    for why, mark in notes.items():
        print(f"{mark} {why}")
    print(describe())


def _tune_command(args) -> int:
    from . import _tune

    if not torch.cuda.is_available():
        print("linattn tune: no GPU here; auto runs the reference on CPU tensors, so there is nothing to measure")
        return 0
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    measured = _tune.tune(args.model, args.batch, dtype, args.backward)
    rows = [["op", "pass", "call (shapes/strides/dtype)", "chosen", "ms (median of 5, CUDA events)"]]
    for entry in measured:
        op, pass_, call = entry["key"].split(":", 2)
        ms = ", ".join(f"{backend} {t:.3f}" for backend, t in entry["ms"].items())
        rows.append([op, pass_, call if len(call) <= 60 else call[:57] + "...", entry["chosen"], ms])
    print(table(rows) if measured else "nothing new to measure: every call's choice is in the table")
    print(_tune.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend can run each op here")
    sub.add_parser("check", help="run every op on every available backend against the reference")
    tune = sub.add_parser("tune", help="measure dispatch's choices for a model's calls on this GPU and keep them")
    tune.add_argument("--model", nargs="+", default=["l0"], help="encoders (l0 .. xl1, squeezesam, vitt, vits)")
    tune.add_argument("--batch", type=int, default=16)
    tune.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    tune.add_argument("--backward", action="store_true", help="also the backward (train mode)")
    sub.add_parser(
        "audit",
        help="the GPU compile gate: compile every kernel for sm_90 and sm_80 (see `python -m linattn audit --help`)",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="end-to-end encoder benchmark, eager vs linattn.optimize (see `python -m linattn bench --help`)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        from ._check import check

        return 0 if check(_device()) else 1
    if args.command == "tune":
        return _tune_command(args)
    if args.command == "audit":
        from .audit import main as audit

        return audit(rest)
    from .benchmarks.bench_e2e import main as bench

    bench(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
