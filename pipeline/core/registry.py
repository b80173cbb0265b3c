"""One registry type for every named, pluggable part (merge methods, weak labellers, difficulty signals, pacing
functions, loss-weighting strategies): one source of truth, listed by tests, unknown names fail with a suggestion."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from sentimerge.pipeline.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object. `register` is a decorator; `get` fails on an unknown name with a did-you-mean suggestion."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def problem(self, name: str) -> str | None:
        """Why `name` cannot be used (None when it can): for collecting config problems before raising once."""
        if name in self._entries:
            return None
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(self.names())}"
        return f"unknown {self.kind} {name!r} ({hint})"

    def get(self, name: str) -> T:
        problem = self.problem(name)
        if problem:
            raise ConfigError(problem)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries
