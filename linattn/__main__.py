"""Command line: `python -m linattn info | check | tune | audit | bench`."""

import argparse
import contextlib
import platform
import sys
import time

import torch

from . import __version__
from ._backend import KERNEL_BACKENDS, registered_ops, status
from ._table import table
from ._tune import describe
from .benchmarks.common import positive_int


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


def _precompile(args) -> bool:
    """tune's first part: every Triton configuration of the models' calls compiled at once into Triton's cache;
    False when one did not compile."""
    from .audit import ARCHS, precompile, traceable
    from .benchmarks.bench_e2e import resolve_model
    from .benchmarks.common import progress

    cc = args.arch
    if cc is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cc = 10 * major + minor
    if cc not in ARCHS:
        print(f"linattn tune: no precompile for sm_{cc} (its launch sizes are known for sm_80 and sm_90): kernels "
              "compile at their first call")  # fmt: skip
        return True
    models = [m for m in map(resolve_model, args.model) if traceable(m)]
    if without := [m for m in args.model if not traceable(resolve_model(m))]:
        print(f"linattn tune: nothing to precompile for {', '.join(without)} (none of linattn's Triton kernels runs)")
    if not models:
        return True
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar = []

        def advance(done: int, total: int) -> None:
            if not bar:
                bar.append(stack.enter_context(progress(total, f"precompile sm_{cc}")))
            bar[0].update(done - bar[0].n)

        count, failed = precompile(cc, models, args.batch, [args.dtype], [args.layout], args.backward, args.jobs,
                                   advance)  # fmt: skip
    print(f"linattn tune: {count} Triton configurations of {', '.join(models)} compiled for sm_{cc} into Triton's "
          f"cache in {time.perf_counter() - started:.0f} s")  # fmt: skip
    for line in failed:
        print(f"did not compile: {line}")
    return not failed


def _tune_command(args, parser) -> int:
    from . import _tune
    from .benchmarks.bench_e2e import ALIASES, MODELS, resolve_model

    if unknown := [m for m in args.model if resolve_model(m) not in MODELS]:
        parser.error(f"--model: unknown {unknown}; choose from {', '.join([*MODELS, *ALIASES])}")
    if args.compile_only and args.arch is None and not torch.cuda.is_available():
        parser.error("--compile-only: no GPU here to precompile for: name the target with --arch")
    target = args.arch is not None or torch.cuda.is_available()  # else the measuring below says there is no GPU
    compiled = _precompile(args) if args.compile_only or (args.precompile and target) else True
    if args.compile_only:
        return 0 if compiled else 1
    if not torch.cuda.is_available():
        print("linattn tune: no GPU here; auto runs the reference on CPU tensors, so there is nothing to measure")
        return 0 if compiled else 1
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    measured = [e for b in args.batch for e in _tune.tune(args.model, b, dtype, args.backward, args.layout)]
    rows = [["op", "pass", "call (shapes/strides/dtype)", "chosen", "ms (median of 5, CUDA events)"]]
    for entry in measured:
        op, pass_, call = entry["key"].split(":", 2)
        ms = ", ".join(f"{backend} {t:.3f}" for backend, t in entry["ms"].items())
        rows.append([op, pass_, call if len(call) <= 60 else call[:57] + "...", entry["chosen"], ms])
    print(table(rows) if measured else "nothing new to measure: every call's choice is in the table")
    print(_tune.describe())
    return 0 if compiled else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend can run each op here")
    checking = sub.add_parser("check", help="run every op on every available backend against the reference")
    checking.add_argument("--op", nargs="+", default=[], metavar="OP", help="only these ops (default: every op)")
    checking.add_argument("--backend", nargs="+", default=[], metavar="NAME",
                       help="only these backends: reference, triton, cuda (default: every backend)")  # fmt: skip
    tune = sub.add_parser("tune", help="measure dispatch's choices for a model's calls on this GPU and keep them")
    tune.add_argument("--model", nargs="+", default=["l0"], help="encoders (l0 .. xl1, squeezesam, vitt, vits)")
    tune.add_argument("--batch", type=positive_int, nargs="+", default=[16])
    tune.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    tune.add_argument("--layout", default="channels_last", choices=("channels_last", "nchw"),
                      help="the models' layout (channels_last: optimize's default on a GPU)")  # fmt: skip
    tune.add_argument("--backward", action="store_true", help="also the backward (train mode)")
    tune.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=True,
                      help="first compile every Triton configuration the calls may launch into Triton's cache, one "
                      "process per core (a bare machine's first calls then load their kernels)")  # fmt: skip
    tune.add_argument("--compile-only", action="store_true",
                      help="precompile, then stop (without a GPU: name the target with --arch)")  # fmt: skip
    tune.add_argument("--arch", type=int, choices=(80, 90), help="precompile for sm_80 or sm_90 (default: this GPU)")
    tune.add_argument("--jobs", type=positive_int, help="precompile processes (default: one per core)")
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
    if rest and args.command not in ("audit", "bench"):  # (those two parse their own options)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        from ._check import check

        try:
            return 0 if check(_device(), args.op, args.backend) else 1
        except ValueError as err:  # an unknown op or backend name
            checking.error(str(err))
    if args.command == "tune":
        return _tune_command(args, tune)
    if args.command == "audit":
        from .audit import main as audit

        return audit(rest)
    from .benchmarks.bench_e2e import main as bench
    from .benchmarks.common import exit_status

    return exit_status(bench(rest))  # (gpu_check.sh's step table says so)


if __name__ == "__main__":
    sys.exit(main())
