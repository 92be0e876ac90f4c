"""Bad input gets a clear error naming the op and the argument, on every path (eager and fake)."""

from fractions import Fraction

import pytest
import torch

import linattn


def _ok(shape=(2, 3, 7, 8)):
    return torch.randn(shape)


CASES = [
    ("rank", dict(q=torch.randn(3, 7, 8)), ValueError, "relu_linear_attention: q must be 4-D"),
    ("k shape", dict(k=_ok((2, 3, 6, 8))), ValueError, "relu_linear_attention: k must have q's shape"),
    ("k head dim", dict(k=_ok((2, 3, 7, 16))), ValueError, "relu_linear_attention: k must have q's shape"),
    ("v tokens", dict(v=_ok((2, 3, 5, 8))), ValueError, "relu_linear_attention: v must match q in (B, H, N)"),
    ("v heads", dict(v=_ok((2, 4, 7, 8))), ValueError, "v must match q"),
    ("head dim", dict(q=_ok((2, 3, 7, 129)), k=_ok((2, 3, 7, 129))), ValueError, "q head dim 129 is larger"),
    ("value dim", dict(v=_ok((2, 3, 7, 200))), ValueError, "v head dim 200 is larger"),
    ("int dtype", dict(q=torch.ones(2, 3, 7, 8, dtype=torch.int64)), TypeError, "q must be float16"),
    ("mixed dtype", dict(v=_ok().half()), TypeError, "must share a dtype"),
    ("empty N", dict(q=_ok((2, 3, 0, 8)), k=_ok((2, 3, 0, 8)), v=_ok((2, 3, 0, 8))), ValueError, "q is empty"),
    ("empty batch", dict(q=_ok((0, 3, 7, 8))), ValueError, "q is empty"),
    ("not a tensor", dict(k=[[1.0]]), TypeError, "k must be a torch.Tensor"),
    ("device", dict(v=torch.empty(2, 3, 7, 8, device="meta")), ValueError, "must be on one device"),
    ("k device", dict(k=torch.empty(2, 3, 7, 8, device="meta")), ValueError, "k is on meta, q on cpu"),
]


@pytest.mark.parametrize(("case", "bad", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_relu_linear_attention_bad_input(case, bad, error, message):
    args = dict(q=_ok(), k=_ok(), v=_ok())
    args.update(bad)
    with pytest.raises(error, match=f"linattn.*{message}".replace("(", r"\(").replace(")", r"\)")):
        linattn.relu_linear_attention(**args)


PACKED_CASES = [
    ("rank", torch.randn(2, 48, 25), 16, ValueError, "lite_mla_attention: qkv must be 4-D"),
    ("channels", torch.randn(2, 50, 5, 5), 16, ValueError, "qkv channels \\(50\\) must be a multiple of 3\\*dim"),
    ("channels 2*dim", torch.randn(2, 32, 5, 5), 16, ValueError, "qkv channels \\(32\\) must be a multiple of 3\\*dim"),
    ("dim zero", torch.randn(2, 48, 5, 5), 0, ValueError, "dim must be in \\[1, 128\\]"),
    ("dim large", torch.randn(2, 3 * 130, 5, 5), 130, ValueError, "dim must be in"),
    ("int", torch.ones(2, 48, 5, 5, dtype=torch.int32), 16, TypeError, "qkv must be float16"),
    ("empty", torch.randn(2, 48, 0, 5), 16, ValueError, "qkv is empty"),
]


@pytest.mark.parametrize(("case", "qkv", "dim", "error", "message"), PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_lite_mla_attention_bad_input(case, qkv, dim, error, message):
    with pytest.raises(error, match=f"linattn.*{message}"):
        linattn.lite_mla_attention(qkv, dim)


def _aggregation_args(**bad):
    C, D = 48, 8
    args = dict(
        qkv=torch.randn(1, C, 5, 5),
        dw_weights=[torch.randn(C, 1, 3, 3)],
        pw_weights=[torch.randn(C, D, 1, 1)],
        heads=2,
        dw_biases=None,
        pw_biases=None,
    )
    args.update(bad)
    return args


AGGREGATION_CASES = [
    ("heads", dict(heads=5), ValueError, "heads must be >= 1 and divide"),
    ("heads zero", dict(heads=0), ValueError, "heads must be >= 1"),
    ("heads divide C not 3C", dict(heads=3), ValueError, "heads must be >= 1 and divide"),  # 48 % 3 == 0, 48 % 9 != 0
    (
        "group too large",
        dict(
            qkv=torch.randn(1, 387, 2, 2),
            dw_weights=[torch.randn(387, 1, 3, 3)],
            pw_weights=[torch.randn(387, 129, 1, 1)],
            heads=1,
        ),
        ValueError,
        r"heads gives a group size C/\(3\*heads\) = 129, larger than the supported 128",
    ),
    ("no scale", dict(dw_weights=[], pw_weights=[]), ValueError, "pw_weights needs one weight per scale"),
    ("scales mismatch", dict(pw_weights=[]), ValueError, "pw_weights needs one weight per scale"),
    ("even kernel", dict(dw_weights=[torch.randn(48, 1, 4, 4)]), ValueError, r"dw_weights\[0\] must be \(C, 1, k, k\)"),
    ("dw channels", dict(dw_weights=[torch.randn(40, 1, 3, 3)]), ValueError, r"dw_weights\[0\] must be"),
    (
        "large kernel",
        dict(dw_weights=[torch.randn(48, 1, 11, 11)]),
        ValueError,
        r"dw_weights\[0\] must be .* k odd <= 9",
    ),
    (
        "non-square kernel",
        dict(dw_weights=[torch.randn(48, 1, 3, 5)]),
        ValueError,
        r"dw_weights\[0\] must be \(C, 1, k, k\)",
    ),
    (
        "dw in channels",
        dict(dw_weights=[torch.randn(48, 2, 3, 3)]),
        ValueError,
        r"dw_weights\[0\] must be \(C, 1, k, k\)",
    ),
    (
        "dw device",
        dict(dw_weights=[torch.empty(48, 1, 3, 3, device="meta")]),
        ValueError,
        r"dw_weights\[0\] is on meta",
    ),
    ("pw shape", dict(pw_weights=[torch.randn(48, 16, 1, 1)]), ValueError, r"pw_weights\[0\] must be \(C, D, 1, 1\)"),
    ("pw rank", dict(pw_weights=[torch.randn(48, 8)]), ValueError, r"pw_weights\[0\] must be 4-D"),
    ("bias shape", dict(dw_biases=[torch.randn(47)]), ValueError, r"dw_biases\[0\] must be \(48,\)"),
    ("bias rank", dict(dw_biases=[torch.randn(48, 1)]), ValueError, r"dw_biases\[0\] must be 1-D"),
    (
        "bias device",
        dict(pw_biases=[torch.empty(48, device="meta")]),
        ValueError,
        r"pw_biases\[0\] must be \(48,\) on cpu",
    ),
    ("bias count", dict(pw_biases=[torch.randn(48), torch.randn(48)]), ValueError, "pw_biases needs no entry or one"),
    ("int qkv", dict(qkv=torch.ones(1, 48, 5, 5, dtype=torch.int32)), TypeError, "qkv must be float16"),
    ("weight device", dict(pw_weights=[torch.empty(48, 8, 1, 1, device="meta")]), ValueError, r"pw_weights\[0\] is on"),
    ("empty", dict(qkv=torch.randn(1, 48, 0, 5)), ValueError, "qkv is empty"),
]


@pytest.mark.parametrize(("case", "bad", "error", "message"), AGGREGATION_CASES, ids=[c[0] for c in AGGREGATION_CASES])
def test_multiscale_aggregate_bad_input(case, bad, error, message):
    with pytest.raises(error, match=f"linattn.multiscale_aggregate: {message}"):
        linattn.multiscale_aggregate(**_aggregation_args(**bad))


@pytest.mark.parametrize(("case", "bad", "error", "message"), AGGREGATION_CASES, ids=[c[0] for c in AGGREGATION_CASES])
def test_lite_mla_context_bad_input(case, bad, error, message):
    with pytest.raises(error, match=f"linattn.lite_mla_context: {message}"):
        linattn.lite_mla_context(**_aggregation_args(**bad), dim=8)


def test_lite_mla_context_dim_must_match():
    with pytest.raises(ValueError, match=r"linattn.lite_mla_context: dim must equal qkv's channels / \(3\*heads\) = 8"):
        linattn.lite_mla_context(**_aggregation_args(), dim=16)


@pytest.mark.parametrize("op", ["multiscale_aggregate", "lite_mla_context"])
def test_aggregation_op_checks_the_bias_count(op):
    """torch.ops.linattn.* takes the bias lists as they are (the functionals' None handling is not there): a list
    of one bias per scale or none, checked by the op itself, not zipped away."""
    args = _aggregation_args()
    extra = (8, 1e-15) if op == "lite_mla_context" else ()  # dim, eps
    call = (args["qkv"], args["dw_weights"], args["pw_weights"], 2, *extra)
    two = [torch.randn(48), torch.randn(48)]
    with pytest.raises(ValueError, match=f"linattn.{op}: dw_biases needs no entry or one per scale, got 2 for 1"):
        getattr(torch.ops.linattn, op)(*call, two, [])


def test_largest_head_and_group_dims_are_accepted():
    """The limits are inclusive: head dim 128 (q's D, v's E, lite_mla_attention's dim) and the aggregation's group
    size 128 run (on the reference here), 129 is refused (the cases above)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 3, 128, generator=gen) for _ in range(3))
    want = linattn.reference.relu_linear_attention(q, k, v, 1e-15)
    torch.testing.assert_close(linattn.relu_linear_attention(q, k, v), want)
    qkv = torch.randn(1, 3 * 128, 2, 2, generator=gen)
    assert linattn.lite_mla_attention(qkv, 128).shape == (1, 128, 2, 2)
    dw, pw = [torch.randn(384, 1, 3, 3, generator=gen)], [torch.randn(384, 128, 1, 1, generator=gen)]
    assert linattn.multiscale_aggregate(qkv, dw, pw, 1).shape == (1, 768, 2, 2)


def test_bad_input_under_compile_names_the_op():
    """The fake kernel checks too, so a compiled call fails with the same message."""
    torch._dynamo.reset()
    fn = torch.compile(linattn.relu_linear_attention, fullgraph=True)
    with pytest.raises(Exception, match="linattn.relu_linear_attention: k must have q's shape"):
        fn(_ok(), _ok((2, 3, 6, 8)), _ok())


def test_forced_kernel_backend_rejects_what_it_cannot_run():
    """float64 runs on the reference only: auto falls back, a forced kernel backend says why it can't."""
    q = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    assert linattn.relu_linear_attention(q, q, q).dtype == torch.float64
    for name in ("triton", "cuda"):
        with linattn.backend(name), pytest.raises(RuntimeError, match=f"relu_linear_attention: backend '{name}'"):
            linattn.relu_linear_attention(q, q, q)


def test_an_image_past_int32_offsets_runs_on_the_reference_only():
    """The kernels index within an image in int32: one image's span (not the batch's) decides. Meta tensors: no
    memory."""
    from linattn.ops._common import IMAGE_ELEMENTS, kernel_problem

    n = IMAGE_ELEMENTS // 1024 + 1  # 1024 rows of n: one image just past the limit
    big = torch.empty(8, 1024, n, device="meta", dtype=torch.bfloat16)
    assert kernel_problem(big[:, :-1]) is None  # each image below the limit; 8 of them over it: int64 across images
    assert "one image spans" in kernel_problem(big)
    assert "one image spans" in kernel_problem(big[:, :-1], big)  # any of the call's tensors
    assert "int32 offsets" in kernel_problem(big[:1, :1], out_elements=IMAGE_ELEMENTS + 1)  # an output not yet made
    assert kernel_problem(big[:1, :1], out_elements=IMAGE_ELEMENTS) is None  # the limit itself is in
    corners = big[:, ::1023, :: n - 1]  # 4 elements an image, at its first and last offsets
    assert corners.numel() == 8 * 4 and "one image spans" in kernel_problem(corners)
    assert kernel_problem(big.to(torch.float64)[:1, :1]) == "dtype torch.float64 runs on the reference backend only"


# --- messages a new user ran into (issue 11) ---


def _message(call) -> str:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(("name", "bad"), [("k", dict(k=_ok().half())), ("v", dict(v=_ok().half()))])
def test_mixed_dtype_names_the_odd_tensor_once(name, bad):
    args = {**dict(q=_ok(), k=_ok(), v=_ok()), **bad}
    message = _message(lambda: linattn.relu_linear_attention(**args))
    want = f"linattn.relu_linear_attention: {name} has dtype torch.float16, q torch.float32: q, k and v must share"
    assert message.startswith(want), message


def test_mixed_device_names_the_odd_tensor_once():
    v = torch.empty(2, 3, 7, 8, device="meta")
    message = _message(lambda: linattn.relu_linear_attention(_ok(), _ok(), v))
    assert message == "linattn.relu_linear_attention: v is on meta, q on cpu: q, k and v must be on one device"


def _context(**bad):
    return linattn.lite_mla_context(**{**_aggregation_args(), "dim": 8, **bad})


INT_CASES = [
    ("lite_mla_attention", "dim", lambda v: linattn.lite_mla_attention(torch.randn(1, 48, 5, 5), dim=v)),
    ("multiscale_aggregate", "heads", lambda v: linattn.multiscale_aggregate(**_aggregation_args(heads=v))),
    ("lite_mla_context", "heads", lambda v: _context(heads=v)),
    ("lite_mla_context", "dim", lambda v: _context(dim=v)),
    (
        "conv_bn_act",
        "groups",
        lambda v: linattn.conv_bn_act(torch.randn(1, 4, 5, 5), torch.randn(4, 2, 1, 1), groups=v),
    ),
]


@pytest.mark.parametrize(("op", "arg", "call"), INT_CASES, ids=[f"{c[0]}-{c[1]}" for c in INT_CASES])
@pytest.mark.parametrize("value", [2.0, 16.0, 2.5, True, "2"], ids=repr)
def test_int_arguments_reject_other_types(op, arg, call, value):
    """A float (even a whole one) or a bool is a TypeError naming the op and argument, not a schema dump;
    groups=2.5 used to be truncated to 2."""
    with pytest.raises(TypeError, match=f"^linattn.{op}: {arg} must be an int, got {type(value).__name__} "):
        call(value)


def test_int_arguments_take_numpy_ints():
    np = pytest.importorskip("numpy")
    qkv = torch.randn(1, 48, 5, 5)
    assert torch.equal(linattn.lite_mla_attention(qkv, np.int64(16)), linattn.lite_mla_attention(qkv, 16))
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 1, 1)
    assert torch.equal(linattn.conv_bn_act(x, w, groups=np.int32(2)), linattn.conv_bn_act(x, w, groups=2))
    compiled = torch.compile(
        lambda x, w: linattn.conv_bn_act(x, w, groups=np.int32(2)), fullgraph=True, backend="aot_eager"
    )
    assert torch.equal(compiled(x, w), linattn.conv_bn_act(x, w, groups=2))
    with pytest.raises(TypeError, match="linattn.conv_bn_act: groups must be an int, got float 2.0"):
        linattn.conv_bn_act(x, w, groups=np.float32(2))


def test_stride_float_is_a_type_error():
    with pytest.raises(TypeError, match="linattn.conv_bn_act: stride must be an int or a pair of ints, got 1.0"):
        linattn.conv_bn_act(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1), stride=1.0)
    with pytest.raises(
        TypeError, match=r"linattn.conv_bn_act: padding must be an int or a pair of ints, got \(1, 0.5\)"
    ):
        linattn.conv_bn_act(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1), padding=(1, 0.5))


EPS_CALLS = [
    ("relu_linear_attention", lambda eps: linattn.relu_linear_attention(_ok(), _ok(), _ok(), eps=eps)),
    ("lite_mla_attention", lambda eps: linattn.lite_mla_attention(torch.randn(1, 48, 5, 5), 16, eps=eps)),
    ("lite_mla_context", lambda eps: _context(eps=eps)),
]


@pytest.mark.parametrize(("op", "call"), EPS_CALLS, ids=[c[0] for c in EPS_CALLS])
@pytest.mark.parametrize("eps", [-1, -1e-15, float("nan"), float("inf")], ids=repr)
def test_eps_must_be_finite_and_not_negative(op, call, eps):
    with pytest.raises(ValueError, match=f"^linattn.{op}: eps must be finite and >= 0, got {eps!r}$"):
        call(eps)


@pytest.mark.parametrize(("op", "call"), EPS_CALLS, ids=[c[0] for c in EPS_CALLS])
@pytest.mark.parametrize("eps", ["1e-5", True], ids=repr)
def test_eps_must_be_a_number(op, call, eps):
    """A bool is not an eps (True would be 1.0), as it is not an int for the int arguments."""
    with pytest.raises(TypeError, match=f"^linattn.{op}: eps must be a float, got {type(eps).__name__} {eps!r}$"):
        call(eps)


@pytest.mark.parametrize(("op", "call"), EPS_CALLS, ids=[c[0] for c in EPS_CALLS])
def test_eps_of_any_real_type_is_its_float(op, call):
    """A real number of another type (an int, a Fraction) runs as its float value."""
    torch.manual_seed(0)
    want = call(1e-5)
    torch.manual_seed(0)
    assert torch.equal(call(Fraction(1, 10**5)), want)


def test_eps_checked_on_the_registered_op_too():
    """torch.ops.linattn.* is public API as well: the check is in the op (eager and fake), not only the wrapper."""
    with pytest.raises(ValueError, match="linattn.relu_linear_attention: eps must be finite and >= 0"):
        torch.ops.linattn.relu_linear_attention(_ok(), _ok(), _ok(), -1.0)
    with pytest.raises(ValueError, match="linattn.lite_mla_attention: eps must be finite and >= 0"):
        torch.ops.linattn.lite_mla_attention(torch.randn(1, 48, 5, 5), 16, float("nan"))
    args = _aggregation_args()
    with pytest.raises(ValueError, match="linattn.lite_mla_context: eps must be finite and >= 0"):
        torch.ops.linattn.lite_mla_context(args["qkv"], args["dw_weights"], args["pw_weights"], 2, 8, -1.0, [], [])


def test_eps_zero_is_the_plain_formula():
    """eps = 0 is accepted (docs/design.md 3.1): positive inputs give the reference's result; a token whose
    relu(q) . z is 0 gives 0/0 = NaN, where any eps > 0 gives 0."""
    q, k, v = (torch.rand(1, 2, 9, 4, dtype=torch.float64) + 0.1 for _ in range(3))
    want = linattn.reference.relu_linear_attention(q, k, v, 0.0)
    assert torch.allclose(linattn.relu_linear_attention(q, k, v, eps=0), want)
    q[0, 0, 3] = -1.0
    assert linattn.relu_linear_attention(q, k, v, eps=0)[0, 0, 3].isnan().all()
    assert (linattn.relu_linear_attention(q, k, v, eps=1e-15)[0, 0, 3] == 0).all()


def _backends():
    """The reference, and Triton where it runs on CPU tensors (the interpreter; a GPU machine tests it there)."""
    from utils import kernel_targets

    triton_cpu = [p for p in kernel_targets() if p.values[0] == ("triton", "cpu")]
    return ["reference", pytest.param("triton", marks=triton_cpu[0].marks)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("given", ["post_scale", "post_shift"])
def test_post_scale_or_post_shift_alone_is_defined(backend, given):
    """Not a silent guess: a missing post_scale is 1 and a missing post_shift 0 (a layer scale, or a bias after
    the activation), on conv_bn_act and upsample_block alike, forward and gradients."""
    gen = torch.Generator().manual_seed(3)
    x, w, w2 = torch.randn(1, 4, 5, 5, generator=gen), torch.randn(8, 4, 1, 1, generator=gen), torch.randn(16, 4)
    for call, C in (
        (lambda **kw: linattn.conv_bn_act(x, w, act="relu", **kw), 8),
        (lambda **kw: linattn.upsample_block(x, w2, **kw), 16),
    ):
        vector = (torch.randn(C, generator=gen) + 2.0).requires_grad_()
        identity = torch.ones(C) if given == "post_shift" else torch.zeros(C)
        missing = "post_scale" if given == "post_shift" else "post_shift"
        with linattn.backend(backend):
            alone = call(**{given: vector})
            (d_alone,) = torch.autograd.grad(alone.square().sum(), vector)
            explicit = call(**{given: vector, missing: identity})
            (d_explicit,) = torch.autograd.grad(explicit.square().sum(), vector)
        assert torch.allclose(alone, explicit, atol=1e-6) and torch.allclose(d_alone, d_explicit, rtol=1e-5)
        assert not torch.allclose(alone, call())  # the vector is applied, not dropped


LIST_CASES = [
    ("dw_weights", lambda args: args["dw_weights"][0]),
    ("pw_weights", lambda args: args["pw_weights"][0]),
    ("dw_biases", lambda args: torch.randn(48)),
    ("pw_biases", lambda args: torch.randn(48)),
]


@pytest.mark.parametrize("op", ["multiscale_aggregate", "lite_mla_context"])
@pytest.mark.parametrize(("arg", "single"), LIST_CASES, ids=[c[0] for c in LIST_CASES])
def test_single_tensor_for_a_per_scale_list(op, arg, single):
    """A lone tensor used to be iterated over its first dimension and fail on a shape, or a count, it never had."""
    args = _aggregation_args()
    args[arg] = single(args)
    extra = dict(dim=8) if op == "lite_mla_context" else {}
    shape = tuple(args[arg].shape)
    want = f"linattn.{op}: {arg} must be a list or tuple of tensors"
    message = _message(lambda: getattr(linattn, op)(**args, **extra))
    assert message.startswith(want), message
    assert f"one per scale, got a single Tensor of shape {shape}" in message


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(dw_weights=3), "dw_weights must be a list or tuple of tensors, one per scale, got int"),
        (dict(pw_weights=[[1.0]]), r"pw_weights\[0\] must be a torch.Tensor, got list"),
        (dict(dw_biases=[None, "b"]), r"dw_biases\[1\] must be a torch.Tensor, got str"),
        (dict(dw_weights=[None]), r"dw_weights\[0\] must be a torch.Tensor, got NoneType"),  # None: biases only
        (dict(pw_weights="w"), "pw_weights must be a list or tuple of tensors, one per scale, got str"),
    ],
)
def test_per_scale_list_entries(bad, message):
    with pytest.raises(TypeError, match=f"linattn.multiscale_aggregate: {message}"):
        linattn.multiscale_aggregate(**_aggregation_args(**bad))


def test_per_scale_tuples_and_none_biases_still_work():
    args = _aggregation_args()
    want = linattn.multiscale_aggregate(**args)
    args.update(dw_weights=tuple(args["dw_weights"]), pw_weights=tuple(args["pw_weights"]), dw_biases=[None])
    assert torch.equal(linattn.multiscale_aggregate(**args), want)


def test_forced_cuda_on_cpu_tensors_reports_the_device_first():
    """Forcing cuda on CPU tensors used to complain about the conv's shape only; the device comes first."""
    from linattn._backend import unavailable

    device_reason = unavailable("cuda", torch.device("cpu"))
    assert device_reason  # the CUDA backend never runs CPU tensors
    x, w = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)
    with linattn.backend("cuda"), pytest.raises(RuntimeError) as info:
        linattn.conv_bn_act(x, w, padding=1)
    # every reason at once (the registry's), the device first
    assert str(info.value).startswith(f"linattn.conv_bn_act: backend 'cuda' cannot run this call: {device_reason}")


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(dw_bias=torch.randn(3)), "dw_bias"),
        (dict(dw_weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), "dw_weight"),
        (dict(dw_act="tanh"), "dw_act"),
        (dict(bias=torch.randn(3)), "bias"),
        (dict(act="tanh"), "act"),
    ],
    ids=["dw_bias", "dw_weight", "dw_act", "bias", "act"],
)
def test_separable_names_the_depthwise_arguments(change, name):
    """separable_conv_bn_act checks its depthwise conv as a conv: a mistake there is named dw_weight, dw_bias or
    dw_act, not as the pointwise conv's weight, bias or act."""
    call = dict(x=torch.randn(1, 4, 6, 6), dw_weight=torch.randn(4, 1, 3, 3), weight=torch.randn(5, 4, 1, 1))
    call.update(change)
    with pytest.raises((ValueError, TypeError), match=rf"linattn\.separable_conv_bn_act: {name} "):
        linattn.separable_conv_bn_act(**call, padding=1)


def _backward_calls():
    """Each backward op called directly with a gradient one position short of the forward's output, and a right
    one: (op, call(grad_shape_delta, grad_device)). The attention's v has E = 5 != D: the output (and so the
    gradient) has v's head dim, not q's."""
    q, v = _ok(), _ok((2, 3, 7, 5))
    qkv = torch.randn(2, 3 * 2 * 4, 5, 6)
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    dw, pw = [torch.randn(24, 1, 3, 3)], [torch.randn(24, 4, 1, 1)]
    ops = torch.ops.linattn
    return [
        ("relu_linear_attention_backward", lambda d, device="cpu": ops.relu_linear_attention_backward(
            torch.randn(2, 3, 7 - d, 5, device=device), q, q, v, 1e-15)),
        ("lite_mla_attention_backward", lambda d, device="cpu": ops.lite_mla_attention_backward(
            torch.randn(2, 8, 5, 6 - d, device=device), qkv, 4, 1e-15)),
        ("conv_bn_act_backward", lambda d, device="cpu": ops.conv_bn_act_backward(
            torch.randn(1, 4, 6 - d, 6, device=device), x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", None)),
        ("multiscale_aggregate_backward", lambda d, device="cpu": ops.multiscale_aggregate_backward(
            torch.randn(2, 48, 5 - d, 6, device=device), qkv, dw, pw, 2, [])),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("op", "call"), _backward_calls(), ids=[c[0] for c in _backward_calls()])
def test_backward_ops_check_the_gradients_shape(backend, op, call):
    """Autograd hands a backward op a gradient of the output's shape; a direct call may not, and a kernel would
    read past its end (the Triton interpreter returned values of 1e33 before this check)."""
    with linattn.backend(backend):
        call(0)
        with pytest.raises(ValueError, match=f"linattn.{op}: grad_out must have the forward's output shape"):
            call(1)
    with (
        torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True),
        pytest.raises(ValueError, match=f"linattn.{op}: grad_out"),
    ):
        call(1)  # the fake kernel (torch.compile) checks too


@pytest.mark.parametrize(("op", "call"), _backward_calls(), ids=[c[0] for c in _backward_calls()])
def test_backward_ops_check_the_gradients_device(op, call):
    """A gradient on another device than the forward's inputs is named, not read (a kernel would take its pointer
    for one on the inputs' device)."""
    with pytest.raises(ValueError, match=f"^linattn.{op}: grad_out is on meta, the inputs on cpu$"):
        call(0, "meta")
