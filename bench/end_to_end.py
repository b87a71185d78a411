"""``python -m bench.end_to_end``: where the time of a whole ``supanalysis test`` goes, beside
what the same work costs bare.

Two GPT-2-shaped TinyTransformers of equal non-embedding parameters (A: 4 layers of d=512, B:
16 layers of d=256, 12·L·d² = 12.6M each; tiny with --quick) and a random token file, then in
one process, side by side:

(a) the two models' forwards alone over the test's statistics tokens (torch.inference_mode):
    the full forward (logits), and the trunk (embeddings and blocks: all the measurement runs,
    since its capture stops at the last site); timed before the test and again after it
    (--repeats), the fastest kept, since on a shared machine a slow one measures the neighbours;
(b) ``run_test``'s measurement pass: the report's ``statistics`` stage and its parts;
(c) writing the report folder: its ``report`` stage;
(d) with ``--dictionary topk``: a TopK SAE (expansion 8, k=32) trained at every site: its
    ``sae_training`` stage;

and the SAE trainer's step (:mod:`supanalysis.dictionary.train`) against a plain PyTorch TopK
step (dense encoder GEMM, torch.topk, dense decoder, autograd, Adam) at each model's SAE shape,
both as dense-equivalent FLOP/s beside torch.mm's. Every stage of the run comes from the
report's ``timings`` (docs/report-schema.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.limits import matmul_rate
from bench.report import fmt_rate, fmt_time
from bench.runner import commit, device_name
from bench.timing import median_time
from supanalysis.config import ModelSpec, SAETraining, TestConfig
from supanalysis.durable import write_text
from supanalysis.experiment import run_test
from supanalysis.experiment.plan import open_token_file, plan_tokens
from supanalysis.models import TinyConfig, TinyTransformer

SAE_EXPANSION, SAE_K = 8, 32


@dataclass(frozen=True)
class Size:
    """One flavour of the bench (the full one and --quick share every code path)."""

    shape_a: tuple[int, int]  # (n_layers, d_model)
    shape_b: tuple[int, int]
    vocab: int
    seq_len: int
    batch_size: int  # sequences per batch of the test
    tokens: int  # statistics tokens of the test
    eval_tokens: int
    sae_tokens: int  # training tokens per site
    sae_batch: int
    bootstrap: int
    min_run_time: float  # CPU timer, seconds per SAE step row


FULL = Size((4, 512), (16, 256), 50257, 1024, 8, 65_536, 8_192, 65_536, 4096, 200, 1.0)
QUICK = Size((2, 64), (8, 32), 512, 64, 8, 2_048, 512, 1_024, 256, 50, 0.05)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and token counts (CI smoke, < 60 s)")
    p.add_argument("--tokens", type=int, default=None, help="statistics tokens of the test (default: by size)")
    p.add_argument("--sae-tokens", type=int, default=None, help="SAE training tokens per site (default: by size)")
    p.add_argument("--dictionary", choices=["neurons", "topk"], default="topk",
                   help="the test's feature basis: neurons, or TopK SAEs trained at every site")  # fmt: skip
    p.add_argument("--no-any-layer", action="store_true", help="match depth pairs only (the test matches all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="folder for the models, tokens and report (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown")
    p.add_argument("--repeats", type=int, default=2,
                   help="time (a) this often: once before the test, then after it; the fastest counts")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    size = QUICK if args.quick else FULL
    args.size = replace(size, tokens=args.tokens or size.tokens, sae_tokens=args.sae_tokens or size.sae_tokens)
    if args.size.tokens < args.size.seq_len:
        p.error(f"--tokens must be at least one sequence ({args.size.seq_len})")
    return args


# ----------------------------------------------------------------------------- models, tokens, config
def gpt2_shaped(n_layers: int, d_model: int, size: Size, seed: int) -> TinyTransformer:
    """GPT-2's block: d_ff = 4d, 64-wide heads (at least one), learned positions over seq_len."""
    torch.manual_seed(seed)
    cfg = TinyConfig(n_layers=n_layers, d_model=d_model, n_heads=max(1, d_model // 64), d_ff=4 * d_model,
                     vocab_size=size.vocab, n_ctx=size.seq_len)  # fmt: skip
    return TinyTransformer(cfg).eval()


def prepare(args: argparse.Namespace, folder: Path) -> TestConfig:
    """Save both models and a random token file under ``folder``; return the test's config."""
    size = args.size
    for name, (L, d), seed in (("A", size.shape_a, 0), ("B", size.shape_b, 1)):
        gpt2_shaped(L, d, size, seed).save(folder / name)
    L = size.seq_len
    trains = args.dictionary == "topk"
    seqs = math.ceil((size.eval_tokens + size.eval_tokens // L) / L) + math.ceil(size.tokens / L)
    seqs += math.ceil(size.sae_tokens / L) if trains else 0
    rng = np.random.default_rng(0)
    np.save(folder / "tokens.npy", rng.integers(0, size.vocab, size=(seqs + 1) * L, dtype=np.int64).astype(np.uint16))
    choice = "train" if trains else "neuron"
    (la, da), (lb, db) = size.shape_a, size.shape_b
    return TestConfig(
        model_a=ModelSpec(path=str(folder / "A"), name=f"A (L={la}, d={da})", dictionary=choice),
        model_b=ModelSpec(path=str(folder / "B"), name=f"B (L={lb}, d={db})", dictionary=choice),
        tokens=str(folder / "tokens.npy"),
        seq_len=L,
        batch_size=size.batch_size,
        eval_tokens=size.eval_tokens,
        stats_tokens=size.tokens,
        match_tokens=size.tokens // 2,  # the defaults' ratio (50k of 100k)
        any_layer=not args.no_any_layer,
        sae=SAETraining(expansion=SAE_EXPANSION, k=SAE_K, tokens=size.sae_tokens, batch_size=size.sae_batch),
        bootstrap=size.bootstrap,
        device=args.device,
    )  # fmt: skip


# ----------------------------------------------------------------------------- (a) forwards alone
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trunk(model: TinyTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings and blocks: the forward the measurement's capture runs (it stops at the last site)."""
    x = model.embed(ids) + model.pos_embed(torch.arange(ids.shape[1], device=ids.device))
    for block in model.blocks:
        x = block(x)
    return x


def time_forwards(cfg: TestConfig, device: torch.device) -> dict[str, float]:
    """Seconds of both models' full and trunk forwards over the test's statistics sequences."""
    models = [TinyTransformer.load(spec.path, map_location=device).eval() for spec in (cfg.model_a, cfg.model_b)]
    plan = plan_tokens(cfg, open_token_file(cfg), models)
    seqs = plan.seqs(plan.stats_start, plan.n_stats)
    out = {"tokens": float(sum(ids.numel() for ids in seqs))}
    with torch.inference_mode():
        for name, fn in (("full", lambda m, ids: m(ids)), ("trunk", trunk)):
            for m in models:  # warm: the test's forwards follow its eval forwards
                fn(m, next(iter(seqs)).to(device))
            sync(device)
            t0 = time.perf_counter()
            for ids in seqs:
                ids = ids.to(device)
                for m in models:
                    fn(m, ids)
            sync(device)
            out[name] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- (b)-(d) the test
def run_measured(cfg: TestConfig, folder: Path, progress: bool) -> dict:
    """run_test, then the report folder written; -> the report's timings (report.json's)."""
    report = run_test(cfg, progress=progress)
    paths = report.write(folder / "report")
    return json.loads(paths["json"].read_text(encoding="utf-8"))["timings"]


# ----------------------------------------------------------------------------- SAE training step
#: rounds of the two SAE steps, alternated; the fastest counts
STEP_ROUNDS = 3


def plain_topk_step(m: int, n: int, k: int, device: torch.device):
    """A plain PyTorch TopK SAE step: dense encoder GEMM, torch.topk, scatter into dense codes,
    dense decoder GEMM, FVU loss, autograd, Adam."""
    g = torch.Generator(device="cpu").manual_seed(0)
    W_dec = torch.randn(n, m, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = [p.to(device).requires_grad_() for p in (W_dec.T.contiguous(), torch.zeros(n), W_dec, torch.zeros(m))]
    W_enc, b_enc, W_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=1e-4)

    def step(x: torch.Tensor) -> None:
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        loss = ((codes @ W_dec + b_dec - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def trainer_step(m: int, n: int, k: int, batch: int, x: torch.Tensor):
    """supanalysis's trainer step (sparse backward, decoder kept at unit norm) at the same shape.
    Its plan is for 10^12 tokens, so AuxK and resampling stay off, as in the plain step."""
    from supanalysis.dictionary.train import TopKTrainConfig, _plan, _Run

    cfg = TopKTrainConfig(batch_size=batch, seed=0, log_every=10**9)
    run = _Run(cfg, _plan(cfg, n, k, 10**12), None)
    run.step(x)  # initialises the SAE (geometric median of this batch) and the optimiser
    return run.step


def sae_step_rows(cfg: TestConfig, size: Size, device: torch.device, mm_rate: float | None) -> list[dict]:
    """Both steps at each model's SAE shape (m, n = 8m, k = 32, the test's SAE batch)."""
    rows = []
    for name, (_, d) in (("A", size.shape_a), ("B", size.shape_b)):
        m, n, batch = d, SAE_EXPANSION * d, size.sae_batch
        x = torch.randn(batch, m, generator=torch.Generator().manual_seed(1)).to(device)
        flops = 10 * batch * m * n  # the dense step's GEMMs: encoder, decoder, their gradients
        steps = {"plain PyTorch": plain_topk_step(m, n, SAE_K, device),
                 "supanalysis trainer": trainer_step(m, n, SAE_K, batch, x)}  # fmt: skip
        # Rounds alternate the two steps and the fastest round counts: on a small shared CPU
        # the first steps of a fresh optimiser (page faults of new buffers) and the neighbours
        # both make single timings vary several-fold.
        best: dict[str, object] = {}
        for _ in range(STEP_ROUNDS):
            for label, fn in steps.items():
                t = median_time(lambda fn=fn, x=x: fn(x), device, size.min_run_time)
                if label not in best or t.median < best[label].median:
                    best[label] = t
        for label, t in best.items():
            rate = flops / t.median
            rows.append({"model": name, "step": label, "shape": f"B={batch} m={m} n={n} k={SAE_K}",
                         "seconds": t.median, "samples": t.samples, "dense_flop_per_s": rate,
                         "pct_of_mm": 100 * rate / mm_rate if mm_rate else None})  # fmt: skip
        plain, ours = rows[-2]["seconds"], rows[-1]["seconds"]
        rows[-1]["speedup_vs_plain"] = plain / ours
    return rows


# ----------------------------------------------------------------------------- results
def header(args: argparse.Namespace, device: torch.device) -> dict:
    size = args.size
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "models": f"A L={size.shape_a[0]} d={size.shape_a[1]}, B L={size.shape_b[0]} d={size.shape_b[1]}, "
        f"vocab {size.vocab}, seq_len {size.seq_len}, batch {size.batch_size} sequences",
        "dictionary": args.dictionary if args.dictionary == "neurons" else f"topk (x{SAE_EXPANSION}, k={SAE_K})",
        "any_layer": not args.no_any_layer,
        "tokens": size.tokens,
        "sae_tokens_per_site": size.sae_tokens if args.dictionary == "topk" else 0,
    }


def summary(fw: dict, timings: dict) -> dict:
    """The side-by-side numbers: (b)/(a), the measurement's parts, (c) and (d)."""
    st = {s["stage"]: s for s in timings["stages"]}

    def sec(name: str) -> float | None:
        return st[name]["seconds"] if name in st else None

    meas = sec("statistics")
    out = {
        "forward_full_s": fw["full"],
        "forward_trunk_s": fw["trunk"],
        "forward_tokens": int(fw["tokens"]),
        "measurement_s": meas,
        "measurement_over_full_forward": meas / fw["full"] if meas else None,
        "measurement_over_trunk_forward": meas / fw["trunk"] if meas else None,
        "report_s": sec("report"),
        "sae_training_s": sec("sae_training"),
        "sae_training_per_site_s": sec("sae_training") / st["sae_training"]["calls"] if "sae_training" in st else None,
        "run_s": timings["seconds"],
    }
    for part in ("forward", "codes", "matching", "checkpoint"):
        name = f"statistics.{part}"
        if name in st and meas:
            out[f"measurement_{part}_s"], out[f"measurement_{part}_share"] = sec(name), sec(name) / meas
            out[f"measurement_{part}_tokens"] = st[name]["tokens"]
    return out


def text_table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    body = [headers, *rows]
    widths = [max(len(r[i]) for r in body) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def stage_cells(st: dict) -> list[str]:
    """One stage of the report's timings as table cells."""

    def num(x: float | None, scale: float = 1.0) -> str:
        return "-" if x is None else f"{x / scale:,.0f}"

    return [st["stage"], f"{st['seconds']:.3f}", str(st["calls"]), num(st["tokens"]), num(st["tokens_per_second"]),
            num(st["peak_rss_bytes"], 2**20), num(st["peak_cuda_bytes"], 2**20)]  # fmt: skip


def render(res: dict, markdown: bool) -> str:
    s, h = res["summary"], res["header"]
    tok = s["forward_tokens"]

    def rate(t: float | None, n: float | None = tok) -> str:
        return f"{n / t:,.0f}" if t and n else "-"

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    side = [
        ["(a) forwards, full (logits), both models", fmt_time(s["forward_full_s"]), rate(s["forward_full_s"]), "1.00x"],
        ["(a) forwards, trunk (blocks), both models", fmt_time(s["forward_trunk_s"]), rate(s["forward_trunk_s"]),
         ratio(s["forward_trunk_s"] / s["forward_full_s"])],
        ["(b) measurement pass (statistics)", fmt_time(s["measurement_s"]), rate(s["measurement_s"]),
         ratio(s["measurement_over_full_forward"])],
    ]  # fmt: skip
    for part in ("forward", "codes", "matching", "checkpoint"):
        if f"measurement_{part}_s" in s:
            t = s[f"measurement_{part}_s"]
            side.append([f"    statistics.{part} ({s[f'measurement_{part}_share']:.0%} of (b))", fmt_time(t),
                         rate(t, s[f"measurement_{part}_tokens"]), ratio(t / s["forward_full_s"])])  # fmt: skip
    side.append(["(c) report writing", fmt_time(s["report_s"]), "-", "-"])
    if s["sae_training_s"] is not None:
        side.append(["(d) SAE training, every site", fmt_time(s["sae_training_s"]), "-",
                     f"{fmt_time(s['sae_training_per_site_s'])} a site"])  # fmt: skip
    side.append(["whole run (report.json timings.seconds)", fmt_time(s["run_s"]), "-", "-"])
    stages = [stage_cells(st) for st in res["timings"]["stages"]]
    steps = [[r["model"], r["step"], r["shape"], fmt_time(r["seconds"]), fmt_rate(r["dense_flop_per_s"], "FLOP"),
              "-" if r["pct_of_mm"] is None else f"{r['pct_of_mm']:.3g}%",
              ratio(r.get("speedup_vs_plain"))] for r in res["sae_steps"]]  # fmt: skip
    out = [f"{'## ' if markdown else ''}end to end: {h['device']} ({h['date']})", ""]
    out += [f"- {k}: {v}" for k, v in h.items()] + [""]
    out += [text_table(["what", "time", "tokens/s", "vs (a) full"], side, markdown), ""]
    out += [text_table(["stage", "seconds", "calls", "tokens", "tokens/s", "peak RSS MiB", "peak CUDA MiB"], stages,
                       markdown), ""]  # fmt: skip
    out += [f"torch.mm float32: {fmt_rate(res['mm_flop_per_s'], 'FLOP')} ({res['mm_shape']})", ""]
    out += [text_table(["SAE", "step", "shape", "time", "dense-equiv. rate", "% of mm", "vs plain"], steps, markdown)]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Every measurement of the module docstring; -> {header, forwards, timings, summary, ...}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="supanalysis-e2e-") as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = prepare(args, folder)
        runs = [time_forwards(cfg, device)]
        timings = run_measured(cfg, folder, not args.no_progress)
        runs += [time_forwards(cfg, device) for _ in range(args.repeats - 1)]
    # Before and after the test: on a shared machine the faster is the nearer to the forwards' cost.
    fw = {k: min(r[k] for r in runs) for k in runs[0]}
    n, t = matmul_rate(device, torch.float32, 1024 if args.quick else 8192, 0.2 if args.quick else 1.0,
                       args.size.min_run_time)  # fmt: skip
    mm = 2 * n**3 / t.median
    res = {"header": header(args, device), "forwards": fw, "forwards_runs": runs, "timings": timings,
           "summary": summary(fw, timings), "mm_flop_per_s": mm, "mm_shape": f"{n}x{n}"}  # fmt: skip
    res["sae_steps"] = sae_step_rows(cfg, args.size, device, mm)
    res["config"] = asdict(cfg)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(render(res, markdown=False))
    if args.json:
        write_text(args.json, json.dumps(res, indent=1, default=str) + "\n")
    if args.markdown:
        write_text(args.markdown, render(res, markdown=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
