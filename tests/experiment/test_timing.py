"""Stage timings: the clock itself, and the report's `timings` from run_test through write()."""

from __future__ import annotations

import json
import time

import pytest
import torch
from pair_config import pair_config, pair_workspace

from supanalysis.config import ModelSpec, SAETraining, Thresholds
from supanalysis.experiment import rows, run_test
from supanalysis.experiment.timing import StageClock, peak_rss_bytes
from supanalysis.report import load_report

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_a_stage_adds_up_its_calls_and_tokens():
    clock = StageClock()
    for n in (3, 4):
        with clock.stage("work", n):
            time.sleep(0.01)
    with clock.stage("outer") as st:
        with clock.stage("outer.part") as part:
            part.count(5)
        st.count(7)
    t = clock.row()
    work, outer, part = t.stages
    assert [s.stage for s in t.stages] == ["work", "outer", "outer.part"]  # the order they first ran
    assert work.calls == 2 and work.tokens == 7 and work.seconds >= 0.02
    assert work.tokens_per_second == pytest.approx(7 / work.seconds)
    assert outer.tokens == 7 and part.tokens == 5 and outer.seconds >= part.seconds
    assert t.seconds >= work.seconds + outer.seconds
    assert t.peak_rss_bytes == peak_rss_bytes() and t.peak_rss_bytes > 1 << 20  # bytes, not KiB
    assert t.peak_cuda_bytes is None and work.peak_cuda_bytes is None  # no CUDA device given


def test_a_per_batch_stage_is_timed_like_any_other_off_cuda():
    clock = StageClock("cpu")
    for _ in range(2):
        with clock.stage("batch", 4, per_batch=True):
            time.sleep(0.01)
    (batch,) = clock.row().stages
    assert batch.calls == 2 and batch.tokens == 8 and batch.seconds >= 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_per_batch_stage_on_cuda_times_the_device_without_synchronising(monkeypatch):
    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    clock = StageClock(dev)
    syncs = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a) or real(*a))
    for _ in range(3):
        with clock.stage("batch", per_batch=True):
            x = (x @ x).tanh_()
    assert syncs == []  # the loop never waited on the host
    (batch,) = clock.row().stages
    assert batch.calls == 3 and batch.seconds > 0 and not clock.stages["batch"].pending


def test_a_stage_that_raises_is_not_counted():
    clock = StageClock()
    with pytest.raises(KeyError):
        with clock.stage("fails", 10):
            raise KeyError("x")
    st = clock.stages["fails"]
    assert st.calls == 0 and st.tokens is None and st.seconds == 0.0


def test_without_drops_stages_and_their_time_from_the_total():
    clock = StageClock()
    with clock.stage("keep"):
        time.sleep(0.01)
    with clock.stage("again"):
        time.sleep(0.05)
    before = clock.row().seconds
    copy = clock.without(["again"])
    assert list(copy.stages) == ["keep"] and list(clock.stages) == ["keep", "again"]
    assert copy.row().seconds == pytest.approx(before - clock.stages["again"].seconds, abs=5e-3)
    with copy.stage("again"):
        pass
    assert copy.stages["again"].calls == 1 and clock.stages["again"].calls == 1


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """One run with trained dictionaries, written to a folder: (cfg, report, folder)."""
    root = pair_workspace(tmp_path_factory.mktemp("timing"), 40_000)
    cfg = pair_config(
        root,
        stats_tokens=2000,
        match_tokens=1000,  # fewer than the statistics: the matching's tokens are its own
        bootstrap=50,
        model_a=ModelSpec(path=str(root / "A"), name="A", dictionary="train"),
        model_b=ModelSpec(path=str(root / "B"), name="B", dictionary="train"),
        sae=SAETraining(expansion=2, k=4, tokens=1024, batch_size=256),
    )
    report = run_test(cfg, progress=False)
    report.write(root / "out")
    return cfg, report, root / "out"


def stages(timings: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in timings["stages"]}


def test_run_test_times_every_stage_with_its_tokens(timed):
    cfg, report, _ = timed
    t = report.data["timings"]
    assert tuple(report.data) == rows.REPORT_FIELDS and tuple(t) == rows.TIMINGS_FIELDS
    assert all(tuple(s) == rows.STAGE_FIELDS for s in t["stages"])
    got = stages(t)
    assert list(got) == [
        "plan", "load_models", "eval_losses", "sae_training", "geometry", "statistics",
        "statistics.forward", "statistics.codes", "statistics.matching", "analysis", "report",
    ]  # fmt: skip
    assert got["eval_losses"]["calls"] == 2 and got["eval_losses"]["tokens"] == 2 * cfg.eval_tokens
    assert got["sae_training"]["calls"] == 3 and got["sae_training"]["tokens"] == 3 * cfg.sae.tokens  # 1 + 2 sites
    assert got["statistics"]["tokens"] == cfg.stats_tokens == got["statistics.forward"]["tokens"]
    assert got["statistics.codes"]["tokens"] == cfg.stats_tokens
    assert got["statistics.matching"]["tokens"] == cfg.match_tokens
    assert got["statistics.codes"]["calls"] == -(-cfg.stats_tokens // (cfg.batch_size * cfg.seq_len))  # batches
    assert got["statistics.forward"]["calls"] == got["statistics.codes"]["calls"] + 1  # and the exhausted call
    parts = sum(got[f"statistics.{p}"]["seconds"] for p in ("forward", "codes", "matching"))
    assert parts <= got["statistics"]["seconds"]
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 0 for s in t["stages"])
    assert t["seconds"] >= sum(s["seconds"] for s in t["stages"] if "." not in s["stage"])
    assert t["world_size"] == 1 and t["torch_threads"] == torch.get_num_threads()


def test_write_adds_the_report_stage_to_report_json_only(timed):
    _, report, folder = timed
    page = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert page["timings"] == report.data["timings"]
    written = stages(page["timings"])["report"]
    assert written["calls"] == 1 and written["seconds"] > 0 and written["tokens"] is None
    assert [k for k in page if k != "checksum"] == list(rows.REPORT_FIELDS)  # keys and order kept
    loaded, _ = load_report(folder)  # the rewritten file still passes its checksum
    assert loaded["timings"] == report.data["timings"]
    md = (folder / "report.md").read_text(encoding="utf-8")
    table = md[md.index("### Timings") : md.index("### Configuration")]
    assert "| statistics.forward |" in table and "| analysis |" in table and "| report |" not in table
    assert "its time is in report.json only" in table
    assert "<h3>Timings</h3>" in (folder / "report.html").read_text(encoding="utf-8")


def test_reanalyse_keeps_the_measurement_stages_and_times_its_own_analysis(timed):
    _, report, _ = timed
    again = report.reanalyse(Thresholds(tau=0.3))
    old, new = stages(report.data["timings"]), stages(again.data["timings"])
    assert "report" not in new and new["analysis"]["calls"] == 1
    for name in ("eval_losses", "sae_training", "statistics"):
        assert new[name] == old[name]
    assert report.data["timings"]["stages"][-1]["stage"] == "report"  # the original is untouched


def test_a_second_write_replaces_the_report_stage(timed, tmp_path):
    _, report, _ = timed
    report.write(tmp_path / "again")
    md = (tmp_path / "again" / "report.md").read_text(encoding="utf-8")
    assert "| report |" not in md  # the first write's time is not shown as this one's
    page = json.loads((tmp_path / "again" / "report.json").read_text(encoding="utf-8"))
    assert [s["stage"] for s in page["timings"]["stages"]].count("report") == 1
    assert stages(page["timings"])["report"]["calls"] == 1
