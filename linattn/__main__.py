"""Command line: `python -m linattn info | check | bench`."""

import argparse
import platform
import sys

import torch

from . import __version__
from ._backend import KERNEL_BACKENDS, registered_ops, status
from ._table import table


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend can run each op here")
    sub.add_parser("check", help="run every op on every available backend against the reference")
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
    if args.command == "audit":
        from .audit import main as audit

        return audit(rest)
    from .benchmarks.bench_e2e import main as bench

    bench(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
