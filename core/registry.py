"""The one small registry behind model families, objectives, loss types and the other named choices.

``Registry("loss type")`` maps names to objects; ``register("name")`` is a decorator that refuses duplicates,
and a lookup of an unknown name raises ``ConfigError`` listing the valid names (verl's registries). Config
validation reads ``names()``, so a newly registered entry is at once a valid config value.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from tandem.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str, key: str = "") -> T:
        """The entry ``name``; ConfigError naming ``key`` (the config key it came from) and the valid names."""
        if name not in self._entries:
            where = f"config key '{key}' is {name!r}; " if key else f"unknown {self.kind} {name!r}; "
            raise ConfigError(f"{where}allowed {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (a plug-in or a test that registered it for a while)."""
        return self._entries.pop(name)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
