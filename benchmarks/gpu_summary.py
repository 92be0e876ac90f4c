"""The end of benchmarks/gpu_check.sh: its step table, the headline end-to-end numbers, one results file.

    python benchmarks/gpu_summary.py WORK_DIR [SECONDS]

Reads WORK_DIR/steps.tsv (name, status, exit code, seconds, bound per step), WORK_DIR/logs/<step>.log,
WORK_DIR/results/*.jsonl and results/dispatch/*.jsonl (what measured dispatch timed); writes
WORK_DIR/results.jsonl (every row of this pass, each with its results_file) and WORK_DIR/summary.txt, and
prints the summary. Standard library only: it runs where the build failed too.
"""

import json
import sys
from pathlib import Path

HEADLINE = (  # e2e columns shown in the summary
    ("model", "model"),
    ("provider", "provider"),
    ("img_s", "img/s"),
    ("reps", "reps"),
    ("iqr_pct", "iqr%"),
    ("lat_b1_ms", "B1 ms"),
    ("lat_b1_iqr_pct", "B1 iqr%"),
    ("host_b1_ms", "B1 host ms"),
    ("speedup_vs_eager", "vs eager"),
    ("speedup_vs_compile", "vs compile"),
    ("rel_err", "rel_err"),
    ("note", "note"),
)


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(rows: list[list[str]]) -> list[str]:
    """Aligned text table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def last_line(log: Path, width: int = 70) -> str:
    """The last non-empty line of a log (progress-bar carriage returns split too), cut to `width`."""
    if not log.exists():
        return ""
    lines = [s.strip() for s in log.read_text(errors="replace").replace("\r", "\n").splitlines() if s.strip()]
    return (lines[-1][: width - 3] + "...") if lines and len(lines[-1]) > width else (lines[-1] if lines else "")


def step_rows(work: Path) -> list[dict]:
    rows = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, seconds, bound = line.split("\t")
        rows.append({"step": name, "status": status, "rc": rc, "s": seconds, "bound": bound})
    return rows


def combine(results: Path) -> list[dict]:
    """Every row of every results file, tagged with the file's stem (the benchmark and its suffixes); the files of
    a variant's folder (host_aware/: the e2e-l0-host-aware step) with the folder's name after the stem."""
    rows = []
    for path in [*sorted(results.glob("*.jsonl")), *sorted(results.glob("host_aware/*.jsonl"))]:
        name = path.stem if path.parent == results else f"{path.stem}-{path.parent.name}"
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append({"results_file": name, **json.loads(line)})
    return rows


def summary(work: Path, seconds: str | None = None) -> list[str]:
    steps = step_rows(work)
    rows = combine(work / "results")
    with (work / "results.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = []
    gpu = work / "gpu.txt"
    if gpu.exists():
        lines += [s for s in gpu.read_text().splitlines() if s.startswith(("gpu_check.sh", "torch", "missing"))]
    done = [s for s in steps if s["status"] == "ok"]
    bad = [f"{s['step']} {s['status']}" for s in steps if s["status"] != "ok"]
    took = f" in {seconds} s" if seconds else ""
    lines.append(
        f"gpu_check: {len(done)} of {len(steps)} steps ok{took}" + (f"; not ok: {', '.join(bad)}" if bad else "")
    )
    lines.append("")
    if steps:
        header = ["step", "status", "rc", "s", "bound", "last line of its log"]
        logs = {s["step"]: last_line(work / "logs" / f"{s['step']}.log") for s in steps}
        lines += table(
            [header] + [[s["step"], s["status"], s["rc"], s["s"], s["bound"], logs[s["step"]]] for s in steps]
        )
        # the warm machine goes back within a minute of idling: the next call, ready to paste
        if rest := [s["step"] for s in steps if s["status"] in ("no-time", "TIMEOUT", "STOPPED")]:
            lines.append(f'cut short or not run: STEPS="{" ".join(rest)}" BUDGET_S=0 bash benchmarks/gpu_check.sh OUT')
    # per results file: rows, timed, skipped, failed
    files = list(dict.fromkeys(r["results_file"] for r in rows))
    if files:
        lines.append("")
        counts = [["results file", "rows", "timed", "skipped", "failed", "wrong"]]
        wrong = []
        for name in files:
            mine = [r for r in rows if r["results_file"] == name]
            notes = [str(r.get("note") or "") for r in mine]
            timed = sum(any(r.get(k) is not None for k in ("ms", "us", "host_us")) for r in mine)  # profile: us
            counts.append([name, str(len(mine)), str(timed), str(sum(n.startswith("skipped") for n in notes)),
                           str(sum(n.startswith(("failed", "stopped")) for n in notes)),
                           str(sum(n.startswith("wrong") for n in notes))])  # fmt: skip
            wrong += [r for r, n in zip(mine, notes) if n.startswith("wrong")]
        lines += table(counts)
        # a result outside the tolerance is the pass's first news: each row, not only a count
        for r in wrong:
            what = " ".join(str(r.get(k)) for k in ("op", "shape", "dtype", "pass", "provider") if r.get(k))
            lines.append(f"WRONG {r['results_file']}: {what}: {str(r['note']).split(';')[0]}")
    e2e = [r for r in rows if r["results_file"].startswith("e2e")]
    if e2e:
        lines += ["", "end to end (python -m linattn bench; ms are medians of reps timed calls, iqr% their spread):"]
        shown = [[title for _, title in HEADLINE]]
        for r in e2e:
            name = str(r.get("model", "")).removeprefix("efficientvit-sam-")
            values = {**r, "model": f"{name} {r.get('dtype')} B{r.get('batch')}", "note": note_of(r)}
            if r["results_file"].endswith("-host_aware"):  # the variant's rows, named so beside the plain ones
                values["provider"] = f"{r.get('provider')} (host-aware)"
            shown.append([cell(values.get(key)) for key, _ in HEADLINE])
        lines += table(shown)
        for step in steps:
            log = work / "logs" / f"{step['step']}.log"
            if step["step"].startswith("bench-e2e") and log.exists():
                lines += [s for s in log.read_text(errors="replace").splitlines() if " targets (" in s]
    lines += context_lines(rows)
    lines += host_lines(rows)
    lines += dispatch_lines(work / "results")
    return lines


def context_lines(rows: list[dict]) -> list[str]:
    """The fused LiteMLA context's forward (bench-multiscale step), issue 14's measure: each provider's time, its
    share of the copy bandwidth (the memory floor) and of the fp32 peak (the depthwise taps' FMAs)."""
    mine = [r for r in rows if r["results_file"].startswith("lite_mla_context") and r.get("pass") == "fwd"]
    if not mine:
        return []
    shown = [["shape", "dtype", "layout", "provider", "us", "iqr%", "% copy", "% fp32", "vs eager", "note"]]
    for r in mine:
        us = None if r.get("ms") is None else 1e3 * r["ms"]
        shown.append([str(r.get("shape")), str(r.get("dtype")), str(r.get("layout")), str(r.get("provider")), cell(us),
                      cell(r.get("iqr_pct")), cell(r.get("pct_copy")), cell(r.get("pct_fma")),
                      cell(r.get("speedup_vs_eager")), note_of(r)])  # fmt: skip
    return ["", "lite_mla_context forward (% copy: of the memory floor; % fp32: the taps' FMAs of the fp32 peak):",
            *table(shown)]  # fmt: skip


def host_lines(rows: list[dict]) -> list[str]:
    """bench_host.py's layers of one batch-1 conv call (bench-host step): host us per call, outermost first."""
    host = [r for r in rows if r["results_file"] == "host_layers"]
    if not host:
        return []
    shown = [["layer", "host us", "iqr%", "drained us", "note"]]
    for r in host:
        shown.append([str(r.get("layer")), cell(r.get("host_us")), cell(r.get("iqr_pct")), cell(r.get("drained_us")),
                      note_of(r)])  # fmt: skip
    return ["", f"host time of one B1 conv call, layer by layer ({host[0].get('shape')}):", *table(shown)]


def dispatch_lines(results: Path, slowest: int = 5) -> list[str]:
    """What measured dispatch did in this pass (results/dispatch/*.jsonl, the benchmarks' saved timings): how many
    choices and the seconds they took, the slowest (a first call's compiles and graph builds), what won, and
    every candidate it left out (a result that disagreed with the baseline's, or a run that raised), in full."""
    entries = []
    for path in sorted((results / "dispatch").glob("*.jsonl")):
        entries += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        return []
    total = sum(e.get("s") or 0.0 for e in entries if not e.get("nested"))  # a nested one's are in its outer's
    won: dict[str, int] = {}
    for e in entries:
        kind = "triton config" if ".triton:" in e["key"] else e["chosen"]
        won[kind] = won.get(kind, 0) + 1
    lines = ["", f"measured dispatch: {len(entries)} choices in {total:.1f} s; chosen: "
             + ", ".join(f"{k} {n}" for k, n in sorted(won.items()))]  # fmt: skip
    for e in sorted(entries, key=lambda e: -(e.get("s") or 0.0))[:slowest]:
        lines.append(f"  {e.get('s') or 0.0:6.2f} s  {e['chosen'][:40]:40}  {e['key'][:110]}")
    left_out = [(e["key"], name, why) for e in entries for name, why in (e.get("rejected") or {}).items()]
    lines.append(f"left out by the results check: {len(left_out)}")
    for key, name, why in left_out:
        lines.append(f"  {name}: {why if isinstance(why, str) else f'relative difference {why:.3g}'}  at {key}")
    return lines


def note_of(row: dict) -> str:
    """A short note: failures, skips and wrong results in full; optimize's report cut, what follows it kept ("; ran
    eagerly: ...", "; host profile failed: ...")."""
    note = str(row.get("note") or "")
    if note.startswith(("failed", "stopped", "skipped", "wrong")):
        return note
    first, _, rest = note.partition("; ")
    return first[:40] + (f"; {rest}" if rest else "")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    work = Path(argv[0])
    if not (work / "steps.tsv").is_file():  # not a gpu_check.sh work folder: nothing written into it
        print(f"gpu_summary.py: {work} has no steps.tsv (not a work folder of benchmarks/gpu_check.sh)")
        return 2
    lines = summary(work, argv[1] if len(argv) > 1 else None)
    text = "\n".join(lines) + "\n"
    (work / "summary.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
