"""The command line's verbs, one module each, and the parser built from them.

Each ``supanalysis.commands.<verb>`` module exposes ``register(subparsers) -> None``, which adds
its sub-parser with ``set_defaults(func=run)``, and ``run(args) -> int``, the exit status.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

DESCRIPTION = "The ``supanalysis`` command line: test, demo, toy, info."

#: the verbs in the order ``supanalysis --help`` lists them
VERBS = ("info", "test", "demo", "toy", "planted")


def verb_module(verb: str) -> ModuleType | None:
    """``supanalysis.commands.<verb>``, or None when exactly that module does not exist.

    Any other import failure (a missing dependency inside the module) is raised, not hidden.
    """
    name = f"{__name__}.{verb}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def build_parser() -> argparse.ArgumentParser:
    """The ``supanalysis`` parser: one sub-command per module of :data:`VERBS` that exists."""
    parser = argparse.ArgumentParser(prog="supanalysis", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        module = verb_module(verb)
        if module is not None:
            module.register(subparsers)
    return parser
