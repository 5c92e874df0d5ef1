"""Console progress: a tqdm bar on a terminal, plain lines in redirected logs; rank 0 alone says what all ranks say."""

import io
import logging

from engine.run.progress import PER_RANK, RankFilter, StageProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(stream, caplog, *, total=7, every_steps=3, enabled=True) -> list[str]:
    with caplog.at_level(logging.INFO, logger="engine.run.progress"):
        progress = StageProgress("finetune", total=total, initial=0, enabled=enabled, every_steps=every_steps,
                                 stream=stream)
        for step in range(1, total + 1):
            progress.update(step, {"batch_loss": f"{step / 10:.4f}", "samples/s": "12.0"})
        progress.close()
    return [r.getMessage() for r in caplog.records if r.name == "engine.run.progress"]


def test_redirected_output_gets_plain_lines_every_n_steps_and_at_the_end(caplog):
    stream = io.StringIO()  # not a terminal: no bar, no carriage returns
    lines = run(stream, caplog)
    assert stream.getvalue() == ""
    assert lines == [f"finetune step {s}/7: batch_loss {s / 10:.4f}, samples/s 12.0" for s in (3, 6, 7)]


def test_a_terminal_gets_the_bar_and_no_lines(caplog):
    stream = Terminal()
    assert run(stream, caplog) == []
    assert "finetune" in stream.getvalue() and "7/7" in stream.getvalue() and "batch_loss=0.7000" in stream.getvalue()


def test_disabled_progress_shows_nothing(caplog):
    stream = Terminal()
    assert run(stream, caplog, enabled=False) == [] and stream.getvalue() == ""


def test_other_ranks_log_only_their_own_facts_and_errors():
    def record(name, level, **extra):
        rec = logging.LogRecord(name, level, __file__, 1, "text", (), None)
        rec.__dict__.update(extra)
        return rec

    keep = RankFilter().filter
    assert not keep(record("engine.trainer", logging.WARNING))  # the same on every rank: rank 0 says it
    assert not keep(record("engine.trainer", logging.INFO))
    assert keep(record("engine.trainer", logging.WARNING, **{PER_RANK: True}))  # this rank's skipped samples
    assert keep(record("engine.data.loader", logging.WARNING))
    assert keep(record("engine.trainer", logging.ERROR))
