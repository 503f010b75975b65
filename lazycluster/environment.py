"""Process-wide settings of lazycluster: where logs go, how loud other libraries are."""

from __future__ import annotations

import logging
import os

# Libraries whose INFO and WARNING lines drown lazycluster's own; they start at ERROR.
THIRD_PARTY_LOGGERS = ("paramiko",)

DEFAULT_MAIN_DIRECTORY = "./lazycluster"


class Environment:
    """Settings shared by every Runtime of this Python process.

    `main_directory` is where execution logs go, under
    `<main_directory>/execution_log/<host>/<task>_<timestamp>.log`. A relative
    path is resolved against the current directory when a log is written.
    """

    main_directory: str = DEFAULT_MAIN_DIRECTORY
    third_party_log_level: int = logging.ERROR

    @classmethod
    def set_main_directory(cls, dir: str) -> None:  # noqa: A002 - public argument name
        """Set the directory for execution logs; it is created when the first log is written."""
        if not isinstance(dir, (str, os.PathLike)):
            raise TypeError(f"Invalid main directory {dir!r}: expected a path.")
        path = os.fspath(dir)
        if not path.strip():
            raise ValueError("Invalid main directory '': it must not be empty.")
        cls.main_directory = os.path.abspath(os.path.expanduser(path))

    @classmethod
    def set_third_party_log_level(cls, level: int | str) -> None:
        """Set the log level of noisy third-party libraries such as paramiko."""
        if isinstance(level, str):
            resolved = logging.getLevelName(level.upper())
            if not isinstance(resolved, int):
                raise ValueError(
                    f"Invalid log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL."
                )
            level = resolved
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"Invalid log level {level!r}: expected an int or a level name.")

        cls.third_party_log_level = level
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(level)

    @classmethod
    def execution_log_dir(cls, host: str) -> str:
        """Return the absolute directory of the execution logs of `host`."""
        return os.path.join(os.path.abspath(cls.main_directory), "execution_log", host)


Environment.set_third_party_log_level(Environment.third_party_log_level)
