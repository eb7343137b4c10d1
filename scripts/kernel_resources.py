"""Resource usage and SASS instruction mix of the WKV-7 CUDA kernels, without a GPU.

Compiles kernels/rwkv7_wkv/csrc/cuda/wkv7_cuda.cu with nvcc for one architecture (sm_90 by default) and prints, per
kernel: registers, stack and spill (local) bytes from `cuobjdump --dump-resource-usage`, the dynamic shared memory
the launcher asks for (from wkv7_core.h, via a host build), and for head size 64 the static SASS instruction counts
by kind (global/shared loads and stores, barriers, FMAs) with the loops of the code: each loop's instruction count
is the cost of one trip, e.g. one time step of the forward.

    python scripts/kernel_resources.py [--arch 90] [--object wkv7_cuda.o]

Needs nvcc, g++, and cuobjdump and nvdisasm (CUDA toolkit, or pip's nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm, whose bin/ this script also looks in).
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "kernels" / "rwkv7_wkv" / "csrc"
NVCC_FLAGS = [
    "-std=c++20",
    "-O3",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
# instruction kinds counted (the opcode up to its first dot)
KINDS = ["LDG", "STG", "LDS", "STS", "LDL", "STL", "BAR", "FFMA", "FMUL", "FADD", "MUFU", "SHFL"]

SMEM_PROGRAM = r"""
#include <cstdio>
#include "wkv7_core.h"
template <int N> void print() {
  std::printf("forward %d %zu %zu\nbackward %d %zu 0\n", N, wkv7::forward_smem_floats<N>() * sizeof(float),
              wkv7::forward_buffer_floats<N>() * sizeof(float), N, wkv7::BackwardSmem<N>::kFloats * sizeof(float));
}
int main() { print<16>(); print<32>(); print<64>(); }
"""


def find_tool(name: str) -> str:
    """`name` on PATH, in the CUDA toolkit of nvcc, or in the bin/ of pip's nvidia-cuda-* packages."""
    candidates = [shutil.which(name)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        text = Path(nvcc).read_bytes()[:4096].decode(errors="ignore")
        candidates += [f"{home}/bin/{name}" for home in re.findall(r"(/\S+)/bin/nvcc", text)]
        candidates.append(str(Path(nvcc).resolve().parent / name))
    try:
        import nvidia

        candidates += [str(Path(p) / "cu13" / "bin" / name) for p in nvidia.__path__]
    except ImportError:
        pass
    for candidate in filter(None, candidates):
        if Path(candidate).is_file():
            return candidate
    raise SystemExit(f"error: {name} not found (install the CUDA toolkit, or pip install nvidia-cuda-{name})")


def run(command: list[str], **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def kernel_label(mangled: str) -> str:
    match = re.search(r"(forward|backward)_kernelILi(\d+)E(\w*?)EEv", mangled)
    return f"{match.group(1)} N={match.group(2)} {DTYPES.get(match.group(3), match.group(3))}" if match else mangled


def dynamic_shared_memory(temp: Path) -> dict:
    source = temp / "smem.cpp"
    source.write_text(SMEM_PROGRAM)
    run(["g++", "-std=c++20", f"-I{CSRC}", str(source), "-o", str(temp / "smem")])
    sizes = {}
    for line in run([str(temp / "smem")]).splitlines():
        kind, n, size, one_chunk = line.split()
        sizes[(kind, int(n))] = (int(size), int(one_chunk))
    return sizes


def sass_functions(sass: str) -> dict:
    """Instructions (address, opcode, text) of each function of a `cuobjdump -sass` listing."""
    functions, current = {}, None
    for line in sass.splitlines():
        header = re.match(r"\s+Function : (\S+)", line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        instruction = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if instruction and current is not None:
            current.append((int(instruction.group(1), 16), instruction.group(3).split(".")[0], instruction.group(4)))
    return functions


def loops(instructions) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each backward branch's loop, outermost last."""
    index = {address: i for i, (address, _, _) in enumerate(instructions)}
    found = []
    for i, (address, opcode, operands) in enumerate(instructions):
        target = re.match(r"`?\(?(0x[0-9a-f]+)", operands.strip())
        if opcode == "BRA" and target and int(target.group(1), 16) <= address:
            found.append((index.get(int(target.group(1), 16), 0), i))
    return sorted(found, key=lambda loop: loop[1] - loop[0])


def mix(instructions) -> str:
    counts = Counter(opcode for _, opcode, _ in instructions)
    return " ".join(f"{kind} {counts[kind]}" for kind in KINDS if counts[kind])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--object", type=Path, help="an already compiled wkv7_cuda.o to read instead of compiling")
    args = parser.parse_args()
    cuobjdump = find_tool("cuobjdump")
    nvdisasm = find_tool("nvdisasm")
    env = {"PATH": f"{Path(nvdisasm).parent}:{Path(find_tool('nvcc')).parent}:/usr/bin:/bin"}

    with tempfile.TemporaryDirectory() as temp_name:
        temp = Path(temp_name)
        obj = args.object
        if obj is None:
            obj = temp / "wkv7_cuda.o"
            run(
                [
                    find_tool("nvcc"),
                    *NVCC_FLAGS,
                    f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}",
                    f"-I{CSRC}",
                    "-c",
                    str(CSRC / "cuda" / "wkv7_cuda.cu"),
                    "-o",
                    str(obj),
                ]
            )
        smem = dynamic_shared_memory(temp)
        usage = run([cuobjdump, "--dump-resource-usage", str(obj)], env=env)
        sass = run([cuobjdump, "-sass", str(obj)], env=env)

    print(f"sm_{args.arch}: registers, stack, spills (local), dynamic shared memory per block")
    rows = []
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage):
        values = dict(re.findall(r"(\w+(?:\[\d\])?):(\d+)", fields))
        label = kernel_label(name)
        kind, n = label.split()[0], int(label.split()[1][2:])
        rows.append((label, values, smem[(kind, n)]))
    for label, values, shared in sorted(rows, key=lambda row: (row[0].split()[0], int(row[0].split()[1][2:]), row[0])):
        one_chunk = f" ({shared[1] / 1024:.2f} KiB for one chunk, e.g. decoding)" if shared[1] else ""
        print(
            f"  {label:<26} REG {values['REG']:>3}  STACK {values['STACK']:>3}  LOCAL {values['LOCAL']:>3}  "
            f"dynamic smem {shared[0] / 1024:6.2f} KiB{one_chunk}"
        )

    print(f"\nsm_{args.arch} SASS, head size 64: static instruction counts; loops innermost first (one trip each)")
    for name, instructions in sorted(sass_functions(sass).items(), key=lambda item: kernel_label(item[0])):
        label = kernel_label(name)
        if " N=64 " not in label:
            continue
        print(f"  {label}: {len(instructions)} instructions: {mix(instructions)}")
        for first, last in loops(instructions):
            body = instructions[first : last + 1]
            print(
                f"    loop {instructions[first][0]:#06x}-{instructions[last][0]:#06x}: {len(body):4d} instructions: "
                f"{mix(body)}"
            )


if __name__ == "__main__":
    sys.exit(main())
