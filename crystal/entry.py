"""The `crystal` command's entry point ([project.scripts]) and `python -m crystal`'s.

Importing crystal.cli takes a moment (click, numpy, the config), and a Ctrl-C in that moment
raises KeyboardInterrupt inside the import, where crystal.cli.main cannot catch it yet. This
module imports only `sys` (and the package's __init__ imports nothing), so it is loaded at once,
and it catches the interrupt around the import as main() catches it around a command: exit 130
with one line, no traceback, wherever the Ctrl-C lands.
"""

import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as crystal.cli.error_exit


def main(argv: list[str] | None = None) -> int:
    try:
        from crystal.cli import main as run

        return run(argv)
    except KeyboardInterrupt:  # during the import (a command's own is caught in crystal.cli.main)
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED
