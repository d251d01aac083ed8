"""The `difflower` command line.

Argument parsing lives here and nowhere else: each subcommand turns its flags into plain
keyword arguments of a library function. A user mistake (`DifflowerError`) is printed as one
line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from difflower.errors import DifflowerError


def _cmd_tiny(args: argparse.Namespace) -> int:
    from difflower.reference.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.dir, family=args.family, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {args.family} checkpoint (seed {args.seed}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflower",
        description="Lower Stable-Diffusion-family models to accelerator backends and prove parity.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny", help="write a tiny random checkpoint in diffusers format")
    tiny.add_argument("dir", type=Path, metavar="DIR", help="output folder")
    tiny.add_argument("--family", choices=("sd", "sdxl", "sd3"), default="sd")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    tiny.set_defaults(handler=_cmd_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except DifflowerError as err:
        print(f"difflower {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difflower {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
