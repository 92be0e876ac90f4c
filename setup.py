"""Build of linattn: the Python package, its Triton kernels and the optional CUDA extension linattn._C.

The extension is built when LINATTN_BUILD_CUDA=1, or when it is unset and a
GPU is visible; LINATTN_BUILD_CUDA=0 skips it. Building it needs torch at build
time: install with `pip install -e . --no-build-isolation` after torch.
Without a GPU to detect, set TORCH_CUDA_ARCH_LIST (default here: "8.0;9.0").
"""

import glob
import os

from setuptools import setup


def _want_cuda() -> bool:
    flag = os.environ.get("LINATTN_BUILD_CUDA", "")
    if flag in ("0", "1"):
        return flag == "1"
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _extensions():
    if not _want_cuda():
        return [], {}
    # torch guesses CUDA_HOME from nvcc's folder, wrong when nvcc is a link in /usr/local/bin;
    # it reads the variable when cpp_extension is imported
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = ["csrc/ext.cpp", *sorted(glob.glob("csrc/*/*.cu")), *sorted(glob.glob("csrc/*/*.cpp"))]
    version = f'-DLINATTN_TORCH_VERSION="{torch.__version__}"'
    ext = CUDAExtension(
        name="linattn._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20", version],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", version],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["linattn", "linattn.ops", "linattn.nn", "linattn.models", "linattn.kernels", "linattn.benchmarks"],
    package_dir={"linattn.kernels": "kernels", "linattn.benchmarks": "benchmarks"},
    package_data={"linattn": ["tables/*.json"]},  # measured dispatch tables shipped for GPUs (linattn/_tune.py)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
