"""Harness shared by every linattn benchmark: environment, timing, copy bandwidth, result files, tables, plots.

Every row a benchmark saves carries the environment that produced it (device,
torch, triton, CUDA and linattn versions, date), rows are appended to
`<out>/<name>.jsonl` so that every run is kept, and plots are drawn from those
files, never from memory.
"""

import csv
import datetime
import functools
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = [
    "copy_bandwidth_gbs",
    "environment",
    "error_line",
    "load_results",
    "plot_results",
    "print_table",
    "progress",
    "save_results",
    "time_ms",
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

    `device` defaults to the current CUDA device when there is one, else the CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"{major}.{minor}"
    else:
        name, capability = f"cpu: {_cpu_model()}", None
    return {
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "linattn": _version("linattn"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(
    fn: Callable[[], object], device: torch.device | str, cuda_graph: bool = False, notes: list[str] | None = None
) -> float:
    """Median time of one call of `fn`, in milliseconds.

    CUDA: `triton.testing.do_bench` (warm-up, L2 flushed between calls), or with
    `cuda_graph` the calls replayed from a CUDA graph, which removes launch
    overhead for small ops (inputs may then stay in L2). When capture fails (an
    op that syncs, torch.compile's own graphs) it falls back to do_bench and
    appends the reason to `notes`. CPU: perf_counter median after warm-up.
    """
    if torch.device(device).type != "cuda":
        return _cpu_time_ms(fn)
    import triton.testing

    if cuda_graph:
        try:
            # Capture is not allowed on the default stream (older triton does not switch streams itself).
            with torch.cuda.stream(torch.cuda.Stream()):
                return triton.testing.do_bench_cudagraph(fn, return_mode="median")
        except Exception as err:  # capture failures come as RuntimeError, AssertionError or CUDA errors
            torch.cuda.synchronize()
            reason = f"CUDA graph capture failed, timed with do_bench: {error_line(err)}"
            if notes is not None:
                notes.append(reason)
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return triton.testing.do_bench(fn, return_mode="median")


def _cpu_time_ms(fn: Callable[[], object], budget_s: float = 0.25, min_runs: int = 3, max_runs: int = 50) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation
    start = time.perf_counter()
    fn()
    estimate = time.perf_counter() - start
    runs = max(min_runs, min(max_runs, int(budget_s / max(estimate, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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


def progress(total: int, desc: str) -> tqdm:
    """Progress bar over `total` benchmark cases, advanced with `.update()`; print with `tqdm.write` while it runs."""
    return tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True)


def save_results(rows: Sequence[dict], out_dir: str | Path, name: str, env: dict | None = None) -> tuple[Path, Path]:
    """Append `rows` (each merged with `env`, default `environment()`) to out_dir/name.jsonl; rewrite name.csv.

    The JSONL file keeps every run; the CSV beside it is regenerated from it
    with the union of all columns. Returns (jsonl_path, csv_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment() if env is None else env
    jsonl_path, csv_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.csv"
    with jsonl_path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, **env}) + "\n")
    every = load_results(jsonl_path)
    columns = list(dict.fromkeys(key for row in every for key in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(every)
    return jsonl_path, csv_path


def load_results(jsonl_path: str | Path) -> list[dict]:
    """Every row of a results file, oldest first."""
    with Path(jsonl_path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print `rows` as an aligned text table of `columns` (missing values as "-")."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    # Numbers right-aligned for comparison down a column, text left-aligned.
    numeric = [all(isinstance(row.get(col), (int, float, type(None))) for row in rows) for col in columns]

    def fmt(line):
        cells = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(line, widths, numeric, strict=True))
        return "  ".join(cells).rstrip()

    print(fmt(columns))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print(fmt(line))


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
    and date), with `hline` (the copy bandwidth) as a dashed line. Returns
    the PNG path, or None when matplotlib is not installed.
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
    rows = [r for r in rows if r.get("date") == last.get("date") and r.get("device") == last.get("device")]
    drawn = [r for r in rows if r.get(y) is not None]

    def values(key, among):
        return list(dict.fromkeys(r.get(key) for r in among))

    prow, pcol = values(panel_rows, rows), values(panel_cols, rows)
    names = values(series, drawn)  # one colour per series in every panel
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(
        len(prow), len(pcol), figsize=(1 + 5 * len(pcol), 1 + 3.5 * len(prow)), squeeze=False, sharey=True
    )
    for i, rv in enumerate(prow):
        for j, cv in enumerate(pcol):
            ax = axes[i][j]
            panel = [r for r in drawn if r.get(panel_rows) == rv and r.get(panel_cols) == cv]
            xs = values(x, panel)
            for k, name in enumerate(names):
                mine = [r for r in panel if r.get(series) == name]
                pos = [xs.index(r[x]) + (k - (len(names) - 1) / 2) * width for r in mine]
                if mine:
                    ax.bar(pos, [r[y] for r in mine], width, label=str(name), color=f"C{k}")
            if hline and panel and panel[0].get(hline):
                ax.axhline(panel[0][hline], color="black", linestyle="--", linewidth=1, label=hline)
            ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{panel_rows} {rv}, {panel_cols} {cv}", fontsize=10)
            ax.set_ylabel(ylabel)
            if panel:
                ax.legend(fontsize=7)
    versions = ", ".join(f"{k} {last.get(k)}" for k in ("torch", "triton", "cuda", "linattn"))
    fig.suptitle(f"{Path(jsonl_path).stem}: {last.get('device')}\n{versions}, {last.get('date')}", fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
