"""Drive the scheduler's generators in-process (no HTTP): many requests, fast, for statistics."""

from __future__ import annotations

import torch

from faser_sgl.executor.model_runner import ModelRunner
from faser_sgl.executor.sampler import Sampler, SamplingOptions
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.request import Request, StopConditions
from faser_sgl.managers.stop_checker import StopChecker
from faser_sgl.managers.token_generator import TargetOnlyGenerator
from faser_sgl.speculative.draft_worker import DraftWorker
from faser_sgl.speculative.policy import FixedLength
from faser_sgl.speculative.spec_generator import SpeculativeGenerator


class Params:
    """Stands in for sglang's SamplingParams (SamplingOptions reads attributes)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class Engine:
    def __init__(self, target_path: str, draft_path: str | None, k: int = 4, slots: int = 8192,
                 max_running: int = 256):
        self.runner = ModelRunner(target_path, max_total_tokens=slots)
        self.sampler = Sampler()
        self.planner = BatchPlanner(self.runner.allocator, max_running, max_step_tokens=4096)
        self.k = k
        if draft_path is None:
            self.generator = TargetOnlyGenerator(self.runner, self.sampler)
        else:
            draft = DraftWorker(draft_path, self.runner, torch.float32, "cpu", "torch")
            self.generator = SpeculativeGenerator(self.runner, draft, self.sampler, FixedLength(k),
                                                  self.runner.allocator)
        self.stop_checker = StopChecker(None)
        self.counter = 0

    def make_request(self, prompt: list[int], max_new_tokens: int, draft_len: int | None = None,
                     **sampling) -> Request:
        self.counter += 1
        opts = SamplingOptions.from_sglang(Params(**sampling), self.runner.vocab_size)
        return Request(rid=f"r{self.counter}", http_worker_ipc=None, prompt_ids=list(prompt),
                       stop=StopConditions(max_new_tokens=max_new_tokens, stop_token_ids=frozenset()),
                       sampling=opts, stream=False, requested_draft_len=draft_len)

    def run(self, reqs: list[Request]) -> list[list[int]]:
        for r in reqs:
            self.planner.add(r)
        extra = self.k if isinstance(self.generator, SpeculativeGenerator) else 0
        while self.planner.has_work():
            chunks = self.planner.plan(extra_slots_per_decode=extra)
            assert chunks, "planner made no progress"
            new = self.generator.generate(chunks)
            for c in chunks:
                if c.req in new:
                    self.stop_checker.append(c.req, new[c.req])
                if c.req.finished:
                    self.planner.release(c.req)
        assert self.runner.allocator.num_used == 0, "KV slots leaked"
        return [r.output_ids for r in reqs]
