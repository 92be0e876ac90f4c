"""`python -m linattn check`: every op on every backend that runs here, against the float64 reference.

A user runs this after installing. Pass means the forward and every input
gradient are within the tolerances of docs/design.md 8: fp32 relative error
under 1e-5, fp16/bf16 at most twice the error of eager PyTorch in the same
dtype. A backend that cannot run here is a skip, not a pass: the summary counts
passed, skipped and failed rows, and every skip reason and error is printed in
full once, as a numbered note the table's rows point to.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import eager, ops, reference
from ._backend import KERNEL_BACKENDS, Unsupported, backend, reasons
from ._table import table
from .benchmarks.common import progress


@dataclass
class Case:
    op: str
    shapes: list[tuple[int, ...]]  # one random input per shape, all differentiated
    run: Callable  # the linattn op on those inputs
    ref: Callable  # reference math (float64 inputs give the oracle)
    eager: Callable  # official-style eager PyTorch in the input dtype (linattn.eager for the LiteMLA ops)
    label: str = ""  # what the row shows, when the op has several cases
    limit_args: tuple = ()  # what the registry's implementation limits read (linattn/_backend.py)


def _aggregation_shapes(heads: int, dim: int, hw: tuple[int, int], ksizes: tuple[int, ...]):
    C = 3 * heads * dim
    return [(2, C, *hw)] + [(C, 1, k, k) for k in ksizes] + [(C, dim, 1, 1) for _ in ksizes]


def _aggregation_call(fn, heads, scales, *extra):
    """Adapt fn(qkv, dws, pws, heads, *extra) to flat inputs (qkv, *dws, *pws)."""
    return lambda qkv, *w: fn(qkv, list(w[:scales]), list(w[scales:]), heads, *extra)


def _channels_last(fn):
    """fn with its first input in channels_last (differentiably: its gradient arrives in the caller's layout)."""
    return lambda x, *rest: fn(x.contiguous(memory_format=torch.channels_last), *rest)


def _conv_call(fn, stride: int, padding: int, groups: int, act: str):
    """conv_bn_act with a BN-after-act affine and a residual on flat inputs (x, weight, bias, post_scale,
    post_shift, residual); the (Cout,) vectors arrive as (1, Cout)."""
    return lambda x, w, b, s, t, r: fn(x, w, b.flatten(), stride, padding, 1, groups, act, s.flatten(), t.flatten(), r)


def _conv_case(label: str, shapes, stride: int, padding: int, groups: int, act: str, **kwargs) -> "Case":
    calls = [_conv_call(fn, stride, padding, groups, act) for fn in (ops.conv_bn_act, reference.conv_bn_act)]
    baseline = _conv_call(_eager_conv_bn_act, stride, padding, groups, act)
    return Case("conv_bn_act", shapes, *calls, baseline, label=label, **kwargs)


def _eager_conv_bn_act(x, w, b, stride, padding, dilation, groups, act, s, t, r):
    """Separate eager ops in the input dtype: conv, activation, affine, residual add."""
    y = reference.activation(torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups), act)
    return y * s[:, None, None] + t[:, None, None] + r


def _upsample_call(fn):
    return lambda x, w, b, s, t: fn(x, w, b.flatten(), s.flatten(), t.flatten())


def _eager_upsample(x, w, b, s, t):
    y = torch.relu(torch.nn.functional.conv2d(x, w[:, :, None, None], b))
    return torch.nn.functional.pixel_shuffle(y * s[:, None, None] + t[:, None, None], 2)


def _separable_call(fn):
    """separable_conv_bn_act 3x3/2 (hardswish, then identity with a BN-after-act affine and a residual) on flat
    inputs (x, dw_weight, dw_bias, weight, bias, post_scale, post_shift, residual)."""
    return lambda x, dw, db, w, b, s, t, r: fn(
        x, dw, db.flatten(), 2, 1, 1, "hardswish", w, b.flatten(), "identity", s.flatten(), t.flatten(), r
    )


def _eager_separable(x, dw, db, stride, padding, dilation, dw_act, w, b, act, s, t, r):
    m = reference.activation(torch.nn.functional.conv2d(x, dw, db, stride, padding, dilation, x.shape[1]), dw_act)
    return reference.activation(torch.nn.functional.conv2d(m, w, b), act) * s[:, None, None] + t[:, None, None] + r


def _separable_op(x, dw, db, stride, padding, dilation, dw_act, w, b, act, s, t, r):
    return ops.separable_conv_bn_act(x, dw, w, db, b, stride, padding, dilation, dw_act, act, s, t, r)


CASES = [
    Case(
        "relu_linear_attention",
        [(2, 4, 257, 32)] * 3,
        ops.relu_linear_attention,
        reference.relu_linear_attention,
        eager.relu_linear_attention,
    ),
    Case(
        "lite_mla_attention",
        [(2, 4 * 3 * 32, 15, 17)],
        lambda qkv: ops.lite_mla_attention(qkv, 32),
        lambda qkv: reference.lite_mla_attention(qkv, 32),
        lambda qkv: eager.lite_mla_attention(qkv, 32),
    ),
    Case(
        "multiscale_aggregate",
        _aggregation_shapes(2, 16, (15, 17), (3, 5)),
        _aggregation_call(ops.multiscale_aggregate, 2, 2),
        _aggregation_call(reference.multiscale_aggregate, 2, 2),
        _aggregation_call(eager.multiscale_aggregate, 2, 2),
    ),
    Case(
        "lite_mla_context",
        _aggregation_shapes(2, 16, (15, 17), (5,)),
        _aggregation_call(ops.lite_mla_context, 2, 1, 16),
        _aggregation_call(reference.lite_mla_context, 2, 1, 16),
        _aggregation_call(eager.lite_mla_context, 2, 1, 16),
    ),
    # as the encoders call it: head dim 32 over a channels_last qkv (the CUDA tensor-core kernel's fp16/bf16 case,
    # with its 16-byte channel loads)
    Case(
        "lite_mla_context",
        _aggregation_shapes(2, 32, (15, 17), (5,)),
        _channels_last(_aggregation_call(ops.lite_mla_context, 2, 1, 32)),
        _aggregation_call(reference.lite_mla_context, 2, 1, 32),
        _aggregation_call(eager.lite_mla_context, 2, 1, 32),
        label="lite_mla_context d32 channels_last",
    ),
    _conv_case(
        "conv_bn_act grouped 3x3/2",
        [(2, 8, 9, 11), (16, 4, 3, 3), (1, 16), (1, 16), (1, 16), (2, 16, 5, 6)],
        2,
        1,
        2,
        "gelu_tanh",
    ),
    _conv_case(
        "conv_bn_act depthwise 5x5/2",
        [(2, 12, 9, 11), (12, 1, 5, 5), (1, 12), (1, 12), (1, 12), (2, 12, 5, 6)],
        2,
        2,
        12,
        "hardswish",
    ),
    _conv_case(
        "conv_bn_act 1x1", [(2, 12, 7, 9), (20, 12, 1, 1), (1, 20), (1, 20), (1, 20), (2, 20, 7, 9)], 1, 0, 1, "silu"
    ),
    Case(
        "separable_conv_bn_act",
        [(2, 12, 9, 11), (12, 1, 3, 3), (1, 12), (20, 12, 1, 1), (1, 20), (1, 20), (1, 20), (2, 20, 5, 6)],
        _separable_call(_separable_op),
        _separable_call(reference.separable_conv_bn_act),
        _separable_call(_eager_separable),
    ),
    Case(
        "upsample_block",
        [(2, 12, 5, 7), (32, 12), (1, 32), (1, 32), (1, 32)],
        _upsample_call(ops.upsample_block),
        _upsample_call(reference.upsample_block),
        _upsample_call(_eager_upsample),
    ),
    Case(
        "upsample_sum",
        [(2, 12, 4, 5), (2, 12, 9, 9), (2, 12, 17, 18)],
        lambda *maps: ops.upsample_sum(maps, (17, 18)),
        lambda *maps: reference.upsample_sum(maps, (17, 18)),
        lambda *maps: eager.upsample_sum(maps, (17, 18)),
        limit_args=(3,),
    ),
]


OPS = tuple(dict.fromkeys(case.op for case in CASES))
BACKENDS = ("reference", *KERNEL_BACKENDS)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out is not finite)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    """docs/design.md 8: fp32 within 1e-5 relative; fp16/bf16 within twice eager PyTorch's error in that dtype.

    fp32 also gets the twice-eager bound where eager fp32 itself is worse than
    1e-5: ill-conditioned gradients (N = 1, where dq is a difference of two
    nearly equal terms) where no fp32 computation can reach 1e-5.
    Where eager overflows in the dtype (an fp16 state past 65504: its error is
    inf or NaN, and twice it no bound at all), ten roundings to the dtype: the
    kernels round about five times on the way (taps, aggregated q/k/v, S, the
    result) and must not overflow (docs/design.md 3.1).
    """
    if not math.isfinite(eager_err):
        return 10.0 * torch.finfo(dtype).eps / 2
    base = 1e-5 if dtype == torch.float32 else 0.0
    return max(base, 2.0 * eager_err)


def _outputs(fn: Callable, inputs: list[torch.Tensor], grad_seed: int) -> list[torch.Tensor]:
    """fn's output followed by the gradient of every input, for a fixed random output gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=gen).to(out))
    return [out.detach(), *(x.grad for x in leaves)]


def run_case(case: Case, name: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, float, float]:
    """(passed, worst error, its tolerance) over the output and every gradient."""
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(s, generator=gen) / (s[-1] if s[1] == 1 else 1)).to(device, dtype) for s in case.shapes]
    oracle = _outputs(case.ref, [x.double() for x in inputs], 1)
    baseline = _outputs(case.eager, inputs, 1)
    with backend(name):
        got = _outputs(case.run, inputs, 1)
    results = [(rel_err(g, o), tolerance(dtype, rel_err(e, o))) for g, e, o in zip(got, baseline, oracle)]
    err, tol = max(results, key=lambda r: r[0] / r[1])
    return all(e <= t for e, t in results), err, tol


def check(device: torch.device, ops: Sequence[str] = (), backends: Sequence[str] = ()) -> bool:
    """Print the table, its footnotes and a count of passed, skipped and failed rows; True when none failed.

    ops, backends: only these (names from OPS and BACKENDS; empty: all)."""
    unknown = sorted(set(ops) - set(OPS)) + sorted(set(backends) - set(BACKENDS))
    if unknown:
        known = f"ops: {', '.join(OPS)}; backends: {', '.join(BACKENDS)}"
        raise ValueError(f"unknown op or backend {', '.join(unknown)}; {known}")
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    cases = [case for case in CASES if not ops or case.op in ops]
    backends = [name for name in BACKENDS if not backends or name in backends]
    rows = [["op", "backend", "dtype", "result", "worst rel. error", "tolerance"]]
    notes: dict[tuple[str, str], int] = {}  # (kind, full text) -> footnote number, one per distinct text
    counts = {"passed": 0, "skipped": 0, "failed": 0}

    def mark(kind: str, text: str) -> str:
        return f"[{notes.setdefault((kind, text), len(notes) + 1)}]"

    # a GPU's first run compiles every kernel (minutes): the bar says which row a stopped run was on
    with progress(len(cases) * len(backends) * len(dtypes), "check") as bar:
        for case in cases:
            for name in backends:
                why = "; ".join(reasons(case.op, "fwd", name, device, args=case.limit_args)) or None
                label = case.label or case.op
                for dtype in dtypes:
                    row = [label, name, str(dtype)[6:]]
                    bar.set_postfix_str(" ".join(row))
                    bar.update()
                    try:
                        if why:  # the registry's reasons, before any call
                            raise Unsupported(why)
                        ok, err, tol = run_case(case, name, device, dtype)
                        rows.append([*row, "pass" if ok else "FAIL", f"{err:.2e}", f"{tol:.2e}"])
                    except Unsupported as exc:  # or the call's own limit (cuDNN declines it, say)
                        counts["skipped"] += 1
                        rows.append([*row, f"skipped {mark('skipped', str(exc))}", "-", "-"])
                        continue
                    except Exception as exc:  # a crash is a failure to report, not to hide
                        ok = False
                        rows.append([*row, f"ERROR {mark('error', f'{type(exc).__name__}: {exc}')}", "-", "-"])
                    counts["passed" if ok else "failed"] += 1
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (float32; float16 and bfloat16 on a GPU)"
    print(f"linattn check on {where}:")
    print(table(rows))
    for kind, title in (("skipped", "skipped because"), ("error", "errors")):
        listed = [(n, text) for (k, text), n in notes.items() if k == kind]
        if listed:
            print(f"\n{title}:")
            for n, text in listed:
                print(f"[{n}] " + text.replace("\n", "\n    "))
    skipped = f"{counts['skipped']} skipped"
    if counts["skipped"]:
        skipped += " (reasons " + ", ".join(f"[{n}]" for (k, _), n in notes.items() if k == "skipped") + ")"
    print(f"\n{counts['passed']} passed, {skipped}, {counts['failed']} failed")
    return counts["failed"] == 0
