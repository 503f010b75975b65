"""The `lazycluster` command: manage runtimes in the SSH config and run a Dask cluster.

Exit codes: 0 success, 1 runtime failure (a lazycluster error or an OS error,
printed on stderr in one or two lines), 2 usage error (bad arguments or
values), 130 interrupted by Ctrl-C outside `lazycluster dask`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

from lazycluster import __version__
from lazycluster.cli.arguments import build_parser
from lazycluster.exceptions import LazyclusterError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROGRAM = "lazycluster"

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main"]


def _configure_logging(verbosity: int, debug: bool) -> None:
    if debug or verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1:
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _print_error(error: BaseException, debug: bool) -> None:
    """Print `error` on stderr: its first line, or the whole traceback with --debug."""
    if debug:
        traceback.print_exception(error)
        return

    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"{PROGRAM}: error: {lines[0]}", file=sys.stderr)
    if len(lines) > 1:
        print(
            f"{PROGRAM}: {len(lines) - 1} more line(s) of detail; run with --debug to see them.",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser(PROGRAM, __version__)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.debug)

    try:
        return int(args.handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LazyclusterError, OSError) as error:
        _print_error(error, args.debug)
        return EXIT_FAILURE
    except ValueError as error:
        # A value that argparse cannot judge alone, such as a host name that
        # the SSH config does not list, is still a usage error.
        _print_error(error, args.debug)
        return EXIT_USAGE
    except Exception as error:
        if args.debug:
            raise
        print(f"{PROGRAM}: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"{PROGRAM}: run with --debug for the traceback and report it.", file=sys.stderr)
        return EXIT_FAILURE
