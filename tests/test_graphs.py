"""linattn.graphs.CUDAGraphModule (`linattn.optimize(model, cuda_graph=True)`): keying, cache, fallbacks, keys.

On CPU the wrapper's own logic runs with an injected recorder that behaves as a CUDA graph does for the
wrapper: the "capture" returns output buffers poisoned with NaN (a capture runs nothing), and each replay
recomputes the forward from the static input buffers and writes into those same output buffers. A wrapper
that skipped the copy into the static inputs, the replay after capture, or the output clone fails these
tests. Capture and replay themselves need a GPU: the tests at the end skip cleanly without one.
"""

import copy
import re
import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from utils import randomize, rel_err

import linattn
from linattn.graphs import CaptureFailed, CUDAGraphModule, Unkeyable, _kept_tensors, _rebuild, signature
from linattn.models import efficientvit_sam_encoder, squeezesam

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def tiny_convnet(seed: int = 1) -> nn.Module:
    """Conv -> BN -> ReLU -> conv -> act -> BN: optimize fuses both runs (folded constants, a FusedSequential).
    Eval mode, no parameter requires grad (an inference model: a call with autograd runs eagerly)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)
    )
    return randomize(model, seed=seed).eval().requires_grad_(False)


def tiny_squeezesam(seed: int = 2) -> nn.Module:
    model = squeezesam(
        widths=(8, 8, 8, 8, 8), transformer_dim=16, transformer_heads=2, transformer_mlp_dim=32, embed_dim=8
    )
    return randomize(model, seed=seed).eval().requires_grad_(False)


def tensor_leaves(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class FakeRecorder:
    """A CUDA graph's contract on CPU: warm-up runs, outputs that hold nothing until a replay, replays that
    write the forward of the current static inputs into the same output buffers."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.captures = 0
        self.warmups = 0

    def __call__(self, forward, device):
        self.warmups += 1
        forward()
        if self.fail:
            raise CaptureFailed("operation not permitted when stream is capturing")
        self.captures += 1
        outputs = forward()
        for t in tensor_leaves(outputs):
            t.fill_(float("nan"))  # a capture computes nothing

        def replay():
            with torch.no_grad():
                for static, new in zip(tensor_leaves(outputs), tensor_leaves(forward()), strict=True):
                    static.copy_(new)

        return outputs, replay, None


def on_cpu(wrapper: CUDAGraphModule, recorder: FakeRecorder | None = None) -> CUDAGraphModule:
    """Let `wrapper` capture CPU calls through `recorder`."""
    wrapper._device_type = "cpu"
    wrapper._record = recorder if recorder is not None else FakeRecorder()
    return wrapper


def never(forward, device):
    raise AssertionError("the wrapper tried to capture a call that must run eagerly")


def rand(*shape, seed=0, **kw):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **kw)


# --- keying ---


def test_signature_same_shape_same_key_other_shape_other_key():
    x = rand(1, 3, 8, 8)
    key, tensors = signature((x,), {})
    assert tensors == [x]
    assert signature((rand(1, 3, 8, 8, seed=1),), {})[0] == key  # values are not in the key
    assert signature((rand(2, 3, 8, 8),), {})[0] != key
    assert signature((rand(1, 3, 8, 9),), {})[0] != key


def test_signature_dtype_strides_and_modes():
    x = rand(1, 3, 8, 8)
    key = signature((x,), {})[0]
    assert signature((x.double(),), {})[0] != key
    assert signature((x.contiguous(memory_format=torch.channels_last),), {})[0] != key
    assert signature((x.transpose(2, 3),), {})[0] != key  # same shape (square), other strides
    assert signature((x.clone().requires_grad_(),), {})[0] != key
    with torch.no_grad():
        no_grad = signature((x,), {})[0]
    with torch.inference_mode():
        inference = signature((x,), {})[0]
    assert len({key, no_grad, inference}) == 3
    with linattn.backend("reference"):
        assert signature((x,), {})[0] != key


def test_signature_keys_the_cuda_autocast_dtype(monkeypatch):
    """CUDA autocast to fp16 and to bf16 are two graphs (read through torch's functions: no GPU here)."""
    x = rand(1, 3, 8, 8)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    keys = set()
    for dtype in (torch.float16, torch.bfloat16):
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type, dtype=dtype: dtype)
        keys.add(signature((x,), {})[0])
    assert len(keys) == 2


def test_signature_structure_and_constants():
    x, y = rand(1, 3, 8, 8), rand(1, 1, 8, 8)
    key = signature((x,), {"box_mask": None})[0]
    assert signature((x,), {})[0] != key
    assert signature((x,), {"box_mask": y})[0] != key
    assert signature((x, None), {})[0] != key  # positional, not keyword
    ints = [signature((x, v), {})[0] for v in (1, True, 1.0, 2, "1")]  # 1 == True == 1.0, but not as keys
    assert len(set(ints)) == len(ints)
    assert signature(([x, y],), {})[0] != signature(((x, y),), {})[0]
    assert signature(({"a": x},), {})[0] != signature(({"b": x},), {})[0]


def test_rebuild_gives_back_the_call():
    Pair = namedtuple("Pair", "a b")
    x, y, z = rand(1, 2), rand(3), rand(2, 2)
    args, kwargs = (x, [y, None, 3], Pair(z, "s")), {"k": {"t": x, "n": 2.5}, "f": False}
    key, tensors = signature(args, kwargs)
    assert [id(t) for t in tensors] == [id(x), id(y), id(z), id(x)]
    statics = [t.clone() for t in tensors]
    got_args, got_kwargs = _rebuild(key[0], iter(statics))
    assert got_args[0] is statics[0] and got_args[1] == [statics[1], None, 3]
    assert type(got_args[2]) is Pair and got_args[2].a is statics[2] and got_args[2].b == "s"
    assert got_kwargs == {"k": {"t": statics[3], "n": 2.5}, "f": False}


@pytest.mark.parametrize(
    "arg",
    [object(), lambda: 0, {object(): 1}, rand(4).to_sparse()],
    ids=["object", "function", "dict-key", "sparse"],
)
def test_signature_unkeyable(arg):
    with pytest.raises(Unkeyable):
        signature((rand(1), arg), {})


# --- the cache, with the injected recorder ---


def test_capture_per_signature_then_replay():
    model = linattn.optimize(tiny_convnet())
    recorder = FakeRecorder()
    wrapper = on_cpu(CUDAGraphModule(model), recorder)
    for seed in range(3):  # new values, same signature: one capture, a replay per call
        x = rand(2, 3, 8, 8, seed=seed)
        torch.testing.assert_close(wrapper(x), model(x), rtol=0, atol=0)
    x = rand(1, 3, 12, 12, seed=9)  # another shape: a second capture
    torch.testing.assert_close(wrapper(x), model(x), rtol=0, atol=0)
    assert recorder.captures == 2
    info = wrapper.cache_info()
    assert info["graphs"] == 2 and info["captures"] == 2 and info["replays"] == 4 and info["eager"] == {}


def test_dtype_and_layout_capture_again():
    model = linattn.optimize(tiny_convnet())
    recorder = FakeRecorder()
    wrapper = on_cpu(CUDAGraphModule(model), recorder)
    x = rand(1, 3, 8, 8)
    wrapper(x)
    wrapper(x.contiguous(memory_format=torch.channels_last))
    out = wrapper(x.double())
    assert recorder.captures == 3 and out.dtype == torch.float64


def test_inputs_are_copied_not_captured_by_reference():
    """The static input is the wrapper's own buffer: writing to the caller's tensor afterwards changes nothing."""
    model = linattn.optimize(tiny_convnet())
    wrapper = on_cpu(CUDAGraphModule(model))
    x = rand(1, 3, 8, 8)
    wrapper(x)
    x2 = rand(1, 3, 8, 8, seed=5)
    want = model(x2)
    x.copy_(torch.full_like(x, 3.0))  # the first call's tensor, changed after the call
    torch.testing.assert_close(wrapper(x2), want, rtol=0, atol=0)


def test_lru_keeps_max_graphs():
    model = linattn.optimize(tiny_convnet())
    recorder = FakeRecorder()
    wrapper = on_cpu(CUDAGraphModule(model, max_graphs=2), recorder)
    a, b, c = (rand(1, 3, s, s) for s in (6, 7, 8))
    wrapper(a), wrapper(b), wrapper(a)  # a is now the most recently used
    wrapper(c)  # evicts b
    assert wrapper.cache_info()["graphs"] == 2 and wrapper.cache_info()["evictions"] == 1
    wrapper(a)
    assert recorder.captures == 3  # a was kept
    torch.testing.assert_close(wrapper(b), model(b), rtol=0, atol=0)
    assert recorder.captures == 4  # b was not: captured again
    assert wrapper.cache_info()["graphs"] == 2


def test_clone_outputs_default_returns_fresh_tensors():
    model = linattn.optimize(tiny_squeezesam())
    wrapper = on_cpu(CUDAGraphModule(model))
    x1, x2 = rand(1, 5, 32, 32, seed=1), rand(1, 5, 32, 32, seed=2)
    masks1, iou1 = wrapper(x1)
    kept = masks1.clone(), iou1.clone()
    masks2, iou2 = wrapper(x2)
    torch.testing.assert_close((masks1, iou1), kept, rtol=0, atol=0)  # the next call left them alone
    torch.testing.assert_close((masks2, iou2), model(x2), rtol=0, atol=0)
    assert masks2.data_ptr() != masks1.data_ptr()


def test_clone_outputs_false_returns_the_static_buffers():
    """The documented aliasing: the outputs are the graph's buffers, overwritten by the next call."""
    model = linattn.optimize(tiny_squeezesam())
    wrapper = on_cpu(CUDAGraphModule(model, clone_outputs=False))
    x1, x2 = rand(1, 5, 32, 32, seed=1), rand(1, 5, 32, 32, seed=2)
    out1 = wrapper(x1)
    torch.testing.assert_close(out1, model(x1), rtol=0, atol=0)
    out2 = wrapper(x2)
    assert out2[0] is out1[0] and out2[1] is out1[1]
    torch.testing.assert_close(out1, model(x2), rtol=0, atol=0)  # overwritten


def test_keyword_arguments_and_none():
    model = linattn.optimize(tiny_squeezesam())
    recorder = FakeRecorder()
    wrapper = on_cpu(CUDAGraphModule(model), recorder)
    image, box = rand(1, 3, 32, 32, seed=3), (rand(1, 1, 32, 32, seed=4) > 0).float()
    torch.testing.assert_close(wrapper(image, box_mask=box), model(image, box_mask=box), rtol=0, atol=0)
    torch.testing.assert_close(wrapper(image, box_mask=None), model(image), rtol=0, atol=0)
    torch.testing.assert_close(wrapper(image, box), model(image, box), rtol=0, atol=0)
    assert recorder.captures == 3


def test_failed_capture_runs_eagerly_once_warned():
    model = linattn.optimize(tiny_convnet())
    recorder = FakeRecorder(fail=True)
    wrapper = on_cpu(CUDAGraphModule(model), recorder)
    x = rand(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="capture failed.*operation not permitted"):
        torch.testing.assert_close(wrapper(x), model(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(wrapper(x), model(x), rtol=0, atol=0)
    assert recorder.warmups == 1  # not tried again
    assert wrapper.cache_info()["eager"] == {"capture failed": 2} and wrapper.cache_info()["captures"] == 0


def test_a_failed_capture_stays_out_of_the_lru_and_is_warned_once():
    """A signature whose capture failed takes no graph's place, and is not warmed up, captured and warned of
    again when the graphs it would have pushed out come and go; reset() forgets it."""
    model = linattn.optimize(tiny_convnet())
    recorder = FakeRecorder()
    wrapper = on_cpu(CUDAGraphModule(model, max_graphs=1), recorder)
    bad, other = rand(1, 3, 8, 8), [rand(1, 3, s, s) for s in (5, 6, 7)]
    recorder.fail = True
    with pytest.warns(RuntimeWarning, match="capture failed"):
        wrapper(bad)
    recorder.fail = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in (*other, bad, *other, bad):
            torch.testing.assert_close(wrapper(x), model(x), rtol=0, atol=0)
    info = wrapper.cache_info()
    assert info["eager"] == {"capture failed": 3} and info["graphs"] == 1 and recorder.warmups == 7
    wrapper.reset()
    wrapper(bad)
    assert recorder.captures == 7


def test_outputs_in_other_objects_run_eagerly():
    """Outputs whose tensors sit in an object torch.utils._pytree does not flatten could not be returned fresh (the
    next call would overwrite them): the signature runs eagerly, warned."""
    from dataclasses import dataclass

    @dataclass
    class Output:
        y: torch.Tensor

    class Model(nn.Module):
        def forward(self, x):
            return Output(x * 2)

    wrapper = on_cpu(CUDAGraphModule(Model().eval()))
    a, b = rand(4), rand(4, seed=2)
    with pytest.warns(RuntimeWarning, match="capture failed.*outputs hold a Output, neither"):
        first = wrapper(a)
    second = wrapper(b)
    torch.testing.assert_close((first.y, second.y), (a * 2, b * 2), rtol=0, atol=0)
    assert wrapper.cache_info()["eager"] == {"capture failed": 2}


def test_a_wrapper_captured_inside_anothers_capture_leaves_it_its_keep_alive():
    """An inner wrapper's capture during the outer's (its first call in the outer's warm-up) hands the outer
    capture back its list of tensors to keep (linattn.graphs.keep_alive)."""
    from linattn.graphs import keep_alive

    inner = on_cpu(CUDAGraphModule(linattn.optimize(tiny_convnet())))
    outer = on_cpu(CUDAGraphModule(nn.Sequential(inner).eval()))
    kept = torch.ones(1)
    record = outer._record

    def recorder(forward, device):
        forward()  # the inner wrapper captures here
        assert keep_alive(kept)
        return record(forward, device)

    outer._record = recorder
    x = rand(1, 3, 8, 8)
    torch.testing.assert_close(outer(x), inner.module(x), rtol=0, atol=0)
    (graph,) = outer._graphs.values()
    assert any(t is kept for t in graph.keep)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_jit_trace_sees_the_model():
    """torch.jit.trace (the legacy ONNX export's) records the model's ops, not copies into a graph's buffers."""
    wrapper = on_cpu(CUDAGraphModule(linattn.optimize(tiny_convnet())))
    wrapper._record = never
    x = rand(1, 3, 8, 8)
    traced = torch.jit.trace(wrapper, x, check_trace=False)
    torch.testing.assert_close(traced(x), wrapper.module(x))


def test_graphs_dropped_on_load_mode_switch_and_move():
    model = linattn.optimize(tiny_convnet())
    recorder = FakeRecorder()
    wrapper = on_cpu(CUDAGraphModule(model), recorder)
    x = rand(1, 3, 8, 8)
    for change in (
        lambda: wrapper.load_state_dict(tiny_convnet().state_dict()),
        lambda: wrapper.eval(),
        lambda: wrapper.float(),
        wrapper.reset,
    ):
        wrapper(x)
        assert wrapper.cache_info()["graphs"] == 1
        change()
        assert wrapper.cache_info()["graphs"] == 0
    # new weights are seen: the capture after load_state_dict folds them again
    new = tiny_convnet(seed=7)
    wrapper.load_state_dict(new.state_dict())
    torch.testing.assert_close(wrapper(x), new(x), rtol=1e-5, atol=1e-5)


def test_graph_keeps_what_it_reads_alive():
    """The folded constants a graph reads stay referenced after the model drops them (a mode switch of the
    inner model, which the wrapper does not see)."""
    model = linattn.optimize(tiny_convnet())
    wrapper = on_cpu(CUDAGraphModule(model))
    wrapper(rand(1, 3, 8, 8))
    entry = next(iter(wrapper._graphs.values()))
    folded = [t for m in model.modules() for b in (m, *getattr(m, "_blocks", ())) for t in _cached(b)]
    assert folded, "optimize folded nothing: the test model no longer exercises the cache"
    model.eval()  # drops the modules' cached constants
    assert not [t for m in model.modules() for b in (m, *getattr(m, "_blocks", ())) for t in _cached(b)]
    kept = {id(t) for t in tree_leaves(entry.keep)}
    assert all(id(t) in kept for t in folded)
    assert len(_kept_tensors(model)) == len(list(model.parameters())) + len(list(model.buffers()))


def test_graph_keeps_what_its_ops_ask_it_to():
    """keep_alive: what an op hands the wrapper's capture (cuDNN's fp32 vectors) is kept with the graph; outside
    a capture of the wrapper's, nothing is kept and the op is told so."""
    from linattn.graphs import keep_alive

    extra = torch.zeros(3)
    assert not keep_alive(extra)

    class Asks(nn.Module):
        def forward(self, x):
            keep_alive(extra)
            return x * 2

    wrapper = on_cpu(CUDAGraphModule(Asks().eval()))
    wrapper(rand(2, 3))
    entry = next(iter(wrapper._graphs.values()))
    assert any(t is extra for t in entry.keep)
    assert not keep_alive(extra)  # the capture is over


def _cached(module) -> list:
    return tree_leaves(module.__dict__.get("_linattn_constants", ()))


# --- fallbacks (the wrapper as it is: captures only on CUDA) ---


def test_cpu_input_runs_the_model_eagerly():
    model = linattn.optimize(tiny_squeezesam())
    wrapper = CUDAGraphModule(model)
    wrapper._record = never
    x = rand(1, 5, 32, 32)
    got, want = wrapper(x), model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert wrapper.cache_info()["eager"] == {"not cuda": 1} and wrapper.cache_info()["graphs"] == 0


def test_inputs_on_two_devices_run_eagerly():
    """Inputs on the capturing device and another: not captured, counted as "not cuda"."""

    class Add(nn.Module):
        def forward(self, a, b):
            return a if b.device.type == "meta" else a + b

    wrapper = on_cpu(CUDAGraphModule(Add().eval()), never)
    with torch.no_grad():
        wrapper(torch.ones(2), torch.ones(2, device="meta"))
    assert wrapper.cache_info()["eager"] == {"not cuda": 1} and wrapper.cache_info()["graphs"] == 0


def test_training_with_grad_runs_eagerly_with_autograd():
    model = linattn.optimize(tiny_convnet().train().requires_grad_())
    wrapper = on_cpu(CUDAGraphModule(model))
    wrapper._record = never
    x = rand(2, 3, 8, 8)
    wrapper(x).sum().backward()
    assert all(p.grad is not None for p in wrapper.parameters())
    assert wrapper.cache_info()["eager"] == {"training": 1}


def test_autograd_in_eval_runs_eagerly():
    model = linattn.optimize(tiny_convnet())
    wrapper = on_cpu(CUDAGraphModule(model))
    wrapper._record = never
    x = rand(1, 3, 8, 8)
    model.requires_grad_()
    with pytest.warns(RuntimeWarning, match="grad mode is on .* runs eagerly, without its CUDA graphs"):
        assert wrapper(x).requires_grad  # the parameters require grad
    model.requires_grad_(False)
    x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per wrapper
        wrapper(x).sum().backward()
    assert x.grad is not None
    assert wrapper.cache_info()["eager"] == {"autograd": 2}
    wrapper._record = FakeRecorder()
    with torch.no_grad():
        wrapper(x)
    assert wrapper.cache_info()["captures"] == 1


@pytest.mark.parametrize("arg", [object(), "none"], ids=["object", "no-tensor"])
def test_unkeyable_or_tensorless_input_runs_eagerly(arg):
    class Takes(nn.Module):
        def forward(self, x, extra=None):
            return torch.ones(2) if x is None else x * 2

    wrapper = on_cpu(CUDAGraphModule(Takes().eval()))
    wrapper._record = never
    if arg == "none":
        torch.testing.assert_close(wrapper(None), torch.ones(2))
        assert wrapper.cache_info()["eager"] == {"no tensor": 1}
    else:
        torch.testing.assert_close(wrapper(torch.ones(3), extra=arg), torch.full((3,), 2.0))
        assert wrapper.cache_info()["eager"] == {"unkeyable": 1}


def test_arguments_checked():
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphModule(nn.Identity(), max_graphs=0)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphModule(nn.Identity(), warmup=0)
    with pytest.raises(TypeError, match="nn.Module"):
        CUDAGraphModule(lambda x: x)


# --- state_dict, copies, optimize ---


def test_state_dict_keys_are_the_models():
    plain = tiny_squeezesam()
    wrapper = linattn.optimize(plain, cuda_graph=True)
    state = wrapper.state_dict()
    assert list(state) == list(wrapper.module.state_dict()) and set(state) == set(plain.state_dict())
    assert state._metadata == wrapper.module.state_dict()._metadata  # module versions too (BatchNorm's)
    other = linattn.optimize(tiny_squeezesam(seed=3), cuda_graph=True)
    other.load_state_dict(plain.state_dict())  # strict
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    plain2 = tiny_squeezesam()
    plain2.load_state_dict(state)  # and back into the plain model
    # inside a parent, the wrapper's keys are the parent's prefix + the model's keys, both ways
    parent = nn.ModuleDict({"encoder": wrapper})
    keys = list(parent.state_dict())
    assert keys == ["encoder." + k for k in state]
    parent.load_state_dict(parent.state_dict())
    assert [n for n, _ in wrapper.named_parameters()][0].startswith("module.")
    # keys missing or unexpected are named as the model's, at the top and inside a parent
    first = next(iter(state))
    partial = {k: v for k, v in state.items() if k != first} | {"bogus.weight": state[first]}
    found = wrapper.load_state_dict(partial, strict=False)
    assert found.missing_keys == [first] and found.unexpected_keys == ["bogus.weight"]
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "encoder.{re.escape(first)}"'):
        parent.load_state_dict({f"encoder.{k}": v for k, v in partial.items()})


def test_a_submodule_in_train_mode_runs_eagerly():
    """A BatchNorm left re-estimating in an eval model: captured, its warm-up runs would update its statistics
    again for each signature; it runs eagerly, as often as called (one warning), until the mode changes."""
    model = tiny_convnet()
    model[1].train()
    wrapper = on_cpu(CUDAGraphModule(model), never)
    x = rand(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="submodule '1' is in train mode"):
        wrapper(x)
    wrapper(x)
    assert int(model[1].num_batches_tracked) == 2 and wrapper.cache_info()["eager"] == {"capture failed": 2}
    wrapper._record = FakeRecorder()
    wrapper.eval()  # every submodule: the signature is captured now
    wrapper(x)
    assert wrapper.cache_info()["captures"] == 1 and int(model[1].num_batches_tracked) == 2


def test_deepcopy_starts_without_graphs():
    model = linattn.optimize(tiny_convnet())
    wrapper = on_cpu(CUDAGraphModule(model, max_graphs=3))
    x = rand(1, 3, 8, 8)
    wrapper(x)
    twin = copy.deepcopy(wrapper)
    assert twin.cache_info()["graphs"] == 0 and twin.max_graphs == 3 and twin.module is not model
    twin.load_state_dict(tiny_convnet(seed=8).state_dict())  # loads into the copy only
    assert not torch.equal(twin.module[0].weight, model[0].weight)
    torch.testing.assert_close(twin(x), twin.module(x), rtol=0, atol=0)


def test_optimize_cuda_graph_returns_the_wrapper():
    plain = tiny_convnet()
    wrapper, report = linattn.optimize(plain, cuda_graph=True, return_report=True)
    assert isinstance(wrapper, CUDAGraphModule) and report.counts() == {"ConvBNAct": 2}
    assert wrapper.clone_outputs and wrapper.max_graphs == 8
    assert type(linattn.optimize(plain)) is not CUDAGraphModule
    x = rand(1, 3, 8, 8)
    torch.testing.assert_close(wrapper(x), linattn.optimize(plain)(x), rtol=0, atol=0)  # CPU: eager


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip note")
def test_bench_e2e_skips_graph_providers_on_cpu(tmp_path):
    from linattn.benchmarks import bench_e2e

    argv = ["--quick", "--model", "l0", "--providers", "linattn-graph", "compile-reduce-overhead"]
    rows = bench_e2e.main([*argv, "--out", str(tmp_path)])
    assert [r["provider"] for r in rows] == ["linattn-graph", "compile-reduce-overhead"]
    assert all(r["ms"] is None and r["note"].startswith("skipped: ") and "GPU" in r["note"] for r in rows)


# --- on a GPU: capture and replay ---


def gpu_model(build, dtype=torch.float32):
    torch.manual_seed(0)
    return build().to("cuda", dtype)


@requires_cuda
@pytest.mark.parametrize("clone_outputs", [True, False], ids=["clone", "alias"])
def test_gpu_efficientvit_capture_and_replay(clone_outputs):
    model = linattn.optimize(gpu_model(lambda: randomize(efficientvit_sam_encoder("l0", embed_size=None), 11).eval()))
    wrapper = CUDAGraphModule(model, clone_outputs=clone_outputs)
    inputs = [torch.randn(b, 3, s, s, device="cuda") for b, s in ((1, 64), (1, 64), (2, 64), (1, 96))]
    linattn._tune._warned.discard("capture")  # it warns once per process
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = []
        for x in inputs:
            got = wrapper(x)
            want = model(x)
            assert rel_err(got, want) < 1e-5, (tuple(x.shape), rel_err(got, want))
            outs.append((got, got.clone()))
        info = wrapper.cache_info()
        assert info["captures"] == 3 and info["replays"] == 4 and info["eager"] == {}, info
        assert not [w for w in caught if "during CUDA-graph capture" in str(w.message)]  # warm-up measured first
        first, first_value = outs[0]
        second, _ = outs[1]
        if clone_outputs:
            assert torch.equal(first, first_value) and first.data_ptr() != second.data_ptr()
        else:
            assert second is first  # the same static buffer, overwritten by the second call
            assert torch.equal(first, outs[1][1])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_squeezesam_tuple_outputs(dtype):
    model = linattn.optimize(gpu_model(tiny_squeezesam, dtype))
    wrapper = linattn.optimize(gpu_model(tiny_squeezesam, dtype), cuda_graph=True)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(2, 5, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            got, want = wrapper(x.to(dtype)), model(x.to(dtype))
            assert isinstance(got, tuple) and len(got) == 2
            for g, w in zip(got, want, strict=True):
                assert rel_err(g, w) < (1e-5 if dtype == torch.float32 else 1e-2), rel_err(g, w)
    assert wrapper.cache_info()["captures"] == 1 and wrapper.cache_info()["replays"] == 3


@requires_cuda
def test_gpu_a_failed_capture_leaves_the_callers_stream_and_runs_eagerly():
    """A model that synchronises with the host (.item()) cannot be captured: it runs eagerly, correctly, and the
    caller's stream is current again (torch.cuda.graph restores it only after ending the capture, which raises)."""

    class Syncs(nn.Module):
        def forward(self, x):
            return x * float(x.abs().max().item())

    wrapper = CUDAGraphModule(Syncs().eval())
    x = torch.randn(64, device="cuda")
    stream = torch.cuda.current_stream()
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="capture failed"):
        out = wrapper(x)
    assert torch.cuda.current_stream() == stream
    torch.testing.assert_close(out, x * x.abs().max())
    torch.testing.assert_close(wrapper(x), x * x.abs().max())
    assert wrapper.cache_info()["eager"] == {"capture failed": 2}


@requires_cuda
def test_gpu_inside_an_outer_capture_runs_eagerly():
    model = linattn.optimize(gpu_model(tiny_convnet))
    wrapper = CUDAGraphModule(model)
    x = torch.randn(1, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        want = model(x)
        wrapper(x)  # captured here
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.graph(graph, stream=stream):
            out = wrapper(x)  # recorded into the caller's graph
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, want)
    assert wrapper.cache_info()["eager"] == {"capturing": 1}
