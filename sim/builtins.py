"""Executables every simulated host has: echo, true, false, sleep, file tools, python3."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from sim.commands import Call, Handler, is_python
from sim.host import TMP_DIR

if TYPE_CHECKING:
    from sim.host import SimHost

TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def split_flags(argv: list[str], known: str) -> tuple[set[str], list[str]]:
    """Split short flags (`-rf` gives r and f) from operands; stop at `--`."""
    flags: set[str] = set()
    operands: list[str] = []
    for index, word in enumerate(argv):
        if word == "--":
            operands.extend(argv[index + 1 :])
            break
        if word.startswith("-") and len(word) > 1 and set(word[1:]) <= set(known):
            flags.update(word[1:])
        else:
            operands.append(word)
    return flags, operands


def echo(call: Call) -> int:
    args = call.argv[1:]
    newline = True
    if args and args[0] == "-n":
        newline, args = False, args[1:]
    text = " ".join(args)
    call.runner.stdout.append(text + ("\n" if newline else ""))
    return 0


PRINTF_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "r": "\r", "a": "\a"}


def printf(call: Call) -> int:
    """printf FORMAT [ARGUMENT...] with %s, %d, %% and backslash escapes in FORMAT."""
    if len(call.argv) < 2:
        call.write_error("printf: usage: printf format [arguments]")
        return 2
    template, args = call.argv[1], call.argv[2:]
    pieces: list[str] = []
    while True:
        text, args = _format_once(template, args)
        pieces.append(text)
        if not args:
            break
    call.runner.stdout.append("".join(pieces))
    return 0


def _format_once(template: str, args: list[str]) -> tuple[str, list[str]]:
    """Apply the format once and return the text and the arguments it did not use."""
    out: list[str] = []
    index = 0
    consumed = False
    while index < len(template):
        char = template[index]
        following = template[index + 1] if index + 1 < len(template) else ""
        if char == "\\" and following in PRINTF_ESCAPES:
            out.append(PRINTF_ESCAPES[following])
            index += 2
        elif char == "%" and following == "%":
            out.append("%")
            index += 2
        elif char == "%" and following in ("s", "d"):
            value = args[0] if args else ""
            args = args[1:]
            consumed = True
            out.append(str(int(value or 0)) if following == "d" else value)
            index += 2
        elif char == "%":
            raise NotImplementedError(
                f"the simulator does not (yet) support printf conversion %{following} in {template!r}"
            )
        else:
            out.append(char)
            index += 1
    return "".join(out), args if consumed else []


def true(call: Call) -> int:
    return 0


def false(call: Call) -> int:
    return 1


def sleep(call: Call) -> int:
    try:
        seconds = sum(float(word) for word in call.argv[1:])
    except ValueError:
        call.write_error(f"sleep: invalid time interval {' '.join(call.argv[1:])!r}")
        return 1
    call.sleep(seconds)
    return 0


def mkdir(call: Call) -> int:
    flags, paths = split_flags(call.argv[1:], "pv")
    code = 0
    for path in paths:
        try:
            call.host.fs.make_directory(call.resolve(path), parents="p" in flags)
        except FileExistsError:
            call.write_error(f"mkdir: cannot create directory '{path}': File exists")
            code = 1
        except (FileNotFoundError, NotADirectoryError):
            call.write_error(f"mkdir: cannot create directory '{path}': No such file or directory")
            code = 1
    return code


def rm(call: Call) -> int:
    flags, paths = split_flags(call.argv[1:], "rRfv")
    code = 0
    for path in paths:
        target = call.resolve(path)
        if not call.host.fs.exists(target):
            if "f" not in flags:
                call.write_error(f"rm: cannot remove '{path}': No such file or directory")
                code = 1
            continue
        if call.host.fs.is_dir(target) and not flags & {"r", "R"}:
            call.write_error(f"rm: cannot remove '{path}': Is a directory")
            code = 1
            continue
        call.host.fs.remove(target, recursive=True)
    return code


def parse_mktemp(call: Call) -> tuple[bool, str | None, str]:
    """Return (make a directory, parent directory or None, template) of a mktemp call."""
    args = call.argv[1:]
    make_directory = False
    parent: str | None = None
    template: str | None = None
    index = 0
    while index < len(args):
        word = args[index]
        if word in ("-d", "--directory"):
            make_directory = True
        elif word in ("-t", "--tmpdir"):
            parent = call.env.get("TMPDIR", TMP_DIR)
        elif word == "-p" and index + 1 < len(args):
            index += 1
            parent = args[index]
        elif word.startswith("--tmpdir="):
            parent = word.partition("=")[2]
        else:
            template = word
        index += 1

    # Without a template GNU mktemp uses tmp.XXXXXXXXXX in $TMPDIR or /tmp.
    if template is None:
        template = "tmp.XXXXXXXXXX"
        parent = parent or call.env.get("TMPDIR", TMP_DIR)
    return make_directory, parent, template


def mktemp(call: Call) -> int:
    make_directory, parent, template = parse_mktemp(call)
    stem = template.rstrip("X")
    width = len(template) - len(stem)
    if width < 3:
        call.write_error(f"mktemp: too few X's in template '{template}'")
        return 1

    rng = call.network.random
    for _ in range(100):
        name = stem + "".join(rng.choice(TEMP_ALPHABET) for _ in range(width))
        path = call.host.fs.resolve(posixpath.join(parent, name) if parent else name, call.cwd)
        if call.host.fs.exists(path):
            continue
        try:
            if make_directory:
                call.host.fs.make_directory(path)
            else:
                call.host.fs.write(path, b"", mode=0o600)
        except OSError:
            break
        call.write(path)
        return 0

    call.write_error(f"mktemp: failed to create file via template '{template}'")
    return 1


def cat(call: Call) -> int:
    if len(call.argv) == 1:
        call.runner.stdout.append(call.stdin.decode(errors="replace"))
        return 0
    code = 0
    for path in call.argv[1:]:
        try:
            call.runner.stdout.append(call.host.fs.read(call.resolve(path)).decode(errors="replace"))
        except IsADirectoryError:
            call.write_error(f"cat: {path}: Is a directory")
            code = 1
        except FileNotFoundError:
            call.write_error(f"cat: {path}: No such file or directory")
            code = 1
    return code


def which(call: Call) -> int:
    args = call.argv[1:]
    if call.argv[0] == "command":
        if not args or args[0] != "-v":
            raise NotImplementedError("the simulator does not (yet) support `command` without -v")
        args = args[1:]
    code = 0
    for name in args:
        if call.network.find_command(call.host, name) is None:
            code = 1
        else:
            call.write(name if name.startswith("/") else f"/usr/bin/{name}")
    return code


def python(call: Call) -> int:
    """python3 -c SNIPPET (snippets the library runs) and python3 --version."""
    args = call.argv[1:]
    if args[:1] in (["--version"], ["-V"]):
        call.write(f"Python {call.host.python_version}")
        return 0
    if len(args) >= 2 and args[0] == "-c":
        handler = call.network.find_snippet(args[1])
        if handler is not None:
            code = handler(call)
            return 0 if code is None else int(code)
        raise NotImplementedError(
            f"the simulator does not (yet) support this python snippet on host "
            f"{call.host.name!r}: {args[1][:200]!r}. Register one with "
            "network.register_snippet(text, handler)."
        )
    raise NotImplementedError(
        f"the simulator does not (yet) support running {' '.join(call.argv)!r} in the "
        "foreground; only `python3 -c SNIPPET` for known snippets and `--version` are modeled"
    )


BUILTINS: dict[str, Handler] = {
    "echo": echo,
    "printf": printf,
    "true": true,
    "false": false,
    "sleep": sleep,
    "mkdir": mkdir,
    "rm": rm,
    "mktemp": mktemp,
    "cat": cat,
    "which": which,
    "command": which,
}

# Shell built-ins need no executable on the host.
SHELL_BUILTINS = frozenset({"echo", "printf", "true", "false", "command"})


def find_builtin(host: SimHost, executable: str) -> Handler | None:
    """Return the built-in handler for `executable` if the host has that program installed."""
    name = posixpath.basename(executable)
    if is_python(name):
        installed = name in host.executables or (name.startswith("python3") and "python3" in host.executables)
        return python if installed else None
    handler = BUILTINS.get(name)
    if handler is None:
        return None
    if name in SHELL_BUILTINS or name in host.executables:
        return handler
    return None
