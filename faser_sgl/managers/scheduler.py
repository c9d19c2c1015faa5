"""faser_sgl's scheduler process: SGLang's replacement scheduler manager.

SGLang's launcher spawns ``run_scheduler_process`` (see faser_sgl.launch_server).  It loads our
executor, answers the startup handshake over the pipe, then loops: receive io_struct messages,
plan a continuous batch, run one forward pass, send new token ids to the detokenizer.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
import traceback
from http import HTTPStatus

import psutil
import setproctitle
import torch

from faser_sgl.executor.device import indexed_device, is_cuda
from faser_sgl.managers import faults, server_state
from faser_sgl.managers.batch_planner import BatchPlanner
from faser_sgl.managers.batch_log import BatchLog
from faser_sgl.managers.control import ControlHandler
from faser_sgl.managers.decode_reservation import test_retract_interval
from faser_sgl.managers.grammar import GrammarBackend
from faser_sgl.managers.output_builder import build_output, should_send
from faser_sgl.managers.progress_watchdog import ProgressWatchdog, act_on_stall
from faser_sgl.managers.request import Request, StopConditions, finish_abort, finish_length
from faser_sgl.managers.heap_trim import HeapTrimmer
from faser_sgl.managers.request_builder import BadRequest, build_request
from faser_sgl.managers.stop_checker import StopChecker
from faser_sgl.managers.step_budget import step_token_budget
from faser_sgl.managers.token_generator import TargetOnlyGenerator
from faser_sgl.options import FaserOptions
from faser_sgl.speculative.policy import make_policy

logger = logging.getLogger("faser_sgl.scheduler")

IDLE_POLL_MS = 200
# A busy scheduler whose last step completed this recently answers health checks at once.
HEALTHY_PROGRESS_S = 5.0


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        if is_cuda(device):
            return torch.bfloat16
        from faser_sgl.executor.cpu_dtype import resolve_auto_cpu_dtype

        return resolve_auto_cpu_dtype()  # bf16 where this CPU has it natively and it measures faster
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def scheduler_device(attention_backend: str, gpu_id: int | None = None, current_index=None) -> str:
    """The one device the scheduler's models run on: "cpu", or "cuda:N" for the FlashInfer
    backend, N being the launcher's GPU id (the current CUDA device when there is none, as for
    the in-process test scheduler).  Always indexed (executor/device.py says why)."""
    if attention_backend != "flashinfer":
        return "cpu"
    return str(indexed_device("cuda", gpu_id, current_index))


class Scheduler:
    def __init__(self, server_args, port_args, options: FaserOptions, sockets=None,
                 gpu_id: int | None = None):
        from faser_sgl.executor.model_runner import ModelRunner
        from faser_sgl.executor.sampler import Sampler

        self.server_args = server_args
        self.options = options
        self.device = scheduler_device(options.attention_backend, gpu_id)
        if is_cuda(self.device):
            # Work that names no device (Triton launches, new streams) goes to ours too.
            torch.cuda.set_device(self.device)
        dtype_name = options.dtype if options.dtype != "auto" or server_args.dtype in (None, "auto") \
            else server_args.dtype
        self.dtype = resolve_dtype(dtype_name, self.device)
        if options.num_threads > 0:
            torch.set_num_threads(options.num_threads)
        seed = server_args.random_seed if server_args.random_seed is not None else 0
        torch.manual_seed(seed)

        # The draft's weights are loaded first, so that when the pool is sized from memory the
        # target's runner budgets both KV pools (same slot count) from what both models left.
        draft_runner = None
        if options.speculative_policy != "none":
            from faser_sgl.speculative.draft_worker import DraftWorker

            draft_runner = DraftWorker.load(options.speculative_draft_model_path, self.dtype,
                                            self.device, options.attention_backend,
                                            cpu_linear=options.cpu_linear,
                                            share_weights_mmap=options.share_weights_mmap)
        self.runner = ModelRunner(
            server_args.model_path,
            dtype=self.dtype,
            device=self.device,
            attention_backend=options.attention_backend,
            cpu_linear=options.cpu_linear,
            share_weights_mmap=options.share_weights_mmap,
            # Without --max-total-tokens: --mem-fraction-static as in SGLang (weights + pools
            # take that share of the device's memory, a CPU's RAM included); else on a GPU as
            # many slots as 80% of the memory left after both models' weights holds (one budget
            # for both KV pools, model_runner.DEFAULT_MEM_FRACTION), on a CPU a fixed pool,
            # since RAM is not what limits how many requests a CPU serves.
            max_total_tokens=server_args.max_total_tokens or (
                None if is_cuda(self.device) or options.mem_fraction_static is not None
                else options.default_kv_slots),
            mem_fraction_static=options.mem_fraction_static,
            draft=draft_runner,
        )
        config = self.runner.config
        self.vocab_size = config.vocab_size
        self.context_len = server_args.context_length or config.max_position_embeddings
        self.eos_token_ids = set(config.eos_token_ids)
        self.tokenizer = None
        if not server_args.skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                server_args.tokenizer_path or server_args.model_path,
                trust_remote_code=server_args.trust_remote_code,
            )
            if self.tokenizer.eos_token_id is not None:
                self.eos_token_ids.add(self.tokenizer.eos_token_id)

        self._grammar_backend = None  # built on the first constrained request (grammar_backend)
        self.allocator = self.runner.allocator
        self.pool_size = self.allocator.num_total
        self.max_running_requests = server_args.max_running_requests or 64
        # SGLang's radix prefix cache, on unless --disable-radix-cache (managers/prefix_cache.py).
        self.prefix_cache = None
        if not getattr(server_args, "disable_radix_cache", False):
            from faser_sgl.managers.prefix_cache import PrefixCache

            self.prefix_cache = PrefixCache(self.allocator)
        self.planner = BatchPlanner(
            self.allocator,
            max_running_requests=self.max_running_requests,
            max_step_tokens=step_token_budget(server_args.chunked_prefill_size, options.max_step_tokens,
                                              self.context_len, server_args.max_prefill_tokens,
                                              self.max_running_requests),
            prefix_cache=self.prefix_cache,
            schedule_policy=server_args.schedule_policy or "fcfs",
            conservativeness=server_args.schedule_conservativeness
            if server_args.schedule_conservativeness is not None else 1.0,
            test_retract_interval=test_retract_interval(),
            prefill_max_requests=getattr(server_args, "prefill_max_requests", None),
        )
        self.sampler = Sampler()
        self.heap_trimmer = HeapTrimmer(enabled=os.environ.get("FASER_HEAP_TRIM", "1") != "0")
        self.batch_log = BatchLog(getattr(server_args, "decode_log_interval", None) or 40)
        self.stop_checker = StopChecker(self.tokenizer)
        self.policy = make_policy(options.speculative_policy, options.speculative_num_draft_tokens,
                                  options.speculative_cost_profile, options.batch_table,
                                  options.batch_ema_config)
        self.speculative = options.speculative_policy != "none"
        if self.speculative:
            from faser_sgl.speculative.early_exit import make_early_exit
            from faser_sgl.speculative.frontier import make_generator

            draft = DraftWorker(draft_runner, self.runner)
            early_exit = make_early_exit(self.runner, options.exit_layers, options.exit_threshold,
                                         options.exit_candidates, options.exit_diagnostic,
                                         options.exit_draft_prob, cost_model=self.policy) \
                if options.early_exit_on else None
            self.generator = make_generator(self.runner, draft, self.sampler, self.policy, self.allocator,
                                            self.stop_checker, self.planner.max_step_tokens, early_exit,
                                            options.frontier_size_value, options.pipeline_split)
            seconds = self.generator.calibrate()
            if seconds:
                logger.info("timed target and draft passes for the %s policy's cost model in %.1fs",
                            self.policy.name, seconds)
        else:
            self.generator = TargetOnlyGenerator(self.runner, self.sampler, self.stop_checker)
        self.stream_interval = max(1, server_args.stream_interval or 1)
        self.metrics = None
        if server_args.enable_metrics:
            from faser_sgl.managers.metrics import SchedulerMetrics

            name = server_args.served_model_name or server_args.model_path
            self.metrics = SchedulerMetrics({"model_name": str(name)})
            if self.speculative:
                self.generator.on_verify = self.metrics.observe_verification
                self.generator.on_draft_lengths = self.metrics.observe_draft_lengths
                self.generator.on_early_exit = self.metrics.early_exited_tokens.inc
        self._last_retractions = 0
        self._last_hit_tokens = 0
        self.sockets = sockets
        self._inbox: list[tuple[object, bool]] = []  # read during a step, handled after it
        self._preempted_last_step = False
        self._last_progress = time.monotonic()  # when a step last completed
        self.watchdog = ProgressWatchdog(options.progress_timeout)
        if self.speculative and sockets is not None:
            self.generator.should_yield = self.newcomer_can_start
        self.control = ControlHandler(self)
        # SGLang's /v1/loads (and a router's load balancing) read what this publishes.
        self.load_publisher = server_state.LoadPublisher(port_args) \
            if sockets is not None and getattr(port_args, "instance_id", None) else None
        self.faults = None
        if faults.enabled():  # tests only (managers/faults.py)
            self.faults = faults.FaultInjector()
            self.faults.wrap(self.runner, faults.TARGET_PREFIX)
            self.faults.wrap_planner(self.planner)
            if self.speculative:
                self.faults.wrap(self.generator.draft, faults.DRAFT_PREFIX)
                if self.generator.early_exit is not None:
                    self.faults.wrap(self.generator.early_exit, faults.TARGET_PREFIX)
        self.step_recorder = None
        if options.record_steps:
            from faser_sgl.managers.step_recorder import StepRecorder

            self.step_recorder = StepRecorder(options.record_steps)
            self.generator.on_pass = self.step_recorder.on_pass
        if self.speculative and (self.metrics is not None or self.step_recorder is not None):
            self.generator.predict_steps = True  # the step's predicted time, beside the measured
        self.gracefully_exit = False
        self.stats = {"num_generated_tokens": 0, "num_finished_requests": 0, "num_forward_steps": 0,
                      "num_aborted_requests": 0, "num_failed_requests": 0}
        self._throughput_window = (time.monotonic(), 0)
        self.last_gen_throughput = 0.0

    @property
    def grammar_backend(self):
        """xgrammar over the tokenizer's vocabulary, built when first needed (it indexes the
        whole vocabulary once); None without a tokenizer."""
        if self._grammar_backend is None and self.tokenizer is not None:
            self._grammar_backend = GrammarBackend(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        return self._grammar_backend

    # -- handshake ---------------------------------------------------------------------------
    @property
    def max_req_input_len(self) -> int:
        # A prompt must leave room for one output token in both the context and the pool.
        return min(self.context_len, self.pool_size) - 1

    def init_info(self, startup_time: dict) -> dict:
        return {
            "status": "ready",
            "max_total_num_tokens": self.pool_size,
            "max_req_input_len": self.max_req_input_len,
            "startup_time": startup_time,
        }

    # -- event loop --------------------------------------------------------------------------
    def run_forever(self, parent_pid: int) -> None:
        while not self.gracefully_exit:
            had_work = self.planner.has_work()
            busy = had_work or (self.faults is not None and self.faults.holding)
            self.receive_messages(0 if busy else IDLE_POLL_MS)
            if not had_work:
                self.watchdog.idle()  # whatever work there is arrived just now: no wait yet
            if self.faults is not None:
                for message in self.faults.due():
                    self.sockets.send_detokenizer(message)
            if self.planner.has_work():
                self.step()
                self._check_progress()
                self.heap_trimmer.after_step()
            else:
                self.heap_trimmer.on_idle()
            if self.load_publisher is not None:
                self.load_publisher.maybe_publish(self, self.planner.has_work())
            if not self.planner.has_work() and not psutil.pid_exists(parent_pid):
                logger.info("parent process is gone; scheduler exits")
                return

    def _check_progress(self) -> None:
        """Work waited past the watchdog's deadline with no step run: progress_watchdog.py."""
        extra = self.options.speculative_num_draft_tokens if self.speculative else 0
        doomed = act_on_stall(self.watchdog, self.planner, extra)  # raises if none can be answered
        if doomed:
            self.stats["num_failed_requests"] += len(doomed)
            self.send_outputs(doomed)

    def receive_messages(self, timeout_ms: int) -> None:
        """Handle what a preempted step set aside, then what the sockets hold (waiting up to
        timeout_ms for the first message when nothing was set aside)."""
        inbox, self._inbox = self._inbox, []
        for msg, from_rpc in inbox + self.sockets.receive(0 if inbox else timeout_ms):
            self.handle_message(msg, from_rpc)

    def newcomer_can_start(self) -> bool:
        """The speculative generator's yield check between draft passes: has a request arrived
        that the next plan would admit?  Messages read here are set aside, handled after the
        step.  The step after a preempted one is never preempted (it cannot starve)."""
        if self._preempted_last_step:
            return False
        received = self.sockets.receive(0)
        if not received:
            return False
        self._inbox.extend(received)
        from sglang.srt.managers import io_struct

        extra = self.options.speculative_num_draft_tokens
        for msg, _ in received:
            items = msg.batch if isinstance(msg, io_struct.BatchTokenizedGenerateReqInput) else [msg]
            for item in items:
                max_new = getattr(getattr(item, "sampling_params", None), "max_new_tokens", None) or 0
                if isinstance(item, io_struct.TokenizedGenerateReqInput) and \
                        self.planner.would_admit(len(item.input_ids or ()), extra, max_new):
                    return True
        return False

    def handle_message(self, msg, from_rpc: bool = False) -> None:
        from sglang.srt.managers import io_struct

        if isinstance(msg, io_struct.BatchTokenizedGenerateReqInput):
            for item in msg.batch:
                self.add_request(item)
        elif isinstance(msg, io_struct.TokenizedGenerateReqInput):
            self.add_request(msg)
        elif isinstance(msg, io_struct.AbortReq):
            self.abort(msg)
        else:
            reply = self.control.handle(msg)
            if reply is not None:
                (self.sockets.send_rpc if from_rpc else self.sockets.send_tokenizer)(reply)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, msg) -> None:
        try:
            req = self.make_request(msg)
        except BadRequest as err:
            self.reject(msg, str(err))
            return
        except Exception as err:  # invalid sampling values and the like
            self.reject(msg, f"invalid request: {err}")
            return
        if req.stop.max_new_tokens == 0 and req.logprobs is None and self.prefix_cache is None:
            # Prefix-only requests (n>1 fan-out, frontend prefill) with nothing to compute:
            # no input logprobs asked, no cache to warm.
            req.finished_reason = finish_length(0)
            self.send_outputs([req])
            return
        if req.is_health_check and self.planner.has_work() \
                and time.monotonic() - self._last_progress < HEALTHY_PROGRESS_S:
            # Busy and making progress is healthy (SGLang's rule too): answer at once rather
            # than queue one probe per poll behind the work.
            req.finished_reason = finish_length(0)
            self.send_outputs([req])
            return
        if getattr(msg, "priority", None) is not None \
                and getattr(self.server_args, "abort_on_priority_when_disabled", False):
            # SGLang's answer when priority scheduling is off (it is never on here).
            self.reject(msg, "Using priority is disabled for this server. Please send a new request "
                             "without a priority.", HTTPStatus.SERVICE_UNAVAILABLE)
            return
        limit = self.server_args.max_queued_requests
        if limit is not None and len(self.planner.waiting) + 1 > limit and not req.is_health_check:
            # SGLang's --max-queued-requests: shed load at the door rather than queue without end.
            self.reject(msg, "The request queue is full.", HTTPStatus.SERVICE_UNAVAILABLE)
            return
        self.planner.add(req)

    def make_request(self, msg) -> Request:
        return build_request(self, msg)

    def reject(self, msg, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        """Answer a request that never entered the queue with an HTTP error (400 by default)."""
        logger.info("rejecting request %s: %s", msg.rid, message)
        req = Request(
            rid=msg.rid,
            http_worker_ipc=msg.http_worker_ipc,
            prompt_ids=[int(t) for t in (msg.input_ids or [])],
            stop=StopConditions(max_new_tokens=0, stop_token_ids=frozenset()),
            sampling=None,
            stream=bool(getattr(msg, "stream", False)),
        )
        req.finished_reason = finish_abort(message, status)
        self.send_outputs([req])

    def abort(self, msg) -> None:
        """AbortReq: by rid prefix (SGLang's rule) or all; frees everything the requests hold."""
        victims = self.planner.abort(
            lambda r: msg.abort_all or r.rid.startswith(msg.rid),
            msg.finished_reason or finish_abort(msg.abort_message or "Aborted by request"))
        self.stats["num_aborted_requests"] += len(victims)
        if victims:
            self.send_outputs(victims)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        chunks = self.planner.plan(extra_slots_per_decode=self.options.speculative_num_draft_tokens
                                   if self.speculative else 0)
        if not chunks:
            return
        if self.faults is not None:
            self.faults.arm(c.req.rid for c in chunks)
        if self.step_recorder is not None:
            self.step_recorder.begin()
        started = time.perf_counter()
        try:
            new_tokens = self.generator.generate(chunks)
            self._preempted_last_step = new_tokens is None
            if new_tokens is None:
                # A newcomer arrived during the draft passes: its prefill goes first, in the next
                # plan; this step's decodes are planned again beside it.
                for chunk in chunks:
                    self.planner.take_back(chunk)
                if self.step_recorder is not None:
                    self.step_recorder.end(chunks, 0, True, True)
                return
        except Exception:
            logger.error("forward pass failed:\n%s", traceback.format_exc())
            self._recover_from_failed_step([c.req for c in chunks])
            self.watchdog.progressed()  # a failed pass is handled, not a stall
            return
        self.stats["num_forward_steps"] += 1
        self._last_progress = time.monotonic()
        self.watchdog.progressed(time.perf_counter() - started)
        verify_before = getattr(self.generator, "num_verify_steps", 0)
        generated_before = self.stats["num_generated_tokens"]
        finished_before = self.stats["num_finished_requests"]
        to_send = []
        for chunk in chunks:
            req = chunk.req
            if req.suspect and chunk.needs_logits and len(chunk.tokens) == 1:
                # Recomputed alone and through a decode step (with its drafts, where it drafts):
                # not the faulty one.
                req.suspect = False
            # The generator appended them already, up to the request's stop condition.
            self.stats["num_generated_tokens"] += len(new_tokens.get(req, ()))
            if req.finished:
                self.planner.release(req)
                self.stats["num_finished_requests"] += 1
                if req.spec_steps is not None:
                    server_state.record_acceptance(self.options.record_acceptance, req)
            if should_send(req, self.stream_interval, self.options.non_stream_flush_interval):
                to_send.append(req)
        if to_send:
            self.send_outputs(to_send)
        self._update_throughput()
        self.batch_log.after_step(
            chunks, running=len(self.planner.running), waiting=len(self.planner.waiting),
            used_slots=self.pool_size - self.allocator.num_available, total_slots=self.pool_size,
            generated=self.stats["num_generated_tokens"] - generated_before, generator=self.generator)
        # The cost model's prediction of the step it chose, beside the measured time.
        prediction = getattr(self.generator, "last_prediction", None)
        observe_step = getattr(self.generator, "observe_step", None)
        if observe_step is not None:  # the step's overhead outside its passes, for the cost model
            observe_step(len(chunks), time.perf_counter() - started)
        if self.metrics is not None:
            self._observe_step(chunks, verify_before, generated_before, finished_before)
            if prediction is not None:
                self.metrics.observe_prediction(time.perf_counter() - started, prediction[0])
        if self.step_recorder is not None:
            self.step_recorder.end(chunks, self.stats["num_generated_tokens"] - generated_before,
                                   False, self.planner.has_work(), prediction,
                                   getattr(self.generator, "last_choice", None))

    def _recover_from_failed_step(self, involved: list[Request]) -> None:
        """A failed pass must not take the server down, nor fail requests that merely shared
        its batch.  The pass's KV is not trusted, so every request in it gives its KV up.  A
        request that was alone in the pass is failed; the others become suspects, recomputed
        from prompt + output each in a batch of its own (BatchPlanner) until it has also come
        through a decode step, so that a failure then names it and a success clears it.  (Failing a suspect whenever it met a second failed
        pass, as before, failed bystanders as soon as two faulty requests overlapped: a soak
        with injected faults lost 7 bystanders in 45 s.)"""
        doomed = [r for r in involved if len(involved) == 1]
        retried = [r for r in involved if r not in doomed]
        for req in doomed:
            self.planner.release(req, keep_kv=False)
            req.finished_reason = finish_abort("internal error in the forward pass",
                                               HTTPStatus.INTERNAL_SERVER_ERROR)
            self.stats["num_failed_requests"] += 1
        for req in reversed(retried):  # back to the queue's head in their order
            if req.grammar is not None:
                req.grammar.rollback()  # drafts the failed step advanced over
            self.planner.requeue_suspect(req)
        if retried:
            logger.warning("retrying %d request(s) of the failed batch one suspect at a time; "
                           "failed %d", len(retried), len(doomed))
        if doomed:
            self.send_outputs(doomed)

    def _observe_step(self, chunks, verify_before, generated_before, finished_before) -> None:
        m = self.metrics
        m.observe_step(
            running=len(self.planner.running), waiting=len(self.planner.waiting),
            used_slots=self.pool_size - self.allocator.num_available, total_slots=self.pool_size,
            step_tokens=sum(len(c.tokens) for c in chunks),
            new_tokens=self.stats["num_generated_tokens"] - generated_before,
            finished=self.stats["num_finished_requests"] - finished_before)
        if self.prefix_cache is not None:
            m.observe_cache(self.prefix_cache, self._last_hit_tokens)
            self._last_hit_tokens = self.prefix_cache.num_hit_tokens
        if self.planner.num_retractions > self._last_retractions:
            m.retractions.inc(self.planner.num_retractions - self._last_retractions)
            self._last_retractions = self.planner.num_retractions
        if self.speculative:
            # Draft-then-verify: one frontier per step in which anything was verified.
            m.frontiers.observe(getattr(self.generator, "last_frontiers", 1)
                                if self.generator.num_verify_steps > verify_before else 0)

    def send_outputs(self, reqs: list[Request]) -> None:
        if self.faults is not None:
            reqs, stalled = self.faults.split_stalled(reqs)
            for req in stalled:
                self.faults.hold(req.rid, build_output([req], speculative=self.speculative))
            if not reqs:
                return
        self.sockets.send_detokenizer(build_output(reqs, speculative=self.speculative))

    def _update_throughput(self) -> None:
        start, tokens_then = self._throughput_window
        now = time.monotonic()
        if now - start >= 5.0:
            self.last_gen_throughput = (self.stats["num_generated_tokens"] - tokens_then) / (now - start)
            self._throughput_window = (now, self.stats["num_generated_tokens"])

    def flush_cache(self) -> bool:
        """/flush_cache: drop the prefix cache's KV (SGLang's rule: only while no request is
        running or waiting)."""
        if self.planner.has_work():
            return False
        return self.prefix_cache.flush() if self.prefix_cache is not None else True

    def internal_state(self) -> dict:
        return server_state.internal_state(self)

def run_scheduler_process(server_args, port_args, gpu_id, tp_rank, pp_rank, dp_rank, pipe_writer,
                          *args, **kwargs):
    """The process entry SGLang's launcher calls (its run_scheduler_process_func hook)."""
    from faser_sgl.managers.ipc import SchedulerSockets

    logging.basicConfig(level=getattr(logging, str(server_args.log_level or "info").upper(), logging.INFO),
                        format="[%(asctime)s faser_sgl] %(message)s")
    parent_pid = os.getppid()
    # A name in ps/top and for supervisors and the soak harness (SGLang names its own
    # processes "sglang::<role>" the same way).
    setproctitle.setproctitle("faser_sgl::scheduler")
    scheduler = None
    try:
        t0 = time.perf_counter()
        options = FaserOptions.from_env()
        sockets = SchedulerSockets(port_args)
        scheduler = Scheduler(server_args, port_args, options, sockets=sockets, gpu_id=gpu_id)
        pipe_writer.send(scheduler.init_info({"scheduler_init": time.perf_counter() - t0}))
        scheduler.run_forever(parent_pid)
    except Exception:
        msg = traceback.format_exc()
        logger.error("scheduler failed:\n%s", msg)
        if scheduler is None:
            # Still in start-up: tell the launcher, which aborts with our message in the log.
            try:
                pipe_writer.send({"status": "error", "error": msg})
            except Exception:
                pass
        else:
            os.kill(parent_pid, signal.SIGQUIT)
    finally:
        gc.collect()
