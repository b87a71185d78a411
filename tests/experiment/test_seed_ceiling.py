"""The dictionary-seed ceiling: a second SAE per trained site, the fraction of latents that recur."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pair_config import pair_config, pair_workspace

from supanalysis import calibration as K
from supanalysis.config import ModelSpec, SAETraining, TestConfig
from supanalysis.dictionary import Dictionary, train_topk_sae
from supanalysis.dictionary import train as train_mod
from supanalysis.dictionary.activations import TopK
from supanalysis.dictionary.train import TopKTrainConfig
from supanalysis.distributed import leave_process_group
from supanalysis.experiment import analyse, features, measure
from supanalysis.report import render_html, render_markdown

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SAE = dict(expansion=2, k=4, tokens=2048, batch_size=256)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return pair_workspace(tmp_path_factory.mktemp("dictionary_seeds"), 20_000)


def config(root, seed_ceiling: bool, **kw) -> TestConfig:
    return pair_config(
        root,
        stats_tokens=2000,
        bootstrap=100,
        model_a=ModelSpec(path=str(root / "A"), name="A", dictionary="train"),
        sae=SAETraining(**SAE, seed_ceiling=seed_ceiling),
        **kw,
    )


@pytest.fixture
def trainings(monkeypatch):
    """The seeds of every SAE the test trains, in order."""
    seeds, real = [], features.train_site_sae

    def counted(model, seqs, site, m, sae, seed, **kw):
        seeds.append(seed)
        return real(model, seqs, site, m, sae, seed, **kw)

    monkeypatch.setattr(features, "train_site_sae", counted)
    return seeds


# ----------------------------------------------------------------------------- config
def test_seed_ceiling_config_is_a_bool_and_old_configs_load():
    assert SAETraining().seed_ceiling is False
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="seed_ceiling"):
            SAETraining(seed_ceiling=bad)
    with pytest.raises(ValueError, match="seed_ceiling"):
        TestConfig.from_dict({"sae": {"seed_ceiling": 1}})
    on = TestConfig(sae=SAETraining(seed_ceiling=True))
    assert TestConfig.from_dict(on.to_dict()) == on
    old = TestConfig().to_dict()
    del old["sae"]["seed_ceiling"]  # a config written before the field existed
    assert TestConfig.from_dict(old).sae.seed_ceiling is False


# ----------------------------------------------------------------------------- the ceiling function
def _planted_activations(n: int, seed: int) -> torch.Tensor:
    """[n, 64] sums of 2 of 32 fixed directions: a dictionary of them is there to be found."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    idx = torch.rand(n, 32, generator=g).argsort(1)[:, :2]
    return (torch.rand(n, 2, generator=g)[..., None] * 2 + 0.5).mul(dirs[idx]).sum(1)


def _trained(seed: int) -> Dictionary:
    x = _planted_activations(16384, 1)
    cfg = TopKTrainConfig(batch_size=256, lr=1e-2, seed=seed)
    return train_topk_sae(
        list(x.split(256)), None, d_sae=32, k=2, n_tokens=16384, config=cfg, progress=False
    ).dictionary


def test_ceiling_is_one_for_the_same_dictionary_and_far_less_for_a_random_one():
    trained = _trained(0)
    random = Dictionary(64, 32, TopK(2))  # zeros: given random unit directions, tied
    with torch.no_grad():
        w = torch.nn.functional.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(5)), dim=1)
        random._W_dec.copy_(w)
        random.W_enc.copy_(w.T)
    held_out = _planted_activations(4096, 2).split(512)
    idx, _ = features.encode(trained, torch.cat(held_out))
    alive = torch.zeros(32, dtype=torch.bool)
    alive[idx.flatten()] = True  # fires on the held-out tokens, as the site's density says
    assert int(alive.sum()) >= 24

    def ceiling(second: Dictionary):
        return K.dictionary_seed_ceiling(features.seed_best_match(trained, second, held_out), alive, 0.7, n_boot=200)

    same, same_mean = ceiling(trained)
    assert (same.value, same.lo, same.hi, same.n) == (1.0, 1.0, 1.0, int(alive.sum()))
    assert same_mean.value == pytest.approx(1.0, abs=1e-9)
    seed, _ = ceiling(_trained(1))  # another seed: most latents recur, not all
    low, low_mean = ceiling(random)
    assert low.hi < seed.lo and low.value < 0.3 and low_mean.value < same_mean.value - 0.3
    assert 0.0 <= low.lo <= low.value <= low.hi <= seed.lo <= seed.value <= seed.hi <= 1.0


def test_only_alive_latents_count():
    best = torch.where(torch.arange(32) < 16, 1.0, 0.0).double()
    assert K.dictionary_seed_ceiling(best, torch.ones(32, dtype=torch.bool), 0.5)[0].value == 0.5
    first = K.dictionary_seed_ceiling(best, torch.arange(32) < 16, 0.5)[0]
    assert (first.value, first.n) == (1.0, 16)


# ----------------------------------------------------------------------------- in a run
def test_a_site_trained_twice_reports_its_ceiling(workspace, trainings):
    cfg = config(workspace, True)
    rep, _ = analyse(measure(cfg, progress=False))
    (a_site,) = rep["sites"]["A"]
    assert trainings == [cfg.seed, cfg.seed + features.SEED_CEILING_OFFSET]  # A's one site, twice; B: neurons
    c, mean = a_site["seed_ceiling"], a_site["seed_ceiling_mean_corr"]
    assert 0.0 <= c["lo"] <= c["value"] <= c["hi"] <= 1.0
    assert c["n"] == a_site["n_alive"] > 0
    assert -1.0 <= mean["lo"] <= mean["value"] <= mean["hi"] <= 1.0
    assert all(s["seed_ceiling"] is None for s in rep["sites"]["B"])  # a neuron basis: nothing trained
    # Two seeds of one SAE recur only in part: well above a random dictionary, below identity.
    assert 0.2 < mean["value"] < 1.0
    assert "fvu | seed_ceiling | seed_ceiling_mean_corr |" in render_markdown(rep)  # beside the FVU
    assert "<th>seed_ceiling</th>" in render_html(rep, None, figures={})


def test_without_seed_ceiling_the_field_is_null_and_the_site_trained_once(workspace, trainings):
    rep, _ = analyse(measure(config(workspace, False), progress=False))
    assert trainings == [0]
    for label in ("A", "B"):
        assert all(s["seed_ceiling"] is None and s["seed_ceiling_mean_corr"] is None for s in rep["sites"][label])
    # Not measured: no column, and a report from before the field existed renders the same.
    md = render_markdown(rep)
    assert "| seed_ceiling" not in md and "dictionary-seed ceiling" not in md
    for s in rep["sites"]["A"] + rep["sites"]["B"]:
        del s["seed_ceiling"], s["seed_ceiling_mean_corr"]
    assert render_markdown(rep) == md


def test_the_second_sae_checkpoints_in_its_own_folder_and_resumes(workspace, tmp_path, trainings, monkeypatch):
    cfg = config(workspace, True)
    ck = tmp_path / "ck"
    first, _ = analyse(measure(cfg, progress=False, checkpoint_dir=ck))
    sae_dir = ck / "sae" / "A.resid_post.0"
    assert (sae_dir / "trainer_state.json").is_file()
    assert (sae_dir / features.SEED_CEILING_DIR / "trainer_state.json").is_file()
    steps, real_step = [0], train_mod._Run.step

    def counted(self, x):
        steps[0] += 1
        return real_step(self, x)

    monkeypatch.setattr(train_mod._Run, "step", counted)
    resumed, _ = analyse(measure(cfg, progress=False, checkpoint_dir=ck, resume=True))
    assert resumed["sites"] == first["sites"]
    # Both finished SAEs were reloaded from their own folders: two seeds asked for, no step taken.
    assert trainings == [0, 1, 0, 1] and steps[0] == 0


# ----------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rep, _ = analyse(measure(config(Path(root), True), progress=False))
        with open(f"{out}.{rank}.json", "w") as fh:
            json.dump(rep["sites"], fh)
    finally:
        leave_process_group()


def test_two_ranks_report_the_single_process_ceiling(workspace, tmp_path):
    out = str(tmp_path / "sites")
    mp.spawn(_worker, args=(2, _free_port(), str(workspace), out), nprocs=2, join=True)
    one, _ = analyse(measure(config(workspace, True), progress=False))
    for rank in range(2):
        with open(f"{out}.{rank}.json") as fh:
            got = json.load(fh)["A"][0]
        want = one["sites"]["A"][0]
        for key in ("seed_ceiling", "seed_ceiling_mean_corr"):
            for f in ("value", "lo", "hi"):
                assert math.isclose(got[key][f], want[key][f], abs_tol=1e-9), (rank, key, f)
