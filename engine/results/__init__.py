"""What a run produced, read back: the summary, the report page, sweeps of runs, interpolation with the base.

summary.py      `summary.json`: base, best and final on the selection metric, cost, paths, warnings
report.py       the end-of-run report printed by `tune` / `finetune`
report_page.py  `run.py report`: one HTML page (and its Markdown twin) comparing runs
sweep.py        `run.py sweep`: a grid of fine-tuning runs from recovered OSR statistics, one report
interpolate.py  `run.py interpolate`: the run's base and fine-tuned weights mixed (WiSE-FT), evaluated per mix
"""
