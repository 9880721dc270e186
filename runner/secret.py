"""A string that is kept in memory only: never shown, logged, pickled or stored."""

from __future__ import annotations

import hmac


class Secret:
    """A string that never shows itself in ``repr``, ``str``, f-strings or logs.

    Call ``reveal()`` at the one place that must hand the value on (an HTTP
    header, the guest's ``run.sh --jitconfig``).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling (multiprocessing, caches) would write the value out; refuse.
        raise TypeError("Secret cannot be pickled")
