"""Static SASS statistics of the Triton kernels for a GPU this machine does not have.

``python -m bench.sass [--arch 90]`` compiles the dense activation-stats kernel for sm_90
(bfloat16 and float32 inputs, the issue 5 benchmark's shape) with Triton's own ptxas, and
prints its registers, local-memory stack and, for every innermost loop, the instructions it
issues per input element and the mix. No GPU is needed: it measures what a GPU would be
asked to execute, not how fast it runs (memory latency, occupancy and issue stalls are left
to `python -m bench` on a GPU). Every non-constexpr argument is compiled as 16-divisible,
as the launcher sees it for aligned tensors (pointers and the bench's strides and sizes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b(?:[^;]*?)0x([0-9a-f]+)")


@dataclass
class Loop:
    start: int
    end: int
    ops: collections.Counter  # opcode (no modifiers) -> count

    @property
    def size(self) -> int:
        return sum(self.ops.values())


@dataclass
class Sass:
    registers: int
    stack_bytes: int
    loops: list[Loop]  # innermost loops, in code order


def _binary(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_cubin(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t != "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["cubin"]


def analyse(cubin: bytes) -> Sass:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_binary("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True)
        res = subprocess.run([_binary("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True)
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, sass.stdout.splitlines()) if m]
    spans = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:  # a backward branch closes a loop
            spans.append((int(m.group(1), 16), addr))
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for lo, hi in sorted(innermost):
        ops = collections.Counter()
        for addr, text in ins:
            if lo <= addr <= hi:
                words = text.split()
                op = words[1] if words[0].startswith("@") else words[0]
                ops[op.split(".")[0]] += 1
        loops.append(Loop(lo, hi, ops))
    reg = re.search(r"REG:(\d+)", res.stdout)
    stack = re.search(r"STACK:(\d+)", res.stdout)
    return Sass(int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1, loops)


def _stats_case(dtype: str, arch: int) -> tuple[Sass, int]:
    import triton.language as tl
    from supanalysis.kernels import activation_stats as mod

    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    cfg = mod.dense_config(131_072, itemsize)
    ptrs = ["*i64", "*i64", "*fp64", "*fp64", "*fp64", "*fp64", "*fp64", "*i32", f"*{dtype}", "*fp32"]
    names = mod._activation_stats_kernel.arg_names
    signature = dict(zip(names, ptrs + ["i32"] * 4 + ["constexpr"] * 6))
    constexprs = {
        "stride_n": 1,
        "ACC": tl.float32,
        "ROWS": cfg.rows,
        "CHUNK": cfg.chunk,
        "BLOCK_N": cfg.block_n,
        "EVEN_N": True,
    }
    cubin = compile_cubin(mod._activation_stats_kernel, signature, constexprs, cfg.num_warps, arch)
    per_thread_step = cfg.rows * cfg.block_n // (32 * cfg.num_warps)
    return analyse(cubin), per_thread_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled for a GPU")
    rows = []
    for dtype in ("bf16", "fp32"):
        sass, elems = _stats_case(dtype, args.arch)
        loops = [{"size": lp.size, "per_element": lp.size / elems, "ops": dict(lp.ops)} for lp in sass.loops]
        rows.append({"kernel": "activation_stats dense", "dtype": dtype, "registers": sass.registers,
                     "stack_bytes": sass.stack_bytes, "elements_per_step": elems, "loops": loops})  # fmt: skip
        if args.json:
            continue
        print(f"activation_stats dense {dtype} sm_{args.arch}: {sass.registers} registers, {sass.stack_bytes} B stack")
        for i, loop in enumerate(sass.loops):
            mix = ", ".join(f"{op} {c}" for op, c in loop.ops.most_common(8))
            print(f"  loop {i} [{loop.start:#x}, {loop.end:#x}]: {loop.size} instructions,")
            print(f"    {loop.size / elems:.1f} per element if it covers one {elems}-element step per thread; {mix}")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
