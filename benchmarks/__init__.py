"""Benchmarks of linattn's ops (installed as linattn.benchmarks): one bench_<op>.py per op, shared harness in common."""
