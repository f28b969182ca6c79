"""One error type for bad input: it always names the file, the line and (when known) the field."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``FILE:LINE: field 'F': message``."""

    def __init__(self, path: object, line: int | None, message: str, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
