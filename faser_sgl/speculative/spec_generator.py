"""Draft-then-verify speculative decoding over a ragged batch (per-request draft lengths).

One step, for the requests that decode this step:
  1. the policy picks k_i per request (trimmed to what the request may still emit and to free
     KV slots); each request gets k_i extra slots beside the one for its newest token;
  2. the draft model runs max(k_i) autoregressive passes; request i takes part in the first k_i
     (its first pass also feeds any committed tokens the draft has not seen yet);
  3. the target verifies [newest token, d_1..d_k_i] for all requests in ONE ragged forward pass;
  4. accept/reject (greedy: longest matching prefix; sampling: rejection sampling) emits
     a_i accepted drafts plus one token from the target;
  5. the slots of rejected drafts go back to the pool (both caches share them);
  6. the emitted tokens are appended up to the request's stop condition, and only what was
     kept counts as accepted.
Prefill chunks ride along in the same target pass, but a step that carries prefill work drafts
nothing: its decodes feed only their newest token, so a new prompt's first token never waits for
draft passes or verification rows (time to first token stays that of plain decoding; the
decodes still advance one token).  Between draft passes the generator asks ``should_yield``
(the server: has a request arrived that could start now?); if so it abandons the step's drafts,
gives back their slots and returns None, and the caller re-plans at once, so a newcomer waits at
most one draft pass instead of the whole draft-then-verify step.  The draft model is fed lazily:
a request that drafts nothing this step (or is still in prefill) costs the draft nothing; the
first pass of its next drafting step feeds what the draft has not seen, in one ragged pass
bounded in time (``_catch_up_budget``).  So a policy that chooses k = 0 pays nothing for the
draft model.  Every forward pass is timed and reported to
the policy (cost-aware policies fit their cost model to it).  A step in which nobody drafts
(k = 0 everywhere, no catch-up) is run by the speculation-free generator itself, so it costs
what a step without speculation costs.
FASER's frontier pipeline (frontier.py) is a subclass whose steps may instead verify the drafts
in chunks while the next chunk is drafted on another part of the machine; it reuses the draft
passes, the acceptance and the roll-back here.
"""

from __future__ import annotations

import threading
import time

import torch

from faser_sgl import kernels
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.managers import logit_processor, logprobs
from faser_sgl.managers.batch_planner import ScheduledChunk
from faser_sgl.managers.request import Request
from faser_sgl.speculative.adaptive import CostCurve, StepOverhead, expected_tokens
from faser_sgl.speculative.early_exit import Verification


class DraftPreempted(Exception):
    """should_yield() asked the draft phase to stop: the step is abandoned."""


class SpeculativeGenerator:
    def __init__(self, target_runner, draft_worker, sampler, policy, allocator, stop_checker,
                 max_step_tokens: int | None = None, early_exit=None):
        self.target = target_runner
        self.draft = draft_worker
        self.sampler = sampler
        self.policy = policy
        self.allocator = allocator
        self.stop_checker = stop_checker
        # Token budget of one draft pass, as chunked prefill bounds a target pass: a request the
        # draft lags far behind (a long prompt, a retraction) is caught up over several steps.
        self.max_step_tokens = max_step_tokens
        # Measured pass costs, to keep a catch-up pass short (_catch_up_budget).
        self.pass_costs = {"target": CostCurve(0.02, 0.002), "draft": CostCurve(0.01, 0.001)}
        # Seconds a step costs outside its passes (observe_step), for the predictions of
        # policies without a cost model of their own.
        self.overhead_cost = StepOverhead()
        self._step_pass_s = 0.0  # pass seconds of the step under way
        self._step_shape = (False, 0)  # (drafted, rows verified) of the step under way
        # FASER early exit (speculative/early_exit.EarlyExitVerifier) or None: full-depth passes.
        self.early_exit = early_exit
        # Whether this step's drafts are scored for early exit (EarlyExitVerifier.worth_scoring)
        # and the seconds scoring took in it, kept out of its pass and overhead costs.
        self._scoring = False
        self._step_scoring_s = 0.0
        self._step_draft_rows = 0
        self.num_verify_steps = 0
        self.num_drafted = 0
        self.num_accepted = 0
        # Optional callbacks, e.g. Prometheus metrics: (drafted, accepted) per verified request,
        # and the lengths chosen for the step's decodes.
        self.on_verify = None
        self.on_draft_lengths = None
        self.on_early_exit = None  # (draft tokens pruned inside this step's verification)
        self.on_pass = None  # (model, tokens, seconds) of every pass: --faser-record-steps
        # Asked before each draft pass; True abandons the step (see the module docstring).
        self.should_yield = None
        self.num_preempted_steps = 0
        self._draft_confidence: dict[int, list[float]] = {}  # per request, this step's drafts
        # Constrained requests: the grammar's mask before each of this step's draft positions
        # (recorded while drafting: the draft samples under it, and the target's row at that
        # position is verified under it).
        self._grammar_masks: dict[int, list[torch.Tensor]] = {}
        # Logprob figures of each request's emitted tokens this step (requests that asked).
        self._emitted_logprobs: dict[int, list] = {}
        # A list to record every timed pass as (model, thread name, start, end), or None.
        self.trace: list[tuple[str, str, float, float]] | None = None
        self._plain_generator = None  # runs the steps in which nobody drafts (_plain_step)
        # (predicted seconds of the last step as chosen, and with no drafts): _predict_step,
        # computed only while someone reads it (predict_steps: the scheduler's metrics or step
        # records), since it prices the step twice more on every step.
        self.predict_steps = False
        self.last_prediction: tuple[float, float] | None = None
        # The choice behind it (same readers): per decode, k chosen, the policy's acceptance
        # estimate where it keeps one, and the tokens the draft model lags behind.
        self.last_choice: dict | None = None
        self.num_plain_steps = 0

    # -- cost calibration --------------------------------------------------------------------
    def calibrate(self, repeats: int = 2) -> float:
        """Time target and draft passes of the token counts the policy asks for, on scratch KV
        slots, so that a cost-aware policy's first choices rest on this machine's measured costs
        instead of its priors (a prior that calls verification nearly free drafts long on a CPU
        where it is not).  Target passes are one sequence with logits on every row, as a
        verification has; draft passes are that many one-token requests, as a draft step has.
        Returns the seconds spent (0 when the policy asks for nothing)."""
        target_sizes, draft_sizes = self.policy.calibration_sizes()
        budget = self.allocator.num_free
        target_sizes = [n for n in target_sizes if n <= budget]
        draft_sizes = [n for n in draft_sizes if n <= budget]
        if not target_sizes and not draft_sizes:
            return 0.0
        start = time.perf_counter()
        slots = self.allocator.alloc(max(target_sizes + draft_sizes))

        def target_pass(n: int, timed: bool = True) -> None:
            feeds = [[0] * n]
            batch = ForwardBatch.build(feeds, [slots[:n]], [list(range(n))])
            if timed:
                self._timed("target", feeds, self.target.forward, batch)
            else:
                self.target.forward(batch)

        def draft_pass(n: int, timed: bool = True) -> None:
            feeds = [[0]] * n
            lists = [[s] for s in slots[:n]]
            if timed:
                self._timed("draft", feeds, self.draft.forward, feeds, lists)
            else:
                self.draft.forward(feeds, lists)

        try:
            # One untimed pass each first: one-time costs (kernel selection, buffer growth) are
            # not what a step costs.
            if target_sizes:
                target_pass(target_sizes[0], timed=False)
            if draft_sizes:
                draft_pass(draft_sizes[0], timed=False)
            for _ in range(repeats):
                for n in target_sizes:
                    target_pass(n)
                for n in draft_sizes:
                    draft_pass(n)
        finally:
            self.allocator.free(slots)
        return time.perf_counter() - start

    # -- draft length ------------------------------------------------------------------------
    def _draft_lengths(self, decodes: list[Request], step_tokens: int) -> tuple[list[int], dict[int, int]]:
        """Per request: drafts this step (slots allocated), and for requests that wanted to draft
        but whose catch-up does not fit this step's draft budget, how many unseen tokens to feed
        the draft model now (they draft on a later step)."""
        wanted = self._wanted_lengths(decodes, step_tokens)
        budget = self._catch_up_budget(step_tokens)
        lengths, catch_up = [], {}
        for req, k in zip(decodes, wanted):
            # One token always comes from the target, so at most remaining-1 drafts are useful.
            remaining = req.stop.max_new_tokens - len(req.output_ids)
            k = max(0, min(k, remaining - 1))
            if req.logit_processor is not None:  # one processor call per real token
                k = 0
            lag = len(req.kv_slots) - req.draft_cached  # tokens pass 0 must feed
            if k > 0 and lag > budget:
                if budget > 0:
                    catch_up[id(req)] = int(budget)
                    budget = 0
                k = 0
            if k > 0:
                slots = self.allocator.alloc(k)
                if slots is None:
                    k = 0
                else:
                    req.kv_slots.extend(slots)
                    budget -= lag
            lengths.append(k)
        return lengths, catch_up

    def _wanted_lengths(self, decodes: list[Request], step_tokens: int) -> list[int]:
        return self.policy.choose_lengths(decodes, step_tokens)

    # Steps in which nobody drafts run as plain steps (_plain_step); False only for a benchmark
    # of the former path (scripts/bench_plain_step.py), which accepted request by request.
    PLAIN_STEPS = True
    MIN_CATCH_UP_TOKENS = 32
    # Whether decodes draft in a step that carries prefill chunks.  False (serving): the new
    # prompt's first token waits for no draft pass and no verification row.
    DRAFT_BESIDE_PREFILL = False

    def _catch_up_budget(self, step_tokens: int) -> int:
        """Tokens one draft pass may feed to catch the draft model up: as many as it runs in
        twice the time of this step's plain target pass (measured), a power of two from 32 up
        to max_step_tokens.  A pass cannot be interrupted, so a request that arrives during a
        catch-up pass waits for it: on a CPU, where the draft model prefills a prompt at about
        half the target's cost, one unbounded pass over a new prompt kept newcomers waiting
        for seconds.  On a GPU the budget is large and a prompt is caught up at once."""
        cap = self.max_step_tokens if self.max_step_tokens is not None else 1 << 20
        limit = 2 * self.pass_costs["target"].predict(max(step_tokens, 1))
        draft = self.pass_costs["draft"]
        n = self.MIN_CATCH_UP_TOKENS
        while n * 2 <= cap and draft.predict(n * 2) <= limit:
            n *= 2
        return min(n, cap)

    # -- one step ----------------------------------------------------------------------------
    def generate(self, chunks: list[ScheduledChunk]) -> dict[Request, list[int]] | None:
        """Run one step; append each request's new tokens up to its stop condition (stop
        checker) and return the tokens appended.  None: should_yield() abandoned the step before
        its target pass; nothing changed but the draft cache, and the caller takes the chunks'
        slots back."""
        if not chunks:
            return {}
        # Per-step state, keyed by id(request): a step that raised may have left some, and a
        # later request can reuse a finished one's id.
        self._draft_confidence.clear()
        self._grammar_masks.clear()
        self._emitted_logprobs.clear()
        decodes = [c.req for c in chunks if c.needs_logits and len(c.tokens) == 1]
        prefilling = any(len(c.tokens) > 1 or not c.needs_logits for c in chunks)
        step_tokens = sum(len(c.tokens) for c in chunks)
        if prefilling and not self.DRAFT_BESIDE_PREFILL:
            lengths, catch_up = [0] * len(decodes), {}  # prefill in this step: no drafting
        else:
            lengths, catch_up = self._draft_lengths(decodes, step_tokens)
            if self.on_draft_lengths is not None and lengths:
                self.on_draft_lengths(lengths)
        self._step_pass_s = 0.0
        self._step_shape = (any(lengths), step_tokens + sum(lengths))
        self._step_scoring_s = 0.0
        self._step_draft_rows = sum(lengths)
        self._scoring = self.early_exit is not None and self.early_exit.worth_scoring(
            step_tokens + sum(lengths), sum(lengths))
        self.last_prediction = self._predict_step(decodes, lengths, step_tokens, catch_up) \
            if self.predict_steps else None
        self.last_choice = self._describe_choice(decodes, lengths) if self.predict_steps else None
        return self._run_step(chunks, decodes, lengths, catch_up)

    def _predict_step(self, decodes: list[Request], lengths: list[int], step_tokens: int,
                      catch_up: dict[int, int]) -> tuple[float, float]:
        """(seconds of the step as chosen, seconds of the same step with no drafts), as the
        policy's cost model predicts them; for a policy without one (fixed K), from the measured
        pass costs: one target pass over the step's tokens and drafts, draft pass 0 over all it
        feeds, one draft pass per further position, plus the measured overhead outside the
        passes.  Called after _draft_lengths gave each drafting request its k draft slots.
        The scheduler sets them beside the measured step time."""
        # Pass 0 feeds each drafting request's committed tokens the draft has not seen, and the
        # catch-up chunks of requests that are behind (_run_draft).
        pass0 = sum(len(r.kv_slots) - k - r.draft_cached for r, k in zip(decodes, lengths) if k > 0)
        pass0 += sum(catch_up.values())
        predict = getattr(self.policy, "predict_step", None)
        if predict is not None:
            return (predict(decodes, lengths, step_tokens, pass0) + self._predicted_scoring(lengths),
                    predict(decodes, [0] * len(decodes), step_tokens, 0))
        target, draft, overhead = self.pass_costs["target"], self.pass_costs["draft"], self.overhead_cost.predict
        rows = [sum(k > s for k in lengths) for s in range(1, max(lengths, default=0))]
        chosen = target.predict(step_tokens + sum(lengths)) + sum(draft.predict(n) for n in rows)
        chosen += draft.predict(pass0) if pass0 else 0.0
        drafted = any(lengths)
        chosen += overhead(drafted, step_tokens + sum(lengths) if drafted else len(decodes))
        return chosen + self._predicted_scoring(lengths), target.predict(step_tokens) + overhead(False, len(decodes))

    def _describe_choice(self, decodes: list[Request], lengths: list[int]) -> dict:
        accept_rate = getattr(self.policy, "accept_rate", None)
        choice = {"k": list(lengths),
                  "lag": [len(r.kv_slots) - k - r.draft_cached for r, k in zip(decodes, lengths)]}
        if accept_rate is not None:
            choice["accept_est"] = [round(accept_rate(r), 3) for r in decodes]
        return choice

    def _predicted_scoring(self, lengths: list[int]) -> float:
        """Early exit's measured scoring cost at this step's draft rows, if it scores them."""
        if not self._scoring or not self.early_exit.scoring_cost.measured:
            return 0.0
        return self.early_exit.scoring_cost.predict(sum(lengths))

    def observe_step(self, num_requests: int, wall_s: float) -> None:
        """The scheduler's measured time of the step just run: what it cost outside the forward
        passes timed in it (sampling, accepting, outputs) becomes the overhead the next
        predictions add."""
        overhead = max(0.0, wall_s - self._step_pass_s - self._step_scoring_s)
        drafted, rows = self._step_shape
        if self._scoring:
            self.early_exit.observe_scoring(self._step_draft_rows, self._step_scoring_s)
        size = rows if drafted else num_requests
        self.overhead_cost.observe(drafted, size, overhead)
        observe = getattr(self.policy, "observe_step_overhead", None)
        if observe is not None:
            observe(drafted, size, overhead)

    def _run_step(self, chunks: list[ScheduledChunk], decodes: list[Request], lengths: list[int],
                  catch_up: dict[int, int]) -> dict[Request, list[int]] | None:
        """Draft, then verify every draft in one target pass (the serial step)."""
        if not any(lengths) and not catch_up and self.PLAIN_STEPS:
            return self._plain_step(chunks)
        k_of = {id(r): k for r, k in zip(decodes, lengths)}
        try:
            drafts, draft_probs, candidates = self._run_draft(decodes, lengths, catch_up)
        except DraftPreempted:
            self._abandon_drafts(decodes, lengths)
            return None

        # Target pass: prefill chunks as planned (with rows for input logprobs where asked);
        # decodes feed newest token + drafts.
        plan = logprobs.input_row_plan(chunks)
        feeds, slot_lists, rows, verifications = [], [], [], {}
        for c, extra in zip(chunks, plan):
            k = k_of.get(id(c.req), 0)
            if k and self._scoring:
                verifications[id(c.req)] = Verification(
                    len(feeds), k, torch.stack(candidates[id(c.req)]),
                    draft_probs=self._draft_confidence.pop(id(c.req), None),
                    accept_rate=self._accept_rate(c.req))
            tokens = c.tokens + drafts.get(id(c.req), [])
            feeds.append(tokens)
            slot_lists.append(c.req.kv_slots)
            if c.needs_logits:
                rows.append(extra + list(range(len(tokens) - 1 - k, len(tokens))))
            else:
                rows.append(extra)
        batch = ForwardBatch.build(feeds, slot_lists, rows)
        if verifications:
            logits = self._timed("target", feeds, self.early_exit.forward, batch, list(verifications.values()),
                                 self._seconds_per_token([c.req for c in chunks if c.needs_logits], k_of,
                                                         batch.num_tokens))
            pruned = sum(v.num_drafts - v.verified for v in verifications.values())
            if pruned and self.on_early_exit is not None:
                self.on_early_exit(pruned)
        else:
            logits = self._timed("target", feeds, self.target.forward, batch)
        counts = [verifications[id(c.req)].rows if id(c.req) in verifications else len(r)
                  for c, r in zip(chunks, rows)]
        logits = logprobs.consume_input_rows(chunks, plan, counts, logits)

        out: dict[Request, list[int]] = {}
        offset = 0
        sampled = [c for c in chunks if c.needs_logits]
        for c in sampled:
            req = c.req
            k = k_of.get(id(req), 0)
            v = verifications.get(id(req))
            # Drafts verified at full depth, and whether the bonus row survived (early exit
            # may have pruned the rows after d_verified; without it, all k and the bonus).
            verified, bonus = (v.verified, v.bonus) if v is not None else (k, True)
            n_rows = verified + (1 if bonus else 0)
            req_logits = logits[offset: offset + n_rows]
            offset += n_rows
            emitted, accepted = self._accept(req, drafts.get(id(req), [])[:verified], req_logits,
                                             draft_probs.get(id(req)), bonus)
            out[req] = emitted[:self._settle(req, k, v, verified, accepted, bonus, emitted)]
        # Prefill-only chunks: nothing to emit (the draft sees their tokens when they draft).
        return out

    def _plain_step(self, chunks: list[ScheduledChunk]) -> dict[Request, list[int]]:
        """A step in which nobody drafts costs what a step of ``--speculative-policy none``
        costs: the same generator runs it (one pass, one batched sampling call), with no draft
        pass, no per-request acceptance and no verification bookkeeping.  Its pass is still
        timed for the policy's cost model, as every pass is."""
        plain = self._plain_generator
        if plain is None:
            from faser_sgl.managers.token_generator import TargetOnlyGenerator

            plain = self._plain_generator = TargetOnlyGenerator(self.target, self.sampler, self.stop_checker)
            plain.on_pass = self._report_pass
        self.num_plain_steps += 1
        return plain.generate(chunks)

    def _report_pass(self, model: str, tokens: int, seconds: float) -> None:
        """A pass timed elsewhere (the plain step's): to the cost curves, policy and recorder."""
        self._observe_pass(model, tokens, seconds)
        if self.on_pass is not None:
            self.on_pass(model, tokens, seconds)

    def _settle(self, req: Request, k: int, v, verified: int, accepted: int, bonus: bool,
                emitted: list[int]) -> int:
        """After one request's verification: early exit's feedback, the emitted tokens committed,
        rejected drafts rolled back, counters; returns how many emitted tokens were kept."""
        unseen = None
        if v is not None:
            unseen = self.early_exit.unseen_rejection(v, accepted)
            self.early_exit.record_outcome(v, accepted)
            if hasattr(self.policy, "observe_pruning"):
                skipped = 0.0 if v.pruned_at is None else 1.0 - v.pruned_at / self._target_depth()
                self.policy.observe_pruning(k, v.verified if v.pruned_at is not None else None, skipped,
                                            accepted, self._accept_rate(req))
        kept = self._commit(req, emitted)
        if k > 0:
            # Roll back: the slots (both caches) of rejected and pruned drafts return to the
            # pool.  A fully accepted draft whose bonus row was pruned also gives back the
            # slot of its last token, whose KV the pruned row never wrote past the exit layer:
            # that token is fed again as the next step's newest token.
            full_kv = accepted if bonus or accepted < verified else accepted - 1
            rejected = k - full_kv
            if rejected:
                self.allocator.free(req.kv_slots[-rejected:])
                del req.kv_slots[-rejected:]
            req.draft_cached = min(req.draft_cached, len(req.kv_slots))
            self._count_verification(req, verified, accepted, kept, len(emitted), unseen)
        return kept

    def _target_depth(self) -> int:
        """Layers of the target model (the share of depth a pruned row skipped is read off it)."""
        return self.target.model.num_layers

    def _commit(self, req: Request, emitted: list[int]) -> int:
        """Append the step's emitted tokens up to the stop condition, with their logprobs, and
        move the request's grammar to its output; returns how many were kept."""
        kept = self.stop_checker.append(req, emitted)
        entries = self._emitted_logprobs.pop(id(req), None)
        if entries:
            req.logprobs.outputs.extend(logprobs.kept_entries(req, entries, kept))
        self._grammar_masks.pop(id(req), None)
        if req.grammar is not None:
            req.grammar.commit(emitted[:kept])
        return kept

    def _grammar_mask(self, req: Request, position: int) -> torch.Tensor:
        """The grammar's mask before the step's draft position ``position`` (0: the token after
        the request's output).  Recorded while drafting; the one after the last draft is taken
        now, when the grammar stands right after the drafts made so far."""
        masks = self._grammar_masks.setdefault(id(req), [])
        if position == len(masks):
            masks.append(req.grammar.mask())
        return masks[position]

    def _abandon_drafts(self, decodes: list[Request], lengths: list[int]) -> None:
        """Undo a preempted draft phase: the draft slots go back to the pool, and the draft
        cache forgets the draft tokens and the newest token, whose slot the caller takes back
        (what it caught up on of earlier committed tokens stays valid)."""
        self.num_preempted_steps += 1
        for req, k in zip(decodes, lengths):
            self._draft_confidence.pop(id(req), None)
            self._grammar_masks.pop(id(req), None)
            if req.grammar is not None:
                req.grammar.rollback()
            if k:
                self.allocator.free(req.kv_slots[-k:])
                del req.kv_slots[-k:]
            req.draft_cached = min(req.draft_cached, len(req.kv_slots) - 1)

    def _yield_point(self) -> None:
        if self.should_yield is not None and self.should_yield():
            raise DraftPreempted

    def _seconds_per_token(self, reqs: list[Request], k_of: dict[int, int], num_tokens: int) -> float | None:
        """Predicted seconds of this target pass (``num_tokens``) per token that ``reqs``, with
        k_of[id] drafts to verify, are expected to emit (the price of a token that a wrong
        early-exit prune loses), from early exit's cost model."""
        cost_model = self.early_exit.cost_model
        if cost_model is None:
            return None
        tokens = sum(expected_tokens(self._accept_rate(r), k_of.get(id(r), 0)) for r in reqs)
        return cost_model.target_cost.predict(num_tokens) / max(tokens, 1.0)

    def _accept_rate(self, req: Request) -> float:
        """The policy's acceptance estimate for req, or a neutral prior for policies without."""
        return self.policy.accept_rate(req) if hasattr(self.policy, "accept_rate") else 0.7

    def _count_verification(self, req: Request, drafted: int, accepted: int, kept: int,
                            emitted: int, unseen_rejection: float | None = None) -> None:
        """Counters and policy feedback for one verification.  When a stop token or string ends
        the output inside the run (kept < emitted), what follows the stop never happened: the
        pass counts kept - 1 accepted drafts, as its tokens (kept) are accepted + the target's
        one everywhere else, so tokens per pass and acceptance estimates stay honest.
        ``drafted``: drafts verified at full depth (early exit's pruned ones never were);
        ``unseen_rejection``: early exit's chance that the first draft a prune hid would have been
        rejected (``EarlyExitVerifier.unseen_rejection``), given to the policy as that draft's trial."""
        if kept < emitted:
            drafted = accepted = kept - 1
            unseen_rejection = None  # a stop came first: nothing after it would have been tested
        req.spec_verify_ct += 1
        req.spec_accepted_drafts += accepted
        req.spec_drafted_tokens += drafted
        if req.spec_steps is not None:
            req.spec_steps.append((drafted, accepted))
        self.num_verify_steps += 1
        self.num_drafted += drafted
        self.num_accepted += accepted
        self.policy.observe(req, drafted, accepted)
        if unseen_rejection is not None and hasattr(self.policy, "observe_unseen"):
            self.policy.observe_unseen(req, unseen_rejection)
        if self.on_verify is not None:
            self.on_verify(drafted, accepted)

    def _run_draft(self, decodes, lengths, catch_up: dict[int, int], goals: dict[int, int] | None = None):
        """Autoregressive draft passes; returns per-request draft tokens and their q rows.
        ``lengths``: the draft slots each request holds; ``goals``: drafts to make now by id
        (default: as many as it holds; a pipeline makes its first frontier only)."""
        drafts: dict[int, list[int]] = {id(r): [] for r in decodes}
        probs: dict[int, list[torch.Tensor]] = {id(r): [] for r in decodes}
        # Early exit's candidates per draft token: the token, then the draft's top alternatives.
        cands: dict[int, list[torch.Tensor]] = {id(r): [] for r in decodes}
        k_of = {id(r): k for r, k in zip(decodes, lengths)}
        step_reqs = [r for r, k in zip(decodes, lengths) if k > 0]
        behind = [r for r in decodes if id(r) in catch_up]
        if not step_reqs and not behind:
            return drafts, probs, cands
        # Pass 0 catches the draft cache up: each drafting request feeds every committed token
        # the draft has not seen (its whole prompt after a prefill, a few tokens after steps
        # without drafting, at least its newest token), and its last row gives d_1.  Requests
        # whose lag exceeds the step's budget only feed a chunk of it (their rows are unused).
        self._yield_point()  # before any draft_cached moves
        feeds, slot_lists = [], []
        for req in step_reqs:
            committed = len(req.kv_slots) - k_of[id(req)]
            feeds.append(req.all_ids[req.draft_cached:committed])
            slot_lists.append(req.kv_slots[:committed])
            req.draft_cached = committed
        for req in behind:
            upto = req.draft_cached + catch_up[id(req)]
            feeds.append(req.all_ids[req.draft_cached:upto])
            slot_lists.append(req.kv_slots[:upto])
            req.draft_cached = upto
        step_logits = self._timed("draft", feeds, self.draft.forward, feeds, slot_lists)[: len(step_reqs)]
        self._draft_sample(step_reqs, step_logits, drafts, probs, cands)
        self._extend_drafts(step_reqs, goals or k_of, drafts, probs, cands, may_yield=True)
        return drafts, probs, cands

    def _extend_drafts(self, reqs, goal: dict[int, int], drafts, probs, cands, may_yield: bool = False) -> None:
        """Draft passes until each request has ``goal[id]`` draft tokens: each pass feeds every
        unfinished request its last draft token and samples the next.  ``may_yield``: ask
        should_yield() before each pass (only the scheduler's own thread may)."""
        reqs = [r for r in reqs if len(drafts[id(r)]) < goal[id(r)]]
        while reqs:
            if may_yield:
                self._yield_point()
            feeds = [[drafts[id(r)][-1]] for r in reqs]
            slot_lists = []
            for r in reqs:
                slot_lists.append(r.kv_slots[: r.draft_cached + 1])
                r.draft_cached += 1
            logits = self._timed("draft", feeds, self.draft.forward, feeds, slot_lists)
            self._draft_sample(reqs, logits, drafts, probs, cands)
            reqs = [r for r in reqs if len(drafts[id(r)]) < goal[id(r)]]

    def _timed(self, model: str, feeds: list[list[int]], forward, *args) -> torch.Tensor:
        """Run one forward pass and report its wall time and token count to the policy."""
        start = time.perf_counter()
        logits = forward(*args)
        if logits.is_cuda:
            # Kernels are asynchronous: time their end (on this thread's stream only, so that a
            # pipeline's other stream runs on).
            torch.cuda.current_stream(logits.device).synchronize()
        end = time.perf_counter()
        if self.trace is not None:
            self.trace.append((model, threading.current_thread().name, start, end))
        seconds = end - start
        if self.early_exit is not None and forward == self.early_exit.forward:
            scoring = self.early_exit.take_scoring_seconds()  # not a cost of the layers
            self._step_scoring_s += scoring
            seconds -= scoring
        self._observe_pass(model, sum(len(f) for f in feeds), seconds)
        if self.on_pass is not None:
            self.on_pass(model, sum(len(f) for f in feeds), seconds)
        return logits

    def _observe_pass(self, model: str, tokens: int, seconds: float) -> None:
        self._step_pass_s += seconds
        self.pass_costs[model].observe(tokens, seconds)
        self.policy.observe_forward(model, tokens, seconds)

    def _draft_sample(self, reqs, logits, drafts, probs, cands) -> list[int]:
        """Sample each request's next draft token from q (its final draft distribution): from
        the request's own generator, or by coupled Gumbel-max at the token's output position."""
        histories = [r.output_ids + drafts[id(r)] for r in reqs]
        opts = [r.sampling for r in reqs]
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if constrained:
            from faser_sgl.managers.grammar import apply_mask  # (xgrammar: only with grammars)

            logits = logits.clone()  # (the forward's output is an inference tensor)
        for i in constrained:  # the draft proposes under the grammar, as the target decides
            mask = self._grammar_mask(reqs[i], len(drafts[id(reqs[i])]))
            width = logits.shape[1]  # the draft's vocabulary may be padded differently
            if mask.numel() != width:
                mask = torch.cat([mask, mask.new_zeros(max(0, width - mask.numel()))])[:width]
            apply_mask(logits[i], mask)
        q = self.sampler.probs(logits, opts, histories, [r.prompt_ids for r in reqs])
        drawn = self.sampler.draw(q, opts, histories)
        tokens = drawn.tolist()
        for i in constrained:
            reqs[i].grammar.advance(tokens[i])
        top = None
        if self._scoring:
            scoring_start = time.perf_counter()
            alternatives = logits.topk(self.early_exit.config.num_candidates, dim=-1).indices
            top = torch.cat([drawn.to(alternatives.device)[:, None], alternatives], dim=1).cpu()
            # The draft's own confidence in its token: half of the exit predictor's signal.
            own = torch.softmax(logits.float(), dim=-1).gather(1, drawn.to(logits.device)[:, None])
            for r, p in zip(reqs, own[:, 0].tolist()):
                self._draft_confidence.setdefault(id(r), []).append(p)
            self._step_scoring_s += time.perf_counter() - scoring_start
        for i, (r, t) in enumerate(zip(reqs, tokens)):
            drafts[id(r)].append(t)
            probs[id(r)].append(q[i])
            if top is not None:
                cands[id(r)].append(top[i])
        return tokens

    def _accept(self, req: Request, draft: list[int], logits: torch.Tensor, q_rows,
                bonus: bool = True, prefix: list[int] = ()) -> tuple[list[int], int]:
        """Verify ``draft`` against the target's rows; returns (emitted tokens, accepted drafts).
        Without a bonus row (early exit pruned it), the last row is repeated as a stand-in
        and a token drawn from it is dropped: the drafts are tested exactly as with the row,
        and a fully accepted draft simply ends the pass without a bonus token.  ``prefix``: drafts
        of this step already accepted before ``draft`` (a pipeline verifies in frontiers)."""
        k = len(draft)
        if req.grammar is not None:
            from faser_sgl.managers.grammar import apply_mask

            # Row j is the target's choice after the drafts before it: masked by the grammar's
            # state there (a copy: the caller may hold a row for the next frontier).
            n_rows = logits.shape[0]
            masks = torch.stack([self._grammar_mask(req, len(prefix) + j) for j in range(n_rows)])
            logits = logits.clone()
            apply_mask(logits, masks)
        if req.logit_processor is not None:  # it drafted nothing (_draft_lengths)
            assert k == 0 and not prefix, "a request with a custom logit processor never drafts"
            logits = logit_processor.apply(req, logits)
        if not bonus:
            logits = torch.cat([logits, logits[-1:]])
        histories = [req.output_ids + list(prefix) + draft[:j] for j in range(k + 1)]
        opts = [req.sampling] * (k + 1)
        prompts = [req.prompt_ids] * (k + 1)
        device = logits.device  # everything the kernels read lives beside the logits
        indptr = torch.tensor([0, k], dtype=torch.int64, device=device)
        draft_t = torch.tensor(draft, dtype=torch.int64, device=device)
        if req.sampling.is_greedy:
            target_tokens = self.sampler.greedy_tokens(logits, opts, histories, prompts)
            _, emitted, n = kernels.greedy_accept(draft_t, indptr, target_tokens)
        elif req.sampling.coupled:
            # The target's own Gumbel-max pick at each position; a draft is accepted iff equal.
            p = self.sampler.probs(logits, opts, histories, prompts)
            _, emitted, n = kernels.greedy_accept(draft_t, indptr, self.sampler.draw(p, opts, histories))
        else:
            p = self.sampler.probs(logits, opts, histories, prompts)
            q = torch.stack(q_rows[:k]) if k else p.new_zeros((0, p.shape[1]))
            acc_u, samp_u = kernels.make_uniforms(indptr, [req.sampling.get_generator()], device)
            _, emitted, n = kernels.rejection_sample(draft_t, indptr, q, p, acc_u, samp_u)
        emitted = emitted[0, : int(n[0])].tolist()
        accepted = len(emitted) - 1
        if not bonus and accepted == k:
            emitted = emitted[:k]
        if req.logprobs is not None:
            self._emitted_logprobs[id(req)] = logprobs.emitted_entries(self.sampler, req, logits, histories, emitted)
        return emitted, accepted
