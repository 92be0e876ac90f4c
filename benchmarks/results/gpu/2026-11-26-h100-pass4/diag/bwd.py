# conv_bn_act's cuda backward on the failing case of the fourth H100 pass: where does dx go wrong?
import torch

from linattn import reference
from linattn.ops._conv_bn_act_cudnn import backward_cuda, run_cuda


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


gen = torch.Generator().manual_seed(9)
Cin, Cout, groups, k = 20, 40, 20, 3
x = torch.randn(2, Cin + 3, 16, 20, generator=gen).cuda()[:, 2 : 2 + Cin]
w = (torch.randn(k, k, Cin // groups, Cout, generator=gen) * 0.3).cuda().permute(3, 2, 0, 1)
b = torch.randn(Cout, generator=gen).cuda()
s = (torch.rand(Cout, generator=gen) + 0.5).cuda()
conv = ((1, 1), (1, 1), (1, 1), False, [0, 0], groups)
print("x strides", x.stride(), "w strides", w.stride())
g = torch.randn(2, Cout, 16, 20, generator=gen).cuda()
with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
    want = torch.ops.aten.convolution_backward(g.double().cpu(), x.double().cpu(), w.double().cpu(), None, *conv,
                                               [True, True, False])  # fmt: skip
    for name, (xx, ww) in {
        "views": (x, w),
        "x dense": (x.contiguous(), w),
        "w dense": (x, w.contiguous()),
        "both dense": (x.contiguous(), w.contiguous()),
    }.items():
        got = torch.ops.aten.convolution_backward(g, xx, ww, None, *conv, [True, True, False])
        print(f"aten convolution_backward, {name}: dx {rel(got[0], want[0]):.2e} dw {rel(got[1], want[1]):.2e}")
    z_ref = torch.ops.aten.convolution(x.double().cpu(), w.double().cpu(), b.double().cpu(), *conv)
    z = torch.empty(2, Cout, 16, 20, device="cuda")
    try:
        run_cuda(x, w, b, (1, 1), (1, 1), (1, 1), groups, "identity", None, None, None, z)
        print(f"z by run_cuda (graph or SIMT): {rel(z, z_ref):.2e}")
    except Exception as err:  # noqa: BLE001
        print("run_cuda failed:", err)
ref = reference.conv_bn_act_backward(g.double(), x.double(), w.double(), b.double(), (1, 1), (1, 1), (1, 1), groups,
                                     "silu", s.double())  # fmt: skip
got = backward_cuda(g, x, w, b, (1, 1), (1, 1), (1, 1), groups, "silu", s)
for name, a, e in zip(["dx", "dweight", "dbias", "dpost_scale", "dpost_shift"], got, ref):
    print(f"backward_cuda {name}: {rel(a, e):.2e}")
