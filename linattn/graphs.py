"""CUDA graphs for an optimized model: `linattn.optimize(model, cuda_graph=True)` or `CUDAGraphModule(model)`.

At batch 1 an optimized encoder is bound by the host: each of its ~90 (L0) to ~160 (XL1) op calls costs
Python checks, custom-op dispatch and a kernel launch, against a few microseconds of GPU work. A CUDA graph
records the launches of one forward once and replays them with one call.

`CUDAGraphModule(model)` holds `model` as its child `module`. Each call is keyed by its input signature:
the structure of the positional and keyword arguments (tuples, lists, dicts; the values of plain constants
such as None, bools, ints, floats and strings), each tensor's shape, strides, dtype, device and
requires_grad, the grad mode, inference mode, CUDA autocast state and linattn's global backend. The first
call of a signature copies the inputs into static buffers, runs the model eagerly a few times on a side
stream (the warm-up: Triton compiles, cuDNN picks its algorithms and linattn's measured dispatch times its
implementations and fills its table, since nothing is timed during capture), then captures one forward
into a `torch.cuda.CUDAGraph`. Every call of that signature, the first included, copies its input tensors
into the static buffers, replays the graph and returns its outputs.

Outputs: with `clone_outputs=True` (the default) each call returns fresh tensors (one device copy of the
outputs per call). With `clone_outputs=False` it returns the graph's static output buffers themselves,
like torch.compile's mode="reduce-overhead": they are overwritten by the next call of the wrapper (any
signature: the graphs share one memory pool), so use or clone them before calling again.

Eager calls, no capture (counted by reason in `cache_info()`):
- "not cuda": a tensor input that is not on a CUDA device (CPU inputs run the model as it is), or inputs on
  more than one device; "no tensor": no tensor among the inputs;
- "training": the model is in training mode (BatchNorm statistics, dropout: graphs are for inference here);
- "autograd": grad mode is on and an input or a parameter requires grad (a replayed graph records no
  autograd graph); use torch.inference_mode() or torch.no_grad() (warned once per wrapper: a model whose
  parameters require grad, as a loaded model's do, never replays without it);
- "unkeyable": an argument that is not a tensor, a constant, or a tuple/list/dict of them, or a tensor
  subclass or a non-strided tensor;
- "capturing": a CUDA graph is already being captured on the current stream (the caller's capture records
  the model's kernels); torch.compile and torch.jit.trace tracing a wrapped model see the model itself;
- "capture failed": this signature's capture raised (an op that synchronises with the host, for example), its
  outputs hold an object other than tensors, constants and the containers torch.utils._pytree flattens
  (tensors in it could not be returned fresh), or a submodule of the eval model is in train mode (a BatchNorm
  re-estimating its statistics: the warm-up runs would update them again); it warned once and runs eagerly
  from then on (until `reset()`, or a mode switch through the wrapper), outside the graphs' LRU.

Memory: the captures share one graph memory pool per device (`torch.cuda.graph_pool_handle()`), so the
activations of different signatures reuse the same memory; each kept graph adds its static inputs and
outputs. At most `max_graphs` signatures are kept (least recently used first out; None keeps all).

Weights: a graph reads the parameters and linattn's folded constants (BatchNorms folded into convs, LiteMLA's
packed depthwise weights, and the fp32 copies of the per-channel vectors that cuDNN's graph takes, which the
ops hand the capture through `keep_alive` instead of capturing their casts) as they were at capture.
`load_state_dict`, `.to()` / `.cuda()` / `.half()` and `.train()` / `.eval()` on the wrapper drop the graphs;
after changing weights any other way (an optimizer step, `p.copy_(...)`) call `reset()`. The tensors the graphs
read are kept alive until then, so a stale graph never reads freed memory.

state_dict: the wrapper's `state_dict()` and `load_state_dict()` use the wrapped model's own keys, no
"module." prefix, so checkpoints move freely between the plain, optimized and wrapped models (also when the
wrapper sits inside a parent module). `named_parameters()` and `named_modules()` show the child `module.`.

Captures are one at a time in the process (a lock around each warm-up and capture: CUDA allows one capture
at a time, and a second thread's synchronisation would invalidate it), in CUDA's "thread_local" capture mode
(other threads' eager work goes on meanwhile). A failed capture leaves the caller's stream current. One
wrapper replays on one stream at a time: calls from several threads or unsynchronised streams race on the
static buffers.
"""

import contextlib
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._backend import get_backend

__all__ = ["CUDAGraphModule", "CaptureFailed", "keep_alive", "signature"]


class _Capture(threading.local):
    held: list | None = None  # while this thread's wrapper captures: what its ops asked the graph to keep


_capture = _Capture()
_CAPTURE_LOCK = threading.RLock()  # one warm-up and capture at a time (re-entrant: a wrapper in a wrapper)


def keep_alive(t: Tensor) -> bool:
    """Keep `t` as long as the graph a CUDAGraphModule is capturing on this thread: for an op that hands the
    capture a tensor no module holds (cuDNN's fp32 copies of the per-channel vectors, kept per vector). False
    when no such capture is under way (the caller's own capture, torch.compile's): the op must then capture
    work that makes the tensor, not a pointer to one a later call could free."""
    if _capture.held is None:
        return False
    _capture.held.append(t)
    return True


# argument values that are part of the key (the graph bakes them in); everything else must be a tensor or a
# tuple, list or dict of these
_CONSTANTS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    torch.Size,
    type(Ellipsis),
)
_TENSOR = ("tensor",)  # the structure of a tensor leaf


class Unkeyable(Exception):
    """An argument that cannot be part of a graph's key; the message names it."""


class CaptureFailed(RuntimeError):
    """A capture that raised; the signature then runs eagerly (its warm-up errors are the model's own and propagate)."""


def _structure(obj, leaves: list[Tensor]):
    """A hashable description of `obj` with its tensors replaced by _TENSOR (appended to `leaves` in order)."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return _TENSOR
    kind = type(obj)
    if kind in _CONSTANTS:
        return ("const", kind, obj)  # the type too: 1, 1.0 and True are different keys
    if kind is tuple or kind is list or (issubclass(kind, tuple) and hasattr(kind, "_fields")):  # namedtuple
        return ("seq", kind, tuple(_structure(o, leaves) for o in obj))
    if kind is dict:
        for k in obj:
            if type(k) not in _CONSTANTS:
                raise Unkeyable(f"a dict key of type {type(k).__name__}")
        return ("dict", tuple(obj), tuple(_structure(v, leaves) for v in obj.values()))
    raise Unkeyable(f"an argument of type {kind.__name__}")


def _rebuild(structure, tensors):
    """The object `structure` describes, its tensor leaves taken in order from the iterator `tensors`."""
    if structure is _TENSOR:
        return next(tensors)
    tag = structure[0]
    if tag == "const":
        return structure[2]
    if tag == "seq":
        kind, items = structure[1], [_rebuild(s, tensors) for s in structure[2]]
        return kind(items) if kind in (tuple, list) else kind(*items)
    return dict(zip(structure[1], (_rebuild(s, tensors) for s in structure[2]), strict=True))


def _tensor_spec(t: Tensor) -> tuple:
    if type(t) is not Tensor and type(t) is not nn.Parameter:
        raise Unkeyable(f"a tensor subclass {type(t).__name__}")
    if t.layout != torch.strided:
        raise Unkeyable(f"a {t.layout} tensor")
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def signature(args: tuple, kwargs: dict) -> tuple[tuple, list[Tensor]]:
    """(key, tensors) of a call: the key of its graph (see the module docstring) and its tensor arguments in
    order. Raises Unkeyable when an argument cannot be keyed."""
    tensors: list[Tensor] = []
    structure = _structure((args, kwargs), tensors)
    specs = tuple(_tensor_spec(t) for t in tensors)
    autocast = torch.is_autocast_enabled("cuda")
    modes = (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        autocast,
        torch.get_autocast_dtype("cuda") if autocast else None,
        get_backend(),
    )
    return (structure, specs, modes), tensors


@dataclass
class _Graph:
    """One captured signature: its static input tensors, its (static) outputs (and their pytree leaves and
    spec) and how to replay it."""

    inputs: list[Tensor]
    structure: object
    outputs: object
    output_leaves: list
    output_spec: object
    replay: Callable[[], None]
    graph: object = None  # the torch.cuda.CUDAGraph (None for an injected recorder)
    keep: tuple = ()  # the tensors it reads that the model might drop (parameters, folded constants)

    def run(self, tensors: list[Tensor], clone: bool):
        for static, t in zip(self.inputs, tensors, strict=True):
            if static is not t:
                static.copy_(t)
        self.replay()
        if not clone:
            return self.outputs
        return tree_unflatten([t.clone() if isinstance(t, Tensor) else t for t in self.output_leaves], self.output_spec)


_EAGER = "capture failed"  # the eager reason of a signature whose capture failed


def _strip_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the wrapped model's keys ("x.weight", not "module.x.weight") and metadata."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == inner[:-1] or k.startswith(inner)]:
            new = prefix + key[len(inner) :] if key != inner[:-1] else prefix[:-1]
            metadata[new] = metadata.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: the wrapped model's keys go to the child `module`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)
    module._loading_prefix = prefix


def _reset_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: the missing and unexpected keys named as the wrapped model's (the error message
    is made from them after), and the graphs dropped."""
    prefix = module.__dict__.pop("_loading_prefix", "")
    inner = prefix + "module."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + k[len(inner) :] if k.startswith(inner) else k for k in keys]
    module.reset()


def _kept_tensors(model: nn.Module) -> tuple:
    """What a graph of `model` reads and the model could drop before the graph does: the storage of every
    parameter and buffer (detached views: `.to()` swaps `.data`) and linattn's cached folded constants
    (modules drop them on a mode switch or recompute them when a weight changes)."""
    modules = list(model.modules())
    modules += [b for m in modules for b in getattr(m, "_blocks", ())]  # FusedSequential's unregistered blocks
    cached = tuple(m.__dict__["_linattn_constants"] for m in modules if "_linattn_constants" in m.__dict__)
    return (*(t.detach() for t in model.parameters()), *(t.detach() for t in model.buffers()), *cached)


class CUDAGraphModule(nn.Module):
    """`module` captured into a CUDA graph per input signature and replayed (see the module docstring).

    Args:
        module: the model (usually `linattn.optimize(model)`), on the GPU, in eval mode.
        max_graphs: how many signatures keep their graph (least recently used out first); None: all.
        clone_outputs: return fresh tensors (default); False returns the static output buffers, overwritten by
            the next call.
        warmup: eager runs on a side stream before each capture (at least 1: measured dispatch times its
            implementations in the first).
    """

    _device_type = "cuda"  # where captures happen (the tests inject a recorder and "cpu")

    def __init__(self, module: nn.Module, max_graphs: int | None = 8, clone_outputs: bool = True, warmup: int = 3):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"CUDAGraphModule: module must be an nn.Module, got {type(module).__name__}")
        if max_graphs is not None and (not isinstance(max_graphs, int) or max_graphs < 1):
            raise ValueError(f"CUDAGraphModule: max_graphs must be a positive int or None, got {max_graphs!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CUDAGraphModule: warmup must be an int >= 1, got {warmup!r}")
        self.module = module
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._failed: set[tuple] = set()  # signatures whose capture failed: eager, outside the LRU
        self._devices: dict[torch.device, tuple] = {}  # device -> (graph pool, capture stream), made on first capture
        self._stats: Counter = Counter()
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)
        self.register_load_state_dict_post_hook(_reset_after_load)

    def extra_repr(self) -> str:
        return f"max_graphs={self.max_graphs}, clone_outputs={self.clone_outputs}, graphs={len(self._graphs)}"

    # --- the call ---

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.module(*args, **kwargs)
        why, key, tensors = self._eager_reason(args, kwargs)
        if why is not None:
            return self._eager(why, args, kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, tensors)
        else:
            self._graphs.move_to_end(key)
        if entry is None:
            return self._eager(_EAGER, args, kwargs)
        self._stats["replays"] += 1
        return entry.run(tensors, self.clone_outputs)

    def _eager(self, why: str, args, kwargs):
        self._stats["eager: " + why] += 1
        if why == "autograd" and self._stats["eager: autograd"] == 1:
            warnings.warn(
                "linattn.graphs: grad mode is on and an input or a parameter requires grad: the model runs eagerly, "
                "without its CUDA graphs; call it under torch.inference_mode() or torch.no_grad() (or "
                "model.requires_grad_(False)) to replay them",
                RuntimeWarning,
                stacklevel=3,
            )
        return self.module(*args, **kwargs)

    def _eager_reason(self, args, kwargs) -> tuple[str | None, tuple | None, list[Tensor]]:
        """(why this call runs eagerly or None, its key, its tensors)."""
        if self.module.training:
            return "training", None, []
        try:
            key, tensors = signature(args, kwargs)
        except Unkeyable:
            return "unkeyable", None, []
        if key in self._failed:
            return _EAGER, None, tensors
        if not tensors:
            return "no tensor", None, tensors
        device = tensors[0].device
        if device.type != self._device_type or any(t.device != device for t in tensors):
            return "not cuda", None, tensors
        if torch.is_grad_enabled() and (
            any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.module.parameters())
        ):
            return "autograd", None, tensors
        if self._device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            return "capturing", None, tensors
        return None, key, tensors

    # --- capture ---

    def _capture(self, key: tuple, tensors: list[Tensor]) -> _Graph | None:
        """Static copies of the inputs, the warm-up and the capture of one signature; the graph is cached (None:
        the capture failed, and the signature is kept among the failed ones)."""
        # a submodule in train mode in an eval model (a BatchNorm re-estimating its statistics): the warm-up runs
        # would update its state again for each signature captured
        training = next((name for name, m in self.module.named_modules() if m.training), None)
        if training is not None:
            warnings.warn(
                f"linattn.graphs: the submodule {training!r} is in train mode (its state would change in the warm-up "
                "runs): this input signature runs eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            self._failed.add(key)
            return None
        structure = key[0]
        statics = [torch.empty_like(t).copy_(t) for t in tensors]
        args, kwargs = _rebuild(structure, iter(statics))

        def forward():
            return self.module(*args, **kwargs)

        with _CAPTURE_LOCK:
            outer, held = _capture.held, []
            _capture.held = held
            try:
                outputs, replay, graph = self._record(forward, statics[0].device)
                leaves, spec = tree_flatten(outputs)
                for leaf in leaves:
                    if not isinstance(leaf, Tensor) and type(leaf) not in _CONSTANTS:
                        raise CaptureFailed(
                            f"its outputs hold a {type(leaf).__name__}, neither a tensor, a constant nor a container "
                            "torch.utils._pytree flattens: tensors in it could not be returned fresh"
                        )
            except CaptureFailed as err:
                warnings.warn(
                    f"linattn.graphs: capture failed, this input signature runs eagerly: {err.__cause__ or err}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._failed.add(key)
                return None
            finally:
                _capture.held = outer
        self._stats["captures"] += 1
        keep = (*_kept_tensors(self.module), *held)
        entry = self._graphs[key] = _Graph(statics, structure, outputs, leaves, spec, replay, graph, keep)
        while self.max_graphs is not None and len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self._stats["evictions"] += 1
        return entry

    def _record(self, forward: Callable[[], object], device: torch.device) -> tuple[object, Callable, object]:
        """Warm up `forward` on a side stream, capture it: (static outputs, replay, graph). Warm-up errors
        propagate; capture errors come as CaptureFailed."""
        if device not in self._devices:
            with torch.cuda.device(device):
                self._devices[device] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device))
        pool, stream = self._devices[device]
        with torch.cuda.device(device), _no_autocast_cache():
            caller = torch.cuda.current_stream(device)
            stream.wait_stream(caller)
            try:
                with torch.cuda.stream(stream):
                    for _ in range(self.warmup):
                        forward()
            finally:
                caller.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    outputs = forward()
            except Exception as err:
                # torch.cuda.graph restores the caller's stream after ending the capture: where that raised (an
                # invalidated capture), the capture stream would stay current
                torch.cuda.set_stream(caller)
                torch.cuda.synchronize(device)
                raise CaptureFailed(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        return outputs, graph.replay, graph

    # --- state ---

    def reset(self) -> None:
        """Drop every graph, and forget failed captures (the next call of each signature warms up and captures
        again)."""
        self._graphs.clear()
        self._failed.clear()

    def cache_info(self) -> dict:
        """{"graphs": kept signatures, "max_graphs", "captures", "replays", "evictions", "eager": {reason: calls}}."""
        eager = {k.removeprefix("eager: "): n for k, n in self._stats.items() if k.startswith("eager: ")}
        counts = {k: self._stats[k] for k in ("captures", "replays", "evictions")}
        return {"graphs": len(self._graphs), "max_graphs": self.max_graphs, **counts, "eager": eager}

    def train(self, mode: bool = True):
        self.reset()  # linattn's modules drop their folded constants on a mode switch
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.reset()  # .to(), .cuda(), .half(): new weight storage
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # deepcopy and pickle: graphs, pools and streams are not copied, the copy captures its own
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_graphs"], state["_failed"], state["_devices"], state["_stats"] = OrderedDict(), set(), {}, Counter()
        return state


def _no_autocast_cache():
    """Under CUDA autocast, warm-up and capture without autocast's weight-cast cache: a cast cached before the
    capture would be read by the graph after the caller's autocast region frees it."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
