"""A pickle payload for the "no pickle from a file is ever executed" checks."""

from __future__ import annotations

from pathlib import Path


class Planted:
    """Unpickling this runs code: it creates the file `marker` (harmless, and visible afterwards)."""

    def __init__(self, marker: str | Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
