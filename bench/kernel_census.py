"""Instructions per element in the hot loop of the token_stats kernels, without a GPU.

Both GPU kernels turned out instruction-bound on an H100 (bench/NOTES-gpu.md, 2026-11-24): at
~29.6e12 lane instructions a second, a loop of k instructions per element streams at most
29.6e12 / k elements a second, so bf16 at 0.95 of the H100's ~3 TB/s read needs k <= ~19.
This script compiles the kernels for sm_90 (nvcc for csrc/cuda/token_stats.cu; Triton's own
compiler for token_stats_triton._slice_kernel, specialised as its launcher is on contiguous,
16-byte aligned rows), disassembles them with the cuobjdump that Triton ships, finds the loop
that holds the 16-byte loads (the backward branch around them) and prints its instructions
per element, with the most frequent opcodes:

    python bench/kernel_census.py                 # cuda and triton, bf16 and fp32

It is a proxy to compare kernel versions offline, not a timing: the GPU decides.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def functions(sass: str) -> dict:
    """name -> [(address, opcode, operands)] of each function in cuobjdump's output."""
    out, name = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :")[1].strip()
            out[name] = []
        elif name is not None:
            m = INSTR.search(line)
            if m:
                out[name].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def hot_loop(instrs):
    """The instructions of the largest backward-branch loop that holds a 16-byte load (the
    streaming loop; the rare NaN rescan after it is a smaller one)."""
    best = None
    for addr, op, rest in instrs:
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", rest)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [i for i in instrs if int(m.group(1), 16) <= i[0] <= addr]
        if any(i[1].startswith("LDG") and ".128" in i[1] for i in body) and (best is None or len(body) > len(best)):
            best = body
    return best or []


def report(label, body, elements):
    ops = collections.Counter(op.split(".")[0] for _, op, _ in body)
    top = ", ".join(f"{n} {op}" for op, n in ops.most_common(8))
    print(f"{label:<14} {len(body):5d} instructions / {elements:3d} elements = "
          f"{len(body) / elements:5.1f} per element   ({top})")


def cuda_census(tmp):
    cubin = os.path.join(tmp, "ts.cubin")
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-o", cubin,
                    os.path.join(REPO, "csrc", "cuda", "token_stats.cu")], check=True)
    sass = subprocess.run([cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True).stdout
    for name, instrs in functions(sass).items():
        if "slice_kernel" not in name:
            continue
        dtype = "bf16" if "bfloat16" in name else "fp16" if "half" in name else "fp32"
        # One iteration: kUnroll (4) groups of 16 bytes per thread.
        report(f"cuda {dtype}", hot_loop(instrs), 4 * (8 if dtype != "fp32" else 4))


def triton_census(tmp):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rankops.ops import token_stats_triton as m
    fn, names = m._slice_kernel, m._slice_kernel.arg_names
    for dtype in ("bf16", "fp32"):
        types = {"logits_ptr": "*" + dtype, "targets_ptr": "*i64", "target_logit_ptr": "*fp32",
                 "lead_sizes": ("i64",), "lead_strides": ("i64",), "n_cols": "i64", "ignore_index": "i64",
                 "part_max_ptr": "*fp32", "part_sum_ptr": "*fp64", "part_gt_ptr": "*i64",
                 "part_eq_ptr": "*i64", "part_bad_ptr": "*i32", "n_slices": "i64"}
        block, warps = m.slice_config(1 << 17)  # the launcher's tile for a large vocabulary
        const = dict(N_LEAD=1, EXTERNAL=False, BF16_BITS=False, SLICE=m.SLICE_COLS, BLOCK=block, stride_col=1)
        sig = {n: "constexpr" if n in const else types[n] for n in names}
        # What Triton's launcher specialises at run time on aligned, contiguous rows of a
        # vocabulary divisible by 16: pointers and those integers are multiples of 16.
        aligned = [n for n in types if n.endswith("_ptr")] + ["n_cols"]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        attrs[(names.index("lead_strides"), 0)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=warps))
        cubin = os.path.join(tmp, f"triton_{dtype}.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True).stdout
        instrs = next(iter(functions(sass).values()))
        report(f"triton {dtype}", hot_loop(instrs), block // (32 * warps))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    args = p.parse_args(argv)
    # This compiles for a GPU target and runs nothing, so Triton must not be in interpreter mode.
    # Triton reads TRITON_INTERPRET when it is first imported (its @jit then makes interpreted
    # functions, which its compiler rejects), and cuda_census already imports it for cuobjdump:
    # drop the variable before either census, not inside the Triton one.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        if "cuda" in args.backends:
            cuda_census(tmp)
        if "triton" in args.backends:
            triton_census(tmp)


if __name__ == "__main__":
    main()
