"""Harness shared by every linattn benchmark: environment, timing, copy bandwidth, result files, tables, plots.

Every row a benchmark saves carries the environment that produced it (device,
torch, triton, CUDA and linattn versions, date), rows are appended to
`<out>/<name>.jsonl` so that every run is kept, and plots are drawn from those
files, never from memory. Every timing reports its repeats and spread (Timing:
the median ms of `reps` timed calls, `iqr_pct`, `min_ms`, `max_ms`), and its
`timer` says which clock took it (CUDA events, or perf_counter on a CPU).
"""

import argparse
import contextlib
import csv
import datetime
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from linattn import _tune
from linattn._backend import Unsupported, auto_choices, status
from linattn._table import dict_table

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm only draws progress bars: a bare machine without it still benchmarks
    tqdm = None

__all__ = [
    "BACKEND_PROVIDERS",
    "COMPILE_MODES",
    "CPU_PROVIDERS",
    "DTYPES",
    "GPU_PROVIDERS",
    "LITE_MLA_STAGES",
    "MIN_REPS",
    "PROVIDERS",
    "QUICK_LITE_MLA_STAGES",
    "SPEEDUP_BASELINES",
    "LiteMLAShape",
    "Skipped",
    "TimeUp",
    "Timing",
    "add_benchmark_args",
    "add_speedups",
    "announce",
    "check_backend",
    "compiled",
    "copy_bandwidth_gbs",
    "cpu_time_ms",
    "cpu_timing",
    "environment",
    "error_line",
    "errors",
    "first_call",
    "fma_peak_tflops",
    "pct_fma",
    "lite_mla_run_shapes",
    "lite_mla_shapes",
    "load_results",
    "max_autotune_skip",
    "measure",
    "measuring",
    "parse_benchmark_args",
    "peak_mb",
    "plot_results",
    "progress",
    "report",
    "result_name",
    "run_device",
    "run_providers",
    "save_results",
    "speedup_column",
    "stop_on_sigterm",
    "table_columns",
    "tensors",
    "time_ms",
    "timer_name",
    "timing",
    "timing_legend",
    "totals",
    "write",
]


def _cpu_model() -> str:
    # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo names the part.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """What produced a result: device name, software versions, UTC date. No hostname or user.

    `device` defaults to the current CUDA device when there is one, else the CPU. When LINATTN_BENCH_RUN is
    set (gpu_check.sh sets it), `run` carries it: the rows of several benchmark processes form one run.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"{major}.{minor}"
    else:
        name, capability = f"cpu: {_cpu_model()}", None
    run = {"run": os.environ["LINATTN_BENCH_RUN"]} if os.environ.get("LINATTN_BENCH_RUN") else {}
    return {
        **run,
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "linattn": _version("linattn"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Timing:
    """The timed calls of one measurement: their median and spread, in milliseconds.

    reps is how many times were taken (do_bench: one per call; a CUDA graph replay: one per replay, each the
    mean over the calls it holds); iqr_pct is their interquartile range over the median, in percent: two
    medians closer than about the larger iqr_pct of the two are noise.
    """

    ms: float  # median
    reps: int | None
    q1: float
    q3: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, times: Sequence[float]) -> "Timing":
        times = sorted(times)
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
        return cls(statistics.median(times), len(times), q1, q3, times[0], times[-1])

    @property
    def iqr_pct(self) -> float:
        return 100 * (self.q3 - self.q1) / self.ms if self.ms > 0 else 0.0

    def columns(self, prefix: str = "") -> dict:
        """Row columns: `<prefix>ms` (the median), `<prefix>reps`, `<prefix>iqr_pct`, `<prefix>min_ms`, `..max_ms`."""
        return {
            f"{prefix}ms": self.ms,
            f"{prefix}reps": self.reps,
            f"{prefix}iqr_pct": self.iqr_pct,
            f"{prefix}min_ms": self.min_ms,
            f"{prefix}max_ms": self.max_ms,
        }


MIN_REPS = 10  # GPU timings: at least this many timed calls, also of calls slower than do_bench's 100 ms budget


def _gpu_timing(bench: Callable, fn: Callable) -> Timing:
    """Timing of triton.testing.do_bench / do_bench_cudagraph over every timed call, MIN_REPS at least (a
    triton without return_mode="all" gives quantiles only: reps is then None)."""
    try:
        timed = Timing.of(bench(fn, return_mode="all"))
    except (AssertionError, TypeError, ValueError):
        low, q1, median, q3, high = bench(fn, quantiles=[0.0, 0.25, 0.5, 0.75, 1.0])
        return Timing(median, None, q1, q3, low, high)
    if timed.reps < MIN_REPS:  # do_bench repeats for about 100 ms: a slow call (a whole encoder) gets a few
        timed = Timing.of(bench(fn, rep=1.2 * MIN_REPS * timed.ms, return_mode="all"))  # the first run warmed up
    return timed


def timing(
    fn: Callable[[], object], device: torch.device | str, cuda_graph: bool = False, notes: list[str] | None = None
) -> Timing:
    """Median and spread of calls of `fn` (see Timing).

    CUDA: `triton.testing.do_bench` (warm-up, L2 flushed between calls, one time
    per call, MIN_REPS calls at least), or with `cuda_graph` the calls replayed
    from a CUDA graph, which removes launch overhead for small ops (inputs may
    then stay in L2; one time per replay). When capture fails (an op that syncs,
    torch.compile's own graphs) it falls back to do_bench and appends the reason
    to `notes`. CPU: cpu_timing (perf_counter after a warm-up call).
    """
    if torch.device(device).type != "cuda":
        return cpu_timing(fn)
    import triton.testing

    if cuda_graph:
        try:
            # Capture is not allowed on the default stream (older triton does not switch streams itself).
            with torch.cuda.stream(torch.cuda.Stream()):
                return _gpu_timing(triton.testing.do_bench_cudagraph, fn)
        except Exception as err:  # capture failures come as RuntimeError, AssertionError or CUDA errors
            torch.cuda.synchronize()
            reason = f"CUDA graph capture failed, timed with do_bench: {error_line(err)}"
            if notes is not None:
                notes.append(reason)
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return _gpu_timing(triton.testing.do_bench, fn)


def time_ms(
    fn: Callable[[], object], device: torch.device | str, cuda_graph: bool = False, notes: list[str] | None = None
) -> float:
    """The median of `timing` alone, in milliseconds."""
    return timing(fn, device, cuda_graph, notes).ms


def cpu_timing(
    fn: Callable[[], object], budget_s: float = 0.25, min_runs: int = 5, max_runs: int = 50, warm_up: bool = True
) -> Timing:
    """min_runs to max_runs timed calls of `fn` (as many as fit in `budget_s`), with perf_counter, after one
    untimed warm-up call (first-call allocations, lazy initialisation) unless the caller did it."""
    if warm_up:
        fn()
    times = []
    while True:
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
        runs = max(min_runs, min(max_runs, int(1e3 * budget_s / max(times[0], 1e-6))))
        if len(times) >= runs:
            return Timing.of(times)


def cpu_time_ms(
    fn: Callable[[], object], budget_s: float = 0.25, min_runs: int = 5, max_runs: int = 50, warm_up: bool = True
) -> float:
    """The median of `cpu_timing` alone, in milliseconds."""
    return cpu_timing(fn, budget_s, min_runs, max_runs, warm_up).ms


def error_line(err: BaseException) -> str:
    """The error as `Type: first line of its message`, short enough for a table cell."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


@functools.cache
def _copy_bandwidth_gbs(device: torch.device) -> float:
    # Far larger than any L2 / last-level cache, so the copy streams from memory.
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6  # the copy reads and writes every byte


def copy_bandwidth_gbs(device: torch.device | str) -> float:
    """Measured device-to-device (on CPU: memcpy) copy bandwidth in GB/s, counting read + write; cached per process."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _copy_bandwidth_gbs(device)


# fp32 FMA lanes an SM, by compute capability (the CUDA programming guide's throughput table); 128 elsewhere
FP32_LANES = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}


@functools.cache
def _fma_peak_tflops(index: int) -> float | None:
    props = torch.cuda.get_device_properties(index)
    khz = getattr(props, "clock_rate", None) or _max_sm_khz(f"GPU-{props.uuid}")  # torch 2.11 has no clock_rate
    if not khz:
        return None
    lanes = FP32_LANES.get((props.major, props.minor), 128)
    return props.multi_processor_count * lanes * 2 * khz * 1e3 / 1e12


def _max_sm_khz(uuid: str) -> int | None:
    """The GPU's highest SM clock in kHz as nvidia-smi reports it, or None."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "-i", uuid, "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return int(done.stdout.split()[0]) * 1000 if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def fma_peak_tflops(device: torch.device | str) -> float | None:
    """The GPU's fp32 peak in TFLOP/s (an FMA is 2 flops): SMs x fp32 lanes an SM x its highest clock. None on
    the CPU, or where neither torch nor nvidia-smi reports the clock. A theoretical figure: a GPU under load may
    clock lower."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _fma_peak_tflops(device.index if device.index is not None else torch.cuda.current_device())


def pct_fma(rows: Sequence[dict], fmas: Callable[[dict], int], device: torch.device | str) -> None:
    """Set each timed row's pct_fma: its fp32 FMA work (fmas(row): the depthwise taps, which every provider runs
    as fp32 FMAs) per second, in percent of fma_peak_tflops. Where the taps' FMAs take longer than the bytes
    at the copy bandwidth, compute bounds the op, not memory (the LiteMLA context at L0: k = 5)."""
    peak = fma_peak_tflops(device)
    for row in rows:
        if peak and row.get("ms"):
            row["pct_fma"] = 100 * 2 * fmas(row) / (row["ms"] * 1e-3) / 1e12 / peak


def device_arg(text: str) -> torch.device:
    """--device's type: "cpu", or a CUDA device this machine has (argparse's error otherwise, not a traceback at
    the first tensor)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu or cuda[:index])") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"benchmarks run on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or not count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    return device


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def out_dir_arg(text: str) -> Path:
    """--out's type: the folder, made now (argparse's error where it cannot be, not a traceback after the run)."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot make the results folder {text!r}: {err}") from None
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into the results folder {text!r}")
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_device(args, cpu_run: str, gpu_run: str) -> tuple[torch.device, bool]:
    """(device of --device, whether it is a GPU); without one, says what the CPU run covers and what needs a GPU."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print(f"No GPU: {cpu_run}. GPU numbers need a GPU: run this on a CUDA machine for {gpu_run}.")
    return device, on_gpu


def announce(device: torch.device) -> tuple[dict, float]:
    """The run's environment and measured copy bandwidth, printed once at the start of a benchmark."""
    env = environment(device)
    copy_gbs = copy_bandwidth_gbs(device)
    peak = fma_peak_tflops(device)
    fp32 = f"; fp32 peak {peak:.1f} TFLOP/s (at its highest clock)" if peak else ""
    print(
        f"{env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"copy bandwidth {copy_gbs:.1f} GB/s{fp32}"
    )
    return env, copy_gbs


class _Progress:
    """What a benchmark uses of a tqdm bar, where tqdm is not installed: prints each case as it starts."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        print(f"{self.desc} {self.n + 1}/{self.total}: {text}", flush=True)


def progress(total: int, desc: str):
    """Progress bar over `total` benchmark cases, advanced with `.update()`; print with `write` while it runs."""
    if tqdm is None:
        return _Progress(total, desc)
    return tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True)


def write(text: str) -> None:
    """Print a line without breaking a progress bar."""
    if tqdm is None:
        print(text, flush=True)
    else:
        tqdm.write(text)


class TimeUp(BaseException):
    """SIGTERM arrived (e.g. from `timeout` in gpu_check.sh): stop measuring, keep and save what was measured.

    A BaseException, so that the `except Exception` around each provider does not take it for a failure.
    """


@contextlib.contextmanager
def measuring(total: int, desc: str):
    """`with measuring(cases, name) as bar:` the progress bar of a benchmark's loop, which SIGTERM (a time limit)
    ends quietly: the loop stops, and what follows the block prints and saves the rows measured so far."""
    _stopped.clear()  # a benchmark's one loop: its exit status is this loop's
    try:
        with stop_on_sigterm(), progress(total, desc) as bar:
            yield bar
    except TimeUp as err:
        print(f"\n{desc}: {err}; the rows measured so far are kept", flush=True)
        _stopped.append(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print(f"\n{desc}: interrupted; the rows measured so far are kept", flush=True)
        _stopped.append(128 + signal.SIGINT)


_stopped: list[int] = []  # the exit status of the last measuring loop, where a signal ended it


def failed(rows: Sequence[dict]) -> list[str]:
    """The cases and providers of the rows that failed or computed a wrong result."""
    return [f"{r['case']} {r['provider']}" for r in rows if str(r.get("note") or "").startswith(("failed", "wrong"))]


def exit_status(rows: Sequence[dict]) -> int:
    """A benchmark's exit status: 130 (Ctrl-C) or 143 (SIGTERM, a time limit) where a signal stopped its loop (the
    rows measured before are saved all the same), else 1 where a row failed or was wrong, else 0."""
    if _stopped:
        return _stopped.pop()
    return 1 if failed(rows) else 0


@contextlib.contextmanager
def stop_on_sigterm():
    """Within the block SIGTERM raises TimeUp in the main thread (the previous handler is restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TimeUp(f"stopped by signal {signum} (time limit)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_results(rows: Sequence[dict], out_dir: str | Path, name: str, env: dict | None = None) -> tuple[Path, Path]:
    """Append `rows` (each merged with `env`, default `environment()`) to out_dir/name.jsonl; rewrite name.csv.

    The JSONL file keeps every run; the CSV beside it is regenerated from it
    with the union of all columns, nested values (lists, dicts) as JSON text.
    Returns (jsonl_path, csv_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment() if env is None else env
    jsonl_path, csv_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.csv"
    with jsonl_path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, **env}) + "\n")
    _save_dispatch_timings(out_dir / "dispatch" / f"{name}.jsonl", env)
    every = load_results(jsonl_path)
    columns = list(dict.fromkeys(key for row in every for key in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in every:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return jsonl_path, csv_path


_timings_saved = 0  # how many of this process's measured-dispatch timings are in a file already


def _save_dispatch_timings(path: Path, env: dict) -> None:
    """Append what measured dispatch timed since the last save (every candidate implementation and Triton
    configuration of each new call, in ms: linattn._tune.timings()) to path, one call a line: on a GPU, which
    configurations win and by how much, per shape. Not a results file (gpu_summary reads results/*.jsonl)."""
    global _timings_saved
    measured = _tune.timings()[_timings_saved:]
    if measured:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for entry in measured:
                f.write(json.dumps({**entry, **env}) + "\n")
        _timings_saved += len(measured)


def load_results(jsonl_path: str | Path) -> list[dict]:
    """Every row of a results file, oldest first."""
    with Path(jsonl_path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_results(
    jsonl_path: str | Path,
    png_path: str | Path,
    x: str = "shape",
    y: str = "gbs",
    series: str = "provider",
    panel_rows: str = "pass",
    panel_cols: str = "dtype",
    hline: str | None = "copy_gbs",
    ylabel: str = "GB/s",
) -> Path | None:
    """Grouped bars of `y` per `series` over `x`, one panel per (panel_rows, panel_cols) value, from a results file.

    Draws the latest run in the file (the rows sharing the last row's device
    and `run`, or without a run its date), with `hline` (the copy bandwidth) as
    a dashed line. Returns the PNG path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    rows = load_results(jsonl_path)
    last = rows[-1]
    same = "run" if last.get("run") else "date"
    rows = [r for r in rows if r.get(same) == last.get(same) and r.get("device") == last.get("device")]
    if len({r.get("layout") for r in rows}) > 1:  # a run over both layouts (--layout): one group of bars each
        rows = [dict(r, **{x: f"{r.get(x)} {r.get('layout')}"}) for r in rows]
    drawn = [r for r in rows if r.get(y) is not None]

    def values(key, among):
        return list(dict.fromkeys(r.get(key) for r in among))

    prow, pcol = values(panel_rows, rows), values(panel_cols, rows)
    names = values(series, drawn)  # one colour per series in every panel
    width = 0.8 / max(len(names), 1)
    # panels 5 inches wide, wider when there are many x values (a quarter inch per group of bars)
    panel_w = max(
        5.0, 0.25 * max([len(values(x, [r for r in drawn if r.get(panel_cols) == cv])) for cv in pcol] or [0])
    )
    # constrained layout makes room for the two-line suptitle (tight_layout ignores it and clips it)
    fig, axes = plt.subplots(
        len(prow),
        len(pcol),
        figsize=(1 + panel_w * len(pcol), 1.5 + 3.5 * len(prow)),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for i, rv in enumerate(prow):
        for j, cv in enumerate(pcol):
            ax = axes[i][j]
            panel = [r for r in drawn if r.get(panel_rows) == rv and r.get(panel_cols) == cv]
            xs = values(x, panel)
            for k, name in enumerate(names):
                mine = [r for r in panel if r.get(series) == name]
                pos = [xs.index(r[x]) + (k - (len(names) - 1) / 2) * width for r in mine]
                if mine:  # whiskers: the repeats' interquartile range (iqr_pct, relative: the same for a rate)
                    spread = [r[y] * (r.get("iqr_pct") or 0) / 200 for r in mine]
                    ax.bar(pos, [r[y] for r in mine], width, yerr=spread, capsize=2, label=str(name), color=f"C{k}",
                           error_kw={"linewidth": 0.8})  # fmt: skip
            if hline and panel and panel[0].get(hline):
                ax.axhline(panel[0][hline], color="black", linestyle="--", linewidth=1, label=hline)
            ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{panel_rows} {rv}, {panel_cols} {cv}", fontsize=10)
            ax.set_ylabel(ylabel)
            if panel:
                ax.legend(fontsize=7)
    versions = ", ".join(f"{k} {last.get(k)}" for k in ("torch", "triton", "cuda", "linattn"))
    run = f", run {last['run']}" if last.get("run") else ""
    title = [f"{Path(jsonl_path).stem}: {last.get('device')}", versions, f"{last.get('date')}{run}"]
    title.append("bars: medians; whiskers: the repeats' interquartile range")
    # each line wrapped to the figure's width (about 13 characters an inch at 10 pt), so that none is clipped
    chars = max(20, int(13 * fig.get_figwidth()))
    fig.suptitle("\n".join(part for line in title for part in textwrap.wrap(line, chars)), fontsize=10)
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# ---- LiteMLA shapes and the provider loop, shared by bench_multiscale.py and bench_lite_mla.py ----


class Skipped(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass(frozen=True)
class LiteMLAShape:
    """One LiteMLA of docs/design.md 5 at one batch size.

    channels is the block's input width C; heads per branch; scales the
    depthwise kernel sizes; dim the head dimension. The packed qkv has
    3*heads*dim channels, the context (1+S)*heads*dim.
    """

    stage: str
    batch: int
    channels: int
    heads: int
    scales: tuple[int, ...]
    height: int
    width: int
    dim: int = 32

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def total_dim(self) -> int:
        return self.heads * self.dim

    @property
    def qkv_channels(self) -> int:
        return 3 * self.total_dim

    @property
    def label(self) -> str:
        ks = "+".join(str(k) for k in self.scales)
        return f"B{self.batch} C{self.channels} h{self.heads} k{ks} {self.height}x{self.width}"

    def columns(self) -> dict:
        """The shape as result-row columns."""
        return {
            "stage": self.stage,
            "shape": self.label,
            "batch": self.batch,
            "channels": self.channels,
            "heads": self.heads,
            "dim": self.dim,
            "scales": "+".join(str(k) for k in self.scales),
            "hw": f"{self.height}x{self.width}",
            "n": self.n,
        }


# docs/design.md 5: every LiteMLA stage of the EfficientViT-SAM encoders, as (channels, heads, scales, height, width)
LITE_MLA_STAGES = {
    "l": (512, 16, (5,), 16, 16),  # l0, l1, l2 stage 4
    "xl-s4": (512, 16, (3,), 32, 32),  # xl0, xl1 stage 4
    "xl-s5": (1024, 32, (3,), 16, 16),  # xl0, xl1 stage 5
}
# --quick: one tiny stage per kernel size; checks a harness end to end in seconds, numbers not kept
QUICK_LITE_MLA_STAGES = {"tiny-k5": (64, 2, (5,), 8, 8), "tiny-k3": (64, 2, (3,), 6, 10)}


def lite_mla_shapes(
    batches: Sequence[int], stages: dict = LITE_MLA_STAGES, names: Sequence[str] | None = None
) -> list[LiteMLAShape]:
    """Every stage (or those in `names`) at every batch size, batch-major (all stages at batches[0] first)."""
    chosen = [(name, stages[name]) for name in names] if names else stages.items()
    return [LiteMLAShape(name, b, c, h, tuple(ks), hs, ws) for b in batches for name, (c, h, ks, hs, ws) in chosen]


def lite_mla_run_shapes(args, on_gpu: bool) -> list[LiteMLAShape]:
    """The shapes of one run: --quick the tiny stages at B=2; on GPU every stage at B=16 and 1; on CPU (a short
    run) the L-model stage at B=1. --batch overrides the batch sizes, --stages the (non-quick) stages."""
    if args.quick:
        return lite_mla_shapes(args.batch or (2,), QUICK_LITE_MLA_STAGES)
    stages = args.stages or (None if on_gpu else ["l"])
    return lite_mla_shapes(args.batch or ((16, 1) if on_gpu else (1,)), LITE_MLA_STAGES, stages)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune", "compile-reduce-overhead": "reduce-overhead"}
SPEEDUP_BASELINES = ("eager", "compile", "compile-max-autotune")
# linattn's op under `linattn.backend(provider)`: a forced backend, or "auto" (the dispatch users get: on a GPU
# it times the implementations on the call's first run and keeps the fastest; rows record what it ran)
BACKEND_PROVIDERS = ("triton", "cuda", "auto", "reference")
PROVIDERS = ("eager", *COMPILE_MODES, *BACKEND_PROVIDERS)  # of the op benchmarks over the LiteMLA shapes
GPU_PROVIDERS = ("eager", "compile", "compile-max-autotune", "triton", "cuda", "auto")  # their defaults on a GPU
CPU_PROVIDERS = ("eager", "reference")  # and on a CPU (a short run)


def speedup_column(baseline: str) -> str:
    """The column of speedups over `baseline`: speedup_vs_eager, speedup_vs_compile, speedup_vs_max_autotune."""
    return "speedup_vs_" + baseline.removeprefix("compile-").replace("-", "_")


def check_backend(op: str, provider: str, device: torch.device) -> None:
    """Raise Skipped with the registry's reasons when `provider`, a linattn backend, cannot run `op` on `device`.
    "auto" always runs: where no kernel can, it runs the reference."""
    if provider != "auto" and (why := status(op, provider, device)):
        raise Skipped(why)


def table_columns(
    *lead: str,
    work: Sequence[str] = ("gbs", "pct_copy"),
    baselines: Sequence[str] = SPEEDUP_BASELINES,
    errors: Sequence[str] = ("peak_mb", "rel_err"),
) -> tuple[str, ...]:
    """The printed columns of an op benchmark: `lead` (what tells its rows apart), provider, the time and its
    spread, `work` (throughput), the speedups over `baselines`, `errors`, what auto ran and the note."""
    speedups = map(speedup_column, baselines)
    return (*lead, "provider", "ms", "reps", "iqr_pct", *work, *speedups, *errors, "auto_choices", "note")


def compiled(fn: Callable, provider: str) -> Callable:
    """torch.compile of `fn` (a function or module) in the mode of `provider` ("compile", "compile-max-autotune").

    Dynamo caches per code object, and every shape and dtype would recompile the same function until the
    recompile limit silently falls back to eager: each compiled provider starts from a clean cache.
    """
    torch.compiler.reset()
    return torch.compile(fn, mode=COMPILE_MODES[provider], dynamic=False)


def max_autotune_skip(args, batch: int) -> dict[str, str]:
    """The `skip` of run_providers for a shape of `batch`: compile-max-autotune outside --max-autotune-batch."""
    if args.max_autotune_batch and batch not in args.max_autotune_batch:
        return {"compile-max-autotune": f"only at --max-autotune-batch {args.max_autotune_batch}"}
    return {}


def add_benchmark_args(
    parser, providers: Sequence[str], dtypes: Sequence[str] = tuple(DTYPES), stages: bool = True, layouts: bool = False
) -> None:
    """The options every benchmark over docs/design.md 5's shapes takes; lists accept spaces or commas (see
    parse_benchmark_args). `stages`: add --stages (the LiteMLA stages); a benchmark with its own shape table
    passes False and adds its own selection option. `layouts`: add --layout (feature maps in memory; the
    benchmark loops over args.layout and records a layout column)."""
    parser.add_argument("--dtype", nargs="+", help=f"one or more of {', '.join(dtypes)} (default: bf16 on GPU)")
    parser.add_argument("--batch", nargs="+", type=positive_int, help="batch sizes (default: 16 1 on GPU, 1 on CPU)")
    if layouts:
        parser.add_argument(
            "--layout",
            nargs="+",
            default=["channels_last"],
            help=f"some of {', '.join(LAYOUTS)}: the feature maps' (and conv weights') memory format, every "
            "provider's (default: channels_last, as linattn.optimize runs a model on a GPU)",
        )
    parser.add_argument("--providers", nargs="+", help=f"some of {', '.join(providers)}")
    if stages:
        parser.add_argument(
            "--stages",
            nargs="+",
            help=f"LiteMLA stages of docs/design.md 5: some of {', '.join(LITE_MLA_STAGES)} (default: all)",
        )
    parser.add_argument(
        "--max-autotune-batch",
        nargs="+",
        type=positive_int,
        help="run compile-max-autotune only at these batch sizes (it re-tunes every shape: slow); default: all",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay calls from a CUDA graph (no launch overhead; inputs may stay in L2)",
    )
    parser.add_argument("--device", type=device_arg, default=default_device())
    parser.add_argument("--out", type=out_dir_arg, default="benchmarks/results",
                        help="folder of the result files and plot (default: benchmarks/results, from the current "
                        "directory)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes: checks the harness (results saved under names ending -quick)")  # fmt: skip


def parse_benchmark_args(parser, argv, **choices: Sequence[str]):
    """parser.parse_args(argv), with each list option in `choices` split at commas and checked against its choices."""
    args = parser.parse_args(argv)
    if hasattr(args, "layout"):
        choices = {"layout": tuple(LAYOUTS), **choices}
    for name, allowed in choices.items():
        values = getattr(args, name)
        if values is not None:
            values = list(dict.fromkeys(v for value in values for v in value.split(",") if v))
            if bad := [v for v in values if v not in allowed]:
                parser.error(f"--{name.replace('_', '-')}: unknown {bad}; choose from {', '.join(allowed)}")
            setattr(args, name, values)
    return args


def tensors(out) -> list[torch.Tensor]:
    """The tensors of an output: a tensor, or any nesting of tuples, lists and dicts of them."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def errors(out, ref) -> dict:
    """Worst max |out - ref| and ||out - ref|| / ||ref|| over the tensors of `out` (computed in float64, where ref
    is finite); inf where out is not finite where ref is (max() would drop a NaN: a broken kernel read as exact)."""
    row = {"max_abs_err": 0.0, "rel_err": 0.0}
    for got, want in zip(tensors(out), tensors(ref), strict=True):
        finite = torch.isfinite(want)
        got, want = got.double()[finite], want.double()[finite]
        diff = got - want
        if not bool(torch.isfinite(diff).all()):
            return {"max_abs_err": float("inf"), "rel_err": float("inf")}
        if not diff.numel():
            continue
        row["max_abs_err"] = max(row["max_abs_err"], diff.abs().max().item())
        row["rel_err"] = max(row["rel_err"], (diff.norm() / want.double().norm()).item())
    return row


def first_call(fn: Callable, ref) -> tuple[dict, dict]:
    """The first call of a provider (it compiles, warms up and lets a GPU's auto measure), outside any timed
    region: (its errors against `ref`, what linattn's auto dispatch ran in it: {"op:pass": {implementation:
    calls}}, empty when it ran nothing through auto). The output is dropped before returning, so that the next
    call may reuse its memory."""
    auto_choices(reset=True)
    row = errors(fn(), ref)
    return row, auto_choices(reset=True)


def peak_mb(fn: Callable, device: torch.device) -> float | None:
    """MiB that one call of `fn` allocates on a CUDA device beyond what was live before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(fn: Callable, ref, nbytes: int, device: torch.device, cuda_graph: bool = False) -> dict:
    """Error against `ref`, peak memory and time of one provider's callable.

    `fn()` returns a tensor or a sequence of tensors, `ref` the float64 tensor(s) it
    should equal; max_abs_err and rel_err (||out - ref|| / ||ref||) are the worst
    over the tensors. peak_mb is what one call allocates beyond what is live before
    it (output included; CUDA only). ms is the median of `reps` timed calls, with
    iqr_pct, min_ms and max_ms their spread (Timing); GB/s counts `nbytes` per call.
    auto_choices, where `fn` calls linattn's auto dispatch, is what it ran in the first call (see first_call):
    the timed calls run the same, from auto's table.
    """
    row, ran = first_call(fn, ref)
    row["peak_mb"] = peak_mb(fn, device)
    notes = []
    timed = timing(fn, device, cuda_graph=cuda_graph, notes=notes)
    row |= {**timed.columns(), "gbs": nbytes / timed.ms / 1e6}
    if ran:
        row["auto_choices"] = ran
    return {**row, "timer": timer_name(device, cuda_graph and not notes), "note": "; ".join(notes) or None}


def timer_name(device: torch.device, cuda_graph: bool = False) -> str:
    """The `timer` column: perf_counter (CPU: wall clock), do_bench or cuda_graph (CUDA events)."""
    return "perf_counter (CPU)" if device.type != "cuda" else ("cuda_graph" if cuda_graph else "do_bench")


def add_speedups(rows: list[dict], baselines: Sequence[str] = SPEEDUP_BASELINES, by: str = "pass") -> None:
    """Fill `speedup_vs_<baseline>` (baseline ms / row ms) in rows of one shape and dtype, per value of `by`."""
    for key in dict.fromkeys(r[by] for r in rows):
        group = [r for r in rows if r[by] == key]
        timed = {r["provider"]: r["ms"] for r in group if r.get("ms") is not None}
        for row in group:
            for baseline in baselines:
                ok = baseline in timed and row.get("ms") is not None
                row[speedup_column(baseline)] = timed[baseline] / row["ms"] if ok else None


def flag_wrong(rows: list[dict], baseline: str = "eager", by: str = "pass") -> None:
    """Prefix the note of every row whose rel_err breaks docs/design.md 8's bound (fp16/bf16: twice the baseline's
    error in that dtype; fp32: 1e-5 or twice the baseline's) with "wrong: ...", per pass: a benchmark is where a
    GPU's own configurations first meet the reference (the third H100 pass's TMA conv rows hid in a column)."""
    from linattn._check import tolerance  # _check imports this module

    for key in dict.fromkeys(r[by] for r in rows):
        group = [r for r in rows if r[by] == key]
        theirs = [r["rel_err"] for r in group if r["provider"] == baseline and r.get("rel_err") is not None]
        if not theirs:
            continue
        for row in group:
            bound = tolerance(DTYPES.get(row.get("dtype"), torch.float32), theirs[0])
            if row["provider"] != baseline and row.get("rel_err") is not None and row["rel_err"] > bound:
                wrong = f"wrong: rel_err {row['rel_err']:.2e} > {bound:.2e} (twice {baseline}'s)"
                row["note"] = "; ".join(filter(None, [wrong, row.get("note")]))


def run_providers(
    providers: Sequence[str],
    setup: Callable[[str], dict],
    passes: dict,
    base: dict,
    device: torch.device,
    copy_gbs: float,
    bar,
    cuda_graph: bool = False,
    skip: dict | None = None,
    baselines: Sequence[str] = SPEEDUP_BASELINES,
) -> list[dict]:
    """Every provider on one shape and dtype: rows of `base` + pass + provider + measure(), speedups filled in.

    setup(provider) returns {pass name: callable}, or raises (Skipped or any error: the provider's rows then
    say why). passes maps each pass name to (float64 reference, bytes moved). skip maps a provider to a
    reason not to run it here. A provider that fails prints one line and the run goes on. `baselines`: the
    providers whose speedup columns are filled (see add_speedups).
    """
    skip = skip or {}
    rows = []
    for provider in providers:
        bar.set_postfix_str(f"{base.get('shape')} {base.get('dtype')} {provider}")
        why = skip.get(provider)
        fns = {}
        if why is None:
            try:
                fns = setup(provider)
            except Skipped as err:
                why = str(err)
            except Exception as err:  # a provider that cannot even be set up must not end the run
                why = error_line(err)
                write(f"{base.get('op')} {base.get('shape')} {base.get('dtype')} {provider}: {why}")
        for pass_name, (ref, nbytes) in passes.items():
            row = {**base, "pass": pass_name, "provider": provider, "bytes": nbytes, "ms": None, "note": None}
            if why is not None:
                row["note"] = f"skipped: {why}"
            else:
                try:
                    row.update(measure(fns[pass_name], ref, nbytes, device, cuda_graph))
                    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                except Unsupported as err:  # the call's own limit (cuDNN declines it): a skip with its reason
                    row["note"] = f"skipped: {err}"
                except Exception as err:  # compile error, OOM, bad kernel: one line, then the next provider
                    row["note"] = f"failed: {error_line(err)}"
                    write(
                        f"{base.get('op')} {base.get('shape')} {base.get('dtype')} {provider} {pass_name}: "
                        f"{error_line(err)}"
                    )
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
        bar.update()
    add_speedups(rows, baselines)
    flag_wrong(rows)
    return rows


def totals(
    rows: Sequence[dict], by: Sequence[str], baselines: Sequence[str] = SPEEDUP_BASELINES, key: str = "shape"
) -> list[dict]:
    """Summed time per provider over the shapes of each group of `by` values: the "taken together" numbers.

    Each total row has the group's `by` values, provider, shapes (how many it timed), ms (their summed
    time), reps (the fewest timed calls of any shape) and iqr_pct (the summed interquartile ranges over
    ms); `speedup_vs_<baseline>` is the baseline's summed time over the provider's, both summed over the
    shapes (`key`) that both timed, so that a skipped or failed shape does not bias the ratio. Put "pass"
    in `by` when rows have several passes.
    """
    groups: dict[tuple, dict[str, dict]] = {}
    spreads: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("ms") is not None:
            group = groups.setdefault(tuple(row.get(k) for k in by), {})
            group.setdefault(row["provider"], {})[row[key]] = row["ms"]
            spreads.setdefault((*(row.get(k) for k in by), row["provider"]), []).append(row)
    out = []
    for values, timed in groups.items():
        for provider, mine in timed.items():
            total = {**dict(zip(by, values, strict=True)), "provider": provider, "shapes": len(mine)}
            total["ms"] = sum(mine.values())
            timed_rows = spreads[(*values, provider)]
            reps = [r.get("reps") for r in timed_rows]
            total["reps"] = min(reps) if None not in reps else None  # the fewest of any shape
            if all(r.get("iqr_pct") is not None for r in timed_rows):  # summed interquartile ranges / summed ms
                total["iqr_pct"] = sum(r["iqr_pct"] * r["ms"] for r in timed_rows) / total["ms"]
            for baseline in baselines:
                theirs = timed.get(baseline, {})
                common = [s for s in mine if s in theirs]
                total[speedup_column(baseline)] = (
                    sum(theirs[s] for s in common) / sum(mine[s] for s in common) if common else None
                )
            out.append(total)
    return out


def result_name(name: str, quick: bool, device: torch.device) -> str:
    """The results file stem: `-quick` and `-cpu` runs are kept out of git (.gitignore)."""
    return name + ("-quick" if quick else "") + ("" if torch.device(device).type == "cuda" else "-cpu")


TIMING_LEGEND = (
    "ms: median of reps timed calls ({timer}); iqr_pct: their interquartile range over the median, in %; "
    "a speedup within the providers' iqr_pct is noise"
)
AUTO_LEGEND = "auto_choices: per op:pass, the implementation linattn's auto dispatch ran and its calls, in one call"


def timing_legend(rows: Sequence[dict]) -> str:
    """The line under a table that says what its ms, reps and iqr_pct columns are."""
    timers = ", ".join(dict.fromkeys(str(r["timer"]) for r in rows if r.get("timer"))) or "-"
    return TIMING_LEGEND.format(timer=timers)


def report(rows: Sequence[dict], columns: Sequence[str], out_dir: str | Path, name: str, env: dict, **plot) -> Path:
    """Print `rows` as a table (with the timing legend), append them to out_dir/name.jsonl (+ .csv), draw
    name.png; returns the JSONL path."""
    if not rows:  # stopped before its first row: nothing to save or draw (an older file's plot would pass for it)
        print("no rows measured: nothing saved")
        return Path(out_dir) / f"{name}.jsonl"
    print(dict_table(rows, columns))
    print(timing_legend(rows))
    if "auto_choices" in columns and any(r.get("auto_choices") for r in rows):
        print(AUTO_LEGEND)
    jsonl_path, csv_path = save_results(rows, out_dir, name, env)
    png_path = plot_results(jsonl_path, jsonl_path.with_suffix(".png"), **plot)
    print(f"results: {jsonl_path}, {csv_path}" + (f"; plot: {png_path}" if png_path else ""))
    return jsonl_path
