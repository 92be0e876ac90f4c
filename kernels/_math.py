"""Elementwise helpers the kernels share: where Triton's own lowering wraps an instruction in work these kernels
do not need, compiled kernels take the instruction alone (inline PTX); under the interpreter, which runs no inline
assembly, plain Triton computes the same function.

The row-sliding depthwise, row-blocked context and neck kernels are instruction-bound (the ninth H100 pass put the
depthwise one at 59% issue-busy and 26% of DRAM bandwidth): their loops are FMAs, loads, bf16 -> fp32 widenings
and, in the conv epilogues, an activation's exp and reciprocal.
"""

import os

import triton
import triton.language as tl

COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def exp2(x):
    """2^x on an fp32 tile. tl.exp2 compiles to the same ex2.approx, but not flushing denormals: a range check
    and two conditional multiplies around it."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def rcp(x):
    """1 / x on an fp32 tile, to 1 ulp. A division compiles to div.full.f32 (2 ulp): the same reciprocal behind
    a range check, a select and a conditional scaling."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def widen(x):
    """x.to(tl.float32). From bf16, compiled: two instructions a pair of elements, the low one shifted up and
    the high one masked in place, where Triton's conversion takes three (it moves the high one down first)."""
    if COMPILED and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x], dtype=tl.float32, is_pure=True,
            pack=2,
        )  # fmt: skip
    return x.to(tl.float32)
