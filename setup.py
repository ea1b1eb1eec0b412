"""Build the compiled operators `equifast._C` with torch's cpp_extension (ninja).

The CPU backend (csrc/equifast.cpp + csrc/cpu/*.cpp) is always built. The CUDA backend
(csrc/cuda/*.cu) is added when torch is a CUDA build, a CUDA toolkit is found and there are CUDA
sources; `EQUIFAST_CUDA=1` demands it (the build fails if it is impossible) and `EQUIFAST_CUDA=0`
forces a CPU-only build.

Build (the build must see the installed torch, hence no build isolation):

    MAX_JOBS=2 pip install --no-build-isolation --no-deps -e .

Environment variables:
    EQUIFAST_CUDA         "1": require the CUDA backend, "0": CPU only, unset: automatic.
    CUDA_HOME             the CUDA toolkit; defaults to /usr/local/cuda when that exists.
    TORCH_CUDA_ARCH_LIST  e.g. "9.0"; when unset and no GPU is visible, defaults to 9.0 (torch
                          cannot guess it without a GPU and fails with an IndexError).
    MAX_JOBS              parallel compile jobs for ninja.
    EQUIFAST_CLEAN_BUILD  "1": compile in a fresh temporary folder instead of build/.
"""

from __future__ import annotations

import glob
import os
import sys

# cpp_extension reads CUDA_HOME when it is imported: set the default before importing it.
# Without it, torch guesses /usr/local from the nvcc on PATH and linking fails (-lcudart).
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")  # relative paths keep the ninja file short and the build relocatable
DEFAULT_CUDA_ARCH_LIST = "9.0"  # H100/H200, the GPUs this project is tested on

# No -std flag: cpp_extension adds the standard its headers need (c++20 for torch 2.14, whose
# headers fail under c++17; older torch may use c++17). Keep equifast's own C++ valid C++17.
# -fopenmp: at::parallel_for is inline in the headers and runs on one thread without it (torch
# itself is built with OpenMP, so its runtime is already loaded).
OPENMP_FLAGS = [] if sys.platform == "darwin" else ["-fopenmp"]
# -fno-trapping-math: GCC otherwise keeps floor() and the float compares of the CPU kernels' plan
# loops scalar (they might raise floating-point exceptions, which nothing here inspects); it
# changes no result.
CXX_FLAGS = ["-O3", "-g0", "-fno-trapping-math"] + OPENMP_FLAGS
# nvcc has no -g0 of its own (it emits no debug info without -g/-G): pass it to the host compiler.
NVCC_FLAGS = ["-O3", "-Xcompiler=-g0", "-diag-suppress=3189", "--expt-relaxed-constexpr"]


def _log(message: str) -> None:
    print(f"[equifast build] {message}", flush=True)


def _fail(message: str) -> None:
    sys.exit(f"[equifast build] error: {message}")


def _sources(pattern: str) -> list[str]:
    # Sorted, relative to the repository root (setup.py runs from there under pip).
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvidia_wheel_includes() -> list[str]:
    """Include folders of torch's nvidia-* wheels (site-packages/nvidia/cu<N>/include).

    A bare toolkit may lack the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes; the
    wheels torch depends on ship them.
    """
    try:
        import nvidia  # namespace package installed with the CUDA build of torch
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        # cu13/include (not cudnn/ or cusparselt/): the CUDA headers of torch's CUDA major version
        found += sorted(glob.glob(os.path.join(base, "cu[0-9]*", "include")))
    return [p for p in found if os.path.isdir(p)]


def _visible_gpu_arches() -> list[str]:
    try:
        if not torch.cuda.is_available():
            return []
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # a broken driver must not break a CPU build
        return []
    return [f"{major}.{minor}" for major, minor in sorted(caps)]


def _choose_cuda(cuda_sources: list[str]) -> tuple[bool, str]:
    """Decide whether to build the CUDA backend; returns (with_cuda, reason)."""
    request = os.environ.get("EQUIFAST_CUDA", "").strip()
    if request not in ("", "0", "1"):
        _fail(f"EQUIFAST_CUDA must be 0, 1 or unset, got {request!r}.")
    if request == "0":
        return False, "EQUIFAST_CUDA=0"
    cuda_home = cpp_extension.CUDA_HOME
    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if not cuda_home or not os.path.isdir(cuda_home):
        problems.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    elif not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        problems.append(f"CUDA_HOME={cuda_home} has no bin/nvcc")
    if request == "1" and problems:
        _fail("EQUIFAST_CUDA=1 but the CUDA backend cannot be built: " + "; ".join(problems))
    if problems:
        return False, "; ".join(problems)
    if not cuda_sources:
        # Nothing to compile with nvcc: a CUDA build would only link cudart and claim a backend
        # without kernels.
        return False, "no CUDA sources in csrc/cuda/ yet"
    return True, "EQUIFAST_CUDA=1" if request == "1" else "torch CUDA build and toolkit found"


def _cuda_arch_list() -> str:
    """Arch list the CUDA sources are compiled for; sets the default when needed."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return arch_list
    visible = _visible_gpu_arches()
    if visible:
        # torch derives the flags from the visible GPUs (and adds +PTX to the newest).
        return ";".join(visible[:-1] + [visible[-1] + "+PTX"])
    _log(f"TORCH_CUDA_ARCH_LIST unset and no GPU visible: using {DEFAULT_CUDA_ARCH_LIST}")
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return DEFAULT_CUDA_ARCH_LIST


def _string_define(name: str, value: str) -> str:
    # cpp_extension shell-quotes every flag in the ninja file, so the quotes reach the compiler.
    return f'-D{name}="{value}"'


def make_extension():
    cpu_sources = [os.path.join(CSRC, "equifast.cpp")] + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda, reason = _choose_cuda(cuda_sources)

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # Build facts for build_info() in csrc/equifast.cpp only (the op bodies never test WITH_CUDA).
    info_defines = [_string_define("EQUIFAST_TORCH_VERSION", torch.__version__)]
    arch_list = ""
    if with_cuda:
        arch_list = _cuda_arch_list()
        # The toolkit's own headers first, the wheels' headers only for what it lacks.
        include_dirs.append(os.path.join(cpp_extension.CUDA_HOME, "include"))
        include_dirs += _nvidia_wheel_includes()
        info_defines += ["-DWITH_CUDA", _string_define("EQUIFAST_CUDA_ARCH_LIST", arch_list)]

    _log("configuration:")
    _log(f"  backends             : {'cpu, cuda' if with_cuda else 'cpu'} ({reason})")
    _log(f"  torch                : {torch.__version__} (CUDA {torch.version.cuda})")
    _log(f"  CUDA_HOME            : {cpp_extension.CUDA_HOME if with_cuda else '-'}")
    _log(f"  TORCH_CUDA_ARCH_LIST : {arch_list or '-'}")
    _log(f"  sources              : {', '.join(cpu_sources + (cuda_sources if with_cuda else []))}")
    _log(f"  include_dirs         : {', '.join(include_dirs)}")
    _log(f"  MAX_JOBS             : {os.environ.get('MAX_JOBS', '(ninja default)')}")

    # An rpath to torch's libraries lets `import equifast._C` work before `import torch` (the
    # loader would not find libc10.so otherwise); once torch is imported it changes nothing.
    link_args = [f"-Wl,-rpath,{lib}" for lib in cpp_extension.library_paths()] + OPENMP_FLAGS
    if with_cuda:
        return cpp_extension.CUDAExtension(
            name="equifast._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS + info_defines, "nvcc": NVCC_FLAGS},
            extra_link_args=link_args,
        )
    return cpp_extension.CppExtension(
        name="equifast._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS + info_defines},
        extra_link_args=link_args,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension with a persistent build folder.

    pip's editable builds compile in a fresh temporary folder, so every rebuild would recompile
    every file; keeping the objects and ninja's log under build/ recompiles only the sources whose
    text, included headers or flags changed. EQUIFAST_CLEAN_BUILD=1 keeps the temporary folder.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        if os.environ.get("EQUIFAST_CLEAN_BUILD", "0") != "1":
            tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")
            _log(f"  object folder        : {self.build_temp}")


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
