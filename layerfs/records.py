"""Frozen records with value equality, without ``dataclasses``.

What ``@dataclass(frozen=True, slots=True)`` gives (keyword construction, ``==``, ``hash``,
``repr``, assignment refused), for the classes the first mount's caller builds
(layerfs.config, mount_helper.argv): ``dataclasses`` (``inspect``, ``re``, ``enum`` behind it)
and the classes it builds were 75 of that caller's 135 million instructions (callgrind), twice
Python's own start.

Must not import: anything but the standard library's built-in modules.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs the caller ~5 ms
if TYPE_CHECKING:
    from typing import Any, Self


class Record:
    """Subclasses name their fields in ``__slots__``, in order, and set them all in
    ``__init__`` with ``self._fill(locals())``."""

    __slots__: tuple[str, ...] = ()

    def _fill(self, values: dict[str, Any]) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def fields(self) -> dict[str, Any]:
        """The fields by name, in order."""
        return {name: getattr(self, name) for name in self.__slots__}

    def replace(self, **changes: Any) -> Self:
        """A copy with CHANGES (as ``dataclasses.replace``)."""
        unknown = changes.keys() - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        new = object.__new__(type(self))
        for name in self.__slots__:
            object.__setattr__(new, name, changes.get(name, getattr(self, name)))
        return new

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __getstate__(self) -> tuple[Any, ...]:  # pickle and copy, past __setattr__
        return self._values()

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)
