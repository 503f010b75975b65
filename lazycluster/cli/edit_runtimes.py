"""`lazycluster add-runtime` and `lazycluster delete-runtime`."""

from __future__ import annotations

import argparse
import os
import sys

from lazycluster.cli import ssh_config_file
from lazycluster.cli.ssh_config_file import HostEntry

# Keywords that the target and --id-file already set; -o must not set them again.
_KEYWORDS_FROM_ARGUMENTS = {
    "hostname": "the HOST argument",
    "user": "USER@ in the HOST argument",
    "port": ":PORT in the HOST argument",
    "identityfile": "--id-file",
}


def _check_option_conflicts(args: argparse.Namespace) -> None:
    set_by_arguments = {
        "hostname": True,
        "user": args.target.user is not None,
        "port": args.target.port is not None,
        "identityfile": args.id_file is not None,
    }
    for key, _ in args.options:
        if set_by_arguments.get(key.lower()):
            raise ValueError(
                f"Option -o {key} conflicts with {_KEYWORDS_FROM_ARGUMENTS[key.lower()]}; "
                "give the value only once."
            )


def add_runtime(args: argparse.Namespace) -> int:
    """Add the Host entry for the runtime `args.name` to the SSH config."""
    _check_option_conflicts(args)
    path = ssh_config_file.resolve_config_path(args.ssh_config)

    entry = HostEntry(
        name=args.name, target=args.target, identity_file=args.id_file,
        options=tuple(args.options),
    )
    ssh_config_file.add_host_entry(path, entry)
    print(f"Added runtime {args.name!r} to {path}. Check it with `ssh {args.name}`.")

    if args.id_file is not None and not os.path.exists(os.path.expanduser(args.id_file)):
        print(
            f"lazycluster: warning: identity file {args.id_file} does not exist yet; "
            "ssh will fail until it does.",
            file=sys.stderr,
        )
    return 0


def delete_runtime(args: argparse.Namespace) -> int:
    """Remove the Host entry of the runtime `args.name` from the SSH config."""
    path = ssh_config_file.resolve_config_path(args.ssh_config)
    ssh_config_file.remove_host_entry(path, args.name)
    print(f"Removed runtime {args.name!r} from {path}.")
    return 0
