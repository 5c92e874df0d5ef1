"""The run's life: who holds the folder, how it stops, what it logs and what it cost.

lock.py        one job per run folder (`.run.lock`), the run id every rank checks
folder.py      what a run folder of this engine is; `--overwrite`'s removal of one
preemption.py  SIGTERM / SIGUSR1 stop the job at a step boundary
heartbeat.py   which rank stopped responding
log.py         the JSON-lines run log (`log.jsonl`)
live.py        live views of that log: TensorBoard, Weights & Biases
progress.py    progress on the console: a bar on a terminal, plain lines in a log file
cost.py        steps, samples, seconds and ranks per stage and launch (a checkpoint part)
"""
