"""The rows of a CSV file the user gives (shard sources, evaluation tasks), with malformed rows reported by line.

`csv.field_size_limit()` (131,072 characters) stays as it is: no caption or path is that long, and a field that
long is almost always a quote left open, which would swallow the rest of the file into one field if the limit
were raised. Such a row is a ValueError naming the file, the line where the row starts and the fix.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path


def csv_rows(reader: csv.DictReader, path: str | Path) -> Iterator[dict[str, str]]:
    """The rows of `reader` (reading file `path`); a row the csv module refuses raises ValueError."""
    while True:
        start = reader.line_num + 1  # the row's first line (a quoted field may span several)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise ValueError(
                    f"{path}:{start}: a field longer than {csv.field_size_limit()} characters, usually a quote "
                    "that is never closed; close the quote (or shorten the field)"
                ) from None
            raise ValueError(f"{path}:{start}: not a valid CSV row ({exc}); fix the row") from None
        yield row
