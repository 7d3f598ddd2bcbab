"""Small value classes (a run of bytes, a run of clusters): equality, hash
and repr from their ``__slots__``, as a frozen dataclass gives, without
importing dataclasses (and inspect) at every backup's start."""

from __future__ import annotations


class Value:
    """Subclasses name their fields in ``__slots__`` and set them in ``__init__``."""

    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        names: tuple[str, ...] = type(self).__slots__
        return tuple(getattr(self, name) for name in names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Value) and type(other) is type(self) and \
            self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._fields()}"
