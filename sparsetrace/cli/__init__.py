"""The `sparsetrace` command: thin subcommands over the library (parse, call, print), one module each.

Each module has `register(sub)`, which adds its subcommands with `--help` examples and sets `run`.
Exit status: 0 ok, 2 bad input (one line on stderr naming the fix), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SparsetraceError
from . import ablate, analysis, anchors, attribution, fidelity, needles, trace
from . import report as report_commands

COMMAND_MODULES = (trace, fidelity, needles, anchors, report_commands, analysis, ablate, attribution)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrace",
        description="Sparse attention traces of long-context language models (Stream, per-head top-k key blocks).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SparsetraceError as error:
        print(f"sparsetrace: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsetrace: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
