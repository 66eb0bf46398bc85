"""Every Triton kernel compiles for a GPU, checked here without one.

The tests elsewhere run the kernels under TRITON_INTERPRET=1, and the interpreter accepts code
that the GPU compiler refuses: a global that is not a tl.constexpr, or a tuple indexed by a
name assigned in the kernel (a compiled kernel holds such a name as a tensor). This file
compiles each kernel ahead of time for sm_90 with Triton's own ptxas, in every specialisation
its launcher can ask for, in a child process without TRITON_INTERPRET."""
import os
import subprocess
import sys

import pytest
import torch

import rankops

COMPILE_FOR_GPU = r'''
import itertools
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_kernel(fn, types, const, **options):
    """fn compiled for sm_90: types maps arguments to Triton types (other pointers *fp32, other
    scalars i32), const the constexpr arguments."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)

# The logits as each launcher passes them: bf16 as its int16 bits (BF16_BITS), fp16 and fp32 as is.
LOGITS = (("fp32", False), ("fp16", False), ("i16", True))

def linear_token_stats():
    from rankops.ops import linear_token_stats_triton as m
    ints = {"targets_ptr": "*i64", "part_gt_ptr": "*i64", "part_eq_ptr": "*i64", "part_bad_ptr": "*i32",
            "part_sum_ptr": "*fp64"}
    for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        block_m, block_k, warps, stages = m.TILES[size]
        types = dict(ints, hidden_ptr="*" + dtype, weight_ptr="*" + dtype, bias_ptr="*" + dtype)
        const = dict(HAS_BIAS=True, ROUND={"bf16": 1, "fp16": 2, "fp32": 0}[dtype], UPCAST=False,
                     BF16_BITS=False, INPUT_PRECISION="ieee" if dtype == "fp32" else None,
                     BLOCK_M=block_m, BLOCK_N=m.BLOCK_N, BLOCK_K=block_k)
        ptx = compile_kernel(m._tiles_kernel, types, const, num_warps=warps, num_stages=stages).asm["ptx"]
        # 16-bit inputs on tensor cores (wgmma on sm_90); fp32 "ieee" never as tf32.
        assert ("wgmma" in ptx) == (size == 2) and "tf32" not in ptx, dtype
    types = dict(ints, rank_ptr="*i64", ties_ptr="*i64", bad_ptr="*i32", ignore_index="i64")
    compile_kernel(m._finish_kernel, types, dict(BLOCK_R=128), num_warps=4)

def token_stats():
    from rankops.ops import token_stats_triton as m
    layout = dict(zip(("ROW_COUNT", "ROW_SUM_HI", "ROW_SUM_LO", "ROW_COUNT_PESS", "ROW_SUM_HI_PESS",
                       "ROW_SUM_LO_PESS"), range(6)))
    # Compiled, token_stats' launcher passes bf16 as bf16 (the bits only under the interpreter).
    for (logits, bf16_bits), n_lead, external in itertools.product(LOGITS + (("bf16", False),), (1, 3),
                                                                    (False, True)):
        lead = ("i64",) * n_lead
        types = {"logits_ptr": "*" + logits, "targets_ptr": "*i64", "lead_sizes": lead, "lead_strides": lead,
                 "stride_col": "i64", "n_cols": "i64", "ignore_index": "i64", "part_sum_ptr": "*fp64",
                 "part_gt_ptr": "*i64", "part_eq_ptr": "*i64", "part_bad_ptr": "*i32", "n_slices": "i64",
                 "rank_ptr": "*i64", "ties_ptr": "*i64", "bad_ptr": "*i32", "stats_ptr": "*i64",
                 "hist_len": "i64"}
        flags = dict(N_LEAD=n_lead, EXTERNAL=external, BF16_BITS=bf16_bits)
        for n_cols in (16, 1 << 17):  # the launcher's smallest and largest tiles, with its warps
            block, warps = m.slice_config(n_cols)
            compile_kernel(m._slice_kernel, types, dict(flags, SLICE=m.SLICE_COLS, BLOCK=block),
                           num_warps=warps)
        for accumulate in (False,) if external else (False, True):
            ptx = compile_kernel(m._finish_kernel, types, dict(
                flags, ACCUMULATE=accumulate, LOGP_SCALE=2.0 ** 40 if accumulate else 0.0,
                LOGP_LIMIT=2.0 ** 22 if accumulate else 0.0, **layout), num_warps=1).asm["ptx"]
            # Accumulation adds six int64 words per token with global atomics, and only then.
            assert (".add.u64" in ptx or ".add.s64" in ptx) == accumulate, (logits, n_lead, accumulate)

def softmax_grad():
    from rankops.ops import softmax_grad_triton as m
    for (logits, bf16_bits), n_lead in itertools.product(LOGITS, (1, 3)):
        lead = ("i64",) * n_lead
        types = {"logits_ptr": "*" + logits, "targets_ptr": "*i64", "grad_ptr": "*" + logits,
                 "lead_sizes": lead, "lead_strides": lead, "stride_col": "i64", "n_cols": "i64",
                 "row_len": "i64", "ignore_index": "i64"}
        out = {"fp32": 0, "i16": 1, "fp16": 2}[logits]
        for block in (16, m.MAX_BLOCK):
            compile_kernel(m._grad_kernel, types, dict(BLOCK=block, N_LEAD=n_lead, BF16_BITS=bf16_bits, OUT=out),
                           num_warps=8 if block >= 2048 else 4)

def read_row_max():
    from rankops.bench import read_triton as m
    for dtype in ("fp32", "bf16", "fp16"):
        types = {"x_ptr": "*" + dtype, "stride_row": "i64", "n_cols": "i64", "chunk": "i64", "n_chunks": "i64"}
        compile_kernel(m._row_max_kernel, types, dict(BLOCK=4096), num_warps=8)

globals()[sys.argv[1]]()
print("compiled")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels themselves")
@pytest.mark.parametrize("kernels", ["linear_token_stats", "token_stats", "softmax_grad", "read_row_max"])
def test_triton_kernels_compile_for_a_gpu(kernels):
    pytest.importorskip("triton")
    if "triton" not in rankops.available_backends():
        pytest.skip("no triton backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU, kernels], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("Triton's ptxas is not installed here")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
