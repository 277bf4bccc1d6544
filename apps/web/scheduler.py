"""Bounded work: admission with a queue limit, one worker thread, and batched decoding.

Every model call runs on one worker thread (Paddle on CPU already spreads one op over every core, so two
calls at once only contend). Requests are admitted while fewer than `max_pending` are queued or running;
beyond that `submit` raises QueueFull (the app answers 429). Generation requests with equal DecodeOptions on
the same model that arrive within `batch_window_ms` of the first are decoded together, up to `max_batch`
rows, by one batched Generator.stream (left-padded prompts: a row's text does not depend on its batch).

A request that is cancelled (client gone, or past its deadline) frees its admission slot at once; a queued
one is dropped, a decoding row stops receiving text, and a batch whose rows are all cancelled stops decoding.
A non-generation call that is already running (a fold, an image) cannot be interrupted: its slot is freed,
its result is dropped.
"""
import asyncio
import collections
import threading
import time

END = object()  # the last item a generation job's queue receives


class QueueFull(Exception):
    pass


class Job:
    """One admitted request. Its results reach the event loop of the request through `deliver`."""

    def __init__(self, scheduler, loop):
        self.scheduler, self.loop = scheduler, loop
        self.cancelled = threading.Event()
        self._released = False

    def release(self):
        """Free the admission slot (once)."""
        with self.scheduler._cond:
            if not self._released:
                self._released = True
                self.scheduler._admitted -= 1
                self.scheduler._cond.notify_all()

    def cancel(self):
        self.cancelled.set()
        with self.scheduler._cond:
            if self in self.scheduler._queue:
                self.scheduler._queue.remove(self)
        self.release()

    def deliver(self, callback, *args):
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the request's event loop is closed: nobody is waiting for this any more
            self.cancelled.set()


class CallJob(Job):
    def __init__(self, scheduler, loop, fn):
        super().__init__(scheduler, loop)
        self.fn, self.future = fn, loop.create_future()
        self.batch_key = None

    def _set(self, ok, value):
        if not self.future.done():
            (self.future.set_result if ok else self.future.set_exception)(value)


class GenerationJob(Job):
    def __init__(self, scheduler, loop, model, prompt, options):
        super().__init__(scheduler, loop)
        self.model, self.prompt, self.options = model, prompt, options
        self.batch_key = (model.name, options)
        self.items = asyncio.Queue()
        self.batch_size = None  # rows in the batch it was decoded in

    def push(self, item):
        if not self.cancelled.is_set():
            self.deliver(self.items.put_nowait, item)


class Scheduler:
    def __init__(self, limits):
        self.limits = limits
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._admitted = 0
        self._closed = False
        self.stats = collections.Counter()  # batches, batched_rows, rejected, abandoned_batches
        self._thread = None
        self.start()

    def start(self):
        """Start the worker (again, after close: an app's lifespan may run more than once, e.g. in tests)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive() and not self._closed:
                return
            self._closed = False
            self._thread = threading.Thread(target=self._work, name="ppzoo-web-worker", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------------------------------- admission
    def _admit(self, job):
        with self._cond:
            if self._admitted >= self.limits.max_pending:
                self.stats["rejected"] += 1
                raise QueueFull(f"{self._admitted} requests are queued or running (limit {self.limits.max_pending})")
            self._admitted += 1
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def submit_call(self, fn):
        """Queue fn() for the worker; await job.future for its result."""
        return self._admit(CallJob(self, asyncio.get_running_loop(), fn))

    def submit_generation(self, model, prompt, options):
        """Queue a generation; job.items receives its text pieces, then END (or an exception)."""
        return self._admit(GenerationJob(self, asyncio.get_running_loop(), model, prompt, options))

    def status(self):
        with self._cond:
            return {"admitted": self._admitted, "queued": len(self._queue), "max_pending": self.limits.max_pending,
                    "max_batch": self.limits.max_batch if self.limits.batching else 1,
                    "batching": self.limits.batching, **dict(self.stats)}

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        thread.join(timeout=30)

    # ---------------------------------------------------------------------------------------- worker
    def _next_batch(self):
        """The next job, with the queued generation jobs that can share its batch (waiting up to the batch
        window for them); None when closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue[0]
            max_batch = self.limits.max_batch if self.limits.batching else 1
            if first.batch_key is not None and max_batch > 1:
                deadline = time.monotonic() + self.limits.batch_window_ms / 1000
                while not self._closed and first in self._queue:
                    mates = [j for j in self._queue if j.batch_key == first.batch_key]
                    left = deadline - time.monotonic()
                    if len(mates) >= max_batch or left <= 0:
                        break
                    self._cond.wait(left)
                if first not in self._queue:  # cancelled while waiting: start over
                    return []
                batch = [j for j in self._queue if j.batch_key == first.batch_key][:max_batch]
            else:
                batch = [first]
            for job in batch:
                self._queue.remove(job)
            return batch

    def _work(self):
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            if isinstance(batch[0], CallJob):
                self._run_call(batch[0])
            else:
                self._run_generation(batch)

    def _run_call(self, job):
        try:
            result, ok = job.fn(), True
        except Exception as exc:  # handed to the request, which answers it (4xx for ppzoo errors, else 500)
            result, ok = exc, False
        job.deliver(job._set, ok, result)
        job.release()

    def _run_generation(self, batch):
        self.stats["batches"] += 1
        self.stats["batched_rows"] += len(batch)
        model, options = batch[0].model, batch[0].options
        for job in batch:
            job.batch_size = len(batch)
        stream = model.stream([job.prompt for job in batch], options)
        try:
            for pieces in stream:
                alive = [job for job in batch if not job.cancelled.is_set()]
                if not alive:
                    self.stats["abandoned_batches"] += 1
                    break
                for job, piece in zip(batch, pieces):
                    if piece:
                        job.push(piece)
            for job in batch:
                job.push(END)
        except Exception as exc:  # a decode failure reaches every row of the batch as an error event
            for job in batch:
                job.push(exc)
        finally:
            stream.close()
            for job in batch:
                job.release()
