"""The reward contract, the registry, and building a reward from a config entry.

A reward is a plain callable::

    fn(images, prompts, metadata) -> Sequence[float | None]
    #   images:   np.ndarray uint8 (B, H, W, 3), RGB (read-only when it comes from the Ray object store)
    #   prompts:  list[str], len B
    #   metadata: list[dict], len B (e.g. "text": target text, "reference": uint8 (H, W, 3) array)
    #   returns:  B scores; None or NaN = no score for that sample (never a silent 0)

A reward is found by

* a registered name (``@register("name")`` below; the built-ins live in ``rewards/<name>.py``),
* an import path ``"package.module:attr"`` (a function, or a class that is instantiated once with the
  entry's ``args`` and then called), or
* an installed plugin: the entry-point group ``tandem.rewards`` maps a name to ``"package.module:attr"``.

A reward function with ``args`` may carry a ``check_args(**args)`` attribute that raises ValueError for bad
values; it runs when the reward is built, so a bad ``args`` is one config error before training, never a
reward that silently scores NaN.

A *groupwise* reward (e.g. a pairwise win rate) is called once per prompt group instead of once per batch; it
declares itself with ``register(name, groupwise=True)`` or a ``groupwise = True`` attribute.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from functools import partial
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tandem.core.errors import ConfigError
from tandem.rewards.config import RewardEntry

logger = logging.getLogger("tandem.rewards")

ENTRY_POINT_GROUP = "tandem.rewards"
# Modules holding the built-in rewards; each registers itself on import (their heavy imports are lazy).
BUILTIN_MODULES = tuple(f"tandem.rewards.{m}" for m in ("simple", "ocr", "hands", "aesthetic", "vlm", "lpips", "edit"))


class RewardConfigError(ConfigError):
    """A reward cannot be found or built from its config entry (the CLI prints it as one line, exit 2)."""


class RewardError(RuntimeError):
    """A reward broke its contract at run time (wrong number of scores, timeout, dead actor)."""


@dataclass(frozen=True)
class RewardSpec:
    """What a name resolves to: ``target`` is a reward function or a reward class."""

    name: str
    target: Callable
    groupwise: bool
    doc: str


_REGISTRY: Dict[str, RewardSpec] = {}


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "(no description)"


def register(name: str, groupwise: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register a reward function or class under ``name``; duplicate names are refused."""

    def wrap(target: Callable) -> Callable:
        old = _REGISTRY.get(name)
        same = old is not None and (old.target.__module__, old.target.__qualname__) == (target.__module__, target.__qualname__)
        if old is not None and not same:
            raise ValueError(f"reward name '{name}' is already registered by {old.target.__module__}.{old.target.__qualname__}")
        target.groupwise = groupwise or bool(getattr(target, "groupwise", False))
        _REGISTRY[name] = RewardSpec(name, target, target.groupwise, _first_line(target))
        return target

    return wrap


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def _plugins() -> Dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _spec_of(name: str, target: Callable) -> RewardSpec:
    return RewardSpec(name, target, bool(getattr(target, "groupwise", False)), _first_line(target))


def _import_path(path: str) -> RewardSpec:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardConfigError(f"reward fn '{path}' is not an import path of the form 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardConfigError(f"reward fn '{path}': cannot import module '{module_name}' ({e}); check the rewards[].fn path and PYTHONPATH") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RewardConfigError(f"reward fn '{path}': module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise RewardConfigError(f"reward fn '{path}' is not callable (give a function or a class)")
    return _spec_of(attr.split(".")[-1], target)


def available_names() -> List[str]:
    """Registered names plus installed plugin names, sorted."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_plugins()))


def resolve(name_or_path: str) -> RewardSpec:
    """A registered name, a plugin name, or ``"package.module:attr"`` -> RewardSpec (RewardConfigError if none)."""
    if ":" in name_or_path:
        return _import_path(name_or_path)
    _load_builtins()
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    plugin = _plugins().get(name_or_path)
    if plugin is not None:
        try:
            target = plugin.load()
        except Exception as e:
            raise RewardConfigError(f"reward plugin '{name_or_path}' ({plugin.value}) failed to load: {type(e).__name__}: {e}") from None
        return _REGISTRY.get(name_or_path) or _spec_of(name_or_path, target)
    raise RewardConfigError(
        f"unknown reward '{name_or_path}'; registered: {', '.join(available_names())} "
        "(or give fn: 'package.module:attr')"
    )


def list_rewards() -> List[Tuple[str, str]]:
    """(name, one-line doc) of every registered reward and installed plugin, sorted by name."""
    out = []
    for name in available_names():
        try:
            out.append((name, resolve(name).doc))
        except RewardConfigError as e:
            out.append((name, f"(broken plugin: {e})"))
    return out


# ------------------------------------------------------------------------------------------------ built reward
def to_scores(raw: Any, n: int, name: str) -> np.ndarray:
    """A reward's output -> float64 (n,), None -> NaN; RewardError naming the reward if the count is wrong."""
    if hasattr(raw, "detach"):  # a torch tensor, without importing torch here
        raw = raw.detach().float().cpu().numpy()
    try:
        values = [np.nan if s is None else float(s) for s in raw]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward '{name}' must return a sequence of floats or None, got {type(raw).__name__} ({e})") from None
    if len(values) != n:
        raise RewardError(f"reward '{name}' returned {len(values)} scores for a batch of {n}; it must return one score (or None) per image")
    return np.asarray(values, dtype=np.float64)


@dataclass
class Reward:
    """A ready reward: ``reward(images, prompts, metadata)`` -> float64 (B,) with NaN for no score."""

    name: str
    fn: Callable
    groupwise: bool

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> np.ndarray:
        return to_scores(self.fn(images, list(prompts), list(metadata)), len(prompts), self.name)


def entry_label(entry: RewardEntry) -> str:
    """The name a config entry is known by: ``name``, else the attribute name of ``fn``."""
    if entry.name is not None:
        return entry.name
    return (entry.fn or "?").rpartition(":")[2].split(".")[-1]


def _instantiate(spec: RewardSpec, args: Dict[str, Any], label: str) -> Callable:
    if not inspect.isclass(spec.target):
        if not args:
            return spec.target
        try:
            inspect.signature(spec.target).bind_partial(**args)
        except TypeError as e:
            raise RewardConfigError(f"reward '{label}': rewards[].args do not fit {spec.target.__name__}(images, prompts, metadata, ...): {e}") from None
        check = getattr(spec.target, "check_args", None)
        if check is not None:
            try:
                check(**args)
            except (TypeError, ValueError) as e:
                raise RewardConfigError(f"reward '{label}': bad rewards[].args: {e}") from None
        return partial(spec.target, **args)
    try:
        instance = spec.target(**args)
    except RewardConfigError:
        raise
    except TypeError as e:
        raise RewardConfigError(f"reward '{label}': bad rewards[].args for {spec.target.__name__}: {e}") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise RewardConfigError(f"reward '{label}' could not be built: {type(e).__name__}: {first} (check its rewards[].args)") from None
    if not callable(instance):
        raise RewardConfigError(f"reward '{label}': {spec.target.__name__} instances are not callable; define __call__(images, prompts, metadata)")
    return instance


def build_reward(entry: RewardEntry, label: Optional[str] = None) -> Reward:
    """Resolve and construct the reward of a config entry (RewardConfigError on any failure).

    ``fn`` wins over ``name`` for finding the code when both are given; ``name`` is then only the label.
    ``label`` overrides the name the reward reports itself by (the client passes the de-duplicated one).
    """
    label = label or entry_label(entry)
    if entry.name is None and entry.fn is None:
        raise RewardConfigError("a rewards[] entry needs 'name' (a registered reward) or 'fn' ('package.module:attr')")
    spec = resolve(entry.fn or entry.name)
    fn = _instantiate(spec, dict(entry.args or {}), label)
    groupwise = spec.groupwise or bool(getattr(fn, "groupwise", False))
    return Reward(label, fn, groupwise)


def check_entries(entries: Sequence[RewardEntry]) -> None:
    """Find the reward of every entry (and check a function's args; classes are not built here): unknown names,
    bad import paths and bad args fail fast, before any model is loaded. RewardConfigError names rewards[i]."""
    for i, entry in enumerate(entries):
        if entry.name is None and entry.fn is None:
            raise RewardConfigError(f"rewards[{i}] needs 'name' (a registered reward) or 'fn' ('package.module:attr')")
        try:
            spec = resolve(entry.fn or entry.name)
            if not inspect.isclass(spec.target):  # a function's args are cheap to check; a class is built later
                _instantiate(spec, dict(entry.args or {}), entry_label(entry))
        except RewardConfigError as e:
            raise RewardConfigError(f"rewards[{i}]: {e}") from None


def unique_labels(entries: Sequence[RewardEntry]) -> List[str]:
    """One label per entry, de-duplicated in order with a suffix: ocr, ocr_2, ocr_3, ..."""
    out: List[str] = []
    for entry in entries:
        label, k = entry_label(entry), 1
        while (label if k == 1 else f"{label}_{k}") in out:
            k += 1
        out.append(label if k == 1 else f"{label}_{k}")
    return out
