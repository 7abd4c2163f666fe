"""The `quantserve` command line."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from typing import Optional, Sequence


def _cmd_env(args: argparse.Namespace) -> int:
    """Print what quantserve runs on: versions, devices and which kernel backends are active."""
    import torch

    import quant  # noqa: F401 - registers the backends
    from quant.backends import backend_report

    print(f"quantserve      {metadata.version('quantserve')}")
    print(f"python          {platform.python_version()} ({platform.machine()})")
    print(f"torch           {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"cuda            {torch.cuda.is_available() and torch.cuda.get_device_name(0) or 'not available'}")
    for name, status in backend_report().items():
        print(f"backend {name:<8}{status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantserve",
        description=(
            "quantserve: an OpenAI-compatible LLM inference server with bitsandbytes-compatible "
            "4-bit (NF4/FP4) quantization."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="show versions, devices and active kernel backends")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
