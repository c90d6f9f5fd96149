"""What every ``traindyn`` subcommand module shares."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def run_subcommand(name: str, add_parser: Callable[[argparse._SubParsersAction], object],
                   argv: Sequence[str]) -> int:
    """Run one subcommand on its own (``python -m traindyn.dynamics.cli_<name> …``): the same
    parser as ``traindyn <name> …``, built by the module's ``add_parser``."""
    parser = argparse.ArgumentParser(prog="traindyn")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([name, *argv])
    return args.func(args)
