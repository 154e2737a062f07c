"""Requests in, tokens out: the bounded queue and the pinned-batch engine.

A ``Job`` is one request: its prompt ids, its sampling, its stop strings and where its events go.
An engine runs jobs on one worker thread (the runtimes release the GIL while they compute) and
hands each job's text to the event loop as it comes. Admission is bounded: a job is refused
(``QueueFull``) when ``capacity`` jobs are already waiting or running, and a job whose client went
away stops counting at once.

``BatchEngine`` serves any runner with a pinned batch size: compatible jobs (same sampling) waiting
within ``window_s`` of the first are grouped up to the batch size, a short group is padded with
copies of its last prompt (as ``llmopt run`` does), and a group stops as soon as every one of its
jobs is finished or gone.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from llmopt.runners.base import SamplingConfig

log = logging.getLogger("llmopt.serve")


class QueueFull(Exception):
    """Admission refused: the engine already holds ``capacity`` jobs."""


class EngineStopped(Exception):
    """Admission refused: the server is draining."""


class Detokenizer:
    """Token ids to text deltas, stopping at an end token, a stop string or the token limit.

    Text that could still become a stop string, or that ends in an incomplete UTF-8 sequence, is held
    back until the next token decides it; the stop string itself is never sent."""

    def __init__(self, tokenizer, eos_token_ids: set[int], stops: list[str], limit: int):
        self.tokenizer, self.eos_token_ids, self.stops, self.limit = tokenizer, eos_token_ids, stops, limit
        self.ids: list[int] = []
        self.count = 0  # generated tokens, an end token included
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.cut = False  # ended by a stop string

    def push(self, token_id: int) -> tuple[str, Optional[str]]:
        """(new text, finish reason or None) after one generated token."""
        self.count += 1
        if token_id in self.eos_token_ids:
            return self.final(), "stop"
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.text = text
        for stop in self.stops:
            found = self.text.find(stop, max(0, self.sent - len(stop)))
            if found >= 0:
                self.text, self.cut = self.text[:found], True
                return self._flush(), "stop"
        if self.count >= self.limit:
            return self.final(), "length"
        safe = len(self.text) - self._held_back()
        delta, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return delta, None

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def final(self) -> str:
        """The rest of the text, an incomplete last character included (as ``llmopt run`` prints it)."""
        if not self.cut:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._flush()

    def _flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: SamplingConfig  # max_new_tokens: this request's own limit, already within the artifact's room
    detokenizer: Detokenizer
    seeded: bool = True  # False: any seed will do, so it may share a batch with other unseeded jobs
    loop: Any = None  # the event loop waiting for the events
    events: Any = None  # asyncio.Queue of ("text", str) / ("done", finish_reason) / ("error", message)
    id: int = field(default_factory=itertools.count().__next__)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    finish_reason: Optional[str] = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.cancelled or self.finish_reason is not None

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def push(self, token_id: int) -> None:
        """One generated token, from the engine thread."""
        if self.done:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        delta, reason = self.detokenizer.push(token_id)
        if delta:
            self.emit("text", delta)
        if reason is not None:
            self.finish(reason)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        delta = self.detokenizer.final()
        if delta:
            self.emit("text", delta)
        self.finish_reason, self.finished_at = reason, time.perf_counter()
        self.emit("done", reason)

    def fail(self, message: str) -> None:
        if not self.done:
            self.finish_reason = "error"
            self.emit("error", message)


class Engine:
    """The admission count and the worker thread; subclasses implement ``_serve``."""

    kind = "engine"

    def __init__(self, runner, capacity: int):
        self.runner, self.capacity = runner, capacity
        self._lock = threading.Condition()
        self._admitted: set[int] = set()  # ids of jobs waiting or running
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"llmopt-{self.kind}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._admitted)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._admitted) >= self.capacity:
                raise QueueFull(f"{len(self._admitted)} requests are already queued or running (capacity {self.capacity})")
            self._admitted.add(job.id)
            self._enqueue(job)
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: its slot is free now, and its tokens are no longer computed where possible."""
        job.cancelled = True
        self.release(job)

    def release(self, job: Job) -> None:
        with self._lock:
            self._admitted.discard(job.id)
            self._lock.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was admitted, then end the worker thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a broken runtime: every waiting client gets an error, not a hang
            log.exception("the serving engine failed")
            with self._lock:
                self._stopping = True
            for job in self._drain_all():
                job.fail("the serving engine failed; see the server log")

    def _enqueue(self, job: Job) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        raise NotImplementedError

    def _drain_all(self) -> list[Job]:
        return []


class _GroupDone(Exception):
    """Raised from the token callback: every job of the group is finished or gone."""


def group_key(job: Job) -> tuple:
    sampling = job.sampling
    if sampling.greedy:
        return ("greedy", sampling.repetition_penalty)
    return (sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty,
            sampling.seed if job.seeded else None)


class BatchEngine(Engine):
    """Groups of up to the pinned batch size, formed within ``window_s`` of the first job waiting."""

    kind = "pinned-batch"

    def __init__(self, runner, capacity: int, window_s: float = 0.01):
        self.window_s = window_s
        self._waiting: collections.deque[Job] = collections.deque()
        super().__init__(runner, capacity)

    def _enqueue(self, job: Job) -> None:
        self._waiting.append(job)

    def _drain_all(self) -> list[Job]:
        with self._lock:
            jobs, self._waiting = list(self._waiting), collections.deque()
        return jobs

    def _take(self, key: tuple | None) -> Job | None:
        """The oldest live waiting job (with sampling ``key``, when given); called under the lock."""
        for job in list(self._waiting):
            if job.cancelled:
                self._waiting.remove(job)
            elif key is None or group_key(job) == key:
                self._waiting.remove(job)
                return job
        return None

    def _next_group(self) -> list[Job] | None:
        with self._lock:
            while (first := self._take(None)) is None:
                if self._stopping:
                    return None
                self._lock.wait()
            group, key = [first], group_key(first)
            deadline = time.monotonic() + self.window_s
            while len(group) < self.runner.batch_size:
                job = self._take(key)
                if job is not None:
                    group.append(job)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
        return group

    def _serve(self) -> None:
        while (group := self._next_group()) is not None:
            try:
                self._generate(group)
            except Exception as exc:
                log.exception("generation failed")
                for job in group:
                    job.fail(f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                for job in group:
                    job.finish("length")  # cut short by the group's shared limit (no-op for finished jobs)
                    self.release(job)

    def _generate(self, group: list[Job]) -> None:
        runner = self.runner
        rows = [job.prompt_ids for job in group]
        rows += [rows[-1]] * (runner.batch_size - len(rows))
        room = runner.sequence_length - max(len(ids) for ids in rows)
        limit = min(max(job.sampling.max_new_tokens for job in group), room)
        sampling = replace(group[0].sampling, max_new_tokens=max(limit, 1))
        if not group[0].seeded:
            sampling = replace(sampling, seed=random.randrange(2**31))

        def on_token(row: int, token_id: int) -> None:
            if row < len(group):
                group[row].push(token_id)
            if all(job.done for job in group):
                raise _GroupDone

        try:
            runner.generate(rows, sampling, on_token)
        except _GroupDone:
            pass
