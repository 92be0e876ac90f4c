"""Asks cuDNN's conv graph for one call signature (argv: case name); prints each step."""

import sys

import torch

import linattn  # noqa: F401  (loads linattn._C)
from linattn.ops import _conv_bn_act_cudnn as c

case = sys.argv[1]
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2]]
print("has_cudnn", c.has_cudnn(), flush=True)
N, C, H, W, K = 2, 64, 16, 16, 64
x = torch.randn(N, C, H, W, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
kernel, groups, act, bias = {
    "pw": (1, 1, "relu", True),
    "pw_noact": (1, 1, "identity", False),
    "dw": (3, C, "relu", True),
    "dense3": (3, 1, "hardswish", True),
}[case]
w = torch.randn(K, C // groups, kernel, kernel, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
y = torch.empty(N, K, H, W, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
torch.nn.functional.conv2d(x, w, padding=kernel // 2, groups=groups)  # torch's cuDNN handle first
torch.cuda.synchronize()
print("torch conv ok", flush=True)
sig = c.signature(
    x,
    w,
    torch.zeros(K, device="cuda") if bias else None,
    (1, 1),
    (kernel // 2,) * 2,
    (1, 1),
    groups,
    act,
    None,
    None,
    None,
    y,
)
print("check ->", repr(c.cudnn_reason(sig)), flush=True)
b = torch.randn(K, device="cuda") if bias else None
c.run_cuda(x, w, b, (1, 1), (kernel // 2,) * 2, (1, 1), groups, act, None, None, None, y)
torch.cuda.synchronize()
ref = torch.nn.functional.conv2d(x.float(), w.float(), b, padding=kernel // 2, groups=groups)
ref = {"relu": torch.relu, "identity": lambda t: t, "hardswish": torch.nn.functional.hardswish}[act](ref)
print("run ok, rel err", ((y.float() - ref).norm() / ref.norm()).item(), flush=True)
