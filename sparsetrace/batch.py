"""Many independent units of work: each run once, each result kept, a stopped run resumed.

A *unit* is one piece of work named by its inputs (a needle cell `4096_0.5`, an attribution pair,
an anchors text). `run_units` runs every unit not yet done through an *executor* and, as each
finishes, writes its result to `results/NAME.json` atomically (a temporary file renamed into place:
a result file is complete or absent) and rewrites the run's summary (`run.json`: done / failed /
remaining, each failure with its error). A later run over the same folder skips the units whose
file exists; the units that failed are reported and skipped too, unless `retry_failed`.

The work itself is a *task*: `task(model, tokenizer, inputs) -> dict` (JSON-ready), picklable (a
module-level function, or `functools.partial` of one with the run's shared options). Both executors
call the same task, so their results are the same.

- `InProcess` (the default, no new dependency): one unit after another in this process, on a model
  loaded once.
- `RayExecutor` (`pip install "sparsetrace[ray]"`): one Ray actor per worker, each loading the model
  once with `load_model` (the same cache, `SPARSETRACE_CACHE`) and running one unit at a time; the
  first worker loads it before the others start, so on one machine nothing is converted twice.
  Results come back to this process, which writes them: a worker that dies in the middle of a unit
  (killed, out of memory) loses nothing finished; it is replaced and its unit runs again.
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, SparsetraceError
from .files import write_json

RAY_INSTALL = 'pip install "sparsetrace[ray]"'
# Environment variables a Ray worker needs to find the model files this process would find.
PASSED_ENVIRONMENT = ("SPARSETRACE_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_DEATHS = 3  # a unit whose worker dies this many times is failed (it likely kills any worker)

Task = Callable[[Any, Any, Any], dict]


class UnitsFailedError(SparsetraceError):
    """Some units of a run failed; the others' results are kept, and the errors are in run.json."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: `name`, its result's file stem (from its inputs), and the task's `inputs`."""

    name: str
    inputs: Any


@dataclass
class Outcome:
    """A finished unit: its `result`, or its `error` ("Type: message") and the traceback in `detail`."""

    unit: Unit
    result: dict | None
    error: str | None = None
    detail: str | None = None
    seconds: float = 0.0


@dataclass
class BatchResult:
    """The results of a run by unit name, in unit order (those done, before or now), and its failures."""

    results: dict[str, dict]
    failures: dict[str, str]
    summary_path: Path

    def check(self) -> None:
        """Raise `UnitsFailedError` naming the first failure if any unit failed."""
        if self.failures:
            name, error = next(iter(self.failures.items()))
            total = len(self.results) + len(self.failures)
            raise UnitsFailedError(f"{len(self.failures)} of {total} units failed (first: {name}: {error}); the others'"
                                   f" results are kept and every error is in {self.summary_path}; fix the cause and "
                                   "run again with --retry-failed (retry_failed=True)")


def unit_name(*parts: Any) -> str:
    """A safe file stem from the inputs' parts: `unit_name(4096, 0.5)` is "4096_0.5"."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("._")[:120] or "unit"


def run_units(
    units: list[Unit],
    task: Task,
    results: str | Path,
    executor: InProcess | RayExecutor,
    *,
    summary: str | Path | None = None,
    known: dict[str, dict] | None = None,
    retry_failed: bool = False,
    progress: bool | None = None,
    on_result: Callable[[Unit, dict, dict[str, dict]], None] | None = None,
) -> BatchResult:
    """Run every unit not yet done; write each result to `results/NAME.json` as it finishes.

    Args:
        units: the work, names unique.
        task: `task(model, tokenizer, unit.inputs) -> dict`, picklable for Ray.
        results: the folder of the result files (created).
        executor: `InProcess(model, tokenizer)` or a started `RayExecutor`.
        summary: the run's summary file (default results/../run.json), rewritten after every unit.
        known: results held elsewhere (e.g. a committed summary), counted as done without a file.
        retry_failed: run again the units the last run's summary lists as failed (default: skip them).
        progress: False hides the bar over units (done / failed / remaining).
        on_result: `on_result(unit, result, done)` in this process after each new result is written; `done`:
            every result so far by name (an exception stops the run).
    """
    from tqdm.auto import tqdm

    names = [u.name for u in units]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"two units are named {twice[0]!r}; give each input once (or an \"id\" of its own)")
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    summary = Path(summary) if summary is not None else results.parent / "run.json"
    done = {n: r for n in names if (r := _read_result(results / f"{n}.json")) is not None}
    for name, result in (known or {}).items():
        if name in names:
            done.setdefault(name, result)
    failures = {} if retry_failed else {n: e for n, e in _failures(summary).items() if n in names and n not in done}
    details: dict[str, dict] = {}
    pending = [u for u in units if u.name not in done and u.name not in failures]
    started = time.perf_counter()

    def write_summary() -> None:
        write_json(summary, {"executor": executor.name, "workers": executor.workers, "units": len(units),
                             "done": len(done), "failed": len(failures),
                             "remaining": len(units) - len(done) - len(failures),
                             "seconds": round(time.perf_counter() - started, 1), "results": str(results),
                             "failures": {n: details.get(n, {"error": e}) for n, e in failures.items()},
                             "worker_usage": executor.usage})

    bar = tqdm(total=len(units), initial=len(done) + len(failures), desc=executor.name, unit="unit",
               disable=progress is False or not pending, dynamic_ncols=True)
    write_summary()
    try:
        for outcome in executor.run(task, pending) if pending else ():
            name = outcome.unit.name
            if outcome.error is None:
                write_json(results / f"{name}.json", outcome.result)
                done[name] = outcome.result
            else:
                failures[name] = outcome.error
                details[name] = {"error": outcome.error, "traceback": outcome.detail}
            bar.update(1)
            bar.set_postfix_str(f"done {len(done)}, failed {len(failures)}, "
                                f"remaining {len(units) - len(done) - len(failures)}")
            write_summary()
            if outcome.error is None and on_result is not None:
                on_result(outcome.unit, outcome.result, done)
    finally:
        bar.close()
    write_summary()  # with the workers' usage, known once they finish
    return BatchResult({n: done[n] for n in names if n in done}, failures, summary)


def attempt(task: Task, model, tokenizer, unit: Unit) -> Outcome:
    """Run one unit; an exception becomes the outcome's error (other units go on)."""
    started = time.perf_counter()
    try:
        result = task(model, tokenizer, unit.inputs)
        json.dumps(result)  # a result that cannot be saved fails here, not in the summary
    except Exception as error:  # noqa: BLE001 - a failed unit is reported, not fatal
        return Outcome(unit, None, f"{type(error).__name__}: {error}", traceback.format_exc(),
                       time.perf_counter() - started)
    return Outcome(unit, result, seconds=time.perf_counter() - started)


class InProcess:
    """Units one after another in this process, on a model already loaded (the default executor)."""

    name = "in-process"
    workers = 1

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.usage: list[dict] = []

    def run(self, task: Task, units: list[Unit]) -> Iterator[Outcome]:
        busy, count = 0.0, 0
        for unit in units:
            outcome = attempt(task, self.model, self.tokenizer, unit)
            busy, count = busy + outcome.seconds, count + 1
            self.usage = [_usage(count, busy)]
            yield outcome


@dataclass
class RayExecutor:
    """A pool of Ray actors, one per worker, each with the model loaded once (module docstring).

    `address`: None starts a local Ray on this machine (stopped on exit); an address ("auto",
    "ray://host:10001", "host:6379") joins that cluster. `workers`: default as many as the CPUs
    (local: this machine's, else the cluster's) hold at `num_cpus` each. Each worker runs
    `num_cpus` threads. Use it as a context manager: `with RayExecutor(...) as ex: run_units(...)`.
    """

    model: str | None = None
    dtype: str = "float32"
    address: str | None = None
    workers: int | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    deaths: int = DEFAULT_DEATHS
    name: str = field(default="ray", init=False)
    usage: list[dict] = field(default_factory=list, init=False)
    _started: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        check_ray_options(self.workers, self.num_cpus, self.num_gpus)
        if self.model is not None and Path(self.model).is_dir():
            self.model = str(Path(self.model).absolute())  # the same folder from a worker's working directory

    def __enter__(self) -> RayExecutor:
        ray = import_ray()
        if not ray.is_initialized():
            local = {} if self.address else {"num_cpus": int(self.workers * self.num_cpus) if self.workers else None}
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                         **{k: v for k, v in local.items() if v is not None})
            except ConnectionError as error:
                raise InputError(f"cannot join the Ray cluster at {self.address}: {error}; check the address "
                                 "(`ray status` on the head node shows it) or use --ray for a local Ray") from None
            self._started = True
        if self.workers is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            self.workers = max(1, int(cpus // self.num_cpus)) if self.num_cpus else 1
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import_ray().shutdown()
            self._started = False

    def run(self, task: Task, units: list[Unit]) -> Iterator[Outcome]:
        """Each unit on the next free worker; a unit whose worker died goes back to the queue's front."""
        ray = import_ray()
        died = (ray.exceptions.RayActorError, getattr(ray.exceptions, "ActorUnavailableError", ()))
        queue, deaths = deque(units), dict.fromkeys((u.name for u in units), 0)
        task_ref = ray.put(task)
        idle = deque([self._start_worker()])  # loads (and converts, once) the model before the others start
        idle += [self._start_worker(wait=False) for _ in range(min(self.workers, len(queue)) - 1)]
        pool, running = list(idle), {}
        try:
            while queue or running:
                while queue and idle:
                    actor, unit = idle.popleft(), queue.popleft()
                    running[actor.run.remote(task_ref, unit)] = (actor, unit)
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, unit = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except died:
                    deaths[unit.name] += 1
                    pool.remove(actor)
                    replacement = self._start_worker(wait=False)
                    pool.append(replacement)
                    idle.append(replacement)
                    if deaths[unit.name] < self.deaths:
                        queue.appendleft(unit)
                        continue
                    outcome = Outcome(unit, None, f"WorkerDied: the worker died {deaths[unit.name]} times while "
                                      "running this unit (killed, or out of memory); give workers more memory")
                except ray.exceptions.RayTaskError as error:
                    outcome = Outcome(unit, None, str(error).strip().splitlines()[-1], str(error))
                else:
                    idle.append(actor)
                yield outcome
            self.usage = ray.get([actor.usage.remote() for actor in pool], timeout=60)
        finally:
            for actor in pool:
                ray.kill(actor)

    def _start_worker(self, wait: bool = True):
        """A new actor loading the model; `wait`: until it has (a load error is raised here)."""
        ray = import_ray()
        threads = max(1, int(self.num_cpus))
        env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
        actor = ray.remote(_Worker).options(  # per call: the options differ between executors
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
            runtime_env={"env_vars": env | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
        ).remote(self.model, self.dtype, threads, "cuda" if self.num_gpus else "cpu")
        if wait:
            error = ray.get(actor.ready.remote())
            if error is not None:
                ray.kill(actor)
                raise SparsetraceError(f"the Ray workers cannot load the model: {error}")
        return actor


class _Worker:
    """A Ray actor's state: the model, loaded once; runs one unit at a time."""

    def __init__(self, model: str | None, dtype: str, threads: int, device: str):
        import torch

        from .models import load_model

        torch.set_num_threads(threads)
        self.error, self.count, self.busy = None, 0, 0.0
        try:
            self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)
        except Exception as error:  # noqa: BLE001 - reported by ready(), as one line
            self.error = str(error) if isinstance(error, SparsetraceError) else f"{type(error).__name__}: {error}"

    def ready(self) -> str | None:
        return self.error

    def pid(self) -> int:
        return os.getpid()

    def run(self, task: Task, unit: Unit) -> Outcome:
        if self.error is not None:
            return Outcome(unit, None, f"ModelLoadError: {self.error}")
        outcome = attempt(task, self.model, self.tokenizer, unit)
        self.count, self.busy = self.count + 1, self.busy + outcome.seconds
        return outcome

    def usage(self) -> dict:
        return _usage(self.count, self.busy)


def _usage(units: int, busy: float) -> dict:
    """This process's share of the work: units, seconds in them, CPU seconds and peak memory."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"pid": os.getpid(), "units": units, "unit_seconds": round(busy, 2),
            "cpu_seconds": round(own.ru_utime + own.ru_stime, 2), "peak_rss_mib": round(own.ru_maxrss / 1024, 1)}


def import_ray():
    """The ray module, or an `InputError` naming the install command."""
    try:
        import ray
    except ImportError:
        raise InputError(f"Ray is not installed; {RAY_INSTALL} (or run without --ray / --ray-address)") from None
    return ray


def check_ray_options(workers: int | None, num_cpus: float, num_gpus: float) -> None:
    """Refuse worker counts and resources Ray cannot schedule, before any work."""
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give a positive number of Ray workers")
    if num_cpus <= 0 or num_gpus < 0:
        raise InputError(f"--num-cpus {num_cpus:g} --num-gpus {num_gpus:g}: each worker needs a positive number of "
                         "CPUs and zero or more GPUs (fractions share one)")


def _read_result(path: Path) -> dict | None:
    """A finished unit's result, or None if there is none (results are written atomically, so a file
    that does not parse was not written by a run: it is redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _failures(summary: Path) -> dict[str, str]:
    """The failed units of the last run's summary: name -> error."""
    try:
        return {n: f["error"] for n, f in json.loads(summary.read_text()).get("failures", {}).items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}
