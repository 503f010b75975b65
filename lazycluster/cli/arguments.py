"""The argument parser of the `lazycluster` command and the checks of its values.

Every value is checked here, so a bad one ends in argparse's usage message and
exit code 2 before any host is contacted. The command handlers are imported
only when their command runs, which keeps `--help` fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lazycluster.cli import ssh_config_file

MAX_PORT = 65535


def _argument_type(check: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Wrap a checker raising ValueError so argparse prints its message unchanged."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name
    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"invalid number {text!r}: expected a whole number of at least 1") from None
    if value < 1:
        raise ValueError(f"invalid number {value}: expected at least 1")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: expected seconds, e.g. 30 or 2.5") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"invalid duration {text!r}: expected a finite number of seconds above 0")
    return value


def parse_port(text: str) -> int:
    """Return `text` as a TCP port number, or raise ValueError."""
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise ValueError(f"invalid port {text!r}: expected a number from 1 to {MAX_PORT}")
    return int(text)


def parse_port_range(text: str) -> list[int]:
    """Return the ports of `A-B` (both included), or raise ValueError."""
    first, dash, last = text.partition("-")
    if not dash:
        raise ValueError(f"invalid port range {text!r}: expected FIRST-LAST, e.g. 60001-60200")
    start, end = parse_port(first), parse_port(last)
    if start > end:
        raise ValueError(f"invalid port range {text!r}: the first port is above the last")
    return list(range(start, end + 1))


def parse_host_list(text: str) -> list[str]:
    """Return the names of a comma-separated host list, or raise ValueError."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"invalid host list {text!r}: expected names separated by commas, e.g. a,b")
    for name in names:
        ssh_config_file.validate_runtime_name(name)
    if len(set(names)) != len(names):
        raise ValueError(f"invalid host list {text!r}: a host is named twice")
    return names


def _common_options() -> argparse.ArgumentParser:
    """Options accepted before and after the command name.

    They have no defaults here, so a value given before the command is not
    reset by the subcommand's parser. `build_parser` sets the defaults once.
    """
    parent = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    parent.add_argument("-v", "--verbose", action="count",
                        help="log progress (INFO); twice for DEBUG detail")
    parent.add_argument("--debug", action="store_true",
                        help="log at DEBUG level and show the traceback of an error")
    parent.add_argument("--ssh-config", metavar="PATH",
                        help="SSH config file to read and edit "
                        "(default: $LAZYCLUSTER_SSH_CONFIG, else ~/.ssh/config)")
    return parent


def _add_list_runtimes(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "list-runtimes", parents=[common],
        help="show the hosts of the SSH config that work as runtimes",
        description="Connect to every host of the SSH config in parallel and show which "
        "ones work as runtimes, and why the others do not.",
    )
    parser.add_argument("-l", "--long", action="store_true",
                        help="add OS, CPU cores, memory, Python version and GPUs as a table")
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    parser.add_argument("--timeout", type=_argument_type(_positive_seconds, "seconds"),
                        metavar="S", help="seconds each host may take to start python3 after login "
                        "before it counts as inactive (default: the library's probe timeout); "
                        "ConnectTimeout in the SSH config bounds the login itself")
    parser.set_defaults(handler=_run_list_runtimes)


def _add_add_runtime(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "add-runtime", parents=[common],
        help="add a Host entry to the SSH config",
        description="Add a Host entry to the SSH config. Comments and other entries stay as "
        "they are; the previous file is kept as <config>.bak.",
    )
    parser.add_argument("name", type=_argument_type(ssh_config_file.validate_runtime_name, "name"),
                        help="alias of the new runtime, used as `ssh NAME`")
    parser.add_argument("target", metavar="[USER@]HOST[:PORT]",
                        type=_argument_type(ssh_config_file.parse_target, "target"),
                        help="where the runtime is; an IPv6 address goes in brackets: [::1]:2222")
    parser.add_argument("--id-file", "--id_file", dest="id_file", metavar="PATH",
                        type=_argument_type(ssh_config_file.validate_identity_file, "path"),
                        help="private key to log in with (IdentityFile)")
    parser.add_argument("-o", "--option", dest="options", action="append", default=[],
                        metavar="KEY=VALUE",
                        type=_argument_type(ssh_config_file.parse_option, "option"),
                        help="any other ssh_config option, e.g. -o ForwardAgent=yes; repeatable")
    parser.set_defaults(handler=_run_add_runtime)


def _add_delete_runtime(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "delete-runtime", parents=[common],
        help="remove a Host entry from the SSH config",
        description="Remove a Host entry from the SSH config. The previous file is kept as "
        "<config>.bak.",
    )
    parser.add_argument("name", type=_argument_type(ssh_config_file.validate_runtime_name, "name"),
                        help="alias of the runtime to remove")
    parser.set_defaults(handler=_run_delete_runtime)


def _add_dask(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "dask", parents=[common],
        help="start a Dask cluster on the runtimes and keep it up until Ctrl-C",
        description="Start a Dask scheduler on this machine and workers on the runtimes, print "
        "the scheduler address and the dashboard link, and stop everything on Ctrl-C, SIGTERM "
        "or SIGHUP.",
    )
    parser.add_argument("--workers", type=_argument_type(_positive_int, "count"), metavar="N",
                        help="number of workers (default: one per runtime)")
    parser.add_argument("--hosts", type=_argument_type(parse_host_list, "hosts"), metavar="A,B",
                        help="use only these hosts of the SSH config (default: every working one)")
    parser.add_argument("--port", type=_argument_type(parse_port, "port"), metavar="P",
                        help="scheduler port (default: 8786 when free, else one of --ports)")
    parser.add_argument("--ports", type=_argument_type(parse_port_range, "ports"), metavar="A-B",
                        help="ports for workers and the scheduler (default: 60001-60199)")
    parser.add_argument("--timeout", type=_argument_type(_positive_seconds, "seconds"),
                        metavar="S", help="seconds to wait for each step: every host to start "
                        "python3 after login, the scheduler to start, the workers to register "
                        "(default: the library's timeouts)")
    parser.set_defaults(handler=_run_dask)


def build_parser(program: str, version: str) -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog=program,
        parents=[_common_options()],
        description="Manage the runtimes (SSH hosts) in your SSH config and run a Dask cluster "
        "on them.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    parser.set_defaults(verbose=0, debug=False, ssh_config=None)

    common = _common_options()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_list_runtimes(commands, common)
    _add_add_runtime(commands, common)
    _add_delete_runtime(commands, common)
    _add_dask(commands, common)
    return parser


def _run_list_runtimes(args: argparse.Namespace) -> int:
    from lazycluster.cli.list_runtimes import list_runtimes

    return list_runtimes(args)


def _run_add_runtime(args: argparse.Namespace) -> int:
    from lazycluster.cli.edit_runtimes import add_runtime

    return add_runtime(args)


def _run_delete_runtime(args: argparse.Namespace) -> int:
    from lazycluster.cli.edit_runtimes import delete_runtime

    return delete_runtime(args)


def _run_dask(args: argparse.Namespace) -> int:
    from lazycluster.cli.dask_command import run_dask

    return run_dask(args)
