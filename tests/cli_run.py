"""`tandem ARGS...` in this process: ``tandem.rl.cli.main`` with its stdout and stderr captured.

A subprocess spends seconds importing torch before it reads its arguments; the user-mistake tests call the same
``main`` as the ``tandem`` entry point, here. tests/test_cli_config.py keeps real subprocess runs of the entry point.
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
