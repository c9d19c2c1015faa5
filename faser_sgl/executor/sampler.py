"""Token sampling with SGLang 0.5.23's sampling-parameter semantics, in torch.

Per row (rows may belong to different requests, or several rows to one request):

1. penalties over the request's *output* tokens so far (SGLang's penalizers only ever see output
   tokens, never the prompt), additive ones first, then the multiplicative one, as SGLang's
   overlap scheduler accumulates them:
     frequency_penalty:  logit -= penalty * count(token)
     presence_penalty:   logit -= penalty            if the token occurred
     min_new_tokens:     logit  = -inf for stop/eos  while fewer outputs than min_new_tokens
     repetition_penalty: logit /= penalty if logit > 0 else logit *= penalty, if the token occurred
2. logit_bias added (SGLang adds it after penalties and grammar masks).
3. Greedy rows (top_k == 1; SGLang turns temperature 0 into top_k 1) take the argmax here.
4. Others: softmax(logits / temperature), then top-k, top-p and min-p as SGLang's torch sampler
   does them: top-p keeps a token while the mass strictly before it is <= top_p, min-p drops
   tokens below min_p * (largest probability), and the survivors are renormalised.

``probs`` returns exactly the distribution ``sample`` draws from (one-hot for greedy rows),
because speculative rejection sampling needs the target's and the draft's final distributions.
Randomness comes from one torch.Generator per request (seeded from ``sampling_seed`` when
given), consumed as one float64 uniform per sampled row and inverted on a float64 CDF, so a
seeded request is reproducible whatever else shares its batch, and its draws follow ``probs``
to float64 precision.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from faser_sgl.kernels.coupled import coupled_tokens

TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary"
SAMPLING_EPS = 1e-6  # temperatures below this are greedy, as in SGLang


@dataclass(eq=False)  # identity semantics: several rows of one request share one object
class SamplingOptions:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # masked while fewer than min_new_tokens outputs exist
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    # Coupled sampling (faser_sgl/kernels/coupled.py): Gumbel-max with noise of (seed, output
    # position), so the text does not depend on how many tokens were drafted.  Otherwise each
    # sampled row takes the next uniform of the request's own stream.
    coupled: bool = False
    generator: Optional[torch.Generator] = field(default=None, repr=False)
    _noise_seed: Optional[int] = field(default=None, repr=False)

    def __post_init__(self):
        if self.top_k is None or self.top_k == -1:
            self.top_k = TOP_K_ALL
        if 0 <= self.temperature < SAMPLING_EPS:
            self.temperature, self.top_k = 1.0, 1
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        else:
            self.logit_bias = None
        if not self.is_greedy:
            self.get_generator()  # seed now: the draw order of unseeded requests is arrival order

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1

    @property
    def uses_history(self) -> bool:
        """Whether the output tokens so far change this request's logits."""
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0 or (self.min_new_tokens > 0 and bool(self.stop_token_ids)))

    @property
    def adjusts_logits(self) -> bool:
        return self.uses_history or self.logit_bias is not None

    def get_generator(self) -> torch.Generator:
        """The request's CPU generator, created on first use: seeded from ``seed``, else from
        torch's global RNG (so a server started with a fixed random seed replays exactly)."""
        if self.generator is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 1 << 62, (1,), device="cpu"))
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self.generator

    def noise_seed(self) -> int:
        """The seed of coupled sampling's per-position noise: ``seed`` when given, else one draw
        from the request's generator (fixed for the request's lifetime)."""
        if self._noise_seed is None:
            self._noise_seed = self.seed if self.seed is not None else int(
                torch.randint(0, 1 << 62, (1,), generator=self.get_generator(), device="cpu"))
        return self._noise_seed

    def validate(self, vocab_size: int) -> None:
        if not self.temperature > 0.0 or self.temperature != self.temperature:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be -1 (all) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        for t, bias in (self.logit_bias or {}).items():
            # OpenAI's range; beyond it (or NaN/inf) a bias only turns the logits into inf/NaN.
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias} for token {t}")
        for t in list(self.logit_bias or ()) + list(self.stop_token_ids):
            if not 0 <= t < vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab_size})")

    @staticmethod
    def from_sglang(sp, vocab_size: int, eos_ids: Sequence[int] = ()) -> "SamplingOptions":
        """From an sglang SamplingParams, read by attribute so that the executor never imports
        sglang.  eos_ids are the model's end tokens; together with sp.stop_token_ids they are
        what min_new_tokens holds back (SGLang masks both)."""

        def get(name, default):
            value = getattr(sp, name, None)
            return default if value is None else value

        stop_ids = sorted({int(t) for t in eos_ids} | {int(t) for t in (get("stop_token_ids", ()) or ())})
        opts = SamplingOptions(
            temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)),
            top_k=int(get("top_k", TOP_K_ALL)),
            min_p=float(get("min_p", 0.0)),
            frequency_penalty=float(get("frequency_penalty", 0.0)),
            presence_penalty=float(get("presence_penalty", 0.0)),
            repetition_penalty=float(get("repetition_penalty", 1.0)),
            min_new_tokens=int(get("min_new_tokens", 0)),
            stop_token_ids=tuple(t for t in stop_ids if 0 <= t < vocab_size),
            logit_bias=get("logit_bias", None),
            seed=getattr(sp, "sampling_seed", None),
        )
        opts.validate(vocab_size)
        return opts


class Sampler:
    """Stateless: all per-request state lives in SamplingOptions and the histories passed in.

    Every method takes logits [N, V] and, per row, its request's options and the output tokens
    that precede that row (for speculative rows: the outputs plus the draft tokens before it).
    ``prompt_ids`` is accepted for interface stability and unused (SGLang never penalises
    prompt tokens).
    """

    def adjusted_logits(self, logits: torch.Tensor, options: Sequence[SamplingOptions],
                        histories: Sequence[Sequence[int]] | None) -> torch.Tensor:
        """Float32 logits after penalties, min_new_tokens masking and logit_bias (a copy
        whenever anything changes)."""
        if len(options) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows but {len(options)} sampling options")
        logits = logits.float()
        if not any(o.adjusts_logits for o in options):
            return logits
        logits = logits.clone()
        histories = histories if histories is not None else [()] * len(options)
        _apply_history_penalties(logits, options, histories)
        for i, o in enumerate(options):
            if o.logit_bias:
                toks = torch.tensor(list(o.logit_bias), device=logits.device)
                logits[i, toks] += torch.tensor(list(o.logit_bias.values()), device=logits.device)
        return logits

    def greedy_tokens(self, logits: torch.Tensor, options: Sequence[SamplingOptions],
                      histories: Sequence[Sequence[int]] | None = None, prompt_ids=None) -> torch.Tensor:
        """Argmax of the adjusted logits, whatever each row's temperature: [N] int64."""
        return torch.argmax(self.adjusted_logits(logits, options, histories), dim=-1)

    def probs(self, logits: torch.Tensor, options: Sequence[SamplingOptions],
              histories: Sequence[Sequence[int]] | None = None, prompt_ids=None) -> torch.Tensor:
        """The distribution each row samples from: [N, V] float32, rows sum to 1, one-hot for
        greedy rows."""
        return self._probs(self.adjusted_logits(logits, options, histories), options)

    def sample(self, logits: torch.Tensor, options: Sequence[SamplingOptions],
               histories: Sequence[Sequence[int]] | None = None, prompt_ids=None) -> torch.Tensor:
        """One token per row: [N] int64, on logits' device."""
        adjusted = self.adjusted_logits(logits, options, histories)
        if all(o.is_greedy for o in options):
            return torch.argmax(adjusted, dim=-1)
        return self.draw(self._probs(adjusted, options), options, histories)

    def draw(self, probs: torch.Tensor, options: Sequence[SamplingOptions],
             histories: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """One token per row of ``probs`` (as ``probs`` returns them): [N] int64.  Coupled rows
        pick by Gumbel-max with the noise of their output position (len(history): the row's
        index in the output); the others by inverse CDF with one uniform from the request's
        stream (greedy rows are one-hot, so both give their argmax and consume nothing)."""
        coupled = [i for i, o in enumerate(options) if o.coupled and not o.is_greedy]
        tokens = sample_from_probs(probs, self.uniforms(
            [o if not o.coupled else _GREEDY for o in options], probs.device))
        if coupled:
            if histories is None:
                raise ValueError("coupled sampling needs each row's history (its output position)")
            rows = torch.tensor(coupled, device=probs.device)
            tokens[rows] = coupled_tokens(probs[rows], [options[i].noise_seed() for i in coupled],
                                          [len(histories[i]) for i in coupled])
        return tokens

    @staticmethod
    def uniforms(options: Sequence[SamplingOptions], device: torch.device | str = "cpu") -> torch.Tensor:
        """One U[0, 1) draw per row from its request's generator (0 for greedy rows, which
        consume nothing): [N] float64, 53 random bits, so that inverse-CDF sampling resolves
        probabilities far below float32's step of 2**-24 (make_uniforms draws the same way)."""
        u = [float(torch.rand((), generator=o.get_generator(), dtype=torch.float64, device="cpu"))
             if not o.is_greedy else 0.0 for o in options]
        return torch.tensor(u, dtype=torch.float64, device=device)

    def _probs(self, adjusted: torch.Tensor, options: Sequence[SamplingOptions]) -> torch.Tensor:
        n, vocab = adjusted.shape
        device = adjusted.device
        temps = torch.tensor([o.temperature for o in options], dtype=torch.float32, device=device)
        probs = torch.softmax(adjusted / temps[:, None], dim=-1)
        filtered = [i for i, o in enumerate(options)
                    if not o.is_greedy and (o.top_k < vocab or o.top_p < 1.0 or o.min_p > 0.0)]
        if filtered:
            rows = torch.tensor(filtered, device=device)
            probs[rows] = filter_probs(
                probs[rows],
                top_k=torch.tensor([min(options[i].top_k, vocab) for i in filtered], device=device),
                top_p=torch.tensor([options[i].top_p for i in filtered], device=device),
                min_p=torch.tensor([options[i].min_p for i in filtered], device=device),
            )
        greedy = [i for i, o in enumerate(options) if o.is_greedy]
        if greedy:
            rows = torch.tensor(greedy, device=device)
            onehot = torch.zeros(len(greedy), vocab, dtype=probs.dtype, device=device)
            onehot.scatter_(1, torch.argmax(adjusted[rows], dim=-1, keepdim=True), 1.0)
            probs[rows] = onehot
        return probs


_GREEDY = SamplingOptions(temperature=0.0)  # stands in for rows that draw no uniform


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """Top-k, top-p and min-p on probability rows [n, V] (per-row parameters [n]), renormalised.

    Same rule as SGLang's top_k_top_p_min_p_sampling_from_probs_torch: on the descending sort,
    drop ranks >= top_k, drop tokens whose preceding mass exceeds top_p, drop tokens below
    min_p times the largest probability.  The most likely token always survives.
    """
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    drop |= mass_before > top_p[:, None]
    drop |= sorted_p < (sorted_p[:, :1] * min_p[:, None])
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative mass exceeds
    uniforms[i] * (row mass).  Tokens of zero probability can never be chosen.

    In float64: a float32 CDF over 152k tokens is rounded to steps of ~6e-8 near 1, which moves
    every token's interval by up to that much (tiny tokens' intervals vanish or grow several
    times over), so the tokens drawn would not follow ``probs``, the q that rejection sampling
    is told.  The float64 running sum of float32 probabilities is exact to ~1e-16 per step."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    total = cdf[:, -1]
    # u * total may round up to total for u just below 1: aim just under it, so the draw lands
    # on the last token of positive probability instead of running past the row.
    target = torch.minimum(uniforms.to(torch.float64) * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def _apply_history_penalties(logits: torch.Tensor, options: Sequence[SamplingOptions],
                             histories: Sequence[Sequence[int]]) -> None:
    """Frequency, presence, min_new_tokens and repetition penalties, in place."""
    device = logits.device
    rows = [i for i, o in enumerate(options) if o.uses_history]
    if not rows:
        return
    n_rows, vocab = len(rows), logits.shape[1]
    row_of = torch.tensor(rows, device=device)
    # counts[r, t]: how often token t occurs in row rows[r]'s output history.
    counts = torch.zeros(n_rows, vocab, dtype=torch.float32, device=device)
    lengths = [len(histories[i]) for i in rows]
    if sum(lengths):
        tokens = torch.tensor(list(itertools.chain.from_iterable(histories[i] for i in rows)),
                              dtype=torch.int64, device=device)
        row_ids = torch.repeat_interleave(torch.arange(n_rows, device=device),
                                          torch.tensor(lengths, device=device))
        counts.index_put_((row_ids, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
    occurred = counts > 0

    def per_row(attr):
        return torch.tensor([float(getattr(options[i], attr)) for i in rows], device=device)[:, None]

    sub = logits[row_of]
    # Additive penalties first ...
    sub -= per_row("frequency_penalty") * counts
    sub -= per_row("presence_penalty") * occurred
    for r, i in enumerate(rows):
        o = options[i]
        if o.min_new_tokens > 0 and o.stop_token_ids and len(histories[i]) < o.min_new_tokens:
            sub[r, list(o.stop_token_ids)] = float("-inf")
    # ... then the multiplicative one, on tokens that occurred.
    rep = per_row("repetition_penalty").expand(-1, vocab)
    scale = torch.where(occurred, rep, torch.ones_like(rep))
    sub = torch.where(sub < 0, sub * scale, sub / scale)
    logits[row_of] = sub
