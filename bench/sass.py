"""Static SASS statistics of GPU kernels, for a GPU this machine does not have.

``python -m bench.sass [--arch 90]`` compiles the Triton dense activation-stats kernel for
sm_90 (bfloat16 and float32 inputs, the benchmark's dense-stats shape) with Triton's own
ptxas, and prints its registers, local-memory stack and, for every innermost loop, the
instructions it issues per input element and the mix. ``--object FILE --function REGEX``
does the same for compiled CUDA kernels (a cubin, or an nvcc object file of the build).
No GPU is needed: it measures what a GPU would be asked to execute, not how fast it runs
(memory latency, occupancy and issue stalls are left to `python -m bench` on a GPU). Every
non-constexpr Triton argument is compiled as 16-divisible, as the launcher sees it for
aligned tensors (pointers and the bench's strides and sizes).
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


def _loops(ins: list[tuple[int, str]]) -> list[Loop]:
    """Innermost loops (a backward branch closes one), in code order, with their opcodes."""
    ends: dict[int, int] = {}  # loop head -> its last backward branch (a `continue` adds more)
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            head = int(m.group(1), 16)
            ends[head] = max(addr, ends.get(head, addr))
    spans = list(ends.items())
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
    return loops


def analyse_file(path: str | Path, function: str = "") -> dict[str, Sass]:
    """Every kernel in a cubin, or in a host object carrying one (nvcc's .o), whose
    mangled name matches the regular expression ``function``."""
    sass = subprocess.run([_binary("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True)
    res = subprocess.run([_binary("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True).stdout
    out = {}
    for body in re.split(r"\n\s*Function : ", sass.stdout)[1:]:
        name = body.split("\n", 1)[0].strip()
        if not re.search(function, name):
            continue
        ins = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, body.splitlines()) if m]
        usage = re.search(r"Function " + re.escape(name) + r":\s*REG:(\d+) STACK:(\d+)", res)
        regs, stack = (int(usage.group(1)), int(usage.group(2))) if usage else (-1, -1)
        out[name] = Sass(regs, stack, _loops(ins))
    return out


def analyse(cubin: bytes) -> Sass:
    """The one kernel of a Triton-compiled cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        kernels = analyse_file(path)
    assert len(kernels) == 1, list(kernels)
    return next(iter(kernels.values()))


def _stats_case(dtype: str, arch: int) -> tuple[Sass, int]:
    import triton.language as tl

    from supanalysis.kernels import activation_stats as mod

    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    cfg = mod.dense_config(131_072, itemsize)
    types = {
        **dict.fromkeys(["cnt_ptr", "fire_ptr"], "*i64"),
        **dict.fromkeys(["mean_ptr", "m2_ptr", "max_ptr", "min_ptr", "act_ptr"], "*fp64"),
        "l0_ptr": "*i32",
        "x_ptr": f"*{dtype}",
        "thr_ptr": "*fp32",
        **dict.fromkeys(["T", "n", "tokens_per_split", "stride_t"], "i32"),
    }
    names = mod._activation_stats_kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    assert set(signature) - set(types) == {"stride_n", "ACC", "ROWS", "CHUNK", "BLOCK_N", "EVEN_N"}, signature
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
    p.add_argument("--object", help="instead: every kernel in this cubin or nvcc object (e.g. the CUDA build's .o)")
    p.add_argument("--function", default="", help="with --object: kernels whose mangled name matches this regex")
    args = p.parse_args(argv)
    if args.object:
        for name, sass in analyse_file(args.object, args.function).items():
            print(f"{name}: {sass.registers} registers, {sass.stack_bytes} B stack")
            for i, loop in enumerate(sass.loops):
                mix = ", ".join(f"{op} {c}" for op, c in loop.ops.most_common(10))
                print(f"  loop {i} [{loop.start:#x}, {loop.end:#x}]: {loop.size} instructions; {mix}")
        return 0
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
