"""Executors: run N independent jobs, each in a worker that writes its own files (a store shard),
and hand every outcome back to the driver, which alone writes the study's store.

A job names a function by reference (``"package.module:function"``) and a JSON-like payload, so it
travels to a spawned process or a Ray worker without pickling user objects. Two executors:

- `LocalExecutor` (default): a pool of spawned worker processes on this machine, torch's threads
  divided between them. A worker that dies (SIGKILL, the OOM killer, a segfault) is replaced and
  its job run again, at most `max_retries` more times; a job whose function raises is failed with
  its traceback at once (running it again would raise again).
- `RayExecutor`: Ray tasks (``ray.init(address=...)``: a laptop, Slurm, Kubernetes, a cloud), with
  CPUs and GPUs requested per job through Ray's resource model and Ray's own retries of tasks whose
  worker died. The jobs' files must be on storage every node reaches.

Jobs must be resumable: a retried job finds what its dead predecessor left (its checkpoints) and
continues from there. The executor does not schedule anything itself beyond its process pool.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Job:
    """One unit of work: `fn` ("module:function") called as ``fn(**payload)`` in a worker.

    `resources` asks for what the job needs where the executor can express it (Ray: ``num_cpus``,
    ``num_gpus``); the local executor runs one job per worker process.
    """

    key: str
    fn: str
    payload: Mapping[str, Any]
    resources: Mapping[str, float] = field(default_factory=dict)


@dataclass
class JobResult:
    """What came back of a job: status 'finished' (with the function's `value`) or 'failed'
    (with `error`: the traceback, or how the worker died), after `attempts` runs."""

    key: str
    status: str
    value: Any = None
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0


#: Called with each job's result as it arrives (completion order).
ResultCallback = Callable[[JobResult], None]
#: Called when a job starts (key, attempt).
StartCallback = Callable[[str, int], None]


def resolve(ref: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names."""
    module, _, name = ref.partition(":")
    if not module or not name:
        raise ValueError(f"a job function is 'module:function', got {ref!r}")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def call(ref: str, payload: Mapping[str, Any], threads: int | None = None) -> Any:
    """Runs one job's function here (what every worker does)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return resolve(ref)(**dict(payload))


class Executor(ABC):
    """Runs jobs and reports each result to the driver (see the module docstring)."""

    @abstractmethod
    def run(self, jobs: Sequence[Job], on_result: ResultCallback | None = None,
            on_start: StartCallback | None = None) -> list[JobResult]:
        """Runs every job; returns their results in the order of `jobs`."""


class SerialExecutor(Executor):
    """Runs the jobs one after another in this process (debugging, notebooks, tests): a job that
    raises is failed with its traceback; nothing is retried (a death here is the driver's)."""

    def run(self, jobs: Sequence[Job], on_result: ResultCallback | None = None,
            on_start: StartCallback | None = None) -> list[JobResult]:
        results = []
        for job in jobs:
            if on_start is not None:
                on_start(job.key, 1)
            begun = time.monotonic()
            try:
                result = JobResult(job.key, "finished", value=call(job.fn, job.payload))
            except Exception:  # noqa: BLE001 (the job's error is its result)
                result = JobResult(job.key, "failed", error=traceback.format_exc())
            result.seconds = time.monotonic() - begun
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


# ---- local worker processes ---------------------------------------------------------------------
def worker_main(fd: int, threads: int) -> None:
    """A worker process: receives (key, fn, payload), sends ("ok", value) or ("error", traceback).

    Started as ``python -m instrumented_adam.studies.executor FD THREADS`` (not by
    multiprocessing's spawn, which would re-import the driver's ``__main__``: a user's script
    without an ``if __name__ == "__main__"`` guard would train its root again in every worker).
    """
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which stops the workers
    import torch

    torch.set_num_threads(max(1, int(threads)))
    conn = Connection(fd)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        key, fn, payload = message
        try:
            value = call(fn, payload)
        except BaseException:  # noqa: BLE001 (the job's error is its result)
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", value))


class _Worker:
    """One worker process and the driver's end of its socket."""

    def __init__(self, threads: int) -> None:
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "instrumented_adam.studies.executor", str(theirs.fileno()), str(threads)],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.conn = Connection(mine.detach())
        self.job: int | None = None

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class LocalExecutor(Executor):
    """A pool of `workers` processes (default: one per CPU, at most one per job), each with
    ``threads`` torch threads (default: this process's threads divided between them).

    A worker that dies mid-job is replaced and the job retried up to `max_retries` times.
    """

    def __init__(self, workers: int | None = None, *, threads: int | None = None, max_retries: int = 2) -> None:
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.workers = workers
        self.threads = threads
        self.max_retries = int(max_retries)

    def run(self, jobs: Sequence[Job], on_result: ResultCallback | None = None,
            on_start: StartCallback | None = None) -> list[JobResult]:
        jobs = list(jobs)
        if not jobs:
            return []
        import torch

        n = min(len(jobs), self.workers or os.cpu_count() or 1)
        threads = self.threads or max(1, torch.get_num_threads() // n)
        pending = list(range(len(jobs)))[::-1]
        attempts = [0] * len(jobs)
        results: list[JobResult | None] = [None] * len(jobs)
        started: dict[int, float] = {}
        workers: list[_Worker] = []

        def finish(i: int, result: JobResult) -> None:
            results[i] = result
            if on_result is not None:
                on_result(result)

        def assign(worker: _Worker) -> None:
            if not pending:
                return
            i = pending.pop()
            attempts[i] += 1
            started[i] = time.monotonic()
            worker.job = i
            if on_start is not None:
                on_start(jobs[i].key, attempts[i])
            try:
                worker.conn.send((jobs[i].key, jobs[i].fn, dict(jobs[i].payload)))
            except OSError:
                pass  # it died already: seen as a death below

        try:
            for _ in range(n):
                workers.append(_Worker(threads))
                assign(workers[-1])
            while any(w.job is not None for w in workers):
                busy = [w for w in workers if w.job is not None]
                ready = wait([w.conn for w in busy])
                for k, worker in enumerate(workers):
                    if worker.job is None or worker.conn not in ready:
                        continue
                    i = worker.job
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message is None:  # the worker died without an answer
                        code = worker.proc.wait()
                        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                        worker.conn.close()
                        workers[k] = worker = _Worker(threads)
                        if attempts[i] <= self.max_retries:
                            pending.append(i)  # next, on the fresh worker
                        else:
                            finish(i, JobResult(jobs[i].key, "failed", error=f"the worker process died ({how}) "
                                                f"{attempts[i]} times", attempts=attempts[i],
                                                seconds=time.monotonic() - started[i]))
                    else:
                        kind, value = message
                        worker.job = None
                        seconds = time.monotonic() - started[i]
                        status = "finished" if kind == "ok" else "failed"
                        finish(i, JobResult(jobs[i].key, status, value=value if kind == "ok" else None,
                                            error=None if kind == "ok" else value, attempts=attempts[i], seconds=seconds))
                    assign(worker)
        finally:
            for worker in workers:
                worker.stop()
        return [r for r in results if r is not None]


# ---- Ray ----------------------------------------------------------------------------------------
def _ray_call(fn: str, payload: Mapping[str, Any], threads: int) -> Any:
    return call(fn, payload, threads)


class RayExecutor(Executor):
    """Jobs as Ray tasks on a Ray cluster (`address`: "auto", "ray://host:10001", or None for the
    cluster `ray.init` finds or starts). Each job asks for `num_cpus` CPUs (its torch threads)
    and `num_gpus` GPUs, or what its `Job.resources` say. Ray retries a task whose worker died
    `max_retries` times; a task that raises is failed with its traceback. `init_kwargs` go to
    `ray.init` when this executor starts Ray (it is then shut down after `run`).

    The task's module must be importable on every node: installed there, or shipped with
    ``ray.init(runtime_env={"working_dir": ...})`` / ``{"env_vars": {"PYTHONPATH": ...}}``."""

    def __init__(self, address: str | None = None, *, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2,
                 init_kwargs: Mapping[str, Any] | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = int(max_retries)
        self.init_kwargs = dict(init_kwargs or {})

    def run(self, jobs: Sequence[Job], on_result: ResultCallback | None = None,
            on_start: StartCallback | None = None) -> list[JobResult]:
        try:
            import ray
        except ImportError as e:
            raise RuntimeError("the Ray executor needs Ray: pip install ray") from e
        jobs = list(jobs)
        started_ray = False
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
            started_ray = True
        try:
            remote = ray.remote(_ray_call)
            refs: dict[Any, int] = {}
            begun: dict[int, float] = {}
            for i, job in enumerate(jobs):
                cpus = float(job.resources.get("num_cpus", self.num_cpus))
                gpus = float(job.resources.get("num_gpus", self.num_gpus))
                options = remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=self.max_retries,
                                         retry_exceptions=False, name=f"branch-{job.key}")
                refs[options.remote(job.fn, dict(job.payload), max(1, int(cpus)))] = i
                begun[i] = time.monotonic()
                if on_start is not None:
                    on_start(job.key, 1)
            results: list[JobResult | None] = [None] * len(jobs)
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    seconds = time.monotonic() - begun[i]
                    try:
                        result = JobResult(jobs[i].key, "finished", value=ray.get(ref), seconds=seconds)
                    except ray.exceptions.RayTaskError as e:
                        result = JobResult(jobs[i].key, "failed", error=str(e), seconds=seconds)
                    except ray.exceptions.RayError as e:  # the worker died more often than retried
                        result = JobResult(jobs[i].key, "failed", error=f"{type(e).__name__}: {e}",
                                           attempts=self.max_retries + 1, seconds=seconds)
                    results[i] = result
                    if on_result is not None:
                        on_result(result)
            return [r for r in results if r is not None]
        finally:
            if started_ray:
                ray.shutdown()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))

__all__ = ["Job", "JobResult", "Executor", "SerialExecutor", "LocalExecutor", "RayExecutor", "call", "resolve"]
