"""The command line of sparsevit: ``python -m sparsevit {info,check,bench}``.

* ``info``  -- versions, devices, the extension, and the backend every op uses here;
* ``check`` -- every op on every backend available on this device against the reference;
* ``bench`` -- the headline benchmark: block-sparse MLPs, DynamicViT and the fused
  masked attention, each against its dense baseline in the same run.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import bench, check, info
from .env import DeviceError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsevit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{info,check,bench}")
    sub.required = True
    for module in (info, check, bench):
        module.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status.

    A device that is not there is one line on stderr and exit status 2, not a traceback.
    """
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DeviceError as exc:
        print(f"python -m sparsevit {args.command}: error: {exc}", file=sys.stderr)
        return 2
