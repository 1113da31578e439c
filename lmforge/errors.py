"""Errors lmforge raises for bad input: each names the file, the record and what is wrong."""

from __future__ import annotations

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether a failed write says the disk (or the quota) is full: by errno, or by its text for
    writers that raise with the message but no errno set (pyarrow)."""
    text = str(error)
    return (getattr(error, "errno", None) in DISK_FULL or "No space left on device" in text
            or "Disk quota exceeded" in text)


class LmforgeError(Exception):
    """An error the user can fix; the CLI prints it without a traceback and exits non-zero."""


class DataError(LmforgeError):
    """A data file, or one record in it, cannot be used.

    `where` is a human-readable location inside the file ("record 3", "line 12"), or None when
    the problem concerns the whole file.
    """

    def __init__(self, path: str, where: str | None, reason: str):
        self.path = str(path)
        self.where = where
        self.reason = reason
        location = f"{self.path}, {where}" if where else self.path
        super().__init__(f"{location}: {reason}")


class RecordError(ValueError):
    """Raised by a per-record normaliser; the reader adds the file and record location.

    `kind` is a short stable name ("unknown_role", "empty_content", ...) used to count skips.
    """

    def __init__(self, kind: str, reason: str):
        self.kind = kind
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        # Record errors come back from worker processes pickled; the default would call
        # RecordError(reason) and fail.
        return RecordError, (self.kind, self.reason)
