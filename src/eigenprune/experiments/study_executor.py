"""Where a study's cells run: this process, `--jobs N` local worker processes, or a SLURM array job.

Every way runs the same claim loop (`study.work`), so they mix freely on one `--out`: a SLURM array can
finish what a laptop started, and a second `eigenprune study` joins the first instead of being refused.

- local, `--jobs 1` (the default): this process runs the cells (`study.run_study`).
- local, `--jobs N`: N `eigenprune study --worker` processes, each with cores/N torch threads and, with
  `--devices 0,1`, its own GPU (CUDA_VISIBLE_DEVICES, given out in turn); this process shows the bar,
  waits, and renders the study. Each worker's output goes to OUT/logs/worker-I.log.
- slurm: one array task per cell still to run, submitted through submitit (`pip install
  'eigenprune[slurm]'`) with the `[executor]` table's partition, time, GPUs, ... (flags override it);
  this process submits and returns. Each task claims its cell, runs it and, if it was the last cell
  to land, renders the study. Logs go to OUT/slurm/. `--status` shows progress.

This module imports nothing heavy at the top: the CLI builds its flags from `ExecutorConfig`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.core.errors import UsageError

EXECUTORS = ("local", "slurm")


@dataclass
class ExecutorConfig:
    """The `[executor]` table of a study spec; `eigenprune study` flags override it."""

    name: str = field(default="local", metadata={
        "help": "where cells run: local (this machine; --jobs worker processes) or slurm (an array job through "
                "submitit, one task per cell)", "flag": "executor", "choices": EXECUTORS, "metavar": "NAME"})
    jobs: int = field(default=1, metadata={"help": "local: worker processes, one cell each at a time, each with "
                                                   "1/N of the torch threads (--threads, else the free cores)"})
    devices: tuple[int, ...] = field(default=(), metadata={
        "help": "local: GPU ids handed to the workers in turn (CUDA_VISIBLE_DEVICES), e.g. 0,1; set device = "
                "\"cuda\" in [settings] to use them"})
    partition: str | None = field(default=None, metadata={"help": "slurm: the partition"})
    timeout_min: int = field(default=60, metadata={"help": "slurm: each cell's time limit, in minutes"})
    gpus_per_node: int = field(default=0, metadata={"help": "slurm: GPUs for each cell"})
    cpus_per_task: int | None = field(default=None, metadata={"help": "slurm: CPU cores for each cell (also its "
                                                                      "torch threads)"})
    mem_gb: float | None = field(default=None, metadata={"help": "slurm: memory for each cell, in GB"})
    array_parallelism: int = field(default=256, metadata={"help": "slurm: at most this many cells at once",
                                                          "cli": False})
    account: str | None = field(default=None, metadata={"help": "slurm: the account to charge", "cli": False})
    qos: str | None = field(default=None, metadata={"help": "slurm: the quality of service", "cli": False})
    constraint: str | None = field(default=None, metadata={"help": "slurm: node features (--constraint)",
                                                           "cli": False})
    setup: tuple[str, ...] = field(default=(), metadata={
        "help": "slurm: shell lines each task runs first (module load ..., source .venv/bin/activate)", "cli": False})

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ValueError(f"executor name must be one of {', '.join(EXECUTORS)}, got {self.name!r}")
        for name, least in (("jobs", 1), ("timeout_min", 1), ("gpus_per_node", 0), ("array_parallelism", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task must be at least 1, got {self.cpus_per_task}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb must be positive, got {self.mem_gb}")
        if any(d < 0 for d in self.devices):
            raise ValueError(f"devices must be GPU ids (0, 1, ...), got {list(self.devices)}")

    def submitit_parameters(self, job_name: str) -> dict:
        """For submitit's `AutoExecutor.update_parameters`: one task on one node per cell."""
        params = {"name": job_name, "timeout_min": self.timeout_min, "gpus_per_node": self.gpus_per_node,
                  "nodes": 1, "tasks_per_node": 1, "slurm_array_parallelism": self.array_parallelism}
        params |= {k: v for k, v in (("cpus_per_task", self.cpus_per_task), ("mem_gb", self.mem_gb)) if v is not None}
        params |= {f"slurm_{k}": getattr(self, k) for k in ("partition", "account", "qos", "constraint")
                   if getattr(self, k) is not None}
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        return params


def _done_count(study, out: Path) -> int:
    return sum((out / "cells" / c.key / "comparison.json").is_file() for c in study.cells)


def run_local(study, out: str | Path, cfg: ExecutorConfig, threads: int, rerun_changed: bool = False,
              quiet: bool = False, report_to: tuple[str, ...] = ()) -> dict:
    """`--jobs N` worker processes on this machine (see the module docstring); the rendered study, logged to the
    `report_to` trackers."""
    from eigenprune.experiments import study as study_module
    from eigenprune.experiments import tracking

    tracking.check_installed(report_to)

    out = Path(out)
    study_module._check_out(out)
    t0, since = time.perf_counter(), time.time()
    state, moved = study_module.prepare(study, out, rerun_changed)
    first_done = _done_count(study, out)
    todo = len(study.cells) - first_done
    per = max(1, threads // cfg.jobs)
    workers = min(cfg.jobs, todo)
    if not quiet:
        print(f"study: {len(study.cells)} cells: {first_done} finished earlier (skipped), {todo} to run on {workers} "
              f"worker(s) of {per} thread(s)" + (f", GPUs {','.join(map(str, cfg.devices))}" if cfg.devices else "")
              + f"; their logs: {out}/logs/", file=sys.stderr)
    (out / "logs").mkdir(exist_ok=True)
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i in range(workers):
            env = dict(os.environ, OMP_NUM_THREADS=str(per))
            if cfg.devices:
                env["CUDA_VISIBLE_DEVICES"] = str(cfg.devices[i % len(cfg.devices)])
            log = out / "logs" / f"worker-{i}.log"
            with open(log, "ab") as sink:  # the child keeps its own descriptor
                procs.append((subprocess.Popen(
                    [sys.executable, "-m", "eigenprune", "study", str(study.path), "--out", str(out), "--worker",
                     "--quiet", "--threads", str(per)], env=env, stdin=subprocess.DEVNULL, stdout=sink,
                    stderr=subprocess.STDOUT), log))
        with study_module._progress(todo, quiet) as bar:
            while any(p.poll() is None for p, _ in procs):
                time.sleep(study_module.POLL_S)
                bar.n = _done_count(study, out) - first_done
                bar.refresh()
    except BaseException:  # Ctrl-C: SIGTERM the workers, which free their cells, and wait for them
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in procs:
            p.wait()
        raise
    failed = study_module.failures(study, out, since)
    if failed:
        raise UsageError(study_module.failed_message(failed))
    if not study_module.complete(study, out):  # a worker killed (out of memory, SIGKILL): its cell is unfinished
        lost = [f"worker {i} exited with {p.returncode} (log: {log})" for i, (p, log) in enumerate(procs)
                if p.returncode not in (0, 2)]
        raise UsageError(f"{'; '.join(lost) or 'a worker stopped early'}; finished cells are kept, and running again "
                         "takes over the unfinished ones")
    done_before = {c.key for c in state.done}
    last_run = {"ran": [c.key for c in study.cells if c.key not in done_before], "skipped": sorted(done_before,
                key=[c.key for c in study.cells].index), "moved_to_stale": moved, "not_in_spec": state.orphans,
                "wall_s": time.perf_counter() - t0}
    report = study_module.render(study, out, last_run)
    tracking.log_folder(out, report_to)
    report["out"] = str(out)
    return report


def submit_slurm(study, out: str | Path, cfg: ExecutorConfig, rerun_changed: bool = False, quiet: bool = False,
                 cluster: str = "slurm") -> list:
    """Submit one array task per cell still to run (not finished, not held by a live process); the submitit jobs.
    `cluster` is submitit's: "slurm", or "local"/"debug" to run the same tasks on this machine (the tests)."""
    try:
        import submitit
    except ImportError:
        raise UsageError("--executor slurm needs submitit: pip install 'eigenprune[slurm]'") from None
    import shutil

    from eigenprune.experiments import study as study_module
    from eigenprune.experiments import study_claims as claims

    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UsageError("--executor slurm needs SLURM's sbatch and srun on PATH; run it on the cluster's login node "
                         "(or use --executor local --jobs N here)")
    out = Path(out).resolve()  # the tasks may start in another folder
    study_module._check_out(out)
    study_module.prepare(study, out, rerun_changed)
    with claims.mutex(out):
        pending = [c for c in study.cells if not (out / "cells" / c.key / "comparison.json").is_file()
                   and ((claim := claims.read_claim(out, c.key)) is None or claim.stale() is not None)]
    if not pending:
        if not quiet:
            print(f"study: nothing to submit; every cell of {study.path} is finished or running", file=sys.stderr)
        return []
    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster=cluster)
    executor.update_parameters(**cfg.submitit_parameters(f"eigenprune-{study.path.stem}"))
    n = len(pending)
    jobs = executor.map_array(run_cell_task, [study] * n, [str(out)] * n, [c.key for c in pending])
    job = jobs[0].job_id.split("_")[0]
    claims.log(out, f"submitted {n} cell(s) as {cluster} job {job}: {', '.join(c.key for c in pending)}")
    if not quiet:
        print(f"study: submitted {n} cell(s) as {cluster} job {job} (logs in {out}/slurm/); follow it with "
              f"eigenprune study {study.path} --out {out} --status", file=sys.stderr)
    return jobs


def run_cell_task(study, out: str, key: str) -> dict:
    """One array task: claim cell `key` (unless finished or running elsewhere), run it, and render the study if
    it was the last to land. What it did, for submitit's result file."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))
    from eigenprune.experiments import study as study_module

    out_dir, t0, since = Path(out), time.perf_counter(), time.time()
    ran = study_module.work(study, out_dir, since, quiet=True, wait=False, only={key})
    failed = study_module.failures(study, out_dir, since)
    if key in failed:
        raise UsageError(study_module.failed_message({key: failed[key]}))
    rendered = study_module.complete(study, out_dir)
    if rendered:
        last_run = {"ran": ran, "skipped": [c.key for c in study.cells if c.key not in ran], "moved_to_stale": [],
                    "not_in_spec": study_module.plan(study, out_dir).orphans, "wall_s": time.perf_counter() - t0}
        study_module.render(study, out_dir, last_run)
    return {"cell": key, "ran": bool(ran), "rendered": rendered}
