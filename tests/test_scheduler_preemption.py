"""A request that arrives while the scheduler is drafting goes first: the scheduler, driven over
real ZMQ sockets, abandons the draft passes, prefills the newcomer in the next step beside plain
decodes, and every output stays the target's own greedy text with every slot freed."""

from __future__ import annotations

import time
import types

import pytest
import zmq

from spec_harness import Engine

RUNNING_PROMPT = list(range(40, 70))  # within one catch-up pass (32 tokens at least)
NEWCOMER_PROMPT = [5, 17, 33, 8]


class _ServerArgs(types.SimpleNamespace):
    """The ServerArgs fields the scheduler reads; any other one is unset (None)."""

    def __getattr__(self, name):
        return None


def _generate_msg(rid: str, prompt: list[int], max_new_tokens: int):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    return TokenizedGenerateReqInput(
        rid=rid, input_text="", input_ids=prompt, input_embeds=None, mm_inputs=None,
        token_type_ids=None, sampling_params=params, return_logprob=False, logprob_start_len=-1,
        top_logprobs_num=0, token_ids_logprob=None, stream=False)


@pytest.fixture
def wired_scheduler(tiny_model_path, partial_draft_path, tmp_path):
    """(scheduler, push socket into it, pull socket of its detokenizer output)."""
    from sglang.srt.managers import io_struct

    from faser_sgl.managers.ipc import SchedulerSockets
    from faser_sgl.managers.scheduler import Scheduler
    from faser_sgl.options import FaserOptions

    names = {n: f"ipc://{tmp_path}/{n}" for n in
             ("scheduler_input_ipc_name", "detokenizer_ipc_name", "tokenizer_ipc_name", "rpc_ipc_name")}
    context = zmq.Context()
    to_scheduler = context.socket(zmq.PUSH)
    to_scheduler.bind(names["scheduler_input_ipc_name"])
    from_scheduler = context.socket(zmq.PULL)
    from_scheduler.bind(names["detokenizer_ipc_name"])
    for name, kind in (("tokenizer_ipc_name", zmq.PULL), ("rpc_ipc_name", zmq.DEALER)):
        context.socket(kind).bind(names[name])
    for sock in (to_scheduler, from_scheduler):
        sock.setsockopt(zmq.LINGER, 0)
    sockets = SchedulerSockets(types.SimpleNamespace(**names))
    options = FaserOptions(speculative_policy="fixed", speculative_draft_model_path=partial_draft_path,
                           speculative_num_draft_tokens=3, dtype="float32", default_kv_slots=2048)
    try:
        scheduler = Scheduler(_ServerArgs(model_path=tiny_model_path, skip_tokenizer_init=True, random_seed=0),
                              None, options, sockets=sockets)
    except BaseException:
        # A context left to the garbage collector with open sockets blocks in its destructor
        # and would hang the whole test run; close everything before failing.
        sockets.close()
        context.destroy(linger=0)
        raise
    send = lambda msg: io_struct.sock_send(to_scheduler, msg)  # noqa: E731
    yield scheduler, send, from_scheduler
    sockets.close()
    context.destroy(linger=0)


def _wait_readable(sock, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not sock.poll(10):
        assert time.monotonic() < deadline, "the message never reached the scheduler's socket"


def test_a_newcomer_preempts_the_draft_passes(wired_scheduler, tiny_model_path):
    scheduler, send, from_scheduler = wired_scheduler
    send(_generate_msg("running", RUNNING_PROMPT, 24))
    _wait_readable(scheduler.sockets.from_tokenizer)
    scheduler.receive_messages(0)
    scheduler.step()  # the prefill
    scheduler.step()  # a speculative step
    running = scheduler.planner.running[0]
    assert scheduler.generator.num_verify_steps == 1

    # The newcomer arrives while the next step's first draft pass runs.
    draft_forward = scheduler.generator.draft.forward
    passes = []

    def forward_and_send(feeds, slots):
        passes.append(len(feeds))
        if len(passes) == 1:
            send(_generate_msg("newcomer", NEWCOMER_PROMPT, 6))
            _wait_readable(scheduler.sockets.from_tokenizer)
        return draft_forward(feeds, slots)

    scheduler.generator.draft.forward = forward_and_send
    tokens_before, free_before = len(running.output_ids), scheduler.allocator.num_free
    scheduler.step()
    assert len(passes) == 1, "the draft phase went on after the newcomer arrived"
    assert scheduler.generator.num_preempted_steps == 1
    assert scheduler.internal_state()["spec_preempted_steps"] == 1
    assert len(running.output_ids) == tokens_before and scheduler.allocator.num_free == free_before
    assert not scheduler.planner.waiting  # read, set aside, not yet handled

    scheduler.receive_messages(0)
    scheduler.step()  # the newcomer's prefill, beside the running request's plain decode
    newcomer = next(r for r in scheduler.planner.running if r.rid == "newcomer")
    assert len(newcomer.output_ids) == 1 and len(running.output_ids) == tokens_before + 1
    assert len(passes) == 1  # no draft pass in a step that carries a prefill

    while scheduler.planner.has_work():
        scheduler.receive_messages(0)
        scheduler.step()
    # Nothing held by a request; what the prefix cache keeps it gives up on demand.
    assert scheduler.allocator.num_available == scheduler.allocator.num_total
    assert scheduler.generator.num_preempted_steps == 1  # a plain arrival-free run: no more

    reference = Engine(tiny_model_path, None)
    expected = reference.run([reference.make_request(p, n, temperature=0)
                              for p, n in ((RUNNING_PROMPT, 24), (NEWCOMER_PROMPT, 6))])
    assert [running.output_ids, newcomer.output_ids] == expected
    outputs = []
    while from_scheduler.poll(100):
        outputs.append(from_scheduler.recv())
    assert outputs, "the scheduler sent nothing to the detokenizer"


def test_a_newcomer_that_cannot_start_does_not_preempt(wired_scheduler):
    """A request the next plan would not admit (here: one waits already) must not cost the
    running requests their drafts."""
    scheduler, send, _ = wired_scheduler
    send(_generate_msg("running", RUNNING_PROMPT, 12))
    _wait_readable(scheduler.sockets.from_tokenizer)
    scheduler.receive_messages(0)
    scheduler.step()
    scheduler.planner.max_running_requests = 1  # the next request has to wait
    send(_generate_msg("queued", NEWCOMER_PROMPT, 2))
    _wait_readable(scheduler.sockets.from_tokenizer)
    scheduler.step()
    assert scheduler.generator.num_preempted_steps == 0
    assert scheduler.generator.num_verify_steps == 1
    scheduler.receive_messages(0)
    assert [r.rid for r in scheduler.planner.waiting] == ["queued"]
