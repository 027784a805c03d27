"""Reward plugins for the hosting tests, referenced by import path ("tests.reward_plugins:attr") so that Ray
actors import them the way they import a user's module. Not a test module."""

import os
import time
from pathlib import Path

import numpy as np


def mean_red(images, prompts, metadata, scale=1.0):
    """Mean red channel in [0, 1], times args.scale."""
    return (images[..., 0].reshape(len(images), -1).mean(axis=1) / 255.0 * scale).tolist()


class PromptLength:
    """Length of the prompt plus args.offset; None for an empty prompt."""

    def __init__(self, offset=0.0):
        self.offset = offset

    def __call__(self, images, prompts, metadata):
        return [None if not p else len(p) + self.offset for p in prompts]


class GroupSize:
    """Groupwise: every sample scores the size of the group it was called with, plus its rank in the group."""

    groupwise = True

    def __call__(self, images, prompts, metadata):
        return [len(images) + 0.1 * k for k in range(len(images))]


class CrashOnce:
    """Kills its own process on the first call (marker file absent), then scores 1.0 per image."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __call__(self, images, prompts, metadata):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return [1.0] * len(images)


class Sleepy:
    """Sleeps args.seconds on each call while fewer than args.slow_calls calls are counted in args.marker."""

    def __init__(self, seconds, marker, slow_calls=1_000_000):
        self.seconds, self.marker, self.slow_calls = seconds, Path(marker), slow_calls

    def __call__(self, images, prompts, metadata):
        calls = int(self.marker.read_text()) if self.marker.exists() else 0
        self.marker.write_text(str(calls + 1))
        if calls < self.slow_calls:
            time.sleep(self.seconds)
        return [0.5] * len(images)


def fails_on_boom(images, prompts, metadata):
    """Raises if any prompt in the call contains 'boom'; else 1.0."""
    if any("boom" in p for p in prompts):
        raise ValueError("boom in prompt")
    return np.ones(len(images))


def one_short(images, prompts, metadata):
    """Returns one score too few."""
    return [0.0] * (len(images) - 1)


class NeverBuilds:
    """Its constructor always fails."""

    def __init__(self, path="/nonexistent"):
        raise FileNotFoundError(f"no weights at {path}")


def reference_mean(images, prompts, metadata):
    """Mean pixel of metadata["reference"] (an array after loading); None without one."""
    return [None if m.get("reference") is None else float(np.mean(m["reference"])) for m in metadata]


class NotCallable:
    """A class whose instances have no __call__."""


def buggy(images, prompts, metadata):
    """Raises on every call (a broken reward must stop the job, not train on NaN)."""
    raise ZeroDivisionError("buggy reward")


def trl_red_plus_text(prompts, completions, text=None, **kwargs):
    """TRL-style (prompts, completions, **kwargs): mean red of each PIL completion in [0, 1], plus 1 when the
    sample's "text" column is set; kwargs must not carry tandem's own arguments."""
    assert not {"images", "metadata"} & set(kwargs), kwargs
    return [np.asarray(c)[..., 0].mean() / 255.0 + (t is not None) for c, t in zip(completions, text or [None] * len(prompts))]


class ShortAfter:
    """Scores 1.0 for its first args.good_calls calls, then returns one score too few (a RewardError)."""

    def __init__(self, good_calls):
        self.good_calls, self.calls = good_calls, 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        return [1.0] * (len(images) - (self.calls > self.good_calls))


def nothing(images, prompts, metadata):
    """Never scores: None for every image."""
    return [None] * len(images)


class SlowToBuild:
    """Its constructor sleeps args.seconds."""

    def __init__(self, seconds):
        time.sleep(seconds)

    def __call__(self, images, prompts, metadata):
        return [0.0] * len(images)


def ctrl_c_to_the_main_thread(timeout: float = 60.0) -> None:
    """A SIGINT to the main thread (where a job's ``StopSignals`` handles it), returning once that handler has taken
    it: two signals that arrive before the handler runs reach it as one."""
    import signal
    import threading

    stops = getattr(signal.getsignal(signal.SIGINT), "__self__", None)  # the running job's StopSignals, if any

    def state():
        return None if stops is None else (stops.requested, stops.message)

    before = state()
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while stops is not None and state() == before and time.monotonic() < deadline:
        time.sleep(0.001)


class CtrlCAt:
    """mean_red, and a Ctrl-C (``ctrl_c_to_the_main_thread``; local backend) on the calls $TANDEM_TEST_CTRL_C lists
    (1-based, comma-separated)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if str(self.calls) in os.environ.get("TANDEM_TEST_CTRL_C", "").split(","):
            ctrl_c_to_the_main_thread()
        return mean_red(images, prompts, metadata)


def infinite(images, prompts, metadata):
    """+inf for every image (not a number)."""
    return [float("inf")] * len(images)


def as_text(images, prompts, metadata):
    """Its scores as text: "0.5" for every image (not a number)."""
    return ["0.5"] * len(images)


def scores_only_boom(images, prompts, metadata):
    """1.0 for a prompt with 'boom' in it, None (no score) for any other."""
    return [1.0 if "boom" in p else None for p in prompts]


class DiesWhenBuilt:
    """Kills its own process in its constructor, after args.build_s seconds: a reward actor that can never
    start (a crash loop)."""

    def __init__(self, build_s=0.0):
        time.sleep(build_s)
        os._exit(3)

    def __call__(self, images, prompts, metadata):
        return [0.0] * len(images)


class SlowThenDies:
    """Takes args.build_s seconds to build, then kills its own process on every call: a reward actor in a crash
    loop whose restarts take longer than a call may."""

    def __init__(self, build_s):
        time.sleep(build_s)

    def __call__(self, images, prompts, metadata):
        os._exit(3)


class BuildTrace:
    """mean_red, whose build appends "build-start <time>" to args.trace, then "build-end <time>" after args.build_s
    seconds (with args.fail: raises FileNotFoundError instead, a reward that cannot be built)."""

    def __init__(self, trace, build_s=0.0, fail=False):
        append_trace(trace, "build-start")
        time.sleep(build_s)
        if fail:
            raise FileNotFoundError(f"no weights at {trace}")
        append_trace(trace, "build-end")

    def __call__(self, images, prompts, metadata):
        return mean_red(images, prompts, metadata)


def append_trace(trace, event: str) -> None:
    """One line "<event> <wall-clock time>" appended to the file ``trace`` (by any process)."""
    with open(trace, "a") as f:
        f.write(f"{event} {time.time()!r}\n")
