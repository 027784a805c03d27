"""Ctrl-C and SIGTERM during a training job: stop where the run can be continued exactly.

While a job trains (``StopSignals.arm``):

* the first SIGINT / SIGTERM asks the loop to stop at the end of the current rollout: its remaining optimizer
  steps run, then a checkpoint is taken at that rollout boundary and ``Stopped`` is raised (the CLI exits 130).
  A checkpoint inside a rollout could not be continued exactly (the rest of that rollout's samples would be
  lost), so ``resume=auto`` from this one writes the same metrics as an uninterrupted run;
* a second one stops at once (``Interrupted``), keeping what the last checkpoint holds; a checkpoint being
  written then is finished first (``shielded``), so the message names what is on disk.

Before training starts (loading models, starting the reward actors) a signal stops at once. Once the job is
stopping (``closing``: checkpoint taken, reward actors and Ray shutting down), further signals are only logged,
so the clean-up (the embedded Ray cluster's temp folder) always completes. Handlers live in the main thread
only; elsewhere this object does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Dict, Iterator, Optional

log = logging.getLogger("tandem.session")


class Interrupted(KeyboardInterrupt):
    """A signal stopped the job at once (before training started, or a second signal); the CLI exits 130."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the job at a rollout boundary, after its checkpoint; the CLI exits 130."""


class StopSignals:
    """SIGINT / SIGTERM handling of one job (module docstring). ``where`` describes, when a signal comes, the
    step and the last checkpoint for the one-line message."""

    def __init__(self):
        self.requested: Optional[str] = None
        self.message: Optional[str] = None  # of a stop at once
        self.where: Callable[[], str] = lambda: "before training started"
        self._armed = self._closing = False
        self._shield, self._pending = 0, None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Restore the handlers. A stop at once may reach here as a bare KeyboardInterrupt (a blocking ``ray.get``
        turns the handler's exception into a new one): raise it with its message again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self.message and isinstance(exc, KeyboardInterrupt) and not isinstance(exc, (Interrupted, Stopped)):
            raise Interrupted(self.message) from None

    def arm(self, where: Callable[[], str]) -> None:
        """Training starts: the first signal now asks for a stop at the next rollout boundary."""
        self.where, self._armed = where, True

    def close(self) -> None:
        """The job is ending: signals from now on are logged and ignored while it cleans up."""
        self._closing = True

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Hold a second signal until the block (a checkpoint being written) is done, then stop."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if not self._shield and self._pending:
            self._stop_now(self._pending)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._closing:
            log.warning("%s: already stopping; cleaning up (the reward actors and Ray shut down)", name)
        elif not self._armed:
            self._stop_now(name)
        elif self.requested is None:
            self.requested = name
            log.warning("%s: stopping at the end of the current rollout (its remaining optimizer steps first), with "
                        "a checkpoint; send it again to stop at once, keeping the last checkpoint saved by then", name)
        elif self._shield:
            self._pending = name
        else:
            self._stop_now(name)

    def _stop_now(self, name: str) -> None:
        self._pending = None
        again = "a second " if self.requested else ""
        self.message = f"stopped at once by {again}{name} {self.where()}"
        raise Interrupted(self.message)
