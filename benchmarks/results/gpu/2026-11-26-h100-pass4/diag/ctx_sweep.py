# lite_mla_context Triton configurations swept on the GPU: time (CUDA graph replay) and error per config
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

DEV = os.environ.get("DEV", "cuda")

SHAPES = {"tiny": (1, 2, 8, 3, 5, 6)} if DEV == "cpu" else {  # (B, heads, dim, k, H, W)
    "l0 k5 16x16": (16, 16, 32, 5, 16, 16),
    "xl1 k3 32x32": (16, 16, 32, 3, 32, 32),
    "xl1 k3 16x16 h32": (16, 32, 32, 3, 16, 16),
}
LAYOUTS = ("cl", "nchw")


def configs(layout):
    out = []
    if DEV == "cpu":  # the interpreter: a few, to check this script
        return [dict(BLOCK_N=16, BLOCK_D=16, TAP_MMA=m, ROW_TAPS=s, num_warps=4, num_stages=1, splits=sp)
                for m, s, sp in ((True, True, 1), (False, True, 2), (False, False, 1))]
    tiles = [(True, 64), (True, 32), (False, 32), (False, 16)] if layout == "cl" else [(True, 64), (False, 32)]
    for (mma, bn), static, warps, splits in itertools.product(
        tiles, [False, True], [4, 8] if layout == "cl" else [8], [1, 4]
    ):
        out.append(dict(BLOCK_N=bn, BLOCK_D=32, TAP_MMA=mma, ROW_TAPS=static, num_warps=warps, num_stages=1,
                        splits=splits))
    return out


def inputs(shape, layout, seed=0):
    B, heads, dim, k, H, W = shape
    g = torch.Generator(device=DEV).manual_seed(seed)
    C = 3 * heads * dim
    qkv = torch.randn(B, C, H, W, device=DEV, generator=g).to(torch.bfloat16)
    if layout == "cl":
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    dws = [(torch.randn(C, 1, k, k, device=DEV, generator=g) / k).to(torch.bfloat16)]
    pws = [(torch.randn(C, dim, 1, 1, device=DEV, generator=g) * dim**-0.5).to(torch.bfloat16)]
    out = torch.empty(B, 2 * heads * dim, H, W, device=DEV, dtype=torch.bfloat16)
    if layout == "cl":
        out = out.contiguous(memory_format=torch.channels_last)
    return qkv, dws, pws, out


def gtime(fn, calls=20, reps=5):
    """ms per call: calls captured in one CUDA graph, the median of reps replays."""
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / calls)
    return sorted(times)[reps // 2]


def compile_one(job):
    name, layout, cfg = job
    from linattn.kernels.lite_mla_context import lite_mla_context_fwd

    shape = SHAPES[name]
    qkv, dws, pws, out = inputs(shape, layout)
    t = time.time()
    try:
        lite_mla_context_fwd(qkv, dws, pws, shape[1], shape[2], 1e-15, [], [], out, dict(cfg), compile_only=True)
        return None, time.time() - t
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", time.time() - t


def main():
    from linattn import reference
    from linattn.kernels.lite_mla_context import context_configs, lite_mla_context_fwd
    from linattn.kernels._device import device_of

    names = sys.argv[1:] or list(SHAPES)
    jobs = [(n, lay, c) for n in names for lay in LAYOUTS for c in configs(lay)]
    t0 = time.time()
    with ProcessPoolExecutor(int(os.environ.get("WORKERS", "12"))) as pool:
        compiled = list(pool.map(compile_one, jobs))
    print(f"compiled {len(jobs)} in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for n in names:
        shape = SHAPES[n]
        for lay in LAYOUTS:
            qkv, dws, pws, out = inputs(shape, lay)
            ref = reference.lite_mla_context(qkv.double(), [w.double() for w in dws], [w.double() for w in pws],
                                             shape[1], shape[2])
            B, _, H, W = qkv.shape
            heur = context_configs(device_of(qkv), B, shape[1], H * W, shape[2], True)
            floor_bytes = qkv.numel() * 2 + out.numel() * 2
            results = []
            for (name, layout, cfg), (err, _) in zip(jobs, compiled):
                if (name, layout) != (n, lay):
                    continue
                if err:
                    results.append((float("inf"), cfg, err))
                    continue
                out.fill_(float("nan"))
                lite_mla_context_fwd(qkv, dws, pws, shape[1], shape[2], 1e-15, [], [], out, dict(cfg))
                rel = ((out.double() - ref).norm() / ref.norm()).item()
                ms = gtime(lambda: lite_mla_context_fwd(qkv, dws, pws, shape[1], shape[2], 1e-15, [], [], out, dict(cfg)))
                results.append((ms, cfg, f"rel {rel:.2e}"))
            results.sort(key=lambda r: r[0])
            print(f"== {n} {lay}: floor {floor_bytes / 3.0e6:.1f} us at 3 TB/s; candidates now: "
                  f"{[json.dumps(c, sort_keys=True) for c in heur]}")
            for ms, cfg, note in results:
                short = ",".join(f"{k}={v}" for k, v in cfg.items() if k != "BLOCK_D")
                print(f"  {ms * 1e3:8.1f} us  {short}  {note}")
                rows.append(dict(shape=n, layout=lay, ms=ms, cfg=cfg, note=note))
    with open(os.environ.get("SWEEP_OUT", "/tmp/ctx_sweep.json"), "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    torch.multiprocessing.set_start_method("spawn")
    main()
