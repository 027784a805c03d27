"""`tandem ARGS...` in this process: ``tandem.rl.cli.main`` with its stdout and stderr captured.

A subprocess spends seconds importing torch before it reads its arguments; the user-mistake tests call the same
``main`` as the ``tandem`` entry point, here. tests/rl/test_cli.py keeps real subprocess runs of the entry point.
"""

import contextlib
import io
import logging
import subprocess

from tandem.rl.cli import main


def tandem_cli(*args) -> subprocess.CompletedProcess:
    """Run ``tandem *args``; returns its exit code, stdout and stderr like ``subprocess.run(..., text=True)``."""
    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("tandem")
    handlers, level = list(logger.handlers), logger.level  # main() points tandem's logger at the captured stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        logger.handlers[:], logger.level = handlers, level
    return subprocess.CompletedProcess(["tandem", *args], code, out.getvalue(), err.getvalue())


def assert_user_mistake(proc, *expected: str, code: int = 2, only: str | None = None, ignore: tuple = ()) -> str:
    """Assert that ``proc`` (anything with ``returncode`` and ``stderr``) exited with ``code`` and wrote exactly one
    non-blank stderr line, no traceback, containing each of ``expected``; return that line.

    A user mistake exits 2; a runtime failure (``code=1``) keeps the same one-line rule. ``only`` counts just the lines
    that start with it (for example "tandem:" where the job's log lines share stderr); ``ignore`` drops lines that
    contain any of its strings (for example a library's "Loading" progress bar, or "\\x1b" colour codes)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not any(text in line for text in ignore)]
    if only is not None:
        lines = [line for line in lines if line.startswith(only)]
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    assert all(text in lines[0] for text in expected), (expected, lines[0])
    return lines[0]
