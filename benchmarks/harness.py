"""What the benchmarks share: timing, peak resident memory per process (children included),
side-by-side ratios of two paths measured in the same run, and text tables.

Standard library only, so a tool can import it without torch. Memory figures are bytes; each script
converts to the unit its table prints (MB, GB).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# glibc returns freed blocks above 1 MB to the OS, so RSS follows the live tensor bytes instead of
# drifting with heap fragmentation (its default threshold moves up to 32 MB).
FIXED_MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


# --------------------------------------------------------------------------- timing
def cpu_seconds(*, children: bool = False) -> float:
    """CPU time of this process (all threads), plus its waited-for children's when `children`."""
    seconds = time.process_time()
    if children:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds += usage.ru_utime + usage.ru_stime
    return seconds


@dataclass
class Timing:
    """Wall and CPU seconds of one `timed()` block; set when the block ends."""

    wall_s: float = float("nan")
    cpu_s: float = float("nan")


@contextmanager
def timed(*, children: bool = False) -> Iterator[Timing]:
    """Time the block: wall clock (`perf_counter`) and CPU (`cpu_seconds(children=children)`)."""
    timing = Timing()
    wall, cpu = time.perf_counter(), cpu_seconds(children=children)
    try:
        yield timing
    finally:
        timing.wall_s = time.perf_counter() - wall
        timing.cpu_s = cpu_seconds(children=children) - cpu


def round_order(items: Sequence, round_index: int) -> list:
    """`items` rotated by `round_index`: interleaved rounds so that no path always runs right after another."""
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])


# --------------------------------------------------------------------------- memory
def status_kib(field_name: str, pid: int | str = "self") -> int:
    """A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`); 0 when the process or field is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now; 0 when it is gone."""
    return status_kib("VmRSS", pid) * 1024


def peak_rss_bytes(*, children: bool = False) -> int:
    """Peak resident memory (`ru_maxrss`) of this process, or with `children` of its largest waited-for child."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Set this process's high-water mark (VmHWM) to its current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class PeakWindow:
    """Growth of this process's resident memory during one `peak_window()` block; set when it ends."""

    probe: str = "VmHWM reset"
    growth_bytes: int = 0


@contextmanager
def peak_window() -> Iterator[PeakWindow]:
    """Peak RSS during the block minus RSS before it. Where the high-water mark cannot be reset, the
    fallback is `ru_maxrss` after minus before (probe "ru_maxrss"), which can only understate the growth."""
    window = PeakWindow()
    if reset_peak_rss():
        before = rss_bytes()
    else:
        window.probe, before = "ru_maxrss", peak_rss_bytes()
    try:
        yield window
    finally:
        after = status_kib("VmHWM") * 1024 if window.probe == "VmHWM reset" else peak_rss_bytes()
        window.growth_bytes = after - before


def child_pids(parent: int | None = None) -> list[int]:
    """Process ids whose parent is `parent` (default: this process), in ascending order."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(entry))
    return sorted(pids)


def available_memory_bytes() -> float:
    """The machine's available memory (`MemAvailable`); infinite when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


class MemoryWatch(threading.Thread):
    """Samples this process's children's RSS and the machine's available memory every `interval_s`;
    kills the children when available memory falls below `min_free_bytes` (rather than let the kernel's
    OOM killer pick a victim), and reports every `report_every_s` with each child's last `[rank` line."""

    def __init__(self, *, min_free_bytes: float, interval_s: float = 1.0, report_every_s: float = 30.0,
                 unit: float = 1e9, unit_name: str = "GB"):
        super().__init__(daemon=True)
        self.min_free_bytes, self.interval_s, self.report_every_s = min_free_bytes, interval_s, report_every_s
        self.unit, self.unit_name = unit, unit_name
        self.min_available_bytes = float("inf")
        self.max_children_rss_bytes = 0  # all children together
        self.max_rss_bytes: dict[int, int] = {}  # by pid, in start order
        self.killed = False
        self.stopped = threading.Event()

    @staticmethod
    def _last_line(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/fd/1", errors="replace") as log:
                lines = [line for line in log.read().splitlines() if line.startswith("[rank")]
            return lines[-1] if lines else ""
        except OSError:
            return ""

    def stop(self) -> None:
        """End the sampling and wait for the thread."""
        self.stopped.set()
        self.join()

    def run(self) -> None:
        started = last_report = time.perf_counter()
        while not self.stopped.wait(self.interval_s):
            pids = child_pids()
            rss = [rss_bytes(pid) for pid in pids]
            available = available_memory_bytes()
            self.min_available_bytes = min(self.min_available_bytes, available)
            self.max_children_rss_bytes = max(self.max_children_rss_bytes, sum(rss))
            for pid, value in zip(pids, rss):
                self.max_rss_bytes[pid] = max(self.max_rss_bytes.get(pid, 0), value)
            if available < self.min_free_bytes and pids:
                print(f"available memory {available / self.unit:.1f} {self.unit_name} < "
                      f"{self.min_free_bytes / self.unit} {self.unit_name}: stopping the ranks",
                      file=sys.stderr, flush=True)
                self.killed = True
                for pid in pids:
                    os.kill(pid, 9)
            now = time.perf_counter()
            if now - last_report >= self.report_every_s and pids:
                last_report = now
                print(f"  [{now - started:5.0f} s] ranks RSS {', '.join(f'{r / self.unit:.1f}' for r in rss)} "
                      f"{self.unit_name}, machine available {available / self.unit:.1f} {self.unit_name} | "
                      f"{self._last_line(pids[0])}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- side-by-side ratios
@dataclass(frozen=True)
class Ratio:
    """`ours` over `reference`, two paths measured in the same rounds (index i of both = round i)."""

    best: float  # min(ours) / min(reference): for times, the estimate that other load cannot bias
    median: float  # median(ours) / median(reference)
    paired: float  # median over rounds of ours[i] / reference[i]
    paired_low: float  # smallest per-round ratio
    paired_high: float  # largest per-round ratio


def side_by_side(ours: Sequence[float], reference: Sequence[float]) -> Ratio:
    """Ratios of two equally long lists of per-round measurements (times or rates)."""
    if not ours or len(ours) != len(reference):
        raise ValueError(f"side_by_side needs two equally long, non-empty lists; got {len(ours)} and "
                         f"{len(reference)} values")
    per_round = [a / b for a, b in zip(ours, reference)]
    return Ratio(best=min(ours) / min(reference), median=statistics.median(ours) / statistics.median(reference),
                 paired=statistics.median(per_round), paired_low=min(per_round), paired_high=max(per_round))


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """One table column: its name, the least width, the values' format spec (".2f", ","), alignment."""

    name: str
    width: int = 0  # at least len(name)
    spec: str = ""
    align: str = ">"  # ">" right, "<" left


class Table:
    """A text table of `columns`: printed row by row at fixed widths (`header`, `rule`, `row`), or whole
    with every column widened to its widest cell (`format`)."""

    def __init__(self, *columns: Column | str, sep: str = " "):
        self.columns = [Column(c) if isinstance(c, str) else c for c in columns]
        self.sep = sep

    def _widths(self, cells: Sequence[Sequence[str]] = ()) -> list[int]:
        return [max([c.width, len(c.name)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]

    def _line(self, cells: Sequence[str], widths: Sequence[int]) -> str:
        return self.sep.join(f"{cell:{c.align}{w}}" for cell, c, w in zip(cells, self.columns, widths)).rstrip()

    def _cells(self, values: Sequence) -> list[str]:
        if len(values) != len(self.columns):
            raise ValueError(f"a row of {len(values)} values for {len(self.columns)} columns")
        return [format(value, c.spec) for value, c in zip(values, self.columns)]

    def header(self) -> str:
        return self._line([c.name for c in self.columns], self._widths())

    def rule(self) -> str:
        return "-" * len(self.header())

    def row(self, *values) -> str:
        return self._line(self._cells(values), self._widths())

    def format(self, rows: Sequence[Sequence], *, rule: bool = True) -> str:
        """Header, a dashed rule under each column (when `rule`) and `rows`, columns as wide as their widest cell."""
        cells = [self._cells(values) for values in rows]
        widths = self._widths(cells)
        lines = [self._line([c.name for c in self.columns], widths)]
        if rule:
            lines.append(self.sep.join("-" * w for w in widths))
        lines += [self._line(row, widths) for row in cells]
        return "\n".join(lines)
