"""The soak's traffic: one function per request category, each sending one request (or a small
group of them) and classifying how it ended as an ``Outcome``.

Outcomes: ok (HTTP 200 and a finish reason), aborted (a finish reason of type "abort" or an HTTP
error that says so), disconnected (we closed the stream on purpose), error-4xx, error-5xx,
timeout (no answer within the client timeout: a hung request), plus connection-error (the
server dropped the connection), incomplete (200 but no finish reason / no ``[DONE]``) and, for
invalid requests, accepted (a 2xx for a request that should have been refused).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import requests

OK, ABORTED, DISCONNECTED = "ok", "aborted", "disconnected"
ERROR_4XX, ERROR_5XX, TIMEOUT = "error-4xx", "error-5xx", "timeout"
CONNECTION_ERROR, INCOMPLETE, ACCEPTED = "connection-error", "incomplete", "accepted"
HARNESS_ERROR = "harness-error"

# Varied enough that the prefix cache sees both repeats and misses (a random tag is appended
# to half of them).
TEXT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a Python function that checks whether a number is prime.",
    "Explain what a mutex is in two sentences.",
    "Once upon a time there was a small robot who wanted to paint the sea.",
    "def quicksort(xs):",
    "Translate to French: the cat sleeps on the warm window sill.",
    "Summarize the idea of speculative decoding for LLM inference.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100",
]
STOP_STRINGS = ["e", " the", "\n", ".", "a", "(", " is"]


class StreamTimeout(Exception):
    """A stream that kept the connection open past the request's deadline."""


@dataclass
class ServerFacts:
    """What the traffic needs to know about the server, read once at the start."""
    model: str  # the OpenAI model id (GET /v1/models)
    model_path: str
    context_length: int
    pool_tokens: int  # max_total_num_tokens: the KV pool
    vocab_size: int
    max_running: int  # effective_max_running_requests_per_dp
    speculative_policy: str | None = None

    @property
    def max_sequence(self) -> int:
        """The longest prompt + output one request may have: the context, or the pool if smaller
        (a request the pool can never hold is refused, so it is not a valid request)."""
        return min(self.context_length, self.pool_tokens)


@dataclass
class Outcome:
    category: str
    outcome: str
    latency: float | None = None
    status: int | None = None
    problem: str | None = None  # set when this outcome breaks an invariant
    injected: bool = False  # a 5xx tolerated by --allow-5xx-from
    features: tuple[str, ...] = ()
    case_name: str | None = None  # the fuzz case, for invalid requests


class HttpClient:
    """requests with the API key on every call and one Session per thread (a Session is not
    meant to be shared between threads)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._local = threading.local()

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def get(self, path: str, timeout: float | None = None) -> requests.Response:
        return self._session().get(self.base_url + path, headers=self.auth_headers,
                                   timeout=timeout or self.timeout)

    def get_json(self, path: str, timeout: float | None = None) -> dict:
        response = self.get(path, timeout)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict, *, stream: bool = False, timeout: float | None = None,
             fresh_connection: bool = False) -> requests.Response:
        # A fresh connection for streams we mean to drop: closing it must reach the server as a
        # disconnect, not go back into the pool.
        send = requests.post if fresh_connection else self._session().post
        return send(self.base_url + path, json=body, headers=self.auth_headers, stream=stream,
                    timeout=timeout or self.timeout)

    def internal_state(self) -> dict:
        return self.get_json("/get_server_info", timeout=30)["internal_states"][0]


def sse_events(response: requests.Response, deadline: float) -> Iterator[dict | str]:
    """The ``data:`` payloads of a server-sent-event stream (dicts, and the final "[DONE]")."""
    for line in response.iter_lines(decode_unicode=True):
        if time.monotonic() > deadline:
            raise StreamTimeout()
        if not line or not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        yield "[DONE]" if data == "[DONE]" else json.loads(data)


def generate_finish_reasons(body) -> list:
    """/generate answers a dict, or a list of them for n > 1 or a batch."""
    items = body if isinstance(body, list) else [body]
    return [(item.get("meta_info") or {}).get("finish_reason") for item in items]


def openai_finish_reasons(body: dict) -> list:
    return [choice.get("finish_reason") for choice in body.get("choices") or []]


def _reason_type(reason) -> str | None:
    """A /generate finish reason is a dict with a "type"; an OpenAI one is a string."""
    return reason.get("type") if isinstance(reason, dict) else reason


def _error_message(text: str) -> str:
    return " ".join(text.split())[:300]


class Traffic:
    """Builds, sends and classifies the requests of every category."""

    def __init__(self, client: HttpClient, facts: ServerFacts, *, allow_5xx_from: frozenset[str],
                 rid_prefix: str | None = None, fuzz=None):
        self.client = client
        self.facts = facts
        self.allow_5xx_from = allow_5xx_from
        self.rid_prefix = rid_prefix or f"soak-{uuid.uuid4().hex[:8]}"
        self._rid_counter = itertools.count()
        self.fuzz = fuzz  # the faser_sgl.bench.fuzz module, or None when it cannot be imported
        self.categories: dict[str, Callable[[random.Random], Outcome]] = {
            "generate": lambda rng: self.generate(rng, stream=False),
            "generate_stream": lambda rng: self.generate(rng, stream=True),
            "chat": lambda rng: self.openai(rng, chat=True, stream=False),
            "chat_stream": lambda rng: self.openai(rng, chat=True, stream=True),
            "completion": lambda rng: self.openai(rng, chat=False, stream=False),
            "completion_stream": lambda rng: self.openai(rng, chat=False, stream=True),
            "disconnect": self.disconnect,
            "abort": self.abort,
            "n_sampling": self.n_sampling,
            "stop_strings": self.stop_strings,
            "context_limit": self.context_limit,
            "invalid": self.invalid,
            "burst": self.burst_request,  # sent by the burst thread, not drawn by the workers
            "fault": self.fault,  # only with --inject-faults (the server must allow injection)
        }

    def run(self, category: str, rng: random.Random) -> Outcome:
        try:
            return self.categories[category](rng)
        except Exception as exc:  # a bug of the harness must show, not kill its worker
            return Outcome(category, HARNESS_ERROR, problem=f"{category}: harness error {exc!r}")

    def new_rid(self, tag: str) -> str:
        return f"{self.rid_prefix}-{tag}-{next(self._rid_counter)}"

    # ---- prompts and sampling parameters ----

    def _ids_prompt(self, rng: random.Random, length: int) -> list[int]:
        # Id 0 and the first few ids are special tokens in most vocabularies; any other id is fair.
        low = 3 if self.facts.vocab_size > 16 else 0
        return [rng.randrange(low, self.facts.vocab_size) for _ in range(length)]

    def _text_prompt(self, rng: random.Random) -> str:
        prompt = rng.choice(TEXT_PROMPTS)
        return f"{prompt} [{rng.randrange(10_000)}]" if rng.random() < 0.5 else prompt

    def _prompt(self, rng: random.Random) -> tuple[dict, str]:
        """A /generate prompt field: text, or input_ids (4..64 tokens)."""
        if rng.random() < 0.5:
            return {"text": self._text_prompt(rng)}, "text_prompt"
        length = min(rng.randint(4, 64), self.facts.max_sequence // 2)
        return {"input_ids": self._ids_prompt(rng, length)}, "ids_prompt"

    @staticmethod
    def _sampling(rng: random.Random, openai: bool = False) -> tuple[dict, str]:
        if rng.random() < 0.5:
            return {"temperature": 0.0}, "greedy"
        seed_key = "seed" if openai else "sampling_seed"
        return {"temperature": 0.7, seed_key: rng.randrange(2 ** 31)}, "sampled"

    def _max_new_tokens(self, rng: random.Random, high: int = 48) -> int:
        return rng.randint(4, max(4, min(high, self.facts.max_sequence // 4)))

    # ---- classification ----

    def _error_outcome(self, category: str, path: str, status: int, text: str, start: float,
                       *, abort_expected: bool = False, features: tuple[str, ...] = ()) -> Outcome:
        """A non-200 answer to a valid request."""
        latency = time.monotonic() - start
        message = _error_message(text)
        if abort_expected and "abort" in message.lower():
            return Outcome(category, ABORTED, latency, status, features=features)
        if status >= 500:
            injected = bool({category, path, "all"} & self.allow_5xx_from)
            problem = None if injected else f"{category}: HTTP {status} from {path}: {message}"
            return Outcome(category, ERROR_5XX, latency, status, problem, injected, features)
        if abort_expected and message:
            return Outcome(category, ABORTED, latency, status, features=features)
        return Outcome(category, ERROR_4XX, latency, status,
                       f"{category}: valid request refused, HTTP {status} from {path}: {message}",
                       features=features)

    @staticmethod
    def _finish_outcome(category: str, reasons: list, start: float, *, abort_expected: bool = False,
                        expected_count: int = 1, features: tuple[str, ...] = ()) -> Outcome:
        """A 200 answer: every choice must carry a finish reason."""
        latency = time.monotonic() - start
        types = [_reason_type(r) for r in reasons]
        if len(types) != expected_count or any(t is None for t in types):
            return Outcome(category, INCOMPLETE, latency, 200,
                           f"{category}: 200 without a finish reason for every choice "
                           f"(expected {expected_count}): {reasons}", features=features)
        if "abort" in types:
            problem = None if abort_expected else f"{category}: aborted without being asked: {reasons}"
            return Outcome(category, ABORTED, latency, 200, problem, features=features)
        return Outcome(category, OK, latency, 200, features=features)

    def _exception_outcome(self, category: str, path: str, exc: Exception, start: float,
                           features: tuple[str, ...] = ()) -> Outcome:
        latency = time.monotonic() - start
        if isinstance(exc, (requests.Timeout, StreamTimeout)):
            return Outcome(category, TIMEOUT, latency, problem=(
                f"{category}: hung, no complete answer from {path} within {self.client.timeout:.0f}s"),
                features=features)
        if isinstance(exc, requests.ConnectionError):
            return Outcome(category, CONNECTION_ERROR, latency,
                           problem=f"{category}: connection error on {path}: {exc}", features=features)
        if isinstance(exc, ValueError):  # a body or an event that is not JSON
            return Outcome(category, INCOMPLETE, latency,
                           problem=f"{category}: unparsable answer from {path}: {exc}", features=features)
        raise exc

    # ---- senders ----

    def _send(self, category: str, path: str, body: dict, reasons_of, *, abort_expected=False,
              expected_count: int = 1, features: tuple[str, ...] = ()) -> Outcome:
        start = time.monotonic()
        try:
            response = self.client.post(path, body)
            if response.status_code != 200:
                return self._error_outcome(category, path, response.status_code, response.text, start,
                                           abort_expected=abort_expected, features=features)
            return self._finish_outcome(category, reasons_of(response.json()), start,
                                        abort_expected=abort_expected, expected_count=expected_count,
                                        features=features)
        except Exception as exc:
            return self._exception_outcome(category, path, exc, start, features)

    def _send_stream(self, category: str, path: str, body: dict, *, abort_expected=False,
                     features: tuple[str, ...] = ()) -> Outcome:
        """A whole stream: it must end with ``[DONE]`` after an event with a finish reason.
        /generate events carry all output ids so far, so each must extend the one before."""
        start = time.monotonic()
        deadline = start + self.client.timeout
        generate = path == "/generate"
        try:
            with self.client.post(path, body, stream=True) as response:
                if response.status_code != 200:
                    return self._error_outcome(category, path, response.status_code, response.text, start,
                                               abort_expected=abort_expected, features=features)
                reasons, previous_ids, done = [], None, False
                for event in sse_events(response, deadline):
                    if event == "[DONE]":
                        done = True
                        break
                    if "error" in event:
                        error = event["error"]
                        code = error.get("code") if isinstance(error, dict) else None
                        status = code if isinstance(code, int) else 500
                        return self._error_outcome(category, path, status, json.dumps(error), start,
                                                   abort_expected=abort_expected, features=features)
                    if generate:
                        ids = event.get("output_ids")
                        if previous_ids is not None and ids is not None and ids[:len(previous_ids)] != previous_ids:
                            return Outcome(category, INCOMPLETE, time.monotonic() - start, 200,
                                           f"{category}: stream output_ids not cumulative", features=features)
                        previous_ids = ids if ids is not None else previous_ids
                        reasons = generate_finish_reasons(event)
                    else:
                        reasons += [r for r in openai_finish_reasons(event) if r is not None]
                if not done:
                    return Outcome(category, INCOMPLETE, time.monotonic() - start, 200,
                                   f"{category}: stream from {path} ended without [DONE]", features=features)
                return self._finish_outcome(category, reasons[-1:], start, abort_expected=abort_expected,
                                            features=features)
        except Exception as exc:
            return self._exception_outcome(category, path, exc, start, features)

    # ---- categories ----

    def generate(self, rng: random.Random, *, stream: bool) -> Outcome:
        prompt, prompt_kind = self._prompt(rng)
        sampling, sampling_kind = self._sampling(rng)
        body = {**prompt, "stream": stream,
                "sampling_params": {"max_new_tokens": self._max_new_tokens(rng), **sampling}}
        category = "generate_stream" if stream else "generate"
        features = (prompt_kind, sampling_kind)
        if stream:
            return self._send_stream(category, "/generate", body, features=features)
        return self._send(category, "/generate", body, generate_finish_reasons, features=features)

    def openai(self, rng: random.Random, *, chat: bool, stream: bool) -> Outcome:
        sampling, sampling_kind = self._sampling(rng, openai=True)
        body = {"model": self.facts.model, "max_tokens": self._max_new_tokens(rng), "stream": stream, **sampling}
        if chat:
            path, category = "/v1/chat/completions", "chat"
            body["messages"] = [{"role": "user", "content": self._text_prompt(rng)}]
        else:
            path, category = "/v1/completions", "completion"
            body["prompt"] = self._text_prompt(rng)
        if stream:
            return self._send_stream(category + "_stream", path, body, features=(sampling_kind,))
        return self._send(category, path, body, openai_finish_reasons, features=(sampling_kind,))

    def _long_request(self, rng: random.Random, prompt_len: int = 8) -> tuple[dict, int]:
        """A prompt and a max_new_tokens large enough that only an abort or a disconnect ends it
        early (capped: on a fast accelerator it may still finish by itself, which is fine)."""
        max_new = max(1, min(4096, self.facts.max_sequence - prompt_len - 1))
        return {"input_ids": self._ids_prompt(rng, prompt_len)}, max_new

    def disconnect(self, rng: random.Random) -> Outcome:
        """Open a long stream, read one or two events, hang up."""
        category, start = "disconnect", time.monotonic()
        prompt, max_new = self._long_request(rng)
        if rng.random() < 0.5:
            path, feature = "/generate", "disconnect_generate"
            body = {**prompt, "stream": True, "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}
        else:
            # The chat template adds tokens around the message: leave it half the context.
            path, feature = "/v1/chat/completions", "disconnect_chat"
            body = {"model": self.facts.model, "stream": True, "ignore_eos": True,
                    "max_tokens": max(1, min(max_new, self.facts.max_sequence // 2)),
                    "messages": [{"role": "user", "content": self._text_prompt(rng)}]}
        wanted = rng.randint(1, 2)
        try:
            with self.client.post(path, body, stream=True, fresh_connection=True) as response:
                if response.status_code != 200:
                    return self._error_outcome(category, path, response.status_code, response.text, start,
                                               features=(feature,))
                events = 0
                for event in sse_events(response, start + self.client.timeout):
                    if event == "[DONE]":  # finished before we hung up
                        return Outcome(category, OK, time.monotonic() - start, 200, features=(feature,))
                    events += 1
                    if events >= wanted:
                        break
            return Outcome(category, DISCONNECTED, time.monotonic() - start, 200, features=(feature,))
        except Exception as exc:
            return self._exception_outcome(category, path, exc, start, (feature,))

    def abort(self, rng: random.Random) -> Outcome:
        """A long /generate with our own rid, aborted through /abort_request from this thread
        while another one waits for its answer; it must end, with an abort or an error."""
        rid = self.new_rid("abort")
        prompt, max_new = self._long_request(rng)
        stream = rng.random() < 0.5
        body = {"rid": rid, **prompt, "stream": stream,
                "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}
        features = ("abort_stream" if stream else "abort_whole",)
        result: list[Outcome] = []

        def wait_for_answer():
            if stream:
                result.append(self._send_stream("abort", "/generate", body, abort_expected=True, features=features))
            else:
                result.append(self._send("abort", "/generate", body, generate_finish_reasons,
                                         abort_expected=True, features=features))

        waiter = threading.Thread(target=wait_for_answer, daemon=True, name=f"soak-{rid}")
        waiter.start()
        time.sleep(rng.uniform(0.1, 0.6))
        abort_problem = self._abort_until_done(rid, waiter)
        waiter.join(self.client.timeout + 10)
        if not result:
            return Outcome("abort", TIMEOUT, problem=f"abort: request {rid} never answered after its abort")
        outcome = result[0]
        if outcome.outcome == OK:  # it finished before the abort reached it
            outcome.features += ("finished_before_abort",)
        if abort_problem and not outcome.problem:
            outcome.problem = abort_problem
        return outcome

    def _abort_until_done(self, rid: str, waiter: threading.Thread) -> str | None:
        """Abort again every half second: the first abort may arrive before the request is
        registered (then it is a no-op)."""
        deadline = time.monotonic() + self.client.timeout
        while waiter.is_alive() and time.monotonic() < deadline:
            try:
                response = self.client.post("/abort_request", {"rid": rid}, timeout=30)
                if response.status_code >= 500:
                    return f"abort: /abort_request answered HTTP {response.status_code}: {_error_message(response.text)}"
            except requests.RequestException as exc:
                return f"abort: /abort_request failed: {exc!r}"
            waiter.join(0.5)
        return None

    def n_sampling(self, rng: random.Random) -> Outcome:
        n = rng.randint(2, 3)
        prompt, prompt_kind = self._prompt(rng)
        body = {**prompt, "sampling_params": {"max_new_tokens": self._max_new_tokens(rng, 24), "n": n,
                                              "temperature": 0.7, "sampling_seed": rng.randrange(2 ** 31)}}
        return self._send("n_sampling", "/generate", body, generate_finish_reasons, expected_count=n,
                          features=(prompt_kind, f"n={n}"))

    def stop_strings(self, rng: random.Random) -> Outcome:
        stop = rng.sample(STOP_STRINGS, rng.randint(1, 3))
        sampling, sampling_kind = self._sampling(rng)
        body = {"text": self._text_prompt(rng),
                "sampling_params": {"max_new_tokens": self._max_new_tokens(rng), "stop": stop, **sampling}}
        return self._send("stop_strings", "/generate", body, generate_finish_reasons, features=(sampling_kind,))

    def context_limit(self, rng: random.Random) -> Outcome:
        """A prompt that fills the context up to exactly max_new_tokens (8) from its end."""
        max_new = 8
        prompt = self._ids_prompt(rng, self.facts.max_sequence - max_new)
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
        return self._send("context_limit", "/generate", body, generate_finish_reasons)

    def burst_request(self, rng: random.Random) -> Outcome:
        """One request of a burst: long enough that max-running of them overflow the KV pool
        (about 1.5x the pool together), so the scheduler must queue and retract."""
        per_request = -(-3 * self.facts.pool_tokens // (2 * max(1, self.facts.max_running)))
        total = max(16, min(per_request, self.facts.max_sequence - 1, 2048))
        prompt_len = max(4, total // 3)
        sampling, sampling_kind = self._sampling(rng)
        body = {"input_ids": self._ids_prompt(rng, prompt_len),
                "sampling_params": {"max_new_tokens": total - prompt_len, "ignore_eos": True, **sampling}}
        return self._send("burst", "/generate", body, generate_finish_reasons, features=(sampling_kind,))

    def fault(self, rng: random.Random) -> Outcome:
        """A request that opts into an injected fault through its rid (managers/faults.py; the
        server runs with FASER_SGL_FAULT_INJECTION=1): a target or draft pass fault must end
        this request, and only it, with a 5xx (counted as injected); a stall of its output
        messages must only delay it.  Bystanders are the other categories' requests, whose
        outcomes are judged as always."""
        kinds = ["target", "stall"]
        if self.facts.speculative_policy not in (None, "none"):
            kinds.append("draft")
        kind = rng.choice(kinds)
        prompt, _ = self._prompt(rng)
        body = {**prompt, "rid": f"fault-{kind}-{self.new_rid('fault')}",
                "sampling_params": {"max_new_tokens": self._max_new_tokens(rng, high=16), "temperature": 0.0}}
        drafted = []  # the request's spec_num_proposed_drafts (speculative servers report it)

        def reasons(payload):
            meta = payload.get("meta_info") if isinstance(payload, dict) else None
            if isinstance(meta, dict) and "spec_num_proposed_drafts" in meta:
                drafted.append(meta["spec_num_proposed_drafts"])
            return generate_finish_reasons(payload)

        outcome = self._send("fault", "/generate", body, reasons, features=(f"fault_{kind}",))
        if kind == "draft" and outcome.outcome == OK and drafted == [0]:
            # No draft pass carried it (a 1-token answer, or a policy that chose no drafts for
            # it): there was nothing to fault, and completing is right.
            outcome.features += ("fault_draft_never_drafted",)
            return outcome
        if kind == "stall":
            if outcome.outcome == ERROR_5XX:
                outcome.problem, outcome.injected = f"fault: a stalled request failed: HTTP {outcome.status}", False
            return outcome
        if outcome.outcome == ERROR_5XX:
            outcome.problem, outcome.injected = None, True
        elif outcome.problem is None:
            outcome.problem = (f"fault: an injected {kind}-pass fault did not fail its request "
                               f"({outcome.outcome}); is FASER_SGL_FAULT_INJECTION=1 set on the server?")
        return outcome

    def invalid(self, rng: random.Random) -> Outcome:
        """A fuzz case: it must be refused with a 4xx and a message, never a 5xx or a hang."""
        if self.fuzz is None:
            return Outcome("invalid", HARNESS_ERROR, problem="invalid: fuzz module missing (faser_sgl.bench.fuzz)")
        case = self.fuzz.random_invalid_case(rng, context_length=self.facts.context_length,
                                             vocab_size=self.facts.vocab_size, model=self.facts.model)
        start = time.monotonic()
        try:
            status, text = self.fuzz.send_case(self.client.base_url, case, timeout=self.client.timeout,
                                               headers=self.client.auth_headers)
        except Exception as exc:
            outcome = self._exception_outcome("invalid", case.path, exc, start)
            outcome.case_name = case.name
            return outcome
        latency = time.monotonic() - start
        message = _error_message(text)
        body = case.body[:200].decode("utf-8", "replace")
        if 400 <= status < 500:
            problem = None if message else f"invalid {case.name}: HTTP {status} without a message"
            return Outcome("invalid", ERROR_4XX, latency, status, problem, case_name=case.name)
        if status >= 500:
            injected = bool({"invalid", case.path, "all"} & self.allow_5xx_from)
            problem = None if injected else (
                f"invalid {case.name}: HTTP {status} from {case.method} {case.path} "
                f"(body {body!r}): {message}")
            return Outcome("invalid", ERROR_5XX, latency, status, problem, injected, case_name=case.name)
        return Outcome("invalid", ACCEPTED, latency, status,
                       f"invalid {case.name}: accepted with HTTP {status} ({case.method} {case.path}, "
                       f"body {body!r})", case_name=case.name)


@dataclass
class Recorder:
    """Thread-safe tallies of outcomes, latencies and violations."""
    max_violations: int = 200
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    features: dict[str, int] = field(default_factory=dict)
    invalid_cases: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    violation_total: int = 0
    injected_5xx: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            by_outcome = self.counts.setdefault(outcome.category, {})
            by_outcome[outcome.outcome] = by_outcome.get(outcome.outcome, 0) + 1
            for feature in outcome.features:
                self.features[feature] = self.features.get(feature, 0) + 1
            if outcome.case_name:
                by_case = self.invalid_cases.setdefault(outcome.case_name, {})
                by_case[outcome.outcome] = by_case.get(outcome.outcome, 0) + 1
            if outcome.outcome == OK and outcome.latency is not None:
                self.latencies.setdefault(outcome.category, []).append(outcome.latency)
            self.injected_5xx += outcome.injected
        if outcome.problem:
            self.violation(outcome.problem)

    def violation(self, message: str) -> None:
        with self._lock:
            self.violation_total += 1
            if len(self.violations) < self.max_violations:
                self.violations.append(message)

    def all_violations(self) -> list[str]:
        with self._lock:
            dropped = self.violation_total - len(self.violations)
            return self.violations + ([f"... and {dropped} more violations"] if dropped else [])
