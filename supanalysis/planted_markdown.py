"""planted.json as Markdown: what :func:`supanalysis.planted.run_planted_mode` writes to planted.md."""

from __future__ import annotations

#: matched fraction "well above" the shuffled baseline: by this much, and this many times over
MATCH_MARGIN, MATCH_RATIO = 0.25, 3.0


def planted_markdown(r: dict, level: int = 1) -> str:
    """The planted comparison as Markdown (``level``: heading level of its title)."""
    h = "#" * level
    s = r["summary"]
    d = s["density"]
    pl = r["planted"]
    lines = [
        f"{h} Planted ground truth: does the test recover what was put in?",
        "",
        f"{pl['n_features']} planted context features cover fractions of the stream log-spaced from "
        f"{pl['p_max']:g} down to {pl['p_min']:g} over a Zipf background of {pl['background']} tokens (a "
        f"feature's trigger token opens a window of {pl.get('window', 1)} positions whose tokens follow the "
        "feature's own rotation of the background's Zipf law). Models: "
        + "; ".join(
            f"{m['name']}, {m['non_embedding_params']:,} non-embedding parameters, eval loss {m['eval_loss']:.3f}"
            for m in r["models"].values()
        )
        + f". Test verdict on the primary pair: `{r['verdict']}`.",
        "",
        f"Planting mode: **{r.get('mode', 'universal')}** (features whose context family B's training data lacks: "
        f"{', '.join(map(str, r.get('absent_features', []))) or 'none'}).",
        "",
        f"{h}# Densities",
        "",
        "For each planted feature, the dictionary latent whose activation correlates best with the feature's "
        f"indicator; a feature is *represented* when that correlation reaches {d['represented_corr']} (a latent "
        "at lower correlation is shared by several features, and its density is theirs together). Measured "
        "density = the test's density of that latent.",
        "",
        f"- represented: {d['represented']} of {d['of']} (feature, site) pairs",
        f"- median relative error |p_measured / p_planted − 1| among them: {format_number(d['median_rel_error'])} "
        f"(target < {d['target_median_rel_error']:g}): **{'pass' if d['pass'] else 'FAIL'}**",
        f"- quantiles: {_fmt_q(d['quantiles_rel_error'])}",
        f"- at the test's τ = {d['tau']:g} instead ({d['at_tau']} pairs, merged latents included): median "
        f"{format_number(d['median_rel_error_at_tau'])}; quantiles {_fmt_q(d['quantiles_rel_error_at_tau'])}",
        "",
        "| model | site | represented | median rel. error (vs planted) | (vs realised) |",
        "|---|---|---|---|---|",
    ]
    for site in r["sites"]:
        lines.append(
            f"| {site['model']} | {site['site']} | {site['n_represented']}/{len(site['features'])} | "
            f"{format_number(site['median_rel_error'])} | {format_number(site['median_rel_error_realised'])} |"
        )
    lines += ["", "Per feature (first site of each model): planted p, measured p, best correlation.", ""]
    firsts = {}
    for site in r["sites"]:
        firsts.setdefault(site["model"], site)
    lines += [
        "| feature | p planted | " + " | ".join(f"{k} {v['site']}: p measured (ρ)" for k, v in firsts.items()) + " |",
        "|---|---|" + "---|" * len(firsts),
    ]
    for f in range(pl["n_features"]):
        cells = [f"{v['features'][f]['p_measured']:.2e} ({v['features'][f]['corr']:.2f})" for v in firsts.values()]
        lines.append(f"| {f} | {pl['p_f'][f]:.2e} | " + " | ".join(cells) + " |")
    lines += _dictionaries_markdown(r.get("dictionaries", []), h)
    lines += _universality_markdown(s["matching"], s.get("universality"), h)
    return "\n".join(lines)


def _dictionaries_markdown(dicts: list[dict], h: str) -> list[str]:
    """Each dictionary's training FVU, dead fraction and L0, and (primary pair) its seed ceiling."""
    lines = ["", f"{h}# Dictionaries", "",
             "Training-window FVU, dead fraction and L0 of each site's TopK SAE; for the primary pair also the "
             "dictionary-seed ceiling: the fraction of its live latents that recur (ρ ≥ τ) in a second SAE trained "
             "with another seed on the same activations, with the mean best match.", "",
             "| model | site | FVU | dead | L0 | seed ceiling [CI] | mean best match |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in dicts:
        c, m = d.get("seed_ceiling") or {}, d.get("seed_ceiling_mean_corr") or {}
        ceiling = f"{format_number(c.get('value'))} [{format_number(c.get('lo'))}, {format_number(c.get('hi'))}]"
        lines.append(
            f"| {d['model']} | {d['site']} | {format_number(d['fvu'])} | {d['dead_fraction']:.2f} | "
            f"{format_number(d['l0'])} | {ceiling if c else '—'} | {format_number(m.get('value'))} |"
        )
    return lines


def _universality_markdown(m: dict, u: dict | None, h: str) -> list[str]:
    """The matching half of planted.md: the calibrated decision, and matched fraction against
    baseline per depth pair."""
    v = (u or {}).get("verdict") or {}
    um = v.get("U_min") or {}
    lines = [
        "",
        f"{h}# Universality",
        "",
        f"Verdict: `{v.get('outcome')}` ({'calibrated' if v.get('calibrated') else 'uncalibrated'}); U_min "
        f"{format_number(um.get('value'))} [{format_number(um.get('lo'))}, {format_number(um.get('hi'))}]. "
        f"{v.get('reason') or ''}",
        "",
        "Matched fraction of A's alive latents (ρ* ≥ τ) against the token-shuffled baseline; planted features "
        "whose two latents the test matches to each other (of them, absent from B's training data: truth 0); "
        "and the ln density ratio of those (truth: 0).",
        "",
        "| site A | site B | matched | baseline | well above | planted matched (absent) | "
        "median ln ratio (planted) | test's median ln ratio [CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in m["pairs"]:
        t = p["test_median_log_ratio"] or {}
        lines.append(
            f"| {p['site_a']} | {p['site_b']} | {p['matched_fraction_a']:.2f} | {p['baseline_fraction_a']:.2f} | "
            f"{'yes' if p['well_above_baseline'] else 'no'} | {p['planted_matched']}/{p['planted_features']} "
            f"({p['planted_matched_absent']}/{p['planted_absent']}) | {format_number(p['planted_median_log_ratio'])}"
            f" | {format_number(t.get('value'))} [{format_number(t.get('lo'))}, {format_number(t.get('hi'))}] |"
        )
    lines += [
        "",
        f"Matched fraction well above baseline (by ≥ {MATCH_MARGIN:g} and ≥ {MATCH_RATIO:g}×) at every depth pair: "
        f"**{'pass' if m['pass'] else 'FAIL'}**.",
        "",
    ]
    return lines


def format_number(x: float | None) -> str:
    """Three significant digits, or a dash for a missing number."""
    return "—" if x is None else f"{x:.3g}"


def _fmt_q(q: dict | None) -> str:
    return "—" if not q else ", ".join(f"{k} {v:.3g}" for k, v in q.items())
