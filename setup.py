"""Build of linattn: the Python package, its Triton kernels and the optional CUDA extension linattn._C.

The extension is built when LINATTN_BUILD_CUDA=1, or when it is unset and a
GPU is visible; LINATTN_BUILD_CUDA=0 skips it. Building it needs torch at build
time: install with `pip install -e . --no-build-isolation` after torch.
Without a GPU to detect, set TORCH_CUDA_ARCH_LIST (default here: "8.0;9.0+PTX").

Its conv_bn_act forward runs on cuDNN's graph API (csrc/conv_bn_act/cudnn_graph.cpp), which needs
the cudnn-frontend headers, found in this order: LINATTN_CUDNN_FRONTEND_INCLUDE (a folder holding
cudnn_frontend.h), third_party/cudnn_frontend/include (third_party/get_cudnn_frontend.sh puts them
there), the installed nvidia-cudnn-frontend package (`pip install --no-deps nvidia-cudnn-frontend`);
and cuDNN's and NVRTC's headers and libraries, from torch's nvidia-* wheels (or CUDA_HOME;
CUDNN_INCLUDE_DIR / CUDNN_LIB_DIR override cuDNN's). libcudnn and libnvrtc are linked with an rpath
to their folders (torch has loaded both already when linattn._C is imported). Without the frontend
headers LINATTN_BUILD_CUDA=1 stops with an error saying how to get them; an automatic build (GPU
visible, the variable unset) or LINATTN_CUDNN=0 builds without the cuDNN graph (the cuda backend
then has no conv).
"""

import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CUDNN_SOURCE = "csrc/conv_bn_act/cudnn_graph.cpp"


def _want_cuda() -> bool:
    flag = os.environ.get("LINATTN_BUILD_CUDA", "")
    if flag in ("0", "1"):
        return flag == "1"
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _frontend_include() -> tuple[Path | None, list[str]]:
    """The folder with cudnn_frontend.h, and where it was looked for."""
    looked = []
    candidates = []
    if env := os.environ.get("LINATTN_CUDNN_FRONTEND_INCLUDE"):
        candidates.append(("LINATTN_CUDNN_FRONTEND_INCLUDE", Path(env)))
    candidates.append(("third_party", ROOT / "third_party" / "cudnn_frontend" / "include"))
    try:  # the wheel installs its headers as <site-packages>/include/cudnn_frontend*.h
        for f in importlib.metadata.files("nvidia-cudnn-frontend") or []:
            if str(f).replace("\\", "/").endswith("include/cudnn_frontend.h"):
                candidates.append(("nvidia-cudnn-frontend", Path(f.locate()).parent))
    except importlib.metadata.PackageNotFoundError:
        looked.append("nvidia-cudnn-frontend (not installed)")
    for where, folder in candidates:
        if (folder / "cudnn_frontend.h").is_file():
            return folder, looked
        looked.append(f"{where} ({folder})")
    return None, looked


def _nvidia_roots(*names: str) -> list[Path]:
    """Folders <site-packages>/nvidia/<name> of torch's nvidia-* wheels that exist."""
    spec = importlib.util.find_spec("nvidia")
    found = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        found += [Path(base) / n for n in names if (Path(base) / n).is_dir()]
    return found


def _library(what: str, header: str, lib_glob: str, roots: list[tuple[Path, Path]]) -> tuple[Path, Path, str]:
    """(include dir, library dir, library file name) of the first (include, lib) root pair holding both."""
    for inc, lib in roots:
        libs = sorted(glob.glob(str(lib / lib_glob)), key=len)
        if (inc / header).is_file() and libs:
            return inc, lib, Path(libs[0]).name
    tried = ", ".join(f"{inc} + {lib}" for inc, lib in roots) or "nothing"
    raise SystemExit(f"linattn: building linattn._C needs {what} ({header} and {lib_glob}); looked in {tried}")


def _cudnn_build_args(cuda_home: str | None) -> dict:
    """Compile flags (include folders) and link arguments for cuDNN and NVRTC, which cudnn-frontend calls."""
    home = [(Path(cuda_home) / "include", Path(cuda_home) / sub) for sub in ("lib64", "lib")] if cuda_home else []
    cudnn_roots = [(p / "include", p / "lib") for p in _nvidia_roots("cudnn")] + home
    if os.environ.get("CUDNN_INCLUDE_DIR") and os.environ.get("CUDNN_LIB_DIR"):
        cudnn_roots.insert(0, (Path(os.environ["CUDNN_INCLUDE_DIR"]), Path(os.environ["CUDNN_LIB_DIR"])))
    nvrtc_roots = home + [(p / "include", p / "lib") for p in _nvidia_roots("cu13", "cuda_nvrtc")]
    cxx, link = [], []
    for what, header, lib_glob, roots, flag in (
        ("cuDNN (torch's nvidia-cudnn wheel)", "cudnn.h", "libcudnn.so*", cudnn_roots, "-I"),
        # searched after the system folders: the nvidia wheel's folder holds other CUDA headers than CUDA_HOME's
        ("NVRTC (torch's nvrtc wheel or the CUDA toolkit)", "nvrtc.h", "libnvrtc.so*", nvrtc_roots, "-idirafter"),
    ):
        inc, lib, name = _library(what, header, lib_glob, roots)
        cxx.append(f"{flag}{inc}")
        link += [f"-L{lib}", f"-l:{name}", f"-Wl,-rpath,{lib}"]
    return {"cxx": cxx, "extra_link_args": link}


def _needs_libstdcxx(so: Path) -> bool:
    """Whether a shared object lists libstdc++.so as NEEDED: readelf's answer, or without binutils whether the
    name is in the file at all (a statically linked libstdc++ does not name itself)."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True)
        if out.returncode == 0:
            return "libstdc++.so" in out.stdout
    return b"libstdc++.so" in so.read_bytes()


def _shared_libstdcxx_args() -> list[str]:
    """Link arguments that keep linattn._C on the process's shared libstdc++ where the C++ compiler would link
    libstdc++ statically into a shared object (the GPU machine's /opt/gcc does). A static copy's iostream
    and locale code then runs against the data of the shared copy that torch loaded (-Bsymbolic-functions
    binds functions locally, not data), and the first std::ostream insertion in linattn._C segfaults
    (benchmarks/results/gpu/2026-11-26-h100). Linking the loaded libstdc++.so.6 by path, ahead of the
    compiler's own -lstdc++, resolves every libstdc++ symbol there."""
    import torch  # noqa: F401  (loads the libstdc++ the extension will run with)
    from torch.utils.cpp_extension import get_cxx_compiler

    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    with tempfile.TemporaryDirectory() as tmp:
        src, so = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text("#include <sstream>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        built = subprocess.run([get_cxx_compiler(), "-shared", "-fPIC", str(src), "-o", str(so)], capture_output=True)
        if built.returncode != 0 or _needs_libstdcxx(so):
            return []
    if len(loaded) != 1:
        raise SystemExit(
            f"linattn: {get_cxx_compiler()} links libstdc++ statically into shared objects, which crashes linattn._C "
            f"next to torch's shared libstdc++, and the libstdc++ torch loaded was not found ({sorted(loaded)}); "
            "set CXX to a compiler that links it dynamically"
        )
    lib = loaded.pop()
    print(f"linattn: {get_cxx_compiler()} links libstdc++ statically; linking linattn._C against {lib} instead")
    return [lib]


def _extensions():
    if not _want_cuda():
        return [], {}
    # torch guesses CUDA_HOME from nvcc's folder, wrong when nvcc is a link in /usr/local/bin;
    # it reads the variable when cpp_extension is imported
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if not torch.cuda.is_available():
        # PTX beside sm_90's code: a GPU newer than sm_90 (Blackwell) compiles it at load, as it cannot run sm_90's
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources = ["csrc/ext.cpp", *sorted(glob.glob("csrc/*/*.cu")), *sorted(glob.glob("csrc/*/*.cpp"))]
    cxx_flags, extra_link_args = [], _shared_libstdcxx_args()  # cxx_flags: nvcc's .cu files see no cuDNN header
    frontend, looked = (None, ["LINATTN_CUDNN=0"]) if os.environ.get("LINATTN_CUDNN") == "0" else _frontend_include()
    if frontend is not None:
        cudnn = _cudnn_build_args(CUDA_HOME)
        cxx_flags += [f"-I{frontend}", *cudnn["cxx"]]
        extra_link_args += cudnn["extra_link_args"]
    elif os.environ.get("LINATTN_BUILD_CUDA") == "1" and os.environ.get("LINATTN_CUDNN") != "0":
        raise SystemExit(
            "linattn: building linattn._C needs the cudnn-frontend headers (cudnn_frontend.h) for its cuDNN conv "
            f"graphs; looked in: {'; '.join(looked)}. Get them with `pip install --no-deps nvidia-cudnn-frontend` "
            "or `bash third_party/get_cudnn_frontend.sh`, or point LINATTN_CUDNN_FRONTEND_INCLUDE at a folder "
            "holding cudnn_frontend.h; LINATTN_CUDNN=0 builds without the cuDNN graph"
        )
    else:
        print(f"linattn: building linattn._C without the cuDNN conv graph ({'; '.join(looked)})")
        sources.remove(CUDNN_SOURCE)
    version = f'-DLINATTN_TORCH_VERSION="{torch.__version__}"'
    ext = CUDAExtension(
        name="linattn._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            # -g0: no debug info for the cudnn-frontend translation unit (25 MB of it, and slower to build)
            "cxx": ["-O3", "-g0", "-std=c++20", version, *cxx_flags],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", version],
        },
        extra_link_args=extra_link_args,
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
