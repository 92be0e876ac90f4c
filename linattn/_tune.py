"""Measured dispatch: "auto" on a GPU times every implementation that can run a call and keeps the fastest.

The first call with a new key (op, pass, every tensor's shape, strides and dtype, the other arguments, the GPU's
name, linattn/torch/triton/cuDNN versions, a float32 call's TF32 settings: _tf32) runs each candidate implementation
on the call's own inputs into scratch outputs (a runner the op hands over), timed on the GPU with CUDA events after
a warm-up (the GPU's time, not the host's: cuda_median_ms), and keeps the one with the smallest median; ties go to
the registry's priority order.
Later calls with that key are one dictionary lookup. Choices persist per GPU and versions as JSON in
LINATTN_CACHE_DIR (default ~/.cache/linattn), loaded at first use; tables shipped in the package (linattn/tables/)
are read first. Each choice keeps the candidates it was made among: a call that has one it was not made among (an
extension built since, a configuration added since) is measured again. A process writes only what it measured, into
the file as it is then (a file lock, an atomic replace): processes sharing the cache keep each other's choices, and
shipped choices stay in the package's table. LINATTN_TUNE=0 turns timing off: the table, else the priority order.
LINATTN_HOST_AWARE=1 (read at import; an experiment, off by default): the convs' forward is chosen by the larger of
its GPU time and its host time (host_median_ms), under keys of their own. Nothing is timed while a CUDA graph is
being captured or torch.compile traces (the table or the priority order again, with a one-time warning for
capture). A corrupt, foreign or stale file is ignored with a warning.

What is timed is checked first: each candidate runs once into NaN-filled scratch outputs (scratch_like) and its
result is compared with the baseline's (the reference, PyTorch's own path; among a kernel's configurations, its
heuristic's, which the reference checks one level up where that level is measured too, not where it is read from a
table). A candidate whose result differs by more than a rounding difference (TOLERANCE, relative; PEAK times it in
the largest elementwise difference, relative to the largest magnitude) is left out of the timing and the choice,
with a warning: a kernel that is wrong on this GPU, these versions or these inputs is never chosen for being fast.
A choice read from a table (shipped, or kept by an earlier run) is not checked again; a candidate left out because
it ran out of memory leaves the choice to this process, out of the table. Where most of the baseline's result is
not finite nothing can be checked: the priority order, for this process only. Where the check or the timing runs
out of memory, the priority order for this call; a later call measures again.
"""

import concurrent.futures
import contextlib
import functools
import json
import os
import re
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import _backend

FORMAT = 2  # the table's version, new when its layout or what a choice runs changes (2: separable's pair)
WARMUP, REPEATS = 2, 5
# The eighth H100 pass's L0 at batch 1 without graphs was host-bound and 18% behind eager. Its host profile put
# 13 cuDNN graph calls at about 52 us each and 6 PyTorch-path convs at about 97 us of conv2d alone, chosen for
# their GPU time (6-8 us), against about 20 us for a direct Triton launch. Where the host is the bottleneck, a
# call costs the larger of the two: timing both says so. Off until a GPU pass compares it (benchmarks/gpu_check.sh
# e2e-l0-host-aware); the choices made with it are keyed apart from the others.
HOST_AWARE = os.environ.get("LINATTN_HOST_AWARE") == "1"
SPIN_CYCLES = 1_000_000  # GPU clock cycles ahead of each timed call: 0.5-0.7 ms at 1.4-2 GHz
# The largest relative difference (Frobenius norm, per output tensor) from the baseline's result that measured
# dispatch takes for rounding, by the call's least precise input dtype. Far above what the tests allow (2x
# eager's own error against float64, docs/design.md 8), so that rounding, TF32 convs on PyTorch's path and
# accumulation order never reject a candidate; far below what a broken kernel makes (an unwritten element is
# NaN, a layout mistake an error of about 1).
TOLERANCE = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# ... and the largest elementwise difference, relative to the result's largest magnitude, PEAK times that: rounding
# differs most where values are large, but stays a few units in their last place (bf16's is 2^-8 relative); a
# region a kernel computes wrong (a tile's last rows, one wave's tiles) differs there by about its own magnitude
# (the Frobenius norm of 0.2% of a bf16 output zeroed is under 5e-2)
PEAK = 4

SHIPPED = Path(__file__).parent / "tables"  # the tables linattn ships
_lock = threading.Lock()
_timing = threading.RLock()  # held while a choice is measured (reentrant: a candidate's call may choose in turn)
_tables: dict[str, dict[str, str]] = {}  # table file name -> {key: backend}
_considered: dict[str, dict[str, list[str]]] = {}  # table file name -> {key: the candidates its choice was among}
_mine: dict[str, set[str]] = {}  # table file name -> the keys this process measured (what _save writes)
_timings: list[dict] = []  # every measurement of this process, for `python -m linattn tune`
_warned: set[str] = set()
_memo: dict[tuple, str] = {}  # (op, pass, GPU, candidates, _signature) -> choice: the hot path's one lookup
_settled: dict[tuple, dict] = {}  # (op, pass, GPU, _signature) -> the Triton configuration choose_config settled on


class _Fixed(threading.local):
    """Per thread: `on` in fixed_priority() (no table, no timing). A class default, not getattr(..., default): a
    missing attribute's AttributeError costs a few tenths of a microsecond on every planned call."""

    on = False


_fixed = _Fixed()
_plans: dict[tuple, tuple] = {}  # plan_key and dispatch state -> (call plan, the choices it counts)
MAX_PLANS = _backend.MAX_SIGNATURES  # call signatures kept
_generation = 0  # how often the plans were dropped: a Site's plan from before is stale
_unsettled = 0  # answers given for now (nothing could be timed yet): a plan that took one is not kept


@contextlib.contextmanager
def fixed_priority():
    """Within the block, this thread's "auto" takes the registry's priority order: no table, no timing (the
    benchmarks compare it with the measured choice)."""
    previous = _fixed.on
    _fixed.on = True
    try:
        yield
    finally:
        _fixed.on = previous


@contextlib.contextmanager
def timing_on():
    """Within the block, measured dispatch times new calls whatever LINATTN_TUNE said, and cuDNN's graphs autotune
    (linattn._C reads the variable too): the variable is set for the process, so that autograd's CUDA thread,
    which runs a backward, sees it too."""
    previous = os.environ.get("LINATTN_TUNE")
    os.environ["LINATTN_TUNE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LINATTN_TUNE"]
        else:
            os.environ["LINATTN_TUNE"] = previous


# os.environ.get costs half a microsecond (a Mapping lookup that encodes the key and decodes the value); every
# planned call asks enabled(), so the variable is read from the encoded dict os.environ keeps in step
_TUNE_KEY, _TUNE_OFF = os.environ.encodekey("LINATTN_TUNE"), os.environ.encodevalue("0")


def enabled() -> bool:
    encoded = getattr(os.environ, "_data", None)  # None where os.environ was replaced (a plain dict): its get
    if encoded is None:
        return os.environ.get("LINATTN_TUNE", "1") != "0"
    return encoded.get(_TUNE_KEY) != _TUNE_OFF


def cache_dir() -> Path:
    """LINATTN_CACHE_DIR, else ~/.cache/linattn, else (no home directory: a container's user without one) the user's
    folder in the temporary directory."""
    if found := os.environ.get("LINATTN_CACHE_DIR"):
        return Path(found)
    try:
        return Path.home() / ".cache" / "linattn"
    except RuntimeError:
        user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
        return Path(tempfile.gettempdir()) / f"linattn-cache{user}"


@functools.cache
def versions() -> dict:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    # cuDNN's version too: PyTorch's path and the cuda backend's convs run its kernels, and a pip install can change
    # it under the same torch
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"linattn": __version__, "torch": torch.__version__, "triton": triton_version, "cudnn": str(cudnn)}


@functools.cache
def table_name(device_name: str) -> str:
    """The file of one GPU and versions: choices measured elsewhere do not carry over."""
    v = versions()
    slug = f"{device_name}-linattn{v['linattn']}-torch{v['torch']}-triton{v['triton']}-cudnn{v['cudnn']}"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", slug)
    return f"{slug.strip('-')}.json"


def _read(path: Path, device_name: str, quiet: bool = False) -> tuple[dict[str, str], dict[str, list[str]]]:
    """A table file's choices and, where it records them, the candidates each choice was made among."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("device") != device_name or data.get("versions") != versions():
            raise ValueError("made for another GPU, format or versions")
        choices, considered = data["choices"], data.get("candidates", {})
        if not all(isinstance(k, str) and isinstance(b, str) for k, b in choices.items()):
            raise ValueError("choices are not strings")
        if not all(isinstance(c, list) and all(isinstance(b, str) for b in c) for c in considered.values()):
            raise ValueError("candidates are not lists of strings")
        return dict(choices), dict(considered)
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        if not quiet:
            warnings.warn(f"linattn: ignoring the dispatch table {path}: {err}", RuntimeWarning, stacklevel=4)
        return {}, {}


def table(device_name: str) -> dict[str, str]:
    """The choices for this GPU and versions: the shipped table, then this machine's cache over it, then this
    process's measurements."""
    name = table_name(device_name)
    if name not in _tables:
        shipped, shipped_considered = _read(SHIPPED / name, device_name)
        cached, cached_considered = _read(cache_dir() / name, device_name)
        _tables[name] = {**shipped, **cached}
        # a cached choice replaces the shipped one, and what it was made among with it
        _considered[name] = {k: v for k, v in shipped_considered.items() if k not in cached}
        _considered[name].update(cached_considered)
        _mine[name] = set()
    return _tables[name]


def _lookup(device_name: str, key: str, candidates: Sequence[str]) -> str | None:
    """The table's choice for a call, if it still holds: one of this call's candidates, made among all of them
    (a candidate that was not there then, a kernel configuration added since or an extension built since, has
    never been timed: the call is measured again). A choice that records no candidates holds as it is."""
    with _lock:
        chosen = table(device_name).get(key)
        considered = _considered[table_name(device_name)].get(key)
    if chosen not in candidates or (considered is not None and not set(candidates) <= set(considered)):
        return None
    return chosen


def _keep(device_name: str, key: str, chosen: str, candidates: Sequence[str]) -> None:
    """Enter a choice this process measured into the table, and save it (under _lock)."""
    name = table_name(device_name)
    table(device_name)[key] = chosen
    _considered[name][key] = list(candidates)
    _mine[name].add(key)
    _save(device_name)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on path's ".lock" file, between processes, for the block (POSIX; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # Windows: the replace below is still atomic; a concurrent save may be lost
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:  # closing it releases the lock
        with contextlib.suppress(OSError):  # a file system without locks (some network mounts): as on Windows
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _save(device_name: str) -> None:
    """Write this process's measurements into the table file, over what the file holds now: other processes'
    measurements since this one loaded it stay, and shipped choices are not copied into it (a later linattn
    ships its own). Under a file lock, through a temporary file of a unique name and an atomic replace."""
    name = table_name(device_name)
    path = cache_dir() / name
    choices, considered, mine = table(device_name), _considered[name], _mine[name]
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            on_disk, on_disk_considered = _read(path, device_name, quiet=True)
            for key in mine:
                on_disk[key] = choices[key]
                on_disk_considered[key] = considered[key]
            data = {"format": FORMAT, "device": device_name, "versions": versions(), "choices": on_disk,
                    "candidates": on_disk_considered}  # fmt: skip
            # a unique name, made as any file the user writes (mkstemp's are 0600: other users of a shared cache
            # directory could not read the table)
            unique = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.tmp")
            fd = os.open(unique, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            tmp = unique
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old table or the new one
            tmp = None
    except OSError as err:
        _warn_once("save", f"linattn: cannot save the dispatch table to {path}: {err}", stacklevel=5)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def call_key(op: str, pass_: str, args: Sequence) -> str:
    """The key of a call: its op, pass, and each argument (a tensor by shape, strides and dtype, and "@<n>" after
    them where its data pointer is n bytes past a 16-byte boundary: a misaligned view has fewer candidates, and its
    choice must not stand for the aligned calls of the same shape)."""

    def describe(a) -> str:
        if isinstance(a, torch.Tensor):
            misaligned = a.data_ptr() & 15 if type(a) in PLAIN else 0
            return f"{tuple(a.shape)}/{a.stride()}/{str(a.dtype)[6:]}" + (f"@{misaligned}" if misaligned else "")
        if isinstance(a, (list, tuple)):
            return "[" + ",".join(describe(x) for x in a) + "]"
        return repr(a)

    return f"{op}:{pass_}:" + ";".join(describe(a) for a in args)


def _signature(args: Sequence) -> tuple:
    """call_key's information as a tuple (cheaper to build than its string), and each plain tensor's 16-byte
    alignment class: the in-process lookup's key, built on every auto call on a GPU. The alignment, because a
    Triton configuration settled for aligned tensors (a tensor-descriptor one) cannot run a misaligned view of the
    same shape. A loop, not a generator, and int lists (stride, padding) taken whole: about 35% less host time
    for conv_bn_act's arguments."""
    out = []
    for a in args:
        kind = type(a)
        if kind is list or kind is tuple:
            out.append(tuple(a) if all(type(i) is int for i in a) else _signature(a))
        elif kind in PLAIN:
            out.append((a.shape, a.stride(), a.dtype, a.data_ptr() & 15))
        elif isinstance(a, torch.Tensor):  # fake and subclassed tensors: no pointer to read
            out.append((a.shape, a.stride(), a.dtype))
        else:
            out.append(a)
    return tuple(out)


PLAIN = (torch.Tensor, torch.nn.Parameter)  # the tensor types plans key and functionals run directly
_SCALARS = (int, float, str, bool, type(None))


def plan_key(args: Sequence) -> tuple | None:
    """A call's arguments as a call plan's key: each tensor by shape, strides, dtype, device and the 16-byte
    alignment class of its data pointer (cuDNN's graphs and Triton's specializations read it), lists as tuples
    (lists of tensors as their tensors' keys), plain scalars as they are; None where an argument is none of those
    (a fake or subclassed tensor): such calls are not planned."""
    out = []
    for a in args:
        kind = type(a)
        if kind in PLAIN:
            out.append((a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15))
        elif kind is list or kind is tuple:  # the conv geometry (ints, taken whole), per-scale tensor lists
            if all(type(i) is int for i in a):
                out.append(tuple(a))
            elif (inner := plan_key(a)) is not None:
                out.append(inner)
            else:
                return None
        elif kind in _SCALARS:
            out.append(a)
        else:
            return None
    return tuple(out)


def dispatch_state() -> tuple:
    """What a kept plan's choice reads besides its call: the registry and the backend set (_backend.state), the
    GPU-name lookup (the tests replace it), this thread's fixed priority, whether timing is on, and how often the
    plans were dropped."""
    return (*_backend.state(), _device_name, _fixed.on, enabled(), _generation)


def plan(op: str, args: Sequence, build: Callable[[], tuple], site: tuple | None = None) -> tuple:
    """build(): what an op's argument checks and dispatch decide for a call (output size, implementation, Triton
    configuration), kept per call signature (plan_key(args)) and dispatch state, so that a later call with that
    signature does neither: one lookup. The sixth H100 pass had an optimized L0's eager forward host-bound, about
    20 ms of host time for 62 fused calls, slower than eager PyTorch; each call re-ran its checks, its dispatch
    keys and the launchers' heuristics. A plan whose build met an unsettled answer (nothing could be timed during
    a capture or a compile: the next eager call times it) is not kept: it is asked again next call. One made with
    timing off (LINATTN_TUNE=0: the table, else the priority order) is kept under that setting. Each call that
    reuses a plan counts the choices the plan's build counted (auto_choices). site: (a Site, its key for this
    call, Site.key): the plan, when kept, is also the site's."""
    key = plan_key(args)
    if key is None:
        return build()
    state = dispatch_state()
    if (kept := _plans.get((op, key, *state))) is not None:
        for choice in kept[1]:
            _backend.count(*choice)
    else:
        before = _unsettled
        with _backend.record() as counted:
            built = build()
        if _unsettled != before:
            return built
        if len(_plans) >= MAX_PLANS:  # a model fed ever new shapes: start over rather than grow without end
            forget_plans()
            state = dispatch_state()
        kept = _plans[(op, key, *state)] = (built, tuple(counted))
    if site is not None:
        site[0].keep(site[1], kept, state)
    return kept[0]


class Site:
    """One call site of an op in a fused module (linattn/ops: module_conv_bn_act, module_separable,
    module_lite_mla_context), holding the plan of its last planned call. A later call with an equal site key
    reuses it without the op's argument checks, plan key and lookup, which cost more host time than the launch
    (benchmarks/bench_host.py). The key holds the call's own tensors by signature (as plan_key), the module's
    geometry, the dispatch state, and the module's constants (its eval_constants tuples: new objects whenever a
    source changes, linattn/nn/_cache.py) by identity: the entry keeps them, so an id is not reused while it is
    kept. A plan's prepared launch has the layouts it was made for built in, so the key must cover all of them.
    The entry is one tuple, replaced in one assignment: a thread reads the old one or the new one. Pickled and
    copied empty: a plan holds launches, which belong to this process."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None

    def __reduce__(self):
        return (Site, ())

    @staticmethod
    def key(constants: tuple, geometry: tuple, *tensors) -> tuple:
        """The site key of a call: `constants` (a tuple of eval_constants tuples, compared by identity), the
        geometry, the dispatch state and the call's tensors (each None or plain)."""
        sig = [None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) for t in tensors]
        return (constants, geometry, dispatch_state(), *sig)

    def find(self, key: tuple) -> tuple | None:
        """The plan kept for a call with this site key, its choices counted as plan counts them (the caller runs
        it); None if none."""
        entry = self.entry
        if entry is None or entry[0][1:] != key[1:]:
            return None
        for kept, given in zip(entry[0][0], key[0], strict=True):
            if kept is not given:
                return None
        for choice in entry[1][1]:
            _backend.count(*choice)
        return entry[1][0]

    def keep(self, key: tuple, kept: tuple, state: tuple) -> None:
        """Keep `kept` (a plan and its choices) for calls with site key `key`, if the key was made under the
        dispatch state the plan was (no backend switched between the two, on another thread)."""
        if key[2] == state:
            self.entry = (key, kept)


def forget_plans() -> None:
    """Drop every call plan (the sites' too: they go stale). A plan keeps what the launchers' heuristics chose (a
    Triton configuration, a prepared launch), from a device description the tests and the host benchmark replace
    (tests/conftest.py `gpu_heuristics`): they drop the plans made under the other description on the way in and
    out."""
    global _generation
    _plans.clear()
    _generation += 1


def cuda_median_ms(fn: Callable[[], object]) -> float:
    """Median GPU milliseconds of fn on the current stream (CUDA events), after a warm-up.

    Each timed call is queued behind a spin kernel (about half a millisecond), so the host has launched it before
    the GPU gets there and the events time the GPU's work alone. Without it a small call times its host path
    too (on the first H100 pass the Triton path of a small 1x1 conv took 0.16 ms per call against cuDNN's
    0.045, launches included): host time is mostly common to an op's implementations (all but the launch),
    an asynchronous queue hides it where the GPU is the bottleneck, and CUDA graphs remove it."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_timer = cuda_median_ms  # tests inject a timer


def host_median_ms(fn: Callable[[], object]) -> float:
    """Median host milliseconds until fn returns (the GPU not waited on: the host's time to queue the call's
    work), after a warm-up; the GPU drained at the end. For candidates run on the path their planned calls take
    (prepared launches, direct Triton launches): the host time a call of each costs."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


_host_timer = host_median_ms  # tests inject one too


class _Checking(threading.local):
    """Per thread: whether the runners' scratch outputs are NaN-filled (a candidate's checked run, not its timed
    ones: the fill would be timed with it)."""

    on = False


_checking = _Checking()


@contextlib.contextmanager
def _scratch_filled(on: bool):
    previous = _checking.on
    _checking.on = on
    try:
        yield
    finally:
        _checking.on = previous


def scratch_like(t: torch.Tensor) -> torch.Tensor:
    """A scratch output like t for a measured candidate's run: NaN-filled while dispatch checks the candidates'
    results (an element a kernel leaves unwritten then shows), else uninitialized."""
    if _checking.on and t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.empty_like(t)


def _tensors(result) -> list[torch.Tensor]:
    """The tensors of a runner's result (a tensor, or nested tuples and lists of them and None), in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    return []


SLAB = 1 << 23  # elements disagreement() compares at a time: float64 copies of at most 64 MB


def disagreement(got, expected) -> float:
    """How far got is from expected, relative, over the tensors of two results (the largest): per tensor the
    larger of ||got - expected|| / ||expected|| (Frobenius) and max|got - expected| / max|expected| / PEAK (a few
    wrong tile rows in a large output barely move the first). Compared in float64 a slab of rows at a time (float32
    squares overflow above 1.8e19, and an inf norm would read as agreement); inf where they do not match in number
    or shape, or where got is not finite and expected is. Elements where expected itself is not finite (an fp16
    overflow on PyTorch's path) are left out."""
    got, expected = [t.detach() for t in _tensors(got)], [t.detach() for t in _tensors(expected)]
    if len(got) != len(expected):
        return float("inf")
    worst = 0.0
    for a, r in zip(got, expected):
        if a.shape != r.shape:
            return float("inf")
        a, r = a.reshape(1, -1) if a.dim() < 2 else a, r.reshape(1, -1) if r.dim() < 2 else r
        rows = max(1, SLAB // max(1, a[0].numel()))
        diff2 = norm2 = peak_diff = peak = 0.0
        for a_s, r_s in zip(a.split(rows), r.split(rows)):
            a_s, r_s = a_s.double(), r_s.double()
            finite = torch.isfinite(r_s)
            if not bool(finite.all()):
                a_s, r_s = a_s[finite], r_s[finite]
            if not r_s.numel():
                continue
            d = a_s - r_s
            diff2 += float(d.square().sum())
            norm2 += float(r_s.square().sum())
            peak_diff = max(peak_diff, float(d.abs().max()))
            peak = max(peak, float(r_s.abs().max()))
        if diff2 != diff2 or peak_diff != peak_diff:  # NaN: got is not finite where expected is
            return float("inf")
        if diff2 > 0.0:
            if norm2 == 0.0:
                return float("inf")
            worst = max(worst, (diff2 / norm2) ** 0.5, peak_diff / peak / PEAK)
    return worst


def _tolerance(args) -> float:
    """TOLERANCE of the least precise floating dtype among the call's tensors (nested in lists too)."""
    found = [TOLERANCE.get(t.dtype, TOLERANCE[torch.float32]) for t in _tensors(args) if t.is_floating_point()]
    return max(found, default=TOLERANCE[torch.float32])


def _disagreeing(key: str, candidates: Sequence[str], runner: Callable[[str], object], args) -> tuple[dict, bool]:
    """The candidates left out of a choice: {candidate: its relative difference from the baseline's result, where
    over the tolerance, or what it raised}, each run once into NaN-filled scratch outputs, each left out with a
    warning; and whether the check could not be made (unchecked: most of the baseline's result is not finite,
    nothing is compared). The baseline: the reference where it is a candidate, else the first (a kernel's
    heuristic configuration); what it raises is raised. Results without values (fake or meta tensors) are not
    compared. Warned once per op, candidate and kind of failure."""
    baseline = "reference" if "reference" in candidates else candidates[0]
    tolerance = _tolerance(args)
    found = {}
    with _scratch_filled(True):
        expected = runner(baseline)
        if any(isinstance(t, FakeTensor) or t.is_meta for t in _tensors(expected)):
            return found, False  # results without values (the compile gate's replay on fake tensors)
        if _mostly_not_finite(expected):
            return found, True
        for name in candidates:
            if name == baseline:
                continue
            try:  # a kernel that cannot run here (shared memory, registers, a driver's limit) is not a crash
                error = disagreement(runner(name), expected)
            except Exception as e:  # noqa: BLE001
                found[name] = f"{type(e).__name__}: {e}"
                continue
            if not error <= tolerance:
                found[name] = error
    for name, why in found.items():
        # once per op, candidate and kind (a kernel over a smaller GPU's shared memory fails at every call)
        kind = f"left out:{key.split(':', 1)[0]}:{name}:{why.split(':', 1)[0] if isinstance(why, str) else ''}"
        what = (
            f"it raised {why}"
            if isinstance(why, str)
            else f"its result differs from {baseline}'s by {why:.3g} (relative; rounding allows {tolerance:g})"
        )
        _warn_once(
            kind,
            f"linattn: measured dispatch left out {name} for {key}: {what}. Further calls it leaves out so are not "
            "warned of (linattn._tune.timings() lists them all). Please report it with `python -m linattn info`",
            stacklevel=3,
        )
    return found, False


def _mostly_not_finite(result) -> bool:
    """Whether fewer than half the floating elements of a result are finite (nothing to check candidates by)."""
    floating = [t for t in _tensors(result) if t.is_floating_point() and t.numel()]
    total = sum(t.numel() for t in floating)
    return total > 0 and 2 * sum(int(torch.isfinite(t).sum()) for t in floating) < total


def _cannot_time() -> str | None:
    if torch.compiler.is_compiling():
        return "compiling"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "capture"
    return None


@functools.cache
def _device_name(device: torch.device) -> str:
    """Asked once per device: choose() runs on every auto call."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def choose(
    op: str, pass_: str, device: torch.device, candidates: Sequence[str], runner: Callable[[str], object], args,
    host_time: bool = False,
) -> str:  # fmt: skip
    """The implementation among `candidates` (in priority order) that runs this call; runner(backend) runs one
    of them on the call's inputs into scratch outputs (scratch_like) and returns its result, which is checked
    against the reference's before anything is timed (_disagreeing). host_time: chosen by the larger of each
    one's GPU and host times (HOST_AWARE), under keys of pass "<pass_>+host"."""
    return _choose(op, pass_, device, candidates, runner, args, host_time=host_time)[0]


def _choose(op, pass_, device, candidates, runner, args, prepare=None, host_time=False) -> tuple[str, bool]:
    """choose()'s (choice, settled): settled unless nothing could be timed (the choice is then the priority
    order's, asked again next call). prepare(), when given, runs once before the timing."""
    global _unsettled
    if _fixed.on:
        return candidates[0], False
    device_name = _device_name(device)
    pass_ = f"{pass_}+host" if host_time else pass_
    memo = (op, pass_, device_name, tuple(candidates), _signature(args))
    if (chosen := _memo.get(memo)) is not None:
        return chosen, True
    if any(type(a) in PLAIN and a.dtype is torch.float32 for a in args):
        pass_ += _tf32()
    if torch.backends.cudnn.benchmark:  # PyTorch's convs on the algorithms cuDNN times: a faster baseline to beat
        pass_ += "+cudnnbenchmark"
    key = call_key(op, pass_, args)
    if (chosen := _lookup(device_name, key, candidates)) is not None:
        _remember(_memo, memo, chosen)
        return chosen, True
    why_not = _cannot_time() or (None if enabled() else "LINATTN_TUNE=0")
    if why_not:
        if why_not != "LINATTN_TUNE=0":  # the priority order for now: a later eager call times it
            _unsettled += 1
        if why_not == "capture":
            _warn_once(
                "capture",
                "linattn: a call with no measured choice during CUDA-graph capture runs the priority order; "
                "run the model once before capturing (or `python -m linattn tune`)",
            )
        return candidates[0], False
    with _timing:  # one thread at a time: timings running together on a GPU would each time the other's work
        if (chosen := _lookup(device_name, key, candidates)) is not None:  # another thread's, measured meanwhile
            _remember(_memo, memo, chosen)
            return chosen, True
        return _measure(op, device, device_name, memo, key, candidates, runner, args, prepare, host_time)


def _measure(op, device, device_name, memo, key, candidates, runner, args, prepare, host_time) -> tuple[str, bool]:
    """_choose's measurement of a call not in the table (under _timing)."""
    global _unsettled
    started = time.perf_counter()
    nested = _backend.timing()  # made while an outer choice times its candidates: its seconds are in that one's
    try:
        with _on(device), _backend.uncounted():  # the events and the spin kernel on the call's GPU
            if prepare is not None:
                prepare()
            rejected, unchecked = _disagreeing(key, candidates, runner, args)
            timed = [b for b in candidates if b not in rejected] if not unchecked else []
            with _scratch_filled(False):  # (inside an outer candidate's checked run too)
                times = {backend: _timer(lambda backend=backend: runner(backend)) for backend in timed}
                host = {b: _host_timer(lambda b=b: runner(b)) for b in timed} if host_time else None
    except torch.OutOfMemoryError as err:  # the baseline's check or a timed run, beside the model's tensors
        _unsettled += 1  # the priority order for now; a later call measures it again
        _warn_once(
            f"oom:{op}",
            f"linattn: measured dispatch ran out of memory choosing the implementation of {key.split(':', 1)[0]} "
            f"({type(err).__name__}); the call runs the priority order's, and a later call tries again (or fill "
            "the table at a smaller batch first: `python -m linattn tune`)",
        )
        return candidates[0], False
    if unchecked:  # nothing to check a candidate against: the priority order, for this process only
        chosen, score = candidates[0], {}
        _warn_once(
            f"unchecked:{op}",
            f"linattn: measured dispatch cannot check the implementations of {key.split(':', 1)[0]} on this call: "
            "most of its baseline's result is not finite (NaN or inf inputs?); the priority order runs it, for this "
            "process, not in the table",
        )
    else:
        score = times if host is None else {b: max(times[b], host[b]) for b in timed}
        chosen = min(timed, key=lambda b: (score[b], candidates.index(b)))
    # seconds the choice took (compiles, cuDNN graph builds, nested choices, checks, timing): a first call's cost
    spent = round(time.perf_counter() - started, 3)
    row = {"key": key, "device": device_name, "ms": times, "chosen": chosen, "s": spent}
    if host is not None:
        row["host_ms"] = host
    if rejected:
        row["rejected"] = rejected
    if unchecked:
        row["unchecked"] = True
    if nested:
        row["nested"] = True
    # a candidate that ran out of memory (the check's scratch outputs beside the model's tensors) may fit another
    # time: the choice holds for this process, not in the table; so does one nothing checked
    kept = not unchecked and not any(
        isinstance(why, str) and why.startswith("OutOfMemoryError") for why in rejected.values()
    )
    with _lock:
        _remember(_memo, memo, chosen)
        _timings.append(row)
        if kept:
            _keep(device_name, key, chosen, candidates)
    return chosen, True


def _tf32() -> str:
    """The pass suffix of a float32 call: whether PyTorch's path may run it in TF32 (cuDNN's convs, cuBLAS's
    matmuls), which makes that path several times faster than our kernels' full fp32 products, so a choice made
    under one setting does not stand for the other. Read when a call is first chosen, not on the hot path: a
    process that changes the setting later keeps the choices and plans made before (reset)."""
    try:
        conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the legacy and the per-operator settings were mixed: read the per-operator ones
        conv = torch.backends.cudnn.conv.fp32_precision == "tf32"
        matmul = torch.backends.cuda.matmul.fp32_precision == "tf32"
    return "+ieeeconv" * (not conv) + "+tf32matmul" * matmul  # what differs from PyTorch's defaults


def _remember(memo: dict, key, value) -> None:
    """memo[key] = value, a memo of answers the table gives again, started over past MAX_PLANS entries (a model
    fed ever new shapes)."""
    if len(memo) >= MAX_PLANS:
        memo.clear()
    memo[key] = value


def _on(device: torch.device):
    """The block on `device`'s GPU (CUDA events and torch.cuda._sleep go to the current device's stream: a call
    on another GPU than the current one would time an idle stream); nothing where there is no GPU (the tests'
    pretend one)."""
    return torch.cuda.device(device) if torch.cuda.is_available() else contextlib.nullcontext()


def _warn_once(kind: str, message: str, stacklevel: int = 5) -> None:
    """A RuntimeWarning, once per kind in the process (until reset())."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def config_name(config: dict) -> str:
    """A Triton launch configuration as the table stores it: "BLOCK_M=128,BLOCK_N=64,...,num_warps=4"."""
    return ",".join(f"{k}={v}" for k, v in sorted(config.items()))


def choose_config(
    op: str, pass_: str, device: torch.device, configs: Callable[[], Sequence[dict]],
    runner: Callable[[dict], object], args, compile_only: Callable[[dict], object] | None = None,
) -> dict:  # fmt: skip
    """The fastest of a Triton kernel's candidate configurations for this call (configs(): the heuristic first,
    which wins ties and runs when nothing may be timed): measured and kept in the table as choose() does, under
    the key of op "<op>.triton". runner(config) launches one of them on the call's inputs into scratch outputs
    (scratch_like) and returns its result, checked against the heuristic's; compile_only(config), when given,
    compiles one without launching it: before timing, the candidates compile on threads at once (each compile
    is a second or so, and a model's first call on a new machine has dozens).
    A settled call (measured, or in the table) is one lookup: configs() is not asked again. A device that is
    not a GPU takes the first without a lookup."""
    if device.type != "cuda" or _fixed.on:
        return configs()[0]
    settled = (op, pass_, _device_name(device), _signature(args))
    if (config := _settled.get(settled)) is not None:
        return config
    found = configs()
    if len(found) > 1:
        names = [config_name(c) for c in found]
        prepare = None if compile_only is None else functools.partial(_compile_all, compile_only, found)
        run = lambda name: runner(found[names.index(name)])  # noqa: E731
        chosen, final = _choose(f"{op}.triton", pass_, device, names, run, args, prepare)
        if not final:  # nothing measured (capture, compile, LINATTN_TUNE=0): not settled for later calls
            return found[names.index(chosen)]
        found = [found[names.index(chosen)]]
    _remember(_settled, settled, found[0])
    return found[0]


def _compile_all(compile_only: Callable[[dict], object], configs: Sequence[dict]) -> None:
    """compile_only(config) for every config, the compiles at once on threads: Triton's AsyncCompileMode hands
    each kernel.warmup's compile to the pool (1.6-1.9x on 2 cores for twelve sm_90 conv configs, compiled here
    without a GPU). A failure is left for the timed launch to raise. Without that Triton module: one by one."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        AsyncCompileMode = None
    with contextlib.ExitStack() as stack:
        if AsyncCompileMode is not None:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(min(len(configs), os.cpu_count() or 1)))
            stack.enter_context(AsyncCompileMode(pool, ignore_errors=True))
        for config in configs:
            with contextlib.suppress(Exception):
                compile_only(config)


def timings() -> list[dict]:
    """What this process measured: one entry per new key, with every candidate's milliseconds and the seconds the
    choice took ("s": compiles and graph builds included; "nested": made within another entry's timing, whose
    seconds include these)."""
    return list(_timings)


def reset() -> None:
    """Forget the loaded tables and this process's timings (the files stay)."""
    with _lock:
        _tables.clear()
        _considered.clear()
        _mine.clear()
        _memo.clear()
        _settled.clear()
        forget_plans()
        _timings.clear()
        _warned.clear()


def tune(
    models: Sequence[str],
    batch: int,
    dtype: torch.dtype,
    backward: bool = False,
    layout: str = "channels_last",
    quick: bool = False,
):
    """Fill the table for the calls of each model's optimized forward (and backward) at `batch` and `dtype`, run
    in `layout`, on this GPU; returns the measurements (one per new key). Keys measured before are lookups:
    delete the table file to measure again."""
    from . import optimize
    from .benchmarks.bench_e2e import build_model, make_input, resolve_model

    device = torch.device("cuda")
    before = len(_timings)
    with timing_on():
        for name in models:
            name = resolve_model(name)
            model = build_model(name, quick).to(device, dtype).train(backward).requires_grad_(backward)
            model = optimize(model, channels_last=layout == "channels_last")
            x = make_input(name, batch, quick, device).to(dtype)
            with torch.set_grad_enabled(backward):
                y = model(x)
                if backward:
                    outputs = y if isinstance(y, (tuple, list)) else (y,)
                    sum(t.float().sum() for t in outputs if t.requires_grad).backward()
            torch.cuda.synchronize(device)
    return _timings[before:]


def describe() -> str:
    """Where the current GPU's table lives and how many choices it holds (for `python -m linattn info`)."""
    if not torch.cuda.is_available():
        return "measured dispatch: no GPU (auto runs the reference on CPU tensors)"
    name = torch.cuda.get_device_name()
    shipped = SHIPPED / table_name(name)
    return (
        f"measured dispatch: {'on' if enabled() else 'off (LINATTN_TUNE=0)'}; table {cache_dir() / table_name(name)} "
        f"({len(table(name))} choices{', with the shipped table' if shipped.exists() else ''})"
    )
