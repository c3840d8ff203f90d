"""The root of every error fqdnproxy raises.

Each module declares its own subclasses next to the code that raises them; the docstring of a
class is its default message, as in dnspython's ``dns/exception.py``.
"""

from __future__ import annotations


class FqdnproxyError(Exception):
    """An fqdnproxy error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message if message is not None else (self.__doc__ or "").strip())
