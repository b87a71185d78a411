"""``python -m bench``: measure the limits, time every selected op, print and save the table."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import cases, limits, report
from bench.report import Row
from bench.timing import median_time, once
from supanalysis import dispatch
from supanalysis._backend import BACKENDS, available_backends, backend_status
from supanalysis.durable import write_text
from supanalysis.ops.registry import entries

ROOT = Path(__file__).resolve().parents[1]
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Config:
    device: torch.device
    mode: str  # "quick", "cpu" or "cuda": which shapes
    min_run_time: float  # CPU timer, seconds per row
    budget_s: float  # a baseline whose one call is estimated longer is skipped
    bw_bytes: int  # size of the bandwidth probe
    mm_max: int  # largest matmul edge for the FLOP limit
    mm_target_s: float  # stop growing the matmul when one more doubling would take this long


def make_config(device: torch.device, quick: bool, budget: float | None) -> Config:
    if quick:
        return Config(device, "quick", 0.05, budget or 30.0, 64 << 20, 512, 0.2)
    if device.type == "cuda":
        bw = min(4 << 30, torch.cuda.mem_get_info(device)[0] // 4)
        return Config(device, "cuda", 0.0, budget or 5.0, bw, 16384, 1.0)
    return Config(device, "cpu", 1.0, budget or 20.0, 1 << 30, 4096, 3.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke, < 60 s)")
    p.add_argument("--ops", default=",".join(cases.OPS), help="comma list of " + ",".join(cases.OPS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default=None,
        help="comma list (default float32 on cpu, bfloat16,float32 on cuda)",
    )
    p.add_argument(
        "--cases",
        default=None,
        metavar="OP:DTYPE,...",
        help="exactly these (op, dtype) cases, in this order (instead of --ops x --dtype); "
        "so a short GPU allocation goes first to what matters most",
    )
    p.add_argument("--backends", default=None, help="comma list of " + ",".join(BACKENDS) + " (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per call above which a baseline is skipped",
    )
    p.add_argument("--markdown", type=Path, default=None, help="write a Markdown table for bench/RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="write the raw numbers as JSON")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="S",
        help="start no new case after S seconds (for a fixed time budget); the cases left "
        "are listed as not run. --markdown/--json/--write-dispatch are rewritten after every case, "
        "so a run killed from outside still leaves what it measured",
    )
    p.add_argument(
        "--write-dispatch",
        type=Path,
        default=None,
        metavar="FILE",
        help="record the fastest backend per (op, device, dtype) in this dispatch table "
        "(e.g. supanalysis/dispatch.json, which auto consults); merged with its entries",
    )
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = set(args.ops) - set(cases.OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {list(cases.OPS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    default_dtype = "bfloat16,float32" if args.device.startswith("cuda") else "float32"
    names = [d for d in (args.dtype or default_dtype).split(",") if d]
    if any(not isinstance(getattr(torch, d, None), torch.dtype) for d in names):
        p.error(f"--dtype: unknown dtype in {names}")
    args.dtype = [getattr(torch, d) for d in names]
    args.cases = _parse_cases(p, args.cases) if args.cases else None
    args.explicit_backends = args.backends is not None
    args.backends = (args.backends or ",".join(BACKENDS)).split(",")
    if set(args.backends) - set(BACKENDS):
        p.error(f"--backends: choose from {list(BACKENDS)}")
    return args


def _parse_cases(p: argparse.ArgumentParser, text: str) -> list[tuple[str, torch.dtype | None]]:
    """ "stats:bfloat16,coact_sparse" -> [("stats", torch.bfloat16), ("coact_sparse", None)]."""
    out = []
    for item in (c for c in text.split(",") if c):
        op, _, dt = item.partition(":")
        if op not in cases.OPS:
            p.error(f"--cases: unknown op {op!r}; choose from {list(cases.OPS)}")
        dtype = getattr(torch, dt, None) if dt else None
        if dt and not isinstance(dtype, torch.dtype):
            p.error(f"--cases: unknown dtype {dt!r} in {item!r}")
        out.append((op, dtype))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# ----------------------------------------------------------------------------- limits
def measure_limits(cfg: Config, dtypes: set[torch.dtype]) -> tuple[list[Row], dict]:
    """Limit rows, and {"B": bandwidth, dtype: matmul FLOP/s} for holding op rows against."""
    shape, t = limits.read_bandwidth(cfg.device, cfg.bw_bytes, cfg.min_run_time)
    bw = Row("limit", shape, "float32", "torch", "B", cfg.bw_bytes, t.median, t.iqr, t.samples)
    bw.limit = bw.rate
    rows, rates = [bw], {"B": bw.rate}
    for dtype in sorted(dtypes, key=str):
        n, t = limits.matmul_rate(cfg.device, dtype, cfg.mm_max, cfg.mm_target_s, cfg.min_run_time)
        r = Row("limit", f"torch.mm {n}x{n}", dtype_name(dtype), "torch", "FLOP", 2 * n**3, t.median)
        r.iqr, r.samples, r.limit = t.iqr, t.samples, r.rate
        rows.append(r)
        rates[dtype] = r.rate
    return rows, rates


def flop_limit(rates: dict, dtype: torch.dtype) -> float | None:
    """Best matmul rate for inputs of ``dtype``: 16-bit inputs may be computed in float32."""
    options = [rates.get(dtype)] + ([rates.get(torch.float32)] if dtype in SIXTEEN_BIT else [])
    options = [x for x in options if x]
    return max(options) if options else None


# ----------------------------------------------------------------------------- one case
def _chunks(call) -> int:
    return call.chunks if isinstance(call, cases.Chunked) else 1


def is_baseline(name: str) -> bool:
    return name in ("reference", "user") or name.startswith("bare")


def row_order(name: str) -> int:
    """Display order: reference, user, bare, then the backends."""
    order = ["reference", "user", "bare", *BACKENDS]
    return order.index(name.split()[0]) if name.split()[0] in order else len(order)


def estimate_seconds(op: cases.Op, dims: cases.Dims, dtype, cfg: Config, names: list[str]) -> dict:
    """Seconds per call of each baseline, scaled up from a probe at a fraction of the cost.

    Probes grow (1/512, 1/64, 1/8 of the cost, shrinking the op's scaling dimension) until
    the estimate fits the budget or the next probe would itself take over a quarter of it.
    Fixed costs make a small probe overestimate, so a baseline is only skipped on a
    pessimistic estimate when refining it would be too costly.
    """
    dim, power = op.scale
    est, pending = {}, list(names)
    for frac in (1 / 512, 1 / 64, 1 / 8):
        if not pending:
            break
        probe = {**dims, dim: max(1, round(dims[dim] * frac ** (1 / power)))}
        factor = (dims[dim] / probe[dim]) ** power
        calls = op.build(probe, dtype, cfg.device)
        for name in list(pending):
            t = once(calls[name], cfg.device)
            if t < 0.1:  # cheap: time it again, warm
                t = once(calls[name], cfg.device)
            est[name] = t * factor * _chunks(calls[name])  # the whole call, every chunk
            if est[name] <= cfg.budget_s or est[name] * frac * 8 > cfg.budget_s / 4:
                pending.remove(name)
        del calls
    return est


def plan(op: cases.Op, dims: cases.Dims, dtype, cfg: Config, args, calls: dict):
    """(rows to time, {row: why it is skipped}) for one case, baselines first."""
    dev = cfg.device
    runnable = available_backends(op.implemented, dev)
    want_ref = "reference" in args.backends
    names = [n for n in calls if is_baseline(n) and (n != "reference" or want_ref)]
    names += [b for b in args.backends if b != "reference" and b in runnable]
    skipped = {}
    if dev.type == "cpu" and "triton" in names:
        names.remove("triton")
        skipped["triton"] = "not timed on CPU (Triton runs there only under the interpreter)"
    # Variants of a timed backend ("triton tf32"): timed when their backend is.
    names += [n for n in calls if not is_baseline(n) and " " in n and n.split()[0] in names]
    if args.explicit_backends:
        for b in args.backends:
            if b not in names and b not in skipped:
                skipped[b] = backend_status()[b].reason

    # Baselines that would not fit or would take too long are skipped, with the reason.
    share = 0.8 if dev.type == "cuda" else 0.5  # the CPU's memory is shared
    elem = torch.empty(0, dtype=dtype).element_size()
    mem, free = op.mem(dims, elem), share * free_bytes(dev)
    for n in [n for n in names if is_baseline(n) and mem.get(n, 0) > free]:
        names.remove(n)
        skipped[n] = f"skipped: needs ~{mem[n] / 2**30:.1f} GiB, budget {free / 2**30:.1f} GiB"
    try:
        est = estimate_seconds(op, dims, dtype, cfg, [n for n in names if is_baseline(n)])
    except (RuntimeError, MemoryError) as exc:
        est = {}
        print(f"  ({op.name}: baseline time estimate failed: {str(exc)[:80]})")
    for n, s in est.items():
        s /= _chunks(calls[n])  # a chunked baseline is timed one chunk at a time
        if s > cfg.budget_s:
            names.remove(n)
            skipped[n] = f"skipped: est. {s:.3g} s/call > budget {cfg.budget_s:g} s"
    return names, skipped


def run_case(op: cases.Op, dims: cases.Dims, dtype, cfg: Config, args, rates: dict) -> list[Row]:
    """Every row of one (op, shape, dtype): baselines, backends and skip notes."""
    dev = cfg.device
    shape, dname = cases.label(dims), dtype_name(dtype)
    unit, work = op.unit, op.work(dims, torch.empty(0, dtype=dtype).element_size())
    limit = rates["B"] if unit == "B" else flop_limit(rates, dtype) if unit == "FLOP" else None

    def row(backend: str, **kw) -> Row:
        return Row(op.name, shape, dname, backend, unit, work, limit=limit, **kw)

    try:
        calls = op.build(dims, dtype, dev)
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory for the inputs
        return [row("-", note=f"inputs not built: {str(exc)[:80]}")]
    names, skipped = plan(op, dims, dtype, cfg, args, calls)
    rows = []
    for name in names:
        try:
            reps = _chunks(calls[name])
            t = median_time(calls[name], dev, cfg.min_run_time, cfg.budget_s / reps)
            note = "one warm call timed: the first was over the budget" if t.over_budget else ""
            if reps > 1:
                note = f"one chunk of 1/{reps} of the tokens timed, x{reps}" + (f"; {note}" if note else "")
            rows.append(row(name, seconds=t.median * reps, iqr=t.iqr * reps, samples=t.samples, note=note))
        except (RuntimeError, MemoryError) as exc:
            rows.append(row(name, note=f"failed: {str(exc)[:80]}"))
    rows += [row(name, note=why) for name, why in skipped.items()]
    rows.sort(key=lambda r: row_order(r.backend))
    del calls
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    base = {r.backend.split()[0]: r.seconds for r in rows if r.seconds and is_baseline(r.backend)}
    for r in (r for r in rows if r.seconds):
        r.vs_ref, r.vs_user, r.vs_bare = (
            base[b] / r.seconds if b in base else None for b in ("reference", "user", "bare")
        )
    return rows


# ----------------------------------------------------------------------------- header
def commit() -> str:
    """The source's git commit; SUPANALYSIS_COMMIT names it where the tree travelled without .git."""
    if os.environ.get("SUPANALYSIS_COMMIT"):
        return os.environ["SUPANALYSIS_COMMIT"]

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        dirty = False
    return sha + (" (dirty)" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} torch threads"


def header(cfg: Config, args) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    h = {
        "device": device_name(cfg.device),
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": ",".join(dtype_name(d) for d in args.dtype) if not args.cases else "per case",
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "shapes": cfg.mode,
        "timing": "triton.testing.do_bench median"
        if cfg.device.type == "cuda"
        else f"torch.utils.benchmark blocked_autorange median, min_run_time {cfg.min_run_time:g} s",
    }
    if cfg.device.type == "cuda":
        h["tf32"] = str(torch.backends.cuda.matmul.allow_tf32)
    return h


NOTES = [
    "limit rows: read bandwidth of one x.sum() and torch.mm FLOP/s, measured in this run; "
    "% limit holds byte-bound ops (GB/s) against the bandwidth and matmul-bound ops against "
    "the best torch.mm rate for their dtype (16-bit inputs: max of the dtype and float32).",
    "achieved: bytes the op must read/write at least, useful FLOPs (2mnk per product), or "
    "pair increments per second (coact_sparse: T*k*k).",
    "vs ref / vs user: time of the float64 reference / of the plain eager PyTorch a user "
    "would write, divided by this row's time (>1x = faster). bare rows are the one primitive "
    "the op needs (W@W.T, xa.T@xb, one read of the state).",
    "backend rows call the op's backend function directly (no public-wrapper checks).",
    "mutating ops (cross, coact, coact_sparse) accumulate into the same state on every "
    "repeat; the cost does not depend on its values, so no reset is timed.",
    "baselines are skipped when their rough memory need exceeds 50% (CPU) / 80% (GPU) of "
    "the free memory, or when one call, scaled up from a probe at 1/512 to 1/8 of the "
    "shape, exceeds the time budget (small probes overestimate: fixed costs get scaled).",
]


# ----------------------------------------------------------------------------- dispatch
def dispatch_ops() -> dict[str, str]:
    """Bench case -> the registered op whose ``auto`` choice it measures (each registry
    entry's bench_cases; interference_topk times the same op as interference with top-k,
    and its choice is interference's, so that entry lists interference first)."""
    out: dict[str, str] = {}
    for entry in entries().values():
        out.update({case: entry.name for case in entry.bench_cases[:1]})
    return out


DISPATCH_OP = dispatch_ops()


def dispatch_choices(rows: list[Row], device: torch.device, source: str) -> list[dispatch.Choice]:
    """The fastest backend of every (op, dtype) where two or more backends were timed."""
    timed: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        if r.op in DISPATCH_OP and r.seconds and _launcher(DISPATCH_OP[r.op], r.backend):
            timed.setdefault((DISPATCH_OP[r.op], r.dtype, r.shape), {})[r.backend] = r.seconds
    label = dispatch.device_label(device)
    out = []
    for (op, dt, shape), secs in sorted(timed.items()):
        if len(secs) < 2:
            continue
        backend, _, variant = min(secs, key=secs.__getitem__).partition(" ")
        out.append(dispatch.Choice(op, label, dt, backend, secs, shape, source, variant))
    return out


def _launcher(op: str, row: str) -> bool:
    """A row that times a backend of ``op`` or one of its registered variants ("cuda <name>")."""
    backend, _, variant = row.partition(" ")
    if backend not in BACKENDS:
        return False
    return not variant or variant in entries()[op].all_variants().get(backend, {})


# ----------------------------------------------------------------------------- main
Progress = Callable[[dict, list[Row], list[str]], None]


def run(args: argparse.Namespace, progress: Progress | None = None) -> tuple[dict, list[Row], list[str]]:
    """Header, rows and notes of one benchmark run (``args`` from :func:`parse_args`).

    ``progress(header, rows, notes)`` is called after the limits and after every case with
    everything measured so far.
    """
    t0 = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = make_config(device, args.quick, args.budget)
    if args.cases:  # (op, dtype) pairs as given; an op with a fixed dtype keeps it
        todo = [(cases.OPS[o], cases.OPS[o].dtype or d or args.dtype[0]) for o, d in args.cases]
    else:
        todo = [(op, d) for op in (cases.OPS[o] for o in args.ops) for d in ([op.dtype] if op.dtype else args.dtype)]
    flop_dtypes = {d for op, d in todo if op.unit == "FLOP"}
    if flop_dtypes & set(SIXTEEN_BIT):
        flop_dtypes.add(torch.float32)
    h = header(cfg, args)
    notes = list(NOTES)
    if device.type == "cpu":
        notes.append("triton is not timed on CPU: it runs there only under the interpreter.")
    rows, rates = measure_limits(cfg, flop_dtypes)
    if progress:
        progress(h, rows, notes)
    deadline = args.deadline
    for op, dtype in todo:
        dims = op.shapes[cfg.mode]
        if deadline is not None and time.monotonic() - t0 > deadline:
            why = f"not run: the --deadline of {deadline:g} s had passed"
            rows.append(Row(op.name, cases.label(dims), dtype_name(dtype), "-", op.unit, 0.0, note=why))
            continue
        print(f"timing {op.name} {cases.label(dims)} {dtype_name(dtype)} ...", flush=True)
        rows += run_case(op, dims, dtype, cfg, args, rates)
        if progress:
            progress(h, rows, notes)
    return h, rows, notes


def save(args: argparse.Namespace, h: dict, rows: list[Row], notes: list[str], final: bool = False) -> None:
    """Write the files asked for (atomically: a reader never sees half a table)."""

    write = write_text
    if args.markdown:
        write(args.markdown, report.markdown(h, rows, notes))
    if args.json:
        write(args.json, report.to_json(h, rows, notes))
    if args.write_dispatch:
        source = f"{h['device']}, commit {h['commit']}, {h['date']}"
        choices = dispatch_choices(rows, torch.device(args.device), source)
        if choices:
            dispatch.write(args.write_dispatch, choices)
        if final:
            for c in choices:
                print(f"dispatch: {c.op} {c.device} {c.dtype} -> {c.backend} {c.seconds}")
            if not choices:
                print("dispatch: nothing written (no op had two or more backends timed)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h, rows, notes = run(args, progress=lambda *a: save(args, *a))
    print()
    print("  ".join(f"{k}: {v}" for k, v in h.items()))
    print(report.table(rows))
    for n in notes:
        print("note:", n)
    save(args, h, rows, notes, final=True)
    return 0
