"""The reward contract, the registry, and building a reward from a config entry.

A reward is a plain callable::

    fn(images, prompts, metadata) -> Sequence[float | None]
    #   images:   np.ndarray uint8 (B, H, W, 3), RGB (read-only when it comes from the Ray object store)
    #   prompts:  list[str], len B
    #   metadata: list[dict], len B (e.g. "text": target text, "reference": uint8 (H, W, 3) array)
    #   returns:  B scores; None or NaN = no score for that sample (never a silent 0)

A score is a finite number (int, float, bool, numpy or torch scalar). Anything else in the returned sequence —
+-inf, a string (even "0.5": a reward parses its own text), any other object — is not a score: that sample
scores NaN with a warning naming the reward and counts as a failure, like a call that raises
(``rewards.scoring``: ``reward_host.max_failed_*`` stop a job whose reward keeps failing, or scores nothing).

A reward is found by

* a registered name (``@register("name")`` below; the built-ins live in ``rewards/<name>.py``),
* an import path ``"package.module:attr"`` (a function, or a class that is instantiated once with the
  entry's ``args`` and then called), or
* an installed plugin: the entry-point group ``tandem.rewards`` maps a name to ``"package.module:attr"``.

A *groupwise* reward (e.g. a pairwise win rate) is called once per prompt group instead of once per batch; it
declares itself with ``register(name, groupwise=True)`` or a ``groupwise = True`` attribute.

Optional hooks a reward may offer:

* ``check_args(**args)`` (an attribute of a function, a static or class method of a class): cheap checks of
  its ``args`` — values in range, weight paths exist — raising ValueError or RewardConfigError; run when a
  job starts and by ``--dry-run``, before any model loads (``check_entries``), so a bad ``args`` is one config
  error before training, never a reward that silently scores NaN;
* returning ``ScoresWithInfo(scores, info)``: one dict of readable details per sample (OCR: the text it
  read), shown by ``tandem score``.

An entry with ``style: trl`` holds a TRL-style reward function ``fn(prompts, completions, **kwargs)`` (TRL
``GRPOTrainer``'s contract): ``completions`` are the images as PIL images, and every metadata key arrives as
a keyword argument holding one value per sample (None where a sample lacks it), like TRL's dataset columns.

A fresh process (a Ray reward actor) finds the code of an entry by importing the module that defines it
(``code_locations``), with that module's folder on ``sys.path``: a reward registered in the user's own
module works on the Ray backend as it does in-process.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import sys
from dataclasses import dataclass
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tandem.core.errors import ConfigError
from tandem.core.registry import Registry
from tandem.rewards.config import RewardEntry

logger = logging.getLogger("tandem.rewards")

ENTRY_POINT_GROUP = "tandem.rewards"
# Modules holding the built-in rewards; each registers itself on import (their heavy imports are lazy).
BUILTIN_MODULES = tuple(f"tandem.rewards.{m}" for m in ("simple", "ocr", "hands", "aesthetic", "vlm", "lpips", "pickscore", "clip_similarity", "edit"))
# Reward-function calling conventions of a config entry (``rewards[].style``).
STYLES = ("tandem", "trl")


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


REWARDS: Registry[RewardSpec] = Registry("reward")


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "(no description)"


def register(name: str, groupwise: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register a reward function or class under ``name``; duplicate names are refused."""

    def wrap(target: Callable) -> Callable:
        if name in REWARDS:  # the same function again (its module imported twice) replaces itself; another is refused
            old = REWARDS.get(name).target
            if (old.__module__, old.__qualname__) != (target.__module__, target.__qualname__):
                raise ValueError(f"reward name '{name}' is already registered by {old.__module__}.{old.__qualname__}")
            REWARDS.unregister(name)
        target.groupwise = groupwise or bool(getattr(target, "groupwise", False))
        REWARDS.register(name)(RewardSpec(name, target, target.groupwise, _first_line(target)))
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
        raise RewardConfigError(f"reward fn '{path}': cannot import module '{module_name}' ({e}); the working directory and PYTHONPATH are searched") from None
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
    return sorted(set(REWARDS.names()) | set(_plugins()))


def resolve(name_or_path: str) -> RewardSpec:
    """A registered name, a plugin name, or ``"package.module:attr"`` -> RewardSpec (RewardConfigError if none)."""
    if ":" in name_or_path:
        return _import_path(name_or_path)
    _load_builtins()
    if name_or_path in REWARDS:
        return REWARDS.get(name_or_path)
    plugin = _plugins().get(name_or_path)
    if plugin is not None:
        try:
            target = plugin.load()
        except Exception as e:
            raise RewardConfigError(f"reward plugin '{name_or_path}' ({plugin.value}) failed to load: {type(e).__name__}: {e}") from None
        return REWARDS.get(name_or_path) if name_or_path in REWARDS else _spec_of(name_or_path, target)
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
def _as_score(value: Any) -> Optional[float]:
    """One returned value -> float (NaN for None/NaN: no score), or None when it is not a number.

    Numbers are ints, floats, bools and numpy / torch scalars. Not numbers: +-inf, strings (even "0.5": a
    reward parses its own text), and any other object."""
    if value is None:
        return np.nan
    if isinstance(value, (str, bytes)):
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if not math.isinf(score) else None


def _shown(value: Any) -> str:
    text = repr(value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value)
    return text if len(text) <= 40 else text[:37] + "..."


def to_scores(raw: Any, n: int, name: str) -> Tuple[np.ndarray, Dict[int, str]]:
    """A reward's output -> (float64 (n,) scores, {i: the value shown} for the values that are not numbers).

    None and NaN are no score (NaN); a value that is not a number (+-inf, a string, any object) is NaN too and
    listed, so that the caller counts it as a failure (``rewards.scoring``). A wrong count, or an output that
    is not a sequence, breaks the contract: RewardError naming the reward."""
    if hasattr(raw, "detach"):  # a torch tensor, without importing torch here
        raw = raw.detach().float().cpu().numpy()
    try:
        if isinstance(raw, (str, bytes, dict)) or getattr(raw, "ndim", 1) == 0:
            raise TypeError
        raw = list(raw)
    except TypeError:
        raise RewardError(f"reward '{name}' must return a sequence of numbers or None (one per image), got {type(raw).__name__}") from None
    if len(raw) != n:
        raise RewardError(f"reward '{name}' returned {len(raw)} scores for a batch of {n}; it must return one score (or None) per image")
    values, not_numbers = np.full(n, np.nan), {}
    for i, value in enumerate(raw):
        score = _as_score(value)
        if score is None:
            not_numbers[i] = _shown(value)
        else:
            values[i] = score
    return values, not_numbers


class ScoresWithInfo(list):
    """A reward's B scores (floats or None) with ``info``: one dict of readable details per sample (e.g. the
    text OCR read), which ``tandem score`` prints next to the score. Behaves as the plain list of scores."""

    def __init__(self, scores: Sequence[Optional[float]], info: Sequence[dict]):
        super().__init__(scores)
        self.info = [dict(d) for d in info]


@dataclass
class CallScores:
    """One call of a reward on B images.

    scores: float64 (B,), NaN = no score; info: B dicts of readable details (empty unless the reward returned
    ScoresWithInfo); not_numbers: {i: the value shown} for the values that were not numbers (scored NaN).
    """

    scores: np.ndarray
    info: List[dict]
    not_numbers: Dict[int, str]


@dataclass
class Reward:
    """A ready reward: ``reward(images, prompts, metadata)`` -> float64 (B,) with NaN for no score."""

    name: str
    fn: Callable
    groupwise: bool

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> "CallScores":
        """The scores of one call (see CallScores)."""
        raw = self.fn(images, list(prompts), list(metadata))
        info = list(getattr(raw, "info", None) or [{} for _ in prompts])
        if len(info) != len(prompts):
            raise RewardError(f"reward '{self.name}' returned {len(info)} info dicts for a batch of {len(prompts)}")
        scores, not_numbers = to_scores(raw, len(prompts), self.name)
        return CallScores(scores, info, not_numbers)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> np.ndarray:
        return self.score(images, prompts, metadata).scores


def trl_style(fn: Callable) -> Callable:
    """Wrap a TRL-style reward ``fn(prompts, completions, **kwargs)`` into tandem's (images, prompts, metadata).

    completions = the B images as PIL images; kwargs = {metadata key: [value of sample i or None]} over the
    union of the batch's metadata keys (keys named like the call's own arguments are left out).
    """

    def call(images: np.ndarray, prompts: List[str], metadata: List[dict]):
        from PIL import Image

        keys = sorted({k for m in metadata for k in m} - {"prompts", "completions"})
        columns = {k: [m.get(k) for m in metadata] for k in keys}
        return fn(prompts=list(prompts), completions=[Image.fromarray(np.asarray(img)) for img in images], **columns)

    call.groupwise = bool(getattr(fn, "groupwise", False))
    return call


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
    if entry.style == "trl":
        fn = trl_style(fn)
    groupwise = spec.groupwise or bool(getattr(fn, "groupwise", False))
    return Reward(label, fn, groupwise)


def check_entries(entries: Sequence[RewardEntry], key: str = "rewards") -> None:
    """Find the reward of every entry and check its args without loading anything: a function's args against
    its signature and its ``check_args``; a class's ``check_args`` (weight paths exist). Unknown names, bad
    import paths, bad args and missing weight paths fail fast, before any model is loaded. RewardConfigError
    names the entry as ``<key>[i]``."""
    for i, entry in enumerate(entries):
        if entry.name is None and entry.fn is None:
            raise RewardConfigError(f"{key}[{i}] needs 'name' (a registered reward) or 'fn' ('package.module:attr')")
        if entry.style not in STYLES:
            raise RewardConfigError(f"{key}[{i}].style is {entry.style!r}; allowed: {', '.join(STYLES)}")
        try:
            spec = resolve(entry.fn or entry.name)
            args = dict(entry.args or {})
            if not inspect.isclass(spec.target):  # a function's args are cheap to check
                _instantiate(spec, args, entry_label(entry))
            elif hasattr(spec.target, "check_args"):  # a class is built later; its cheap checks run now
                spec.target.check_args(**args)
        except RewardConfigError as e:
            raise RewardConfigError(f"{key}[{i}]: {e}") from None
        except (TypeError, ValueError) as e:
            raise RewardConfigError(f"{key}[{i}]: bad args for reward '{entry_label(entry)}': {e}") from None


def import_reward_modules(modules: Sequence[str]) -> None:
    """Import the config's ``reward_modules`` so that the rewards they ``@register`` are found by name."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise RewardConfigError(f"reward_modules: cannot import '{name}' ({e}); the working directory and PYTHONPATH are searched") from None


def module_root(module_name: str) -> Optional[str]:
    """The sys.path folder that ``import module_name`` found it in (None for a module without a file)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve().parent
    depth = module_name.count(".") + (Path(file).name == "__init__.py")
    for _ in range(depth):
        path = path.parent
    return str(path)


def code_locations(entry: RewardEntry, label: str) -> List[Tuple[Optional[str], str]]:
    """[(sys.path folder, module)] a fresh process imports to find this entry's reward: the module that
    defines (and registers) it. RewardConfigError for a reward defined in ``__main__`` (a script being run),
    which no other process can import."""
    target = resolve(entry.fn or entry.name).target
    module = getattr(target, "__module__", None) or ""
    if module == "__main__":
        raise RewardConfigError(
            f"reward '{label}' is defined in the script being run (__main__), which reward actors cannot import; "
            "move it into a module next to the script and import it from there, or set reward_host.backend=local"
        )
    if not module or module.startswith("tandem."):
        return []
    return [(module_root(module), module)]


def import_code(locations: Sequence[Tuple[Optional[str], str]]) -> None:
    """In a fresh process: put each folder on sys.path and import each module (see ``code_locations``)."""
    for root, module in locations:
        if root and root not in sys.path:
            sys.path.insert(0, root)
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise RewardConfigError(f"the reward actor cannot import '{module}' ({e}); is {root} visible to every Ray node?") from None


def unique_labels(entries: Sequence[RewardEntry]) -> List[str]:
    """One label per entry, de-duplicated in order with a suffix: ocr, ocr_2, ocr_3, ..."""
    out: List[str] = []
    for entry in entries:
        label, k = entry_label(entry), 1
        while (label if k == 1 else f"{label}_{k}") in out:
            k += 1
        out.append(label if k == 1 else f"{label}_{k}")
    return out
