import cProfile, pstats, runpy, sys
sys.argv = ["linattn", "bench", "--model", "l0", "--batch", "1", "--dtype", "bf16", "--providers", "linattn", "--out", "/tmp/b1"]
pr = cProfile.Profile()
pr.enable()
try:
    runpy.run_module("linattn", run_name="__main__")
except SystemExit:
    pass
pr.disable()
st = pstats.Stats(pr)
st.sort_stats("tottime").print_callers("builtins.compile")
st.sort_stats("tottime").print_callers(r"\(backend_impl\)")
st.sort_stats("tottime").print_callers("torch.conv2d")
st.sort_stats("cumulative").print_stats(60)
