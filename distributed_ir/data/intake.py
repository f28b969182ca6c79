"""Reading input rows under a bad-input policy: raise (default) or skip to a rejects file.

Every reader (BEIR corpus/queries/qrels, training records, corpus staging) takes an
:class:`InputCheck`.  It counts each non-blank input row per file when the row is *read*, and
each row again when a consumer accepts or rejects it, so ``input == accepted + rejected`` is a
real invariant (a row dropped silently would break it), not a sum defined to match.

- ``on_error="raise"``: the first bad row raises :class:`DataError` naming file, line and field.
- ``on_error="skip"``:  bad rows are appended to a JSONL rejects file, one object per row:
  ``{"file", "line", "field", "reason", "excerpt"}`` (excerpt = the raw row truncated to
  ``EXCERPT_CHARS``), and reading continues.

Any text field longer than ``max_text_bytes`` (UTF-8 bytes, default 1 MiB) is rejected: no
embedder reads past a few thousand tokens, so a 10 MB "document" is a broken export, not data.
So is one that is not Unicode text: JSON's ``"\\ud800"`` (a lone surrogate) parses, but no UTF-8
writer, tokenizer or Arrow table takes it.
File-level problems (missing file, no records at all) always raise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed_ir.data.errors import DataError

MAX_TEXT_BYTES = 1 << 20  # 1 MiB
EXCERPT_CHARS = 200
ON_ERROR = ("raise", "skip")


class InputCheck:
    """Bad-input policy plus per-file counts; one instance per command run."""

    def __init__(self, on_error: str = "raise", rejects_path: str | Path | None = None,
                 max_text_bytes: int = MAX_TEXT_BYTES):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}")
        if max_text_bytes < 1:
            raise ValueError("max_text_bytes must be >= 1")
        self.on_error = on_error
        self.rejects_path = Path(rejects_path) if rejects_path else None
        self.max_text_bytes = max_text_bytes
        self.counts: dict[str, dict[str, int]] = {}
        self.relay: InputCheck | None = None  # another check that gets a copy of every reject entry
        self._started = False
        self._held: list[dict[str, Any]] | None = None

    def _file(self, path: str | Path) -> dict[str, int]:
        return self.counts.setdefault(str(path), {"input": 0, "accepted": 0, "rejected": 0})

    def read(self, path: str | Path) -> None:
        """One more input row was read from ``path`` (before any validation)."""
        self._file(path)["input"] += 1

    def accept(self, path: str | Path) -> None:
        self._file(path)["accepted"] += 1

    def add(self, path: str | Path, counts: dict[str, int]) -> None:
        """Add counts made elsewhere (a Ray task that read part of ``path``) to this run's."""
        mine = self._file(path)
        for key, n in counts.items():
            mine[key] += n

    def reject(self, err: DataError, raw: Any = None) -> None:
        """Raise ``err`` (on_error=raise), or record the row in the rejects file and go on."""
        if self.on_error == "raise":
            raise err
        self._file(err.path)["rejected"] += 1
        if self.rejects_path is not None:
            self.write_reject(reject_entry(err, raw))

    def write_reject(self, entry: dict[str, Any]) -> None:
        """Append one :func:`reject_entry` to the rejects file (counted by the caller)."""
        if self.relay is not None:
            self.relay.write_reject(entry)
        if self.rejects_path is None:
            return
        if self._held is not None:
            self._held.append(entry)
            return
        if not self._started:  # a fresh file per run: counts and file always agree
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            self.rejects_path.write_text("")
            self._started = True
        with self.rejects_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def hold(self) -> None:
        """Keep reject entries in memory until :meth:`release`, for files not read in input order
        (a corpus staged on Ray after its queries and qrels were read here)."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write the held entries, file by file in the order the files were first counted (register
        one early with ``add(path, {})``), each file's in the order they came."""
        held, self._held = self._held, None
        rank = {name: i for i, name in enumerate(self.counts)}
        for entry in sorted(held or [], key=lambda e: rank.get(e["file"], len(rank))):
            self.write_reject(entry)

    def check_row(self, path: str | Path, line: int, row: dict, surrogates: bool = True) -> None:
        """DataError for the first text field (or list item) that is not valid Unicode (a lone
        surrogate) or is over ``max_text_bytes``. ``surrogates=False``: the row cannot hold one
        (decoded from strict UTF-8 without ``\\u`` escapes), only sizes are checked."""
        for key, value in row.items():
            for item in value if isinstance(value, list) else (value,):
                if not isinstance(item, str):
                    continue
                if surrogates and not item.isascii():
                    try:
                        size = len(item.encode("utf-8"))
                    except UnicodeEncodeError as e:
                        raise DataError(path, line, f"not valid Unicode text: a lone surrogate "
                                        f"{ascii(item[e.start])} at character {e.start}", field=str(key)) from None
                elif len(item) * 4 > self.max_text_bytes:  # len(str) <= bytes <= 4*len(str)
                    size = len(item.encode("utf-8", "surrogatepass"))
                else:
                    continue
                if size > self.max_text_bytes:
                    raise DataError(path, line, f"text is {size} bytes, over max_text_bytes="
                                    f"{self.max_text_bytes}", field=str(key))

    def summary(self) -> dict[str, Any]:
        """Per-file and total counts; ``input == accepted + rejected`` for each file."""
        total = {k: sum(c[k] for c in self.counts.values()) for k in ("input", "accepted", "rejected")}
        out: dict[str, Any] = {**total, "files": dict(self.counts)}
        if total["rejected"] and self.rejects_path:
            out["rejects"] = str(self.rejects_path)
        return out

    def summary_line(self) -> str:
        return summary_line(self.summary())


def summary_line(s: dict[str, Any]) -> str:
    """``[input] N rows = A accepted + R rejected (rejects: FILE)`` for a :meth:`summary`."""
    text = f"[input] {s['input']} rows = {s['accepted']} accepted + {s['rejected']} rejected"
    return text + (f" (rejects: {s['rejects']})" if "rejects" in s else "")


def reject_entry(err: DataError, raw: Any = None) -> dict[str, Any]:
    """One line of the rejects file: where, which field, why, and an excerpt of the raw row."""
    return {"file": err.path, "line": err.line, "field": err.field, "reason": err.reason, "excerpt": excerpt(raw)}


def excerpt(raw: Any, limit: int = EXCERPT_CHARS) -> str:
    """The raw row as text, cut to ``limit`` characters (long strings cut first, cheaply)."""
    if isinstance(raw, bytes):
        text = raw[: limit * 4].decode("utf-8", "backslashreplace").rstrip("\r\n")
    elif isinstance(raw, dict):
        text = json.dumps({k: (v[:limit] if isinstance(v, str) else v) for k, v in raw.items()},
                          ensure_ascii=False, default=str)
    else:
        text = "" if raw is None else str(raw)
    text = text[:limit]
    if not text.isascii():  # a lone surrogate (JSON's "\ud800") written as its escape: the excerpt stays UTF-8
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def iter_jsonl(path: str | Path, check: InputCheck | None = None, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` per non-blank line; bad JSON/UTF-8/size -> ``check``.

    ``start``/``end``: only the lines that begin in that byte range (``start`` must be a line start,
    whose line number is ``first_line``), so a large file can be read in parts.
    """
    check = check or InputCheck()
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        for lineno, raw in enumerate(fh, start=first_line):
            if end is not None and pos >= end:
                break
            pos += len(raw)
            if not raw.strip():
                continue
            check.read(path)
            try:
                obj = _parse_line(path, lineno, raw, check)
            except DataError as e:
                check.reject(e, raw)
                continue
            yield lineno, obj


def _parse_line(path: str | Path, lineno: int, raw: bytes, check: InputCheck) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, lineno, f"invalid UTF-8 ({e.reason} at byte {e.start})",
                        field=_bad_utf8_field(raw)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    # strict UTF-8 holds no surrogate: only a \u escape can make one
    check.check_row(path, lineno, obj, surrogates=b"\\u" in raw)
    return obj


def _bad_utf8_field(raw: bytes) -> str | None:
    """The JSON field whose value holds the undecodable bytes (None when the line is not JSON)."""
    try:
        obj = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in items):
                return str(key)
    return None


def iter_parquet(path: str | Path, check: InputCheck | None = None, row_groups: list[int] | None = None,
                 first_row: int = 1) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, row)`` (1-based) from a Parquet file, size-checked.

    ``row_groups``: only those (consecutive) row groups, whose first row is number ``first_row``.
    """
    import pyarrow.parquet as pq

    check = check or InputCheck()
    i = first_row - 1
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, row_groups=row_groups):
        for row in batch.to_pylist():
            i += 1
            check.read(path)
            try:
                check.check_row(path, i, row)
            except DataError as e:
                check.reject(e, row)
                continue
            yield i, row
