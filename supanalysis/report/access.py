"""Reading the report dict: its config's thresholds, its sites, and the field order of its tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .format import finite


def config_value(report: Mapping, name: str, default: Any = None) -> Any:
    """A threshold from the config: top level first, then the nested ``thresholds`` table."""
    cfg = report.get("config") or {}
    if not isinstance(cfg, Mapping):
        return default
    if cfg.get(name) is not None:
        return cfg[name]
    th = cfg.get("thresholds")
    if isinstance(th, Mapping) and th.get(name) is not None:
        return th[name]
    return default


def capacity_constant(report: Mapping) -> float:
    c = finite(config_value(report, "C", 1.0))
    return c if c is not None and c > 0 else 1.0


def ordered_fields(objs: Iterable[Mapping], known: Sequence[str], exclude: Iterable[str] = ()) -> list[str]:
    """The known fields in schema order, then any others the objects carry (so nothing is hidden)."""
    seen = list(known)
    skip = set(exclude) | set(known)
    for o in objs:
        for k in o:
            if k not in skip and k not in seen:
                seen.append(k)
    return seen


def sites_of(report: Mapping, model: str) -> list[Mapping]:
    return list((report.get("sites") or {}).get(model) or [])


def site_by_name(report: Mapping, model: str, name: Any) -> Mapping:
    for s in sites_of(report, model):
        if s.get("site") == name:
            return s
    return {}
