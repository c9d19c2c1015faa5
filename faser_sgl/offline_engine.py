"""An in-process engine: the scheduler's planner and generators without HTTP or ZMQ.

Used by benchmarks (scripts/) and statistical tests that need thousands of requests quickly.
It runs exactly the code the server's scheduler runs for batching, speculation and stop checks.
"""

from __future__ import annotations

import torch

from faser_sgl.executor.model_runner import ModelRunner
from faser_sgl.executor.sampler import Sampler, SamplingOptions
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.logprobs import make_state as make_logprob_state
from faser_sgl.managers.logprobs import start_input
from faser_sgl.managers.request import Request, StopConditions, finish_abort, uses_coupled_sampling
from faser_sgl.managers.stop_checker import StopChecker
from faser_sgl.managers.token_generator import TargetOnlyGenerator
from faser_sgl.speculative.policy import make_policy


class SamplingParamsLike:
    """Attribute bag shaped like sglang's SamplingParams, for SamplingOptions.from_sglang."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class OfflineEngine:
    def __init__(self, target_path: str, draft_path: str | None = None, policy: str = "fixed",
                 num_draft_tokens: int = 4, dtype: torch.dtype = torch.float32, kv_slots: int | None = 8192,
                 mem_fraction: float | None = None,
                 max_running: int = 256, max_step_tokens: int = 4096, eos_token_ids=(),
                 tokenizer=None, sampling_scheme: str = "rejection", cost_profile: str | None = None,
                 device: str = "cpu", attention_backend: str = "torch", cpu_linear: str = "auto",
                 early_exit: bool | None = None, exit_options: dict | None = None,
                 frontier_size: int | None = 0, pipeline_split: int | None = None,
                 prefix_cache: bool = False, batch_table: str | None = None,
                 batch_ema_config: str | None = None, schedule_conservativeness: float = 1.0,
                 test_retract_interval: int = 0):
        """tokenizer: enables stop strings (make_request(stop=...)); sampling_scheme: how sampled
        requests draw, see faser_sgl.managers.request.uses_coupled_sampling.  early_exit: FASER's
        early exit in verification (None: on for the faser policy only); exit_options: keyword
        arguments of speculative.early_exit.make_early_exit (layers, threshold, candidates,
        diagnostic).  frontier_size / pipeline_split: FASER's frontier pipeline, as
        --faser-frontier-size / --faser-pipeline-split (0: serial steps, the default here;
        None: chosen per step).  prefix_cache: the server's radix prefix cache (on there unless
        --disable-radix-cache; off here by default so that runs do not depend on each other).
        batch_table / batch_ema_config: as --faser-batch-table / --faser-batch-ema-config.
        schedule_conservativeness: as SGLang's flag (managers/decode_reservation.py).
        test_retract_interval: retract a decoding request every that many steps (BatchPlanner),
        for tests of what follows a retraction."""
        # kv_slots=None sizes the pool from mem_fraction of available memory, as the server does
        # without --max-total-tokens; with a draft, one budget covers both models' pools.
        self.speculative = draft_path is not None and policy != "none"
        draft_runner = None
        if self.speculative:
            from faser_sgl.speculative.draft_worker import DraftWorker

            draft_runner = DraftWorker.load(draft_path, dtype, device, attention_backend, cpu_linear)
        self.runner = ModelRunner(target_path, dtype=dtype, device=device, attention_backend=attention_backend,
                                  cpu_linear=cpu_linear,
                                  max_total_tokens=kv_slots, mem_fraction=mem_fraction, draft=draft_runner)
        self.sampler = Sampler()
        self.prefix_cache = None
        if prefix_cache:
            from faser_sgl.managers.prefix_cache import PrefixCache

            self.prefix_cache = PrefixCache(self.runner.allocator)
        self.planner = BatchPlanner(self.runner.allocator, max_running, max_step_tokens, self.prefix_cache,
                                    conservativeness=schedule_conservativeness,
                                    test_retract_interval=test_retract_interval)
        self.stop_checker = StopChecker(tokenizer)
        # cost_profile: as --speculative-cost-profile (adaptive policy only).
        self.policy = make_policy(policy if self.speculative else "none", num_draft_tokens,
                                  *((cost_profile, batch_table, batch_ema_config) if self.speculative else ()))
        self.num_draft_tokens = num_draft_tokens
        if self.speculative:
            from faser_sgl.speculative.draft_worker import DraftWorker
            from faser_sgl.speculative.early_exit import make_early_exit
            from faser_sgl.speculative.frontier import make_generator

            draft = DraftWorker(draft_runner, self.runner)
            use_exit = policy == "faser" if early_exit is None else early_exit
            self.generator = make_generator(
                self.runner, draft, self.sampler, self.policy, self.runner.allocator, self.stop_checker,
                max_step_tokens,
                make_early_exit(self.runner, **{"cost_model": self.policy, **(exit_options or {})})
                if use_exit else None, frontier_size, pipeline_split)
            self.generator.calibrate()
        else:
            self.generator = TargetOnlyGenerator(self.runner, self.sampler, self.stop_checker)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampling_scheme = sampling_scheme
        self._counter = 0

    def make_request(self, prompt: list[int], max_new_tokens: int, draft_len: int | None = None,
                     stop_token_ids=None, stop: tuple[str, ...] = (), logprobs: dict | None = None,
                     grammar=None, **sampling) -> Request:
        """logprobs: {"start_len", "top_num", "token_ids"} as SGLang's logprob_start_len,
        top_logprobs_num and token_ids_logprob (None: no logprobs); grammar: a
        managers.grammar.GrammarState constraining the output."""
        self._counter += 1
        stops = self.eos_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
        opts = SamplingOptions.from_sglang(SamplingParamsLike(**sampling), self.runner.vocab_size, sorted(stops))
        opts.coupled = uses_coupled_sampling(self.sampling_scheme, opts)
        stop_str_tokens = 0
        if stop:
            if self.stop_checker.tokenizer is None:
                raise ValueError("stop strings need the engine's tokenizer")
            stop_str_tokens = max(len(self.stop_checker.tokenizer.encode(s, add_special_tokens=False))
                                  for s in stop)
        conditions = StopConditions(max_new_tokens=max_new_tokens, stop_token_ids=stops,
                                    stop_strs=tuple(stop), stop_str_max_tokens=stop_str_tokens)
        req = Request(rid=f"offline-{self._counter}", http_worker_ipc=None, prompt_ids=list(prompt),
                      stop=conditions, sampling=opts, stream=False, requested_draft_len=draft_len)
        if logprobs is not None:
            req.logprobs = make_logprob_state(True, logprobs.get("start_len"), logprobs.get("top_num"),
                                              logprobs.get("token_ids"), len(prompt), self.runner.vocab_size)
            start_input(req.logprobs, req.prompt_ids)
            if req.logprobs.wants_input:
                req.cacheable_prefix = req.logprobs.cacheable_prefix
        req.grammar = grammar
        return req

    def abort(self, rid_prefix: str) -> list[Request]:
        """Abort running or waiting requests by rid prefix, as the server's AbortReq does."""
        return self.planner.abort(lambda r: r.rid.startswith(rid_prefix), finish_abort("Aborted by request"))

    def step(self) -> list[Request]:
        """One scheduler step; returns the requests that finished in it."""
        extra = self.num_draft_tokens if self.speculative else 0
        chunks = self.planner.plan(extra_slots_per_decode=extra)
        if not chunks:
            raise RuntimeError("the planner made no progress")
        if self.generator.generate(chunks) is None:  # appends each request's new tokens
            for c in chunks:  # preempted (a should_yield hook said so): nothing ran
                self.planner.take_back(c)
            return []
        done = []
        for c in chunks:
            if c.req.finished:
                self.planner.release(c.req)
                done.append(c.req)
        return done

    def run(self, reqs: list[Request]) -> list[list[int]]:
        for r in reqs:
            self.planner.add(r)
        while self.planner.has_work():
            self.step()
        return [r.output_ids for r in reqs]
