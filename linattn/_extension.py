"""Loading of the compiled CUDA extension linattn._C, lazily and without crashing."""

import functools
import importlib
import importlib.util
import warnings

import torch

ABI = 2  # the ops' contract linattn._C must carry (csrc/ext.cpp LINATTN_ABI)


@functools.cache
def load_extension():
    """(module, None) when linattn._C is usable, else (None, reason).

    A missing build is silent (the extension is optional); one that exists but
    does not load, was built against another torch or from sources with another
    ops contract (ABI) gives a one-line warning.
    """
    if importlib.util.find_spec("linattn._C") is None:
        return None, "linattn._C is not built (pip install with LINATTN_BUILD_CUDA=1 and nvcc)"
    try:
        ext = importlib.import_module("linattn._C")
    except (ImportError, OSError) as err:
        why = f"linattn._C failed to load: {str(err).splitlines()[0]}"
        warnings.warn(f"linattn: {why}; the cuda backend is disabled", RuntimeWarning, stacklevel=2)
        return None, why
    built_for = getattr(ext, "torch_version", "unknown")
    if built_for != torch.__version__:
        why = f"linattn._C was built for torch {built_for}, this is torch {torch.__version__}; rebuild it"
        warnings.warn(f"linattn: {why}; the cuda backend is disabled", RuntimeWarning, stacklevel=2)
        return None, why
    if (abi := getattr(ext, "abi", None)) != ABI:
        why = f"linattn._C was built from other sources (ops contract {abi}, these sources {ABI}); rebuild it"
        warnings.warn(f"linattn: {why}; the cuda backend is disabled", RuntimeWarning, stacklevel=2)
        return None, why
    return ext, None
