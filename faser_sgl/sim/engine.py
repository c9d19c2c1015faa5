"""The event loop: the real scheduler's loop on a virtual clock.

One ``SimServer`` stands for one server setting (as the load harness starts one server per
setting and runs every workload against it in turn): the real ``BatchPlanner`` over the real
``SlotAllocator``, the real policy from ``make_policy``, and a simulated generator.  Per
workload the clock starts at 0; the loop is ``Scheduler.run_forever``/``step``: deliver the
requests that have arrived, plan, run one step (its passes advance the clock), release finished
requests, and when nothing runs, jump to the next arrival.  A request that arrives during a
step is seen after it, except that between draft passes the generator asks, as the real one
does, whether a newcomer could start now (``Scheduler.newcomer_can_start``); if so the step is
abandoned and its chunks taken back.  A setting the real server would pipeline
(``SimSetting.pipelined``) gets ``pipeline.SimulatedFrontierGenerator`` on the cost profile's
splits; a profile without splits runs it serially and says so in the record
(``sim.frontier_pipeline``).

Not modelled: the prefix cache (prompts are dummy tokens; the Azure traces publish no text),
stop tokens (outputs end at their length), tokenizer/detokenizer/HTTP time, failed passes.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from faser_sgl.executor.kv_cache import SlotAllocator
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.request import Request, StopConditions
from faser_sgl.managers.stop_checker import StopChecker
from faser_sgl.sim.arrivals import SimWorkload
from faser_sgl.sim.generator import (DUMMY_TOKEN, SimClock, SimExecutor, SimulatedGenerator,
                                     SimulatedTargetOnly)
from faser_sgl.sim.metrics import SimRequestResult, calculate_metrics
from faser_sgl.sim.pipeline import SimulatedFrontierGenerator, pipeline_splits
from faser_sgl.sim.settings import SimSetting
from faser_sgl.speculative.policy import make_policy

# The real record's speculation counters (bench/runner.SPEC_COUNTERS).
SPEC_COUNTERS = ("spec_verify_steps", "spec_drafted_tokens", "spec_accepted_tokens", "spec_pipelined_steps")


class SimServer:
    def __init__(self, setting: SimSetting, profile, acceptance, seed: int, exit_records=None,
                 cost_noise: float = 0.0):
        self.setting = setting
        self.acceptance = acceptance
        self.seed = seed
        opts = setting.options
        self.allocator = SlotAllocator(setting.max_total_tokens)
        self.planner = BatchPlanner(self.allocator, setting.max_running_requests, setting.max_step_tokens)
        self.policy = make_policy(opts.speculative_policy, opts.speculative_num_draft_tokens,
                                  opts.speculative_cost_profile, opts.batch_table, opts.batch_ema_config)
        self.clock = SimClock()
        self.pipeline_note = None  # why a pipelining setting runs serially here
        self.executor = SimExecutor(profile, self.clock, cost_noise, np.random.default_rng([seed, 7]))
        stop_checker = StopChecker(None)
        self.extra_slots = opts.speculative_num_draft_tokens if setting.speculative else 0
        self._acceptance_of: dict[int, object] = {}
        if setting.speculative:
            early_exit = None
            if opts.early_exit_on:
                from faser_sgl.sim.exit_model import SimulatedEarlyExit

                early_exit = SimulatedEarlyExit(
                    exit_records, opts.exit_layers, opts.exit_threshold, opts.exit_draft_prob,
                    self.policy, np.random.default_rng([seed, 8]))
            gen_args = (self.executor, self.policy, self.allocator, stop_checker, setting.max_step_tokens,
                        self._acceptance_for, early_exit)
            splits = []
            if setting.pipelined:
                # As make_generator: a pipelining setting gets the frontier generator on the
                # machine's splits, here the profile's; without any it runs serially (noted).
                splits, self.pipeline_note = pipeline_splits(profile, opts.pipeline_split)
            if splits:
                self.generator = SimulatedFrontierGenerator(*gen_args, splits=splits,
                                                            frontier_size=opts.frontier_size_value)
            else:
                self.generator = SimulatedGenerator(*gen_args)
            self.generator.should_yield = self._newcomer_can_start
        else:
            self.generator = SimulatedTargetOnly(self.executor, stop_checker)
        self.generator.calibrate()
        self.num_steps = 0
        self.step_chunks = 0  # requests scheduled over the completed steps (batch size x steps)
        self.overhead_s = 0.0  # step overhead charged so far (virtual seconds)
        self._preempted_last_step = False
        self._pending: deque = deque()
        self.on_step = None  # optional callback(server, chunks) after each completed step

    @property
    def max_req_input_len(self) -> int:
        return min(self.setting.context_len, self.setting.max_total_tokens) - 1

    def _acceptance_for(self, req: Request):
        return self._acceptance_of[id(req)]

    # -- one workload ---------------------------------------------------------------------------
    def run(self, workload: SimWorkload, workload_index: int) -> dict:
        """Simulate every request of ``workload``; return the load harness's result record."""
        self.clock.now = 0.0
        before = self._counters()
        results = [SimRequestResult(t, p) for t, p in zip(workload.arrivals_s, workload.prompt_lens)]
        order = sorted(range(workload.num_requests), key=lambda i: (workload.arrivals_s[i], i))
        self._pending = deque(order)
        live: dict[int, tuple[Request, SimRequestResult]] = {}
        self._workload, self._results, self._index = workload, results, workload_index
        while self._pending or self.planner.has_work():
            self._deliver(live)
            if not self.planner.has_work():
                if self._pending:
                    self.clock.now = max(self.clock.now, workload.arrivals_s[self._pending[0]])
                continue
            self._step(live)
        duration = max([self.clock.now, *(q.finish_s or 0.0 for q in results), workload.arrivals_s[-1]
                        if workload.arrivals_s else 0.0])
        return self._record(workload, results, duration, before)

    def _deliver(self, live) -> None:
        """Requests that have arrived by now enter the queue (Scheduler.add_request)."""
        wl = self._workload
        while self._pending and wl.arrivals_s[self._pending[0]] <= self.clock.now:
            i = self._pending.popleft()
            result = self._results[i]
            prompt_len, max_new = wl.prompt_lens[i], wl.output_lens[i]
            room = min(self.setting.context_len, self.setting.max_total_tokens) - prompt_len
            if prompt_len > self.max_req_input_len or max_new > room:
                # The server answers 400 at once (Scheduler.make_request).
                result.success, result.finish_s = False, wl.arrivals_s[i]
                result.error = (f"the prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) does "
                                f"not fit the {room + prompt_len} tokens one request can hold")
                continue
            req = Request(rid=f"sim-{self._index}-{i}", http_worker_ipc=None,
                          prompt_ids=[DUMMY_TOKEN] * prompt_len,
                          stop=StopConditions(max_new_tokens=max_new, stop_token_ids=frozenset()),
                          sampling=None, stream=True, arrival_time=wl.arrivals_s[i])
            # The request's own generator: the same request meets the same acceptance sequence
            # under every setting, whatever lengths that setting drafts.
            self._acceptance_of[id(req)] = self.acceptance.for_request(
                np.random.default_rng([self.seed, self._index, i]))
            live[id(req)] = (req, result)
            self.planner.add(req)

    def _newcomer_can_start(self) -> bool:
        """Scheduler.newcomer_can_start on the virtual clock."""
        if self._preempted_last_step:
            return False
        wl = self._workload
        for i in self._pending:
            if wl.arrivals_s[i] > self.clock.now:
                break
            if self.planner.would_admit(wl.prompt_lens[i], self.extra_slots):
                return True
        return False

    def _step(self, live) -> None:
        chunks = self.planner.plan(extra_slots_per_decode=self.extra_slots)
        if not chunks:
            # Nothing fits until something arrives (cannot happen with validated requests; a
            # guard against spinning forever on the virtual clock).
            if not self._pending:
                raise RuntimeError("the planner scheduled nothing and no request is due")
            self.clock.now = max(self.clock.now, self._workload.arrivals_s[self._pending[0]])
            return
        drafts_before = self.executor.passes["draft"]
        started = self.clock.now
        new_tokens = self.generator.generate(chunks)
        # What the server does besides the passes (cost_profile.StepOverhead), before it sends.
        overhead = self.executor.profile.step_overhead.seconds(
            len(chunks), self.executor.passes["draft"] - drafts_before)
        self.clock.now += overhead
        self.overhead_s += overhead
        observe_step = getattr(self.generator, "observe_step", None)
        if new_tokens is not None and observe_step is not None:  # as Scheduler.step tells it
            observe_step(len(chunks), self.clock.now - started)
        self._preempted_last_step = new_tokens is None
        if new_tokens is None:
            for chunk in chunks:
                self.planner.take_back(chunk)
            return
        self.num_steps += 1
        self.step_chunks += len(chunks)
        now = self.clock.now
        for chunk in chunks:
            req = chunk.req
            req_tokens = new_tokens.get(req, ())
            _, result = live[id(req)]
            if req_tokens:
                result.chunks.append((now, len(req_tokens)))
                result.output_len += len(req_tokens)
            if req.finished:
                self.planner.release(req)
                result.finish_s = now
                del live[id(req)]
                del self._acceptance_of[id(req)]
        if self.on_step is not None:
            self.on_step(self, chunks)

    # -- the record -----------------------------------------------------------------------------
    def _counters(self) -> dict:
        gen = self.generator
        return {"spec_verify_steps": gen.num_verify_steps, "spec_drafted_tokens": gen.num_drafted,
                "spec_accepted_tokens": gen.num_accepted,
                "spec_pipelined_steps": getattr(gen, "num_pipelined_steps", 0)}

    def _record(self, workload: SimWorkload, results: list[SimRequestResult], duration: float,
                before: dict) -> dict:
        after = self._counters()
        spec = {name: after[name] - before[name] for name in SPEC_COUNTERS}
        return {
            "workload": workload.name,
            "rate": workload.rate,
            "num_requests": workload.num_requests,
            "failed": sum(not q.success for q in results),
            "errors": sorted({q.error for q in results if not q.success}),
            "duration_s": duration,
            "metrics": calculate_metrics(results, duration),
            "spec": {**spec, "accept_rate": spec["spec_accepted_tokens"] / spec["spec_drafted_tokens"]
                     if spec["spec_drafted_tokens"] else None},
            "requests": [{"arrival_s": q.arrival_s, "prompt_len": q.prompt_len, "output_len": q.output_len,
                          "success": q.success, "ttft_s": q.ttft_s, "latency_s": q.latency_s, "text": None}
                         for q in results],
            "detail": workload.detail,
            "sim": self._sim_stats(),
        }

    def _sim_stats(self) -> dict:
        """Totals since the server started (like the real server's counters, not per run)."""
        gen = self.generator
        ee = getattr(gen, "early_exit", None)
        return {"steps": self.num_steps, "passes": dict(self.executor.passes),
                "busy_s": {k: round(v, 6) for k, v in self.executor.busy_s.items()},
                "mean_batch_requests": round(self.step_chunks / self.num_steps, 3) if self.num_steps else None,
                **self.executor.stats(),
                "step_overhead_s": round(self.overhead_s, 6),
                "preempted_steps": gen.num_preempted_steps, "retractions": self.planner.num_retractions,
                "early_exit": ee.stats.as_dict() if ee is not None else None,
                "frontier_pipeline": self._pipeline_stats()}

    def _pipeline_stats(self) -> dict | None:
        """None for a serial setting; else the controller's choices and counts (sim/pipeline.py),
        or why the setting ran serially."""
        if not self.setting.pipelined:
            return None
        if hasattr(self.generator, "pipeline_stats"):
            return self.generator.pipeline_stats()
        return {"simulated": False, "note": self.pipeline_note}
