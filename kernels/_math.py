"""Elementwise helpers the kernels share: where Triton's own lowering wraps an instruction in work these kernels
do not need, compiled kernels take the instruction alone (inline PTX); under the interpreter, which runs no inline
assembly, plain Triton computes the same function. And round_tf32, for fp32 operands of TF32 dots.

The row-sliding depthwise, row-blocked context and neck kernels are instruction-bound (the ninth H100 pass put the
depthwise one at 59% issue-busy and 26% of DRAM bandwidth): their loops are FMAs, loads, bf16 -> fp32 widenings
and, in the conv epilogues, an activation's exp and reciprocal.
"""

import triton
import triton.language as tl

from .._backend import interpreting

COMPILED = tl.constexpr(not interpreting())


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


@triton.jit
def round_tf32(x, PRECISION: tl.constexpr):
    """An fp32 tile rounded to TF32 (10 mantissa bits, to nearest) where tl.dot multiplies in TF32: the tensor
    cores truncate fp32 operands, and for fp16 inputs that truncation of the fp32 intermediates (states, scaled
    gradients) doubled linear attention's gradients' error on the H100 pass (2.04-2.08x eager's, reproduced to
    three digits by truncating on the CPU); rounded, a CPU emulation puts it at 0.7-0.85x. Loaded fp16/bf16 tiles
    are exact in TF32 and pass as they are. The interpreter multiplies fp32 in full whatever the precision: only a
    GPU shows what this changes."""
    if PRECISION == "tf32":
        x = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return x
