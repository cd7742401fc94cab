"""The `sparsetrace` command: thin subcommands over the library (parse, call, print), one module each.

Each module has `register(sub)`, which adds its subcommands with `--help` examples and sets `run`.
Exit status: 0 ok, 2 bad input (one line on stderr naming the fix), 1 unexpected failure.

Building the parser imports no torch, transformers or numpy (only `run` functions do), so `--help`,
`--version` and argument errors answer at once (tests/unit/test_cli_fast.py, benchmarks/cli_latency).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

from .. import __version__
from ..errors import SparsetraceError, SparsetraceWarning
from . import ablate, analysis, anchors, attribution, fidelity, needles, trace
from . import report as report_commands

COMMAND_MODULES = (trace, fidelity, needles, anchors, report_commands, analysis, ablate, attribution)


class Parser(argparse.ArgumentParser):
    """An argument error is bad input like any other: one line on stderr, exit 2 (argparse's default
    prints the whole usage first, dozens of lines for a command with every estimator flag)."""

    def error(self, message: str):
        self.exit(2, f"sparsetrace: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sparsetrace",
        description="Sparse attention traces of long-context language models (Stream, per-head top-k key blocks).",
    )
    parser.add_argument("--version", action="version", version=f"sparsetrace {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; sparsetrace COMMAND --help shows its options and examples")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every `finally` and
    atomic write (`files.atomic_write`) removes its temporary files before the exit (not an
    `Exception`: nothing catches it on the way)."""


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status 0, 2 on bad input, 130 on Ctrl-C, 143 on SIGTERM, one line each;
    library notes (`SparsetraceWarning`) print as `sparsetrace: note: ...`, each once."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", SparsetraceWarning)
            warnings.showwarning = _note_printer(warnings.showwarning)
            args = build_parser().parse_args(argv)
            args.run(args)
    except SparsetraceError as error:
        print(f"sparsetrace: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsetrace: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Terminated:
        print("sparsetrace: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame) -> None:
    raise Terminated


def _note_printer(show):
    """warnings.showwarning that prints each `SparsetraceWarning` once, as one line; others as `show` does."""
    seen: set[str] = set()

    def note(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, SparsetraceWarning):
            show(message, category, filename, lineno, file, line)
        elif str(message) not in seen:
            seen.add(str(message))
            print(f"sparsetrace: note: {message}", file=sys.stderr)

    return note

