"""Every command the library runs on a host, in one place.

The user API (`Runtime`, `RuntimeTask`, `RuntimeManager`) builds its commands
only from this module, and the simulator interprets exactly these commands, so
a name or an argv shape changed here must change in the simulator too.

Two kinds of commands live here:

- argv builders: functions returning a list of strings. The transport quotes
  each element, so a caller's value never reaches a shell unquoted.
- Python snippets: module-level strings run as `python3 -c SNIPPET` through
  `python_command`. They must run on every Python from `MIN_PYTHON_VERSION`
  on, so they avoid newer syntax (no walrus operator, no match).
"""

from __future__ import annotations

from collections.abc import Sequence

# Interpreter started on hosts for snippets and functions.
PYTHON_EXECUTABLE = "python3"

# The oldest host Python a Runtime accepts.
MIN_PYTHON_VERSION = (3, 8)

# Every temporary directory the library creates on a host starts with this
# name, so leftovers are easy to find (`ls -d /tmp/lazycluster-*`).
TEMP_DIR_PREFIX = "lazycluster-"


def python_command(snippet: str) -> list[str]:
    """Build the argv that runs a Python snippet with the host's python3."""
    return [PYTHON_EXECUTABLE, "-c", snippet]


def make_temp_dir() -> list[str]:
    """Build the argv that creates a temporary directory and prints its absolute path."""
    return ["mktemp", "-d", "-t", TEMP_DIR_PREFIX + "XXXXXXXXXX"]


def make_dir(path: str) -> list[str]:
    """Build the argv that creates `path` and its parents; an existing directory is fine."""
    return ["mkdir", "-p", "--", path]


def remove_dir(path: str) -> list[str]:
    """Build the argv that removes `path` and everything below it."""
    return ["rm", "-rf", "--", path]


def echo(message: str) -> list[str]:
    """Build the argv that prints `message` and a newline, verbatim.

    `printf` instead of `echo`, because some `echo` builtins interpret
    backslashes or a leading `-n`.
    """
    return ["printf", "%s\n", message]


# Prints each argument that names no executable on the PATH, one per line.
MISSING_EXECUTABLES_SCRIPT = (
    'for name in "$@"; do '
    'command -v "$name" >/dev/null 2>&1 || printf "%s\\n" "$name"; '
    "done"
)


def find_missing_executables(names: Sequence[str]) -> list[str]:
    """Build the argv that prints which of `names` are not installed, in one round trip."""
    return ["sh", "-c", MISSING_EXECUTABLES_SCRIPT, "sh", *names]


# Prints one JSON object describing the host. Keys: python_version (str),
# python_version_info (list of int), os (str), cpu_cores (int), memory (bytes,
# int), gpus (list of str, one "name, memory" line per GPU from nvidia-smi),
# home (absolute path of the login user's home directory), distributed_version
# (str, or None without the package). The version comes from the package
# metadata, because importing distributed takes about 0.3 s on the test hosts.
HOST_INFO_SNIPPET = r"""
import json, os, platform, shutil, subprocess, sys

def cpu_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

def memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 0

def gpus():
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        completed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            universal_newlines=True, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in completed.stdout.splitlines() if line.strip()]

def distributed_version():
    try:
        from importlib.metadata import version
        return version("distributed")
    except Exception:
        return None

print(json.dumps({
    "python_version": platform.python_version(),
    "python_version_info": list(sys.version_info[:3]),
    "os": platform.platform(),
    "cpu_cores": cpu_cores(),
    "memory": memory(),
    "gpus": gpus(),
    "home": os.path.expanduser("~"),
    "distributed_version": distributed_version(),
}))
"""

# Marks the stdout line that carries the outcome of FUNCTION_RUNNER_SNIPPET.
FUNCTION_RESULT_MARKER = "LAZYCLUSTER-FUNCTION-RESULT:"

# Exit codes of FUNCTION_RUNNER_SNIPPET besides 0 (the function returned).
FUNCTION_RAISED_EXIT_CODE = 1
FUNCTION_RUNNER_SETUP_EXIT_CODE = 3

# Runs a function shipped by the manager.
#
# Input: cloudpickle.dumps((function, kwargs)) on stdin, or in the file named by
# the first argument, which the runner deletes after reading it.
# While the function runs, file descriptor 1 points at stderr, so everything
# the function or its child processes print ends up in stderr. Afterwards one
# line goes to the real stdout: FUNCTION_RESULT_MARKER followed by the base64
# of cloudpickle.dumps(outcome), where outcome is a dict:
#   {"ok": True, "value": return value}
#   {"ok": False, "error": "Type: message", "traceback": text,
#    "exception": cloudpickle bytes of the exception, or None}
# Exit code 0 when the function returned, FUNCTION_RAISED_EXIT_CODE when it
# raised or its return value could not be pickled, FUNCTION_RUNNER_SETUP_EXIT_CODE
# when cloudpickle is missing or the input could not be read.
FUNCTION_RUNNER_SNIPPET = r"""
import base64, os, sys, traceback
try:
    import cloudpickle
except ImportError as error:
    sys.stderr.write("cloudpickle is not installed for %s: %s\n" % (sys.executable, error))
    sys.exit(3)

try:
    if len(sys.argv) > 1:
        with open(sys.argv[1], "rb") as payload_file:
            payload = payload_file.read()
        os.remove(sys.argv[1])
    else:
        payload = sys.stdin.buffer.read()
    function, kwargs = cloudpickle.loads(payload)
except Exception:
    sys.stderr.write(
        "Failed to load the function sent by the manager with cloudpickle %s on Python %s. "
        "The host needs the manager's cloudpickle and Python versions.\n"
        % (cloudpickle.__version__, sys.version.split()[0])
    )
    traceback.print_exc()
    sys.exit(3)

sys.stdout.flush()
result_fd = os.dup(1)
os.dup2(2, 1)

try:
    outcome = {"ok": True, "value": function(**kwargs)}
except BaseException as error:
    text = traceback.format_exc()
    sys.stderr.write(text)
    try:
        pickled = cloudpickle.dumps(error)
    except Exception:
        pickled = None
    outcome = {"ok": False, "error": "%s: %s" % (type(error).__name__, error),
               "traceback": text, "exception": pickled}

try:
    payload = cloudpickle.dumps(outcome)
except Exception as error:
    text = traceback.format_exc()
    sys.stderr.write(text)
    outcome = {"ok": False, "traceback": text, "exception": None,
               "error": "The return value could not be pickled: %s" % error}
    payload = cloudpickle.dumps(outcome)

sys.stdout.flush()
sys.stderr.flush()
line = "%s%s\n" % ("LAZYCLUSTER-FUNCTION-RESULT:", base64.b64encode(payload).decode("ascii"))
with os.fdopen(result_fd, "w") as result_file:
    result_file.write(line)
sys.exit(0 if outcome["ok"] else 1)
"""


def run_function_from_file(payload_path: str) -> list[str]:
    """Build the argv that runs FUNCTION_RUNNER_SNIPPET on the payload file `payload_path`."""
    return [*python_command(FUNCTION_RUNNER_SNIPPET), payload_path]


# Prints the version of the installed `distributed` package, or nothing when
# it is missing. Reads the package metadata because importing distributed
# takes about half a second.
DISTRIBUTED_VERSION_SNIPPET = r"""
try:
    from importlib.metadata import version
    print(version("distributed"))
except Exception:
    pass
"""
