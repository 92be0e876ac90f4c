"""setup.py's build logic that runs without a GPU: keeping linattn._C on the process's shared libstdc++."""

import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to probe")


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, loaded without building anything."""
    monkeypatch.setenv("LINATTN_BUILD_CUDA", "0")
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="linattn_setup")


def test_a_compiler_linking_libstdcxx_statically_gets_the_shared_one(setup_py, tmp_path, monkeypatch):
    """The GPU machine's compiler links libstdc++ into shared objects, which crashed linattn._C next to torch's
    shared copy: setup.py then links the libstdc++ this process loaded, and that puts it back in NEEDED."""
    monkeypatch.delenv("CXX", raising=False)
    assert setup_py["_shared_libstdcxx_args"]() == []  # g++ as it comes links the shared libstdc++
    static = tmp_path / "g++-static"
    static.write_text('#!/bin/sh\nexec g++ "$@" -static-libstdc++\n')
    static.chmod(0o755)
    monkeypatch.setenv("CXX", str(static))
    (lib,) = setup_py["_shared_libstdcxx_args"]()
    assert "libstdc++.so" in Path(lib).name
    src = tmp_path / "f.cpp"
    src.write_text("#include <sstream>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n")
    for args, shared in (([], False), ([lib], True)):
        so = tmp_path / f"f{len(args)}.so"
        subprocess.run([str(static), "-shared", "-fPIC", str(src), "-o", str(so), *args], check=True)
        assert setup_py["_needs_libstdcxx"](so) is shared
