"""Hardware splits: the draft model and the target run at the same time on disjoint hardware.

A split has two sides.  The draft side is a lane: one worker thread bound to its part of the
machine, to which the frontier pipeline submits draft rounds.  The target side is the caller's
own thread, bound to the rest while it verifies (``target_side()``), and given the whole
machine back afterwards, so a serial step still runs at full width.

- CPU (``CpuSplit``): the lane pins itself to the draft cores and runs that many intra-op
  threads (torch's thread count is per calling thread); the target side pins every other thread
  of the process (the caller and its OpenMP pool) to the target cores.  Measured on a 2-core VM
  (scripts/bench_core_split.py), both models in one process overlap at 1.12x the work rate of
  running them in turn; in two processes 1.27x, the difference being Python's GIL, which each
  thread holds between ops.  The pipeline keeps both models in one process: the draft cache,
  the request state and the sampler stay shared, and a pass is long next to its Python work.
- CUDA (``CudaSplit``): the lane runs on its own stream, the target on another; with
  FlashInfer's green contexts the two streams own disjoint sets of SMs (Hopper hands them out
  in multiples of 8), otherwise they share the device (plain streams).  A split that asked for
  SMs and did not get them says so: a warning with the reason, ``green`` False,
  ``fallback_reason``, and a name of its own (``cuda_split_name``), since the frontier
  controller keeps one pair of cost curves per split name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from concurrent.futures import Future

import torch

from faser_sgl.executor.device import indexed_device

logger = logging.getLogger("faser_sgl.lanes")


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: only the calling thread is pinned
        return {threading.get_native_id()}


class Lane:
    """One worker thread that runs submitted calls in order, after ``bind()`` ran on it."""

    def __init__(self, name: str, bind):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread_ids: set[int] = set()  # the lane's thread and the threads it started
        ready: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(bind, ready), name=name, daemon=True)
        before = _thread_ids()
        self._thread.start()
        ready.result()
        self.thread_ids = _thread_ids() - before

    def _loop(self, bind, ready: Future) -> None:
        try:
            bind()
            torch.ones(64, 64) @ torch.ones(64, 64)  # start this thread's intra-op pool now
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with torch.inference_mode():  # thread-local: the lane needs its own
                    future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
                future.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)


class CpuSplit:
    """Draft on ``draft_cores``, target on ``target_cores`` (disjoint sets of CPU ids)."""

    def __init__(self, target_cores: list[int], draft_cores: list[int]):
        if not target_cores or not draft_cores or set(target_cores) & set(draft_cores):
            raise ValueError(f"a CPU split needs two disjoint, non-empty core sets, got "
                             f"{target_cores} and {draft_cores}")
        self.target_cores, self.draft_cores = sorted(target_cores), sorted(draft_cores)
        self.name = f"cpu:{len(self.target_cores)}+{len(self.draft_cores)}"
        self.lane = Lane(f"draft-lane[{self.name}]", self._bind_draft)

    def _bind_draft(self) -> None:
        os.sched_setaffinity(threading.get_native_id(), self.draft_cores)
        torch.set_num_threads(len(self.draft_cores))

    def draft_side(self):
        return contextlib.nullcontext()  # the lane is pinned for good when it starts

    @contextlib.contextmanager
    def target_side(self):
        """Pin the process's other threads to the target cores for the duration."""
        mine = [t for t in _thread_ids() if t not in self.lane.thread_ids]
        saved: dict[int, set[int]] = {}
        for tid in mine:
            try:
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, self.target_cores)
            except OSError:  # the thread ended meanwhile
                pass
        threads = torch.get_num_threads()
        torch.set_num_threads(len(self.target_cores))
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            for tid, cores in saved.items():
                try:
                    os.sched_setaffinity(tid, cores)
                except OSError:
                    pass

    def close(self) -> None:
        self.lane.close()


class SharedSplit:
    """No partition: the lane (one intra-op thread) and the target share every core and the OS
    interleaves them.  For a one-core machine, and the baseline a partition has to beat."""

    name = "cpu:shared"

    def __init__(self):
        self.lane = Lane(f"draft-lane[{self.name}]", lambda: torch.set_num_threads(1))

    def draft_side(self):
        return contextlib.nullcontext()

    def target_side(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        self.lane.close()


def cuda_split_name(asked_sms: int | None, draft_sms: int | None = None,
                    target_sms: int | None = None) -> str:
    """A CUDA split's name, distinct per kind of split: "cuda:116+16sm" (green contexts: the
    target's and the draft's SMs as granted), "cuda:streams" (plain streams, as asked), or
    "cuda:streams[16sm unavailable]" (green contexts asked for 16 draft SMs and refused)."""
    if draft_sms is not None:
        return f"cuda:{target_sms}+{draft_sms}sm"
    if asked_sms is None:
        return "cuda:streams"
    return f"cuda:streams[{asked_sms}sm unavailable]"


def green_context_streams(device: torch.device, draft_sms: int):
    """(draft stream, target stream, draft SMs, target SMs) on two green contexts of
    ``device`` (an indexed CUDA device), through FlashInfer; raises where that is impossible
    (no flashinfer or cuda-bindings, a driver without green contexts, too many SMs asked).
    FlashInfer rounds the SM count up to the device's granularity, so the counts returned are
    the ones granted."""
    from flashinfer.green_ctx import split_device_green_ctx_by_sm_count

    streams, resources = split_device_green_ctx_by_sm_count(device, [draft_sms])
    return streams[0], streams[-1], int(resources[0].sm.smCount), int(resources[-1].sm.smCount)


class CudaSplit:
    """Draft and target on two CUDA streams; on disjoint SMs where green contexts exist."""

    def __init__(self, device: torch.device | str, draft_sms: int | None = None):
        self.device = indexed_device(device)  # set_device and green contexts need "cuda:N"
        self.draft_sms = draft_sms
        self.green = False
        self.fallback_reason: str | None = None
        granted = (None, None)
        if draft_sms is not None:
            try:
                self.draft_stream, self.target_stream, *granted = green_context_streams(self.device, draft_sms)
                self.green = True
            except Exception as exc:  # noqa: BLE001 - any refusal leaves plain streams, said aloud
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                granted = (None, None)
        if not self.green:
            self.draft_stream = torch.cuda.Stream(self.device)
            self.target_stream = torch.cuda.Stream(self.device)
        self.name = cuda_split_name(draft_sms, *granted)
        if self.fallback_reason is not None:
            logger.warning("no green contexts for a %d-SM draft side on %s (%s): split %s runs "
                           "on plain streams sharing every SM", draft_sms, self.device,
                           self.fallback_reason, self.name)
        self.lane = Lane(f"draft-lane[{self.name}]", lambda: torch.cuda.set_device(self.device))

    @contextlib.contextmanager
    def draft_side(self):
        """Entered by the lane around a draft round: work goes to the draft stream, ordered after
        what the scheduler queued before, and finished when the round returns."""
        self.draft_stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self.draft_stream):
            yield
        self.draft_stream.synchronize()

    @contextlib.contextmanager
    def target_side(self):
        default = torch.cuda.default_stream(self.device)
        self.target_stream.wait_stream(default)
        with torch.cuda.stream(self.target_stream):
            yield
        default.wait_stream(self.target_stream)

    def close(self) -> None:
        self.lane.close()


def parse_auto_count(text: str | int | None, what: str) -> int | None:
    """'auto' (None) or an integer >= 0; ValueError naming ``what`` otherwise."""
    if text is None or str(text).strip() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be 'auto' or an integer >= 0, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must be 'auto' or an integer >= 0, got {value}")
    return value


def parse_split(text: str | int | None) -> int | None:
    """``--faser-pipeline-split``: 'auto' (None) or the draft side's share as a count (CPU
    cores, or SMs on CUDA); 0: no partition (shared cores, or plain CUDA streams)."""
    return parse_auto_count(text, "the pipeline split")


def make_splits(device: torch.device | str, draft_share: int | None = None) -> list:
    """The candidate splits of this machine (the controller picks per step among them and
    running in turn).  ``draft_share``: pin one split (draft cores or SMs); None: a few
    candidates.  An empty list: nothing to split (a single core)."""
    device = indexed_device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).multi_processor_count
        if draft_share == 0:
            return [CudaSplit(device, None)]
        if draft_share is not None:
            if draft_share >= total:
                raise ValueError(f"--faser-pipeline-split {draft_share} leaves the target no SM "
                                 f"(the device has {total})")
            return [CudaSplit(device, draft_share)]
        # Multiples of 8 SMs (Hopper's green-context granularity): a quarter and a half.
        shares = sorted({max(8, (total // 4) // 8 * 8), max(8, (total // 2) // 8 * 8)})
        return _distinct([CudaSplit(device, s) for s in shares if s < total])
    cores = sorted(os.sched_getaffinity(0))
    if draft_share == 0:
        return [SharedSplit()]
    if draft_share is not None:
        if draft_share >= len(cores):
            raise ValueError(f"--faser-pipeline-split {draft_share} leaves the target no core "
                             f"(this process may use {len(cores)})")
        shares = [draft_share]
    else:
        shares = sorted({s for s in (1, len(cores) // 4, len(cores) // 2) if 1 <= s < len(cores)})
    return _distinct([CpuSplit(cores[: len(cores) - s], cores[len(cores) - s:]) for s in shares])


def _distinct(splits: list) -> list:
    """The splits, checked to have distinct names: the frontier controller keys each split's
    cost curves by name, so two splits of one name would share (and blur) one pair of curves."""
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        for s in splits:
            s.close()
        raise RuntimeError(f"hardware splits need distinct names, got {names}")
    return splits
