"""One small name -> factory registry; a miss lists the available names."""

from __future__ import annotations

import inspect
from typing import Callable, Generic, Iterable, Iterator, Mapping, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the available ones."""


class Registry(Generic[F]):
    """Maps names to factories of one kind (models, datasets, strategies, ...).

    Args:
        kind: what the entries are, used in messages ("model", "dataset").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a factory under `name`."""

        def add(factory: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = factory
            return factory

        return add

    def get(self, name: str) -> F:
        """Returns the factory for `name`, or raises UnknownNameError listing the available names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}"
            ) from None

    def check_arguments(self, name: str, args: Mapping[str, object], fixed: Iterable[str] = ()) -> None:
        """Raises ValueError unless every key of `args` is a keyword the factory `name` accepts.

        Args:
            name: registered name.
            args: user-given keyword arguments.
            fixed: parameters the caller passes itself (not the user's to set).
        """
        parameters = inspect.signature(self.get(name)).parameters
        valid = [p for p in parameters if p not in set(fixed) and p != "self"]
        unknown = sorted(set(args) - set(valid))
        if unknown:
            raise ValueError(f"{self.kind} {name} takes no argument '{unknown[0]}'; "
                             f"valid: {', '.join(valid) or 'none'}")

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
