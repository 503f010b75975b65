"""Commands on simulated hosts: built-ins, test-registered handlers and a tiny shell.

A handler is a function `handler(call) -> int | None` that reads `call.argv`,
`call.env`, `call.cwd` and `call.stdin`, writes with `call.write` and
`call.write_error`, may wait with `call.sleep`, and returns the exit code
(None means 0). Unknown commands exit with 127 like in a shell.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING

from sim.process import Program, SimProcess

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.network import Network

Handler = Callable[["Call"], "int | None"]

# Shell operators the tiny shell cannot run; anything using them raises NotImplementedError.
UNSUPPORTED_OPERATORS = {"|", ">", ">>", "<", "<<", "&", "(", ")", "|&", ">&", "<&"}
CONTROL_OPERATORS = {"&&", "||", ";"}
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?$")


class CommandTimedOut(Exception):
    """Raised inside a foreground command whose deadline passed; the transport maps it."""


class Call:
    """One command invocation on a host, handed to a handler."""

    def __init__(self, runner: CommandRunner, argv: list[str], env: dict[str, str]) -> None:
        self.runner = runner
        self.network = runner.network
        self.host = runner.host
        self.argv = argv
        self.env = env
        self.cwd = runner.cwd
        self.stdin = runner.stdin

    def write(self, text: str) -> None:
        """Write `text` to standard output (a newline is added when missing)."""
        self.runner.stdout.append(text if text.endswith("\n") else text + "\n")

    def write_error(self, text: str) -> None:
        self.runner.stderr.append(text if text.endswith("\n") else text + "\n")

    def sleep(self, seconds: float) -> None:
        self.runner.sleep(seconds)

    def resolve(self, path: str) -> str:
        return self.host.fs.resolve(path, self.cwd)


class CommandRunner:
    """Runs argv lists and shell strings on one host, collecting their output.

    In the foreground (`background=False`) `sleep` advances the virtual clock
    and stops at `deadline`. In a background process the handler runs at once
    and its sleeps add up to `elapsed`, the time after which the process exits.
    """

    def __init__(
        self,
        network: Network,
        host: SimHost,
        env: dict[str, str],
        cwd: str,
        stdin: bytes = b"",
        deadline: float | None = None,
        background: bool = False,
    ) -> None:
        self.network = network
        self.host = host
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.deadline = deadline
        self.background = background
        self.elapsed = 0.0
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def sleep(self, seconds: float) -> None:
        if self.background:
            self.elapsed += seconds
            return
        clock = self.network.clock
        if self.deadline is not None and clock.monotonic() + seconds > self.deadline:
            clock.advance_to(self.deadline)
            raise CommandTimedOut()
        clock.sleep(seconds)

    def run_argv(self, argv: list[str], extra_env: dict[str, str] | None = None) -> int:
        """Run one argv list; return its exit code."""
        if not argv:
            return 0
        env = {**self.env, **(extra_env or {})}
        name = posixpath.basename(argv[0])
        if name in ("sh", "bash") and len(argv) >= 3 and argv[1] == "-c":
            script = self.network.find_script(argv[2])
            if script is not None:
                code = script(Call(self, list(argv[3:]), env))
                return 0 if code is None else int(code)
            return self.run_shell(argv[2])

        handler = self.network.find_command(self.host, argv[0])
        if handler is None:
            self.stderr.append(f"sh: 1: {argv[0]}: not found\n")
            return 127
        code = handler(Call(self, list(argv), env))
        return 0 if code is None else int(code)

    def run_shell(self, text: str) -> int:
        """Run a shell string made of simple commands joined by `&&`, `||` and `;`."""
        code = 0
        skip = False
        for operator, words in parse_shell(text):
            if operator == "&&":
                skip = code != 0
            elif operator == "||":
                skip = code == 0
            elif operator == ";":
                skip = False
            if skip or not words:
                continue
            words = [expand_variables(word, self.env) for word in words]
            code = self.run_simple(words)
        return code

    def run_simple(self, words: list[str]) -> int:
        """Run one simple command, handling assignments and the `cd`/`export` built-ins."""
        extra_env: dict[str, str] = {}
        while words and ASSIGNMENT.match(words[0]):
            key, _, value = words.pop(0).partition("=")
            extra_env[key] = value
        if not words:
            self.env.update(extra_env)
            return 0
        if words[0] == "cd":
            target = self.host.fs.resolve(words[1] if len(words) > 1 else "~", self.cwd)
            if not self.host.fs.is_dir(target):
                self.stderr.append(f"sh: 1: cd: can't cd to {target}\n")
                return 2
            self.cwd = target
            return 0
        if words[0] == "export":
            for word in words[1:]:
                key, _, value = word.partition("=")
                self.env[key] = value
            return 0
        return self.run_argv(words, extra_env)


def parse_shell(text: str) -> list[tuple[str, list[str]]]:
    """Split a shell string into (operator before it, words) pairs of simple commands.

    Variables are expanded later, word by word, so single-quoted text stays literal
    only when it forms a whole word.
    """
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands: list[tuple[str, list[str]]] = []
    operator, words = ";", list[str]()
    for token in lexer:
        if token in CONTROL_OPERATORS:
            commands.append((operator, words))
            operator, words = token, []
        elif token in UNSUPPORTED_OPERATORS or set(token) <= set("|&;<>()"):
            raise NotImplementedError(
                f"the simulator does not (yet) support the shell operator {token!r} "
                f"in {text!r}; register a handler for the whole command instead"
            )
        else:
            words.append(token)
    commands.append((operator, words))
    return commands


def expand_variables(word: str, env: dict[str, str]) -> str:
    """Replace $NAME and ${NAME} with values from `env` (unset names become empty)."""
    # NOTE: expansion ignores quoting, so '$HOME' in single quotes is expanded too.
    return VARIABLE.sub(lambda match: env.get(match.group(1) or match.group(2), ""), word)


class CommandProgram(Program):
    """A one-shot command started in the background: output at once, exit after its sleeps."""

    name = "command"

    def start(self, process: SimProcess) -> None:
        runner = CommandRunner(
            process.network, process.host, dict(process.env), process.cwd, background=True
        )
        code = runner.run_argv(process.argv)
        for line in runner.stdout + runner.stderr:
            process.log(line)
        if runner.elapsed > 0:
            process.after(runner.elapsed, lambda: process.exit(code))
        else:
            process.exit(code)


def is_python(executable: str) -> bool:
    """Tell whether an argv[0] starts a Python interpreter (python3, /usr/bin/python3.11, ...)."""
    return bool(PYTHON_NAME.match(posixpath.basename(executable)))
