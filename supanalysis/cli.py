"""The ``supanalysis`` command line: test, demo, toy, info.

The entry point of the ``supanalysis`` script and of ``python -m supanalysis.cli`` (what
``torchrun`` starts); the verbs live in :mod:`supanalysis.commands`.
"""

from __future__ import annotations

import sys

from .commands import build_parser
from .durable import WriteError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the verb; its exit status, 2 on a usage or data error."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MemoryError, WriteError) as exc:
        print(f"supanalysis {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
