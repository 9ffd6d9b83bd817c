"""Build script for lens_fast.

Layout: the package `lens_fast/`, Triton kernels in `kernels/` installed as
`lens_fast.kernels`, the trainer in `train/` installed as `lens_fast.train`, and CUDA
sources in `csrc/` built into `lens_fast._C` only when a CUDA toolkit and a CUDA build
of torch are both present.

Environment variables (as flash-attention does):
  LENS_FAST_SKIP_CUDA_BUILD=1   never build the extension
  LENS_FAST_CUDA_ARCHS="80;90a" architectures to build for (default: the visible GPU's,
                                else 80 and 90a)
  MAX_JOBS                      parallel compile jobs (read by torch's ninja builder)
torch is imported only when the extension is going to be built, so a CPU-only
`pip install .` never needs torch at build time.
"""
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Folder -> import name. `kernels` and `train` must never install as top-level modules
# (`kernels` is a real package that transformers uses for GPT-OSS's MXFP4 path).
ROOTS = {"lens_fast": "lens_fast", "kernels": "lens_fast.kernels", "train": "lens_fast.train"}


def _packages():
    packages, package_dir = [], {}
    for folder, name in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(HERE, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" not in filenames:
                continue
            rel = os.path.relpath(dirpath, HERE)
            sub = os.path.relpath(dirpath, os.path.join(HERE, folder))
            pkg = name if sub == "." else name + "." + sub.replace(os.sep, ".")
            packages.append(pkg)
            package_dir[pkg] = rel
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()


def _want_cuda_build():
    if os.environ.get("LENS_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return False
    try:
        import torch  # noqa: F401 - only when a toolkit is present
    except ImportError:
        return False
    return torch.version.cuda is not None


def _cuda_archs(torch):
    env = os.environ.get("LENS_FAST_CUDA_ARCHS")
    if env:
        archs = [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}{minor}" + ("a" if major == 9 else "")]
    else:
        archs = ["80", "90a"]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def _extensions():
    if not _want_cuda_build():
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc"))
                     if f.endswith((".cu", ".cpp")))
    ext = CUDAExtension(
        name="lens_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + _cuda_archs(torch)},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"lens_fast": ["py.typed", "toy/*.yaml"], "lens_fast.reasoner": ["default_system_prompt.txt"],
                  "lens_fast.curate": ["caption_prompt.txt", "STAGES.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
