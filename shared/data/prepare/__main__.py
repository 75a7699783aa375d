"""`python -m shared.data.prepare <dataset> --src ... --dst ...`: build the on-disk layouts the loaders read."""

from __future__ import annotations

import argparse

from shared.cli import run_cli
from shared.data.prepare import camvid, cityscapes, cocostuff, five_crop, knn, potsdam

COMMANDS = {
    "cocostuff": cocostuff,
    "cityscapes": cityscapes,
    "potsdam": potsdam,
    "camvid": camvid,
    "five_crop": five_crop,
    "knn": knn,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.data.prepare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        add = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0], description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(add)
    args = parser.parse_args(argv)
    COMMANDS[args.command].run(args)


if __name__ == "__main__":
    run_cli(main)  # a known error: one line, exit code 2 (--debug shows the traceback)
