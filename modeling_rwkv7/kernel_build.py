"""Build the rwkv7_wkv kernel (kernel-hub layout) for this machine.

The kernel's sources ship inside the package (`modeling_rwkv7/kernel`, a link to `kernels/rwkv7_wkv` in a checkout),
so an installed package can build its native CPU decoding ops itself. The official builder (kernel-builder) needs
Nix; this module produces the same layout with torch.utils.cpp_extension:

    <variant>/__init__.py            the Python API (torch-ext/rwkv7_wkv/*.py)
    <variant>/_ops.py                binds torch.ops.<id>
    <variant>/<id>.abi3.so           the ops, registered under the namespace <id>
    <variant>/metadata.json          name, id, version, license, python-depends, backend, digest
    <variant>/rwkv7_wkv/__init__.py  entry point for `kernels` releases that import this directory

The variant name is the one `kernels` looks for on this machine (e.g. torch213-cxx11-cpu-x86_64-linux) and
<id> is `_rwkv7_wkv_<backend>_<hash of the sources, this module and the toolchain>`: a variant is rebuilt only
when that hash changes, and a source change gives the new build a fresh ops namespace.

As with kernel-builder, each source is compiled with only the include directories build.toml declares for it (a
kernel's `include` entries; torch-ext sources get none but the generated registration.h). metadata.json carries
the SHA-256 digest of the variant's files (kernels-data's `Digest`), and the CPU build is checked with
kernel-abi-check (Python 3.9 stable ABI, manylinux_2_28).

    python -m modeling_rwkv7.kernel_build               # CPU variant into kernels/rwkv7_wkv/build/ (to publish)
    python -m modeling_rwkv7.kernel_build --native      # CPU variant into the per-user cache the model loads from
    python -m modeling_rwkv7.kernel_build --cuda        # CUDA variant, for the GPUs of this machine
    python -m modeling_rwkv7.kernel_build --check-cuda  # nvcc + c++ compile check of the CUDA sources for
                                                        # build.toml's cuda-capabilities (no GPU needed;
                                                        # --archs 8.0,12.0+PTX: only those; --quick: device
                                                        # code at -O1, a tenth of the time, without the
                                                        # release build's register and spill counts)
    python -m modeling_rwkv7.kernel_build --check-cpu   # c++ compile check of the CPU sources
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib

KERNEL_DIR = (Path(__file__).resolve().parent / "kernel").resolve()  # kernels/rwkv7_wkv in a checkout
BUILD_DIR = KERNEL_DIR / "build"  # where the kernel-hub variants are published from
PYTHON_ABI = "3.9"  # the stable-ABI and manylinux levels kernel-builder builds for
MANYLINUX = "manylinux_2_28"

# What kernel-builder generates next to torch_binding.cpp: a TORCH_LIBRARY that takes the namespace from a macro,
# and a Python module init so that `from . import <id>` loads the library.
REGISTRATION_H = """\
#pragma once
#include <Python.h>

#define RWKV7_WKV_STRINGIFY_(x) #x
#define RWKV7_WKV_STRINGIFY(x) RWKV7_WKV_STRINGIFY_(x)
#define RWKV7_WKV_CONCAT_(a, b) a##b
#define RWKV7_WKV_CONCAT(a, b) RWKV7_WKV_CONCAT_(a, b)

#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)

#define REGISTER_EXTENSION(NAME)                                                                 \\
  PyMODINIT_FUNC RWKV7_WKV_CONCAT(PyInit_, NAME)() {                                             \\
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, RWKV7_WKV_STRINGIFY(NAME), nullptr, 0, nullptr}; \\
    return PyModule_Create(&module);                                                             \\
  }
"""

OPS_PY = '''\
import torch

from . import {ops_id}

ops = torch.ops.{ops_id}


def add_op_namespace_prefix(op_name: str) -> str:
    """The qualified name of one of this kernel's ops."""
    return f"{ops_id}::{{op_name}}"
'''

COMPAT_INIT_PY = '''\
"""Entry point for `kernels` releases that import build/<variant>/{module}/: loads the variant's own module."""

import importlib.util
import sys
from pathlib import Path

_variant_dir = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    f"{{__name__}}._variant", _variant_dir / "__init__.py", submodule_search_locations=[str(_variant_dir)]
)
_variant = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _variant
_spec.loader.exec_module(_variant)

globals().update({{name: getattr(_variant, name) for name in _variant.__all__}})
__all__ = list(_variant.__all__)
'''


def kernel_config() -> dict:
    with open(KERNEL_DIR / "build.toml", "rb") as f:
        return tomllib.load(f)


def python_module_name(config: dict) -> str:
    return config["general"]["name"].replace("-", "_")


def variant_name(backend: str) -> str:
    """The arch variant `kernels` accepts for this torch, e.g. torch213-cxx11-cpu-x86_64-linux."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if backend == "cuda":
        cuda_major, cuda_minor = torch.version.cuda.split(".")[:2]
        compute = f"cu{cuda_major}{cuda_minor}"
    else:
        compute = "cpu"
    os_name = platform.system().lower()
    abi = f"-cxx{'11' if torch.compiled_with_cxx11_abi() else '98'}" if os_name == "linux" else ""
    return f"torch{major}{minor}{abi}-{compute}-{platform.machine()}-{os_name}"


def check_variant_accepted(variant: str, backend: str) -> str:
    """Ask the installed `kernels` whether it would pick `variant` here; returns a line for the report."""
    try:
        from kernels._internals.variants import parse_variant, resolve_variants  # private since kernels 0.19
    except ImportError:
        return "kernels not installed: variant name not cross-checked"
    accepted, trace = resolve_variants([parse_variant(variant)], backend)
    if not accepted:
        reasons = "; ".join(getattr(decision, "reason", "") for decision in trace)
        raise SystemExit(f"error: kernels would not load variant {variant} on this machine: {reasons}")
    return f"kernels accepts {variant} for backend {backend}"


def source_files() -> list[Path]:
    files = [KERNEL_DIR / "build.toml"]
    files += sorted(p for p in (KERNEL_DIR / "csrc").rglob("*") if p.is_file())
    files += sorted(p for p in (KERNEL_DIR / "torch-ext").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def kernel_sources(config: dict, backend: str) -> dict[str, list[Path]]:
    """Compiled sources (relative to KERNEL_DIR) of `backend`, from build.toml, each with the include directories
    build.toml declares for it: its kernel's `include` entries; none for the torch-ext sources."""
    sources = {s: [] for s in config["torch"]["src"] if s.endswith((".cpp", ".cu"))}
    for kernel in config["kernel"].values():
        if kernel["backend"] == backend:
            includes = [KERNEL_DIR / entry for entry in kernel.get("include", [])]
            sources.update({s: includes for s in kernel["src"] if s.endswith((".cpp", ".cu"))})
    return sources


def declared_cuda_archs(config: dict) -> list[str]:
    """The cuda-capabilities of build.toml's CUDA kernels (e.g. "12.0+PTX"), in ascending order."""
    archs = {
        arch
        for kernel in config["kernel"].values()
        if kernel["backend"] == "cuda"
        for arch in kernel["cuda-capabilities"]
    }
    return sorted(archs, key=lambda arch: tuple(int(x) for x in arch.removesuffix("+PTX").split(".")))


def build_hash(backend: str, flags: list[str]) -> str:
    import torch

    digest = hashlib.sha256()
    this_module = Path(__file__).resolve()
    for name, path in [
        *((str(p.relative_to(KERNEL_DIR)), p) for p in source_files()),
        (this_module.name, this_module),
    ]:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    toolchain = [backend, torch.__version__, str(torch.version.cuda), sys.version, platform.machine(), *flags]
    digest.update("\0".join(toolchain).encode())
    return digest.hexdigest()[:7]


def cuda_archs() -> list[str]:
    """TORCH_CUDA_ARCH_LIST if set, else the compute capabilities of the visible GPUs."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return sorted(set(re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip())))
    if not torch.cuda.is_available():
        raise SystemExit("error: --cuda needs a visible GPU or TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0')")
    return sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})


def find_cuda_home() -> Path:
    """The CUDA toolkit to build with, exported as CUDA_HOME for torch.utils.cpp_extension (which reads it when
    imported): CUDA_HOME / CUDA_PATH, else the toolkit of the `nvcc` on PATH or under /usr/local, preferring one
    whose major version matches this torch's CUDA."""
    import torch

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        # /usr/local/bin/nvcc may be a wrapper script: look for the toolkit path it runs
        with open(nvcc, "rb") as f:
            candidates += re.findall(r"(/\S+)/bin/nvcc", f.read(4096).decode(errors="ignore"))
    candidates += ["/usr/local/cuda"] + sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    toolkits = []
    for candidate in dict.fromkeys(filter(None, candidates)):
        home = Path(candidate)
        if (home / "include" / "cuda_runtime_api.h").exists() and (home / "bin" / "nvcc").exists():
            toolkits.append(home)
    if not toolkits:
        raise SystemExit(f"error: no CUDA toolkit found (tried {[c for c in candidates if c]}); set CUDA_HOME")
    if torch.version.cuda and not os.environ.get("CUDA_HOME"):
        major = torch.version.cuda.split(".")[0]
        toolkits.sort(key=lambda path: toolkit_version(path).split(".")[0] != major)
    os.environ["CUDA_HOME"] = str(toolkits[0])
    return toolkits[0]


def toolkit_version(cuda_home: Path) -> str:
    output = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else "unknown"


def gencode_flags(archs) -> list[str]:
    flags = []
    for arch in archs:
        number = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def compile_extension(
    ops_id: str, backend: str, sources: dict[str, list[Path]], flags: dict, out_dir: Path, temp: Path
):
    """Compile and link `<ops_id>.abi3.so` into `out_dir` with torch.utils.cpp_extension, on the declared include
    directories of the sources (cpp_extension takes one list for all: their union)."""
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include = temp / "include"
    include.mkdir()
    (include / "registration.h").write_text(REGISTRATION_H)
    make_extension = CUDAExtension if backend == "cuda" else CppExtension
    declared = dict.fromkeys(str(path) for includes in sources.values() for path in includes)
    # The binary holds source paths (in its error messages): mapped to fixed names, the same sources give the same
    # bytes wherever they and torch are installed, as the id (a hash of their contents) promises.
    import torch

    path_maps = [f"-ffile-prefix-map={KERNEL_DIR}=rwkv7_wkv", f"-ffile-prefix-map={Path(torch.__file__).parent}=torch"]
    flags = {
        name: [*compiler_flags, *(path_maps if name == "cxx" else [f"-Xcompiler={m}" for m in path_maps])]
        for name, compiler_flags in flags.items()
    }
    extension = make_extension(
        name=ops_id,
        sources=list(sources),
        include_dirs=[str(include), *declared],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"] if backend == "cpu" else [],
        py_limited_api=True,
    )
    os.environ.setdefault("MAX_JOBS", "2")
    cwd = os.getcwd()
    os.chdir(KERNEL_DIR)
    try:
        setup(
            name="rwkv7_wkv_build",
            ext_modules=[extension],
            cmdclass={"build_ext": BuildExtension},
            script_args=["-q", "build_ext", "--build-lib", str(out_dir), "--build-temp", str(temp / "objects")],
        )
    finally:
        os.chdir(cwd)
    built = [p for p in out_dir.iterdir() if p.name.startswith(ops_id) and p.suffix == ".so"]
    if len(built) != 1:
        raise SystemExit(f"error: expected one {ops_id}*.so in {out_dir}, found {[p.name for p in built]}")
    if not built[0].name.endswith(".abi3.so"):
        built[0].rename(out_dir / f"{ops_id}.abi3.so")


def variant_digest(variant_dir: Path):
    """metadata.json's `digest` entry for the files of `variant_dir` (kernels-data's SHA-256 `Digest`, which
    skips metadata.json and __pycache__), or None without kernels-data."""
    try:
        from kernels_data import Digest, DigestAlgorithm
    except ImportError:
        return None
    return {"algorithm": "sha256", "files": Digest.hash_variant(DigestAlgorithm.SHA256, variant_dir).files}


def check_metadata(variant_dir: Path) -> str:
    """Reads metadata.json with kernels-data's `Metadata` and validates its digest against the files; raises
    SystemExit on a mismatch. Returns a line for the report."""
    try:
        from kernels_data import Digest, DigestValidationError, Metadata
    except ImportError:
        return "kernels-data not installed: metadata.json not cross-checked"
    metadata = Metadata.read_from_file(variant_dir / "metadata.json")
    if metadata.digest is None:
        raise SystemExit(f"error: {variant_dir / 'metadata.json'} has no digest")
    try:
        metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, variant_dir))
    except DigestValidationError as error:
        violations = "; ".join(str(violation) for violation in error.violations)
        raise SystemExit(f"error: {variant_dir.name} does not match its metadata digest: {violations}")
    return f"metadata.json read by kernels-data (id {metadata.id}); digest of {len(metadata.digest.files)} files ok"


def check_abi(library: Path) -> str:
    """kernel-abi-check of a built library: a Python stable-ABI violation raises SystemExit; symbols newer than
    manylinux_2_28 (what a build against this machine's glibc may need) are reported, since only kernel-builder's
    toolchain targets that level. Returns a line for the report."""
    try:
        from kernel_abi_check import ObjectFile
    except ImportError:
        return "kernel-abi-check not installed: ABI not checked"
    binary = ObjectFile(library)
    abi_violations = binary.check_python_abi(PYTHON_ABI)
    if abi_violations:
        raise SystemExit(f"error: {library.name} is not abi3 for Python {PYTHON_ABI}: {abi_violations}")
    newer = sorted({f"{v.name} ({v.dep} {v.version})" for v in binary.check_manylinux(MANYLINUX)})
    manylinux = f"{MANYLINUX} compatible" if not newer else f"not {MANYLINUX}: needs {', '.join(newer)}"
    return f"kernel-abi-check: {library.name} is abi3 for Python >= {PYTHON_ABI}; {manylinux}"


def build_flags(backend: str, archs: list[str]) -> dict[str, list[str]]:
    macro = "-DCUDA_KERNEL" if backend == "cuda" else "-DCPU_KERNEL"
    flags = {"cxx": ["-O3", "-g0", macro] + (["-fopenmp"] if backend == "cpu" else [])}
    if backend == "cuda":
        flags["nvcc"] = ["-O3", macro, "-lineinfo"] + gencode_flags(archs)
    return flags


def ops_id_for(backend: str, flags: dict[str, list[str]]) -> str:
    """`_rwkv7_wkv_<backend>_<hash>`: the ops namespace and the build's identity (see the module docstring)."""
    return f"_{python_module_name(kernel_config())}_{backend}_{build_hash(backend, sorted(sum(flags.values(), [])))}"


def up_to_date_variant(build_dir: Path, backend: str = "cpu", archs: Optional[list[str]] = None) -> Optional[Path]:
    """The variant directory of `build_dir` built from the current sources and toolchain, or None."""
    ops_id = ops_id_for(backend, build_flags(backend, archs or []))
    variant_dir = build_dir / variant_name(backend)
    metadata_path = variant_dir / "metadata.json"
    if metadata_path.exists() and (variant_dir / f"{ops_id}.abi3.so").exists():
        if json.loads(metadata_path.read_text()).get("id") == ops_id:
            return variant_dir
    return None


def native_cache_dir() -> Path:
    """Where the model's own native CPU ops are built and found: `kernels/` in the package's cache folder
    (`measured_rwkv7.cache_root()`). Safe to delete: the ops are rebuilt when next needed."""
    from .measured_rwkv7 import cache_root

    return cache_root() / "kernels"


def build_into(out: Path, staging: Path, backend: str, ops_id: str, flags: dict, archs: list[str]) -> None:
    """Compile the `backend` ops as `ops_id` into the empty folder `out` and write the variant's Python files and
    metadata.json (with its digest) beside them."""
    config = kernel_config()
    module = python_module_name(config)
    compile_extension(ops_id, backend, kernel_sources(config, backend), flags, out, staging)

    for source in sorted((KERNEL_DIR / "torch-ext" / module).glob("*.py")):
        shutil.copy2(source, out / source.name)
    (out / "_ops.py").write_text(OPS_PY.format(ops_id=ops_id))
    (out / module).mkdir()
    (out / module / "__init__.py").write_text(COMPAT_INIT_PY.format(module=module))
    metadata = {
        "name": config["general"]["name"],
        "id": ops_id,
        "version": config["general"]["version"],
        "license": config["general"]["license"],
        "python-depends": [],
        "backend": {"type": backend, **({"archs": archs} if archs else {})},
    }
    digest = variant_digest(out)  # of every file but metadata.json, so computed before writing it
    if digest is None:
        print("note: kernels-data not installed: metadata.json without a digest")
    else:
        metadata["digest"] = digest
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(check_metadata(out))
    if backend == "cpu":
        print(check_abi(out / f"{ops_id}.abi3.so"))


def build_variant(backend: str, force: bool = False, build_dir: Path = BUILD_DIR) -> Path:
    """Build the `backend` variant into `build_dir/<variant>` (atomically: a staging folder renamed into place), or
    find it up to date there. Returns the variant directory."""
    import torch

    if backend == "cuda" and torch.version.cuda is None:
        raise SystemExit(f"error: --cuda needs a CUDA build of torch, this one is {torch.__version__}")
    variant = variant_name(backend)
    print(check_variant_accepted(variant, backend))

    archs = []
    if backend == "cuda":
        cuda_home = find_cuda_home()
        print(f"CUDA toolkit: {cuda_home} ({toolkit_version(cuda_home)}); torch built with CUDA {torch.version.cuda}")
        archs = cuda_archs()
    flags = build_flags(backend, archs)
    ops_id = ops_id_for(backend, flags)
    variant_dir = build_dir / variant
    if not force and up_to_date_variant(build_dir, backend, archs) is not None:
        print(f"up to date: {variant_dir} (id {ops_id})")
        return variant_dir
    # One id, one binary: a process that loaded the native cache's build refuses another build with the same id, so
    # a build elsewhere copies an up-to-date native build rather than compiling (the native build itself compiles).
    native = native_cache_dir()
    twin = None if force or build_dir.resolve() == native.resolve() else up_to_date_variant(native, backend, archs)

    started = time.time()
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".staging-{variant}-", dir=build_dir) as staging_name:
        staging = Path(staging_name)
        out = staging / "variant"
        if twin is not None:
            print(f"copying {twin} (id {ops_id}, built from the same sources)")
            shutil.copytree(twin, out)
            print(check_metadata(out))
        else:
            print(f"building {variant} (id {ops_id}, backend {backend}{' for ' + ' '.join(archs) if archs else ''})")
            out.mkdir()
            build_into(out, staging, backend, ops_id, flags, archs)

        # another process may have built the same variant meanwhile: its copy is as good as this one
        if up_to_date_variant(build_dir, backend, archs) is None:
            shutil.rmtree(variant_dir, ignore_errors=True)
            try:
                out.rename(variant_dir)
            except OSError:
                if up_to_date_variant(build_dir, backend, archs) is None:
                    raise
    files = ", ".join(sorted(str(p.relative_to(variant_dir)) for p in variant_dir.rglob("*") if p.is_file()))
    print(f"built {variant_dir} in {time.time() - started:.0f} s: {files}")
    return variant_dir


def check_sources(backend: str, only_archs: Optional[list[str]] = None, quick: bool = False) -> list[dict]:
    """Compile every `backend` source of build.toml with exactly its declared include directories (plus the
    system headers of torch, Python and CUDA), as kernel-builder does, without a GPU: nvcc for the .cu files, for
    every cuda-capability of build.toml (reporting registers and spills), and c++ -fsyntax-only for the .cpp
    files. `quick`: nvcc optimizes device code at -O1 (every template still compiles for every capability; the
    optimisation of the release build's -O3 is 90% of nvcc's time), so the registers and spills reported are not
    the release build's. Prints a line per source and returns a record per source: {"source", "compiler" ("nvcc"
    or "c++"), "includes" (the -I directories, relative to the kernel folder), "archs", "kernels" (nvcc: a line
    per compiled kernel with its registers and spills)}; a failed compile raises SystemExit."""
    import torch.utils.cpp_extension as cpp_extension

    config = kernel_config()
    sources = kernel_sources(config, backend)
    torch_sources = set(config["torch"]["src"])
    archs = declared_cuda_archs(config)
    if only_archs:
        undeclared = sorted(set(only_archs) - set(archs))
        if undeclared:
            raise SystemExit(f"error: --archs {','.join(undeclared)} not among build.toml's cuda-capabilities {archs}")
        archs = [arch for arch in archs if arch in only_archs]
    cuda_home = find_cuda_home() if backend == "cuda" else None
    started = time.time()
    with tempfile.TemporaryDirectory() as temp_name:
        temp = Path(temp_name)
        generated = temp / "generated"  # what kernel-builder writes next to torch_binding.cpp
        generated.mkdir()
        (generated / "registration.h").write_text(REGISTRATION_H)
        system = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
        if cuda_home is not None:
            # Generated at torch's own build and absent from CPU wheels; its one macro only affects symbol visibility.
            stand_in = temp / "system"
            (stand_in / "c10" / "cuda" / "impl").mkdir(parents=True)
            macros = stand_in / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
            macros.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
            system += [str(stand_in), str(cuda_home / "include")]
        macro = "-DCUDA_KERNEL" if backend == "cuda" else "-DCPU_KERNEL"

        jobs = []
        for source, includes in sources.items():
            include_flags = [f"-I{path}" for path in includes + ([generated] if source in torch_sources else [])]
            if source.endswith(".cu"):
                # the flags torch's CUDAExtension adds (C++20, no implicit half conversions, ...) plus ours
                command = [
                    str(cuda_home / "bin" / "nvcc"),
                    "-std=c++20",
                    *cpp_extension.COMMON_NVCC_FLAGS,
                    "-O3",
                    "-c",
                    str(KERNEL_DIR / source),
                    "-o",
                    str(temp / (Path(source).stem + ".o")),
                    *(["-Xptxas", "-v,-O1", "-Xcicc", "-O1"] if quick else ["-Xptxas", "-v"]),
                    "--threads",
                    "2",
                    *include_flags,
                    *gencode_flags(archs),
                ]
                compiler, label = "nvcc", f"nvcc {source} for {', '.join(archs)}"
            else:
                command = [
                    "c++",
                    "-std=c++20",
                    "-fsyntax-only",
                    "-Wall",
                    macro,
                    "-DTORCH_EXTENSION_NAME=_check",
                    *include_flags,
                    *(f"-isystem{path}" for path in system),
                    str(KERNEL_DIR / source),
                ]
                compiler, label = "c++", f"c++ -fsyntax-only {macro} {source}"
            relative_includes = [str(p.relative_to(KERNEL_DIR)) for p in includes]
            label += f" (includes: {', '.join(relative_includes) or 'none'})"
            record = {"source": source, "compiler": compiler, "includes": relative_includes}
            record["archs"] = archs if compiler == "nvcc" else []
            jobs.append((label, record, command))

        running = [
            (label, record, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for label, record, cmd in jobs
        ]
        failed, checked = False, []
        for label, record, process in running:
            output, _ = process.communicate()
            if process.returncode != 0:
                failed = True
                print(f"FAILED: {label}\n{output}")
                continue
            print(f"ok: {label}")
            record["kernels"] = ptxas_summary(output) if record["compiler"] == "nvcc" else []
            for line in record["kernels"]:
                print("  " + line)
            checked.append(record)
    if failed:
        raise SystemExit(f"error: {backend} compile check failed")
    print(f"{backend} compile check passed in {time.time() - started:.0f} s")
    return checked


def ptxas_summary(output: str) -> list[str]:
    """One line per compiled kernel: name, arch, registers, spill bytes."""
    lines, current = [], None
    for line in output.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if entry:
            name = re.search(r"(forward|backward)_kernelILi(\d+)E(\w*?)EEv", entry.group(1))
            label = f"{name.group(1)} N={name.group(2)} {demangle_dtype(name.group(3))}" if name else entry.group(1)
            current = [label, entry.group(2), "", ""]
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current:
            current[3] = f"spill {spill.group(1)}/{spill.group(2)} B"
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current:
            current[2] = f"{registers.group(1)} registers"
            lines.append(f"{current[1]} {current[0]:<28} {current[2]:<14} {current[3]}")
            current = None
    return lines


def demangle_dtype(mangled: str) -> str:
    return {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}.get(mangled, mangled)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="build the CUDA variant instead of the CPU one")
    parser.add_argument("--check-cuda", action="store_true", help="only compile-check the CUDA sources (no GPU)")
    parser.add_argument("--check-cpu", action="store_true", help="only compile-check the CPU sources")
    parser.add_argument(
        "--archs", help="with --check-cuda: only these of build.toml's cuda-capabilities (e.g. 8.0,12.0+PTX)"
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help=f"build the CPU variant into the per-user cache the model loads from ({native_cache_dir()})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="with --check-cuda: device code at -O1 (not the release registers)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the variant is up to date")
    args = parser.parse_args(argv)
    checks = [backend for backend, wanted in (("cpu", args.check_cpu), ("cuda", args.check_cuda)) if wanted]
    for backend in checks:
        check_sources(backend, args.archs.split(",") if args.archs else None, quick=args.quick)
    if not checks:
        build_dir = native_cache_dir() if args.native else BUILD_DIR
        build_variant("cuda" if args.cuda else "cpu", force=args.force, build_dir=build_dir)


if __name__ == "__main__":
    main()
