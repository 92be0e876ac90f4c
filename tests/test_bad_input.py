"""Bad input gets a clear error naming the op and the argument, on every path (eager and fake)."""

import pytest
import torch

import linattn


def _ok(shape=(2, 3, 7, 8)):
    return torch.randn(shape)


CASES = [
    ("rank", dict(q=torch.randn(3, 7, 8)), ValueError, "relu_linear_attention: q must be 4-D"),
    ("k shape", dict(k=_ok((2, 3, 6, 8))), ValueError, "relu_linear_attention: k must have q's shape"),
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
    ("no scale", dict(dw_weights=[], pw_weights=[]), ValueError, "pw_weights needs one weight per scale"),
    ("scales mismatch", dict(pw_weights=[]), ValueError, "pw_weights needs one weight per scale"),
    ("even kernel", dict(dw_weights=[torch.randn(48, 1, 4, 4)]), ValueError, r"dw_weights\[0\] must be \(C, 1, k, k\)"),
    ("dw channels", dict(dw_weights=[torch.randn(40, 1, 3, 3)]), ValueError, r"dw_weights\[0\] must be"),
    ("pw shape", dict(pw_weights=[torch.randn(48, 16, 1, 1)]), ValueError, r"pw_weights\[0\] must be \(C, D, 1, 1\)"),
    ("pw rank", dict(pw_weights=[torch.randn(48, 8)]), ValueError, r"pw_weights\[0\] must be 4-D"),
    ("bias shape", dict(dw_biases=[torch.randn(47)]), ValueError, r"dw_biases\[0\] must be \(48,\)"),
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
