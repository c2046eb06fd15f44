"""A pool of killable verifier processes with a hard per-check deadline, and the batch reward API.

Why processes: SymPy calls cannot be interrupted from another thread, and ``signal.alarm``
timeouts (used by public graders) only work in the main thread of the main interpreter — an RL
loop that scores from a helper thread silently loses its deadline. Here every check runs in a
worker process; the parent measures each check's wall time and, when it passes the deadline,
kills the worker (SIGKILL), records "not equivalent: timeout after T s", starts a replacement and
re-sends the rest of that worker's chunk.

Workers are fresh interpreters (``spawn`` semantics: fork+exec, so no JAX thread state is
copied), started once per pool with ``subprocess`` rather than ``multiprocessing``: that way the
parent's ``__main__`` (an experiment script importing JAX) is not re-imported in each worker and
no ``if __name__ == "__main__"`` guard is needed. Messages are JSON over pipes; the parent never
unpickles anything a worker sends.

Dispatch: a batch is cut into chunks (a few per worker); each worker answers item by item, so the
deadline is per check, not per chunk. Workers cap their address space (:data:`WORKER_MEMORY_BYTES`)
so a runaway computation fails with MemoryError instead of exhausting the host.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing.connection
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np

from offpolicy_jax.rewards import math as rmath

DEFAULT_TIMEOUT_S = 2.0
WORKER_MEMORY_BYTES = 4 * 1024**3
_MAX_CHUNK = 16
_START_TIMEOUT_S = 120.0  # generous: importing SymPy on a loaded 2-core machine
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])


@dataclasses.dataclass(frozen=True)
class BatchScore:
    """Result of :func:`score_batch`.

    Attributes:
      rewards: float32 ``[N]``, 1.0 where the response's answer is equivalent to the gold, else 0.0.
      equivalent: ``N`` booleans (the same information).
      extracted: ``N`` extracted answers (``None`` where no answer was found).
      reasons: ``N`` short reasons ("mathematically equal", "timeout after 2.0 s", ...).
    """

    rewards: np.ndarray
    equivalent: list
    extracted: list
    reasons: list


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # not Linux, or a lower hard limit already set
        pass


def _run_task(task: tuple) -> tuple:
    """Runs one task in a worker: ``("score", response, gold)`` or
    ``("check", gold, pred[, options])`` (options: a dict of keywords for
    :func:`offpolicy_jax.rewards.math.check`, or None).

    Returns ``(equivalent, extracted, reason)``; exceptions become "not equivalent" verdicts.
    """
    kind, first, second, *rest = task
    options = rest[0] if rest and rest[0] else {}
    try:
        if kind == "score":
            extracted = rmath.extract_answer(first)
            verdict = rmath.check(second, extracted)
            return verdict.equivalent, extracted, verdict.reason
        verdict = rmath.check(first, second, **options)
        return verdict.equivalent, second, verdict.reason
    except MemoryError:
        return False, None, "out of memory"
    except Exception as exc:  # a verifier bug must cost one sample, not the RL run
        return False, None, f"verifier error ({type(exc).__name__}: {str(exc)[:80]})"


def _worker_main() -> None:
    """Worker loop on fds 0 (requests) and 1 (answers), with JSON messages.

    Receives lists of ``[index, task]`` and answers ``[index, result]`` one by one. The original
    stdout is kept for answers and fd 1 is pointed at stderr, so a stray print cannot corrupt the
    protocol.
    """
    requests = multiprocessing.connection.Connection(os.dup(0), writable=False)
    answers = multiprocessing.connection.Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    _limit_memory()
    answers.send_bytes(json.dumps("ready").encode())  # imports done: deadlines may start now
    while True:
        try:
            message = json.loads(requests.recv_bytes())
        except (EOFError, OSError):
            return
        if message is None:
            return
        for index, task in message:
            answers.send_bytes(json.dumps([index, list(_run_task(tuple(task)))]).encode())


_WORKER_CODE = "from offpolicy_jax.rewards.pool import _worker_main; _worker_main()"


class _Worker:
    """One verifier process (a fresh interpreter) and the parent's bookkeeping for it."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, close_fds=True)
        self.to_worker = multiprocessing.connection.Connection(
            os.dup(self.process.stdin.fileno()), readable=False)
        self.from_worker = multiprocessing.connection.Connection(
            os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.pending: collections.deque = collections.deque()  # indices sent, not answered
        self.head_started = 0.0  # when the oldest pending item started running (approximately)
        self.started = time.monotonic()
        self.ready = False  # set when the worker reports that its imports are done

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def send(self, message) -> None:
        self.to_worker.send_bytes(json.dumps(message).encode())

    def recv(self):
        return json.loads(self.from_worker.recv_bytes())

    def kill(self) -> None:
        if self.is_alive():
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for conn in (self.to_worker, self.from_worker):
            try:
                conn.close()
            except OSError:
                pass


class VerifierPool:
    """Persistent worker processes that run verifier checks under a hard per-check deadline.

    Reuse one pool across RL steps (start-up imports SymPy once per worker). A check that runs
    past ``timeout`` seconds is "not equivalent" with reason ``"timeout after T s"``; its worker is
    killed and replaced, and the batch continues. Use as a context manager or call :meth:`close`.

    Args:
      num_workers: worker processes; default ``min(8, max(1, cpu_count // 2))``.
      timeout: per-check deadline in seconds (default 2.0).
    """

    def __init__(self, num_workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        if num_workers is None:
            num_workers = min(8, max(1, (os.cpu_count() or 2) // 2))
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._workers = [_Worker() for _ in range(num_workers)]
        self.restarts = 0  # workers replaced after a timeout or crash (a health metric)
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops all workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            worker.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def run(self, tasks: list[tuple], timeout: float | None = None) -> list[tuple]:
        """Runs tasks (see :func:`_run_task`) and returns their results in order."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        timeout = self.timeout if timeout is None else float(timeout)
        with self._lock:
            return self._run_locked(tasks, timeout)

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker()
        self.restarts += 1

    def _run_locked(self, tasks, timeout):
        n = len(tasks)
        results: list = [None] * n
        queue = collections.deque(range(n))
        chunk = max(1, min(_MAX_CHUNK, -(-n // (4 * self.num_workers))))
        done = 0
        for slot, worker in enumerate(self._workers):  # a worker that died while idle
            if not worker.is_alive():
                self._replace(slot)
        while done < n:
            self._dispatch(queue, tasks, chunk)
            waiting = [w for w in self._workers if w.pending or not w.ready]
            deadlines = [w.head_started + timeout for w in waiting if w.pending]
            deadlines += [w.started + _START_TIMEOUT_S for w in waiting if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
            ready = multiprocessing.connection.wait([w.from_worker for w in waiting], timeout=wait_s)
            for slot, worker in enumerate(self._workers):
                try:
                    if worker.from_worker in ready:
                        done += self._receive(worker, results)
                except (EOFError, OSError, ValueError):
                    # the worker died (killed by the OS, or failed to start): its current item fails
                    if worker.pending:
                        index = worker.pending.popleft()
                        results[index] = (False, None, "verifier worker crashed")
                        done += 1
                    queue.extendleft(reversed(worker.pending))
                    worker.pending.clear()
                    self._replace(slot)
                    continue
                now = time.monotonic()
                if worker.pending and now - worker.head_started > timeout:
                    index = worker.pending.popleft()
                    results[index] = (False, None, f"timeout after {timeout:g} s")
                    done += 1
                    queue.extendleft(reversed(worker.pending))
                    worker.pending.clear()
                    self._replace(slot)
                elif not worker.ready and now - worker.started > _START_TIMEOUT_S:
                    raise RuntimeError(
                        f"verifier worker {worker.pid} did not start within {_START_TIMEOUT_S:g} s")
        return results

    def _dispatch(self, queue, tasks, chunk) -> None:
        """Sends a chunk to every started worker that has nothing pending."""
        for slot, worker in enumerate(self._workers):
            if worker.pending or not worker.ready or not queue:
                continue
            batch = [queue.popleft() for _ in range(min(chunk, len(queue)))]
            try:
                worker.send([[i, list(tasks[i])] for i in batch])
            except (OSError, ValueError):
                queue.extendleft(reversed(batch))
                self._replace(slot)
                continue
            worker.pending.extend(batch)
            worker.head_started = time.monotonic()

    @staticmethod
    def _receive(worker: _Worker, results: list) -> int:
        """Reads every answer available from ``worker``; returns how many items completed."""
        completed = 0
        while worker.from_worker.poll():
            message = worker.recv()
            if message == "ready":
                worker.ready = True
                continue
            index, result = message
            expected = worker.pending.popleft() if worker.pending else None
            if index != expected:
                raise RuntimeError(f"verifier worker answered item {index}, expected {expected}")
            results[index] = tuple(result)
            completed += 1
            worker.head_started = time.monotonic()
            if not worker.pending:
                break
        return completed

    def check(self, gold: str, pred: str | None, timeout: float | None = None) -> rmath.Verdict:
        """:func:`offpolicy_jax.rewards.math.check` under the deadline."""
        equivalent, _, reason = self.run([("check", gold, pred)], timeout)[0]
        return rmath.Verdict(equivalent, reason)

    def check_many(self, golds: list[str], preds: list, timeout: float | None = None,
                   options: list | None = None):
        """Deadline-bounded :func:`check` for pairs of already-extracted answers.

        ``options``: one dict of :func:`offpolicy_jax.rewards.math.check` keywords (or None) per
        pair, e.g. ``{"ordered_lists": True}`` for a question that fixes the order of its answers.
        """
        if len(golds) != len(preds):
            raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
        options = [None] * len(golds) if options is None else list(options)
        if len(options) != len(golds):
            raise ValueError(f"{len(golds)} golds but {len(options)} options")
        results = self.run([("check", g, p, o) for g, p, o in zip(golds, preds, options)], timeout)
        return [rmath.Verdict(eq, reason) for eq, _, reason in results]


def score_batch(responses: list[str], golds: list[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                pool: VerifierPool | None = None) -> BatchScore:
    """Rewards for a batch of responses: extract each final answer and check it against its gold.

    Args:
      responses: ``N`` model responses (full text).
      golds: ``N`` gold answers (strings, as returned by :func:`load_benchmark`).
      timeout: per-response deadline in seconds; a response past it gets reward 0 and reason
        ``"timeout after T s"``.
      pool: a persistent :class:`VerifierPool` (recommended in a loop); without one a pool is
        started and stopped for this call, which costs process start-up time.

    Returns:
      :class:`BatchScore` with ``rewards`` float32 ``[N]``.
    """
    if len(responses) != len(golds):
        raise ValueError(f"score_batch got {len(responses)} responses but {len(golds)} golds")
    # Only the tail that extract_answer searches is sent to the workers (bounded pipe traffic); a
    # response that is not a string has no answer.
    tasks = [("score", r[-rmath.MAX_RESPONSE_CHARS:] if isinstance(r, str) else None, str(g))
             for r, g in zip(responses, golds)]
    if pool is None:
        with VerifierPool(timeout=timeout) as own_pool:
            results = own_pool.run(tasks, timeout)
    else:
        results = pool.run(tasks, timeout)
    equivalent = [bool(r[0]) for r in results]
    return BatchScore(
        rewards=np.asarray(equivalent, dtype=np.float32).reshape(len(results)),
        equivalent=equivalent,
        extracted=[r[1] for r in results],
        reasons=[r[2] for r in results],
    )
