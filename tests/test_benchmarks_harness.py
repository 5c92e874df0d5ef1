"""The benchmarks' shared harness: tables as the scripts print them, side-by-side ratios, peak memory."""

import pytest

from benchmarks.harness import Column, Table, peak_window, side_by_side, timed


def test_fitted_table_as_faults_prints_it():
    table = Table(*(Column(name, align="<") for name in ("scenario", "faults", "ok")), sep="  ")
    text = table.format([("random kills", 3, "yes"), ("SIGTERM", 12, "NO")])
    assert text.split("\n") == [
        "scenario      faults  ok",
        "------------  ------  ---",
        "random kills  3       yes",
        "SIGTERM       12      NO",
    ]


def test_fixed_width_rows_equal_the_format_specs():
    table = Table(Column("model", 10, align="<"), Column("batch", 5), Column("MBCL s/step", spec=".4f"),
                  Column("peak build"))
    assert table.header() == f"{'model':<10} {'batch':>5} {'MBCL s/step':>11} {'peak build':>10}"
    assert table.rule() == "-" * len(table.header())
    assert table.row("ViT-B-32", 32, 7.34829, "4.77G") == f"{'ViT-B-32':<10} {32:>5} {7.34829:>11.4f} {'4.77G':>10}"
    with pytest.raises(ValueError, match="3 values for 4 columns"):
        table.row(1, 2, 3)


def test_side_by_side_ratios():
    ratio = side_by_side([2.0, 3.0, 9.0], [1.0, 2.0, 3.0])
    assert ratio.best == 2.0 and ratio.median == 1.5
    assert ratio.paired == 2.0 and (ratio.paired_low, ratio.paired_high) == (1.5, 3.0)
    with pytest.raises(ValueError, match="equally long"):
        side_by_side([1.0], [1.0, 2.0])


def test_peak_window_sees_a_freed_allocation():
    size = 64 * 1024 * 1024
    with peak_window() as memory, timed() as timing:
        block = b"\x01" * size  # written: every page touched
        del block
    if memory.probe != "VmHWM reset":
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    assert 0.75 * size <= memory.growth_bytes <= 2 * size
    assert timing.wall_s >= 0 and timing.cpu_s >= 0
