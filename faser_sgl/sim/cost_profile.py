"""How long a simulated forward pass takes: a cost profile per model ("target", "draft").

A profile maps the number of tokens a pass carries (decode rows + draft rows + prefill chunks,
summed over the batch) to seconds, plus, optionally, a term for the attention over the cached
context: ``per_context_token_us`` x the pass's *context*, the sum over the requests in the pass
of the tokens each request's attention reads (its cached tokens + the tokens it feeds, i.e. the
KV slots the pass attends over).  On the CPU machines measured so far the weights' traffic and
the row count dominate a pass and the attention is a few percent of it (docs/benchmarks.md,
"Where a decode step's time goes"), so the CPU profile has no context term; on a GPU serving
large batches of long contexts the KV reads grow with batch x context and can outweigh the
weights (the roofline profiles derive theirs from the models' KV bytes per token).

Three ways to give one:
- a JSON file (or a built-in name, see ``BUILTIN``)::

      {"name": "...", "machine": "...", "units": "ms",
       "target": {"points": [[1, 294], [2, 332], ...], "per_context_token_us": 0.0978},
       "draft": {"fixed_ms": 2, "per_token_ms": 0.01},
       "step_overhead": {"fixed_ms": 20, "per_request_ms": 3, "per_draft_pass_ms": 5}}

  ``points`` are (tokens, ms) pairs, interpolated linearly and extrapolated past the last
  point with the last segment's slope; ``fixed_ms`` + ``per_token_ms`` is a straight line.
  ``per_context_token_us`` (optional, microseconds whatever ``units`` says, default 0) is the
  context term above: a pass costs curve(tokens) + per_context_token_us x context.  Without it
  a pass is priced by its token count only, exactly as before the term existed.
  The optional ``step_overhead`` (``StepOverhead``) is added once per step; without it a step
  costs its passes only.
  The optional ``splits`` list (``SplitCost``) prices FASER's frontier pipeline: per hardware
  split, each side's pass while the other side runs, e.g. ``{"name": "cpu:1+1", "draft_share": 1,
  "target": {"points": ...}, "draft": {"scale": 1.43}}`` (a scale multiplies the whole-machine
  curve, its context term included); without it pipelined settings run serially
  (sim/pipeline.py).  A split side may give its own ``per_context_token_us``; a ``points`` or
  ``fixed_ms`` side without one keeps the whole machine's context term, a ``scale`` side
  scales it.
- the adaptive policy's ``--speculative-cost-profile`` text, ``target=30+0.01,draft=2+0.01``
  (no context term);
- a policy's learnt cost curves (``from_curves``), e.g. after the server's start-up calibration
  (no context term).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from faser_sgl.speculative.adaptive import parse_cost_profile

PROFILE_DIR = Path(__file__).parent / "profiles"
BUILTIN = {"cpu-xeon-2core": PROFILE_DIR / "cpu_xeon_2core.json",
           # Derived on paper from the GPUs' rooflines, not measured (see their "sources").
           "h100-roofline-qwen3-32b": PROFILE_DIR / "h100_roofline_qwen3_32b.json",
           "h200-roofline-qwen3-32b": PROFILE_DIR / "h200_roofline_qwen3_32b.json",
           "h100x4-tp4-roofline-qwen3-32b": PROFILE_DIR / "h100x4_tp4_roofline_qwen3_32b.json"}
MODELS = ("target", "draft")


@dataclass
class PassCurve:
    """Seconds of one pass against its token count: piecewise linear through ``points``, plus
    ``per_context_s`` seconds per token of context the pass's attention reads (module
    docstring; 0: priced by token count only)."""

    points: list[tuple[float, float]]  # (tokens, seconds), sorted by tokens
    per_context_s: float = 0.0

    def __post_init__(self):
        self.points = sorted((float(n), float(s)) for n, s in self.points)
        if not self.points:
            raise ValueError("a pass curve needs at least one point")
        if any(n <= 0 or s < 0 or not math.isfinite(s) for n, s in self.points):
            raise ValueError(f"pass curve points must have tokens > 0 and seconds >= 0: {self.points}")
        self._keys = [n for n, _ in self.points]
        self.per_context_s = float(self.per_context_s)
        if self.per_context_s < 0 or not math.isfinite(self.per_context_s):
            raise ValueError(f"per_context_token_us must be finite and >= 0, got {self.per_context_s * 1e6}")

    @classmethod
    def line(cls, fixed_s: float, per_token_s: float, per_context_s: float = 0.0) -> "PassCurve":
        return cls([(1.0, fixed_s + per_token_s), (2.0, fixed_s + 2 * per_token_s)], per_context_s)

    def seconds(self, tokens: float, context: float = 0.0) -> float:
        return self.token_seconds(tokens) + self.per_context_s * context if self.per_context_s \
            else self.token_seconds(tokens)

    def token_seconds(self, tokens: float) -> float:
        """The curve alone (no context term)."""
        pts = self.points
        if len(pts) == 1 or tokens <= pts[0][0]:
            # Below the first measured size a pass costs no less than it (a pass has a floor).
            return pts[0][1]
        i = min(max(bisect.bisect_left(self._keys, tokens), 1), len(pts) - 1)
        (n0, s0), (n1, s1) = pts[i - 1], pts[i]
        return max(0.0, s0 + (s1 - s0) * (tokens - n0) / (n1 - n0))


@dataclass
class StepOverhead:
    """What a step costs besides its forward passes: the scheduler's planning, sampling over the
    vocabulary, stop checks, output messages and socket reads, and the CPU the server's other
    processes (tokenizer, detokenizer, HTTP) take from the passes.  Linear in the step's requests
    and draft passes (each draft pass samples every drafting request's next token)."""

    fixed_s: float = 0.0
    per_request_s: float = 0.0
    per_draft_pass_s: float = 0.0

    def seconds(self, requests: int, draft_passes: int) -> float:
        return self.fixed_s + self.per_request_s * requests + self.per_draft_pass_s * draft_passes

    @classmethod
    def from_dict(cls, spec: dict, scale: float) -> "StepOverhead":
        values = [spec.get(k, 0.0) * scale for k in ("fixed_ms", "per_request_ms", "per_draft_pass_ms")]
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError(f"step overhead terms must be finite and >= 0: {spec}")
        return cls(*values)

    def to_dict(self) -> dict:
        return {"fixed_ms": self.fixed_s * 1e3, "per_request_ms": self.per_request_s * 1e3,
                "per_draft_pass_ms": self.per_draft_pass_s * 1e3}


@dataclass
class ScaledCurve:
    """A split side's pass cost given as a multiple of the whole machine's curve (a side that
    was measured at one shape, or derived on paper as "s times slower")."""

    base: PassCurve
    scale: float
    per_context_s: float | None = None  # None: scale x the base's context term

    def seconds(self, tokens: float, context: float = 0.0) -> float:
        per_context = self.scale * self.base.per_context_s if self.per_context_s is None else self.per_context_s
        return self.scale * self.base.token_seconds(tokens) + per_context * context


@dataclass
class SplitCost:
    """One hardware split of the frontier pipeline (speculative/lanes.py): the seconds of each
    side's pass *while the other side runs*, which is what FrontierController's split curves hold
    (the real generator times them with the other side busy).  ``name`` is the real split's name
    (``cpu:1+1``, ``cuda:100+32sm``, ...); ``draft_share`` the draft side's cores or SMs, which
    ``--faser-pipeline-split N`` selects (0: no partition; None: not stated)."""

    name: str
    target: PassCurve | ScaledCurve
    draft: PassCurve | ScaledCurve
    draft_share: int | None = None

    def seconds(self, model: str, tokens: float, context: float = 0.0) -> float:
        return (self.target if model == "target" else self.draft).seconds(tokens, context)

    @classmethod
    def from_dict(cls, spec: dict, whole: dict, scale: float) -> "SplitCost":
        """``whole``: the profile's curves by model (what a ``{"scale": x}`` side multiplies);
        ``scale``: seconds per unit of the profile's ``points``."""
        sides = {}
        for model in MODELS:
            side = spec.get(model)
            if side is None:
                raise ValueError(f"split {spec.get('name')!r} has no {model!r} entry")
            own_context = _per_context_s(side)
            if "scale" in side:
                factor = float(side["scale"])
                if not (factor > 0 and math.isfinite(factor)):
                    raise ValueError(f"split {spec.get('name')!r}: {model} scale must be > 0, got {factor}")
                sides[model] = ScaledCurve(whole[model], factor, own_context)
            else:
                # Without its own context term a side keeps the whole machine's.
                sides[model] = _curve(side, scale, whole[model].per_context_s if own_context is None
                                      else own_context)
        share = spec.get("draft_share")
        return cls(str(spec["name"]), sides["target"], sides["draft"], None if share is None else int(share))

    def to_dict(self, explicit_context: bool = False) -> dict:
        """``explicit_context``: write every curve side's context term, zero included (a side
        without one would otherwise inherit the whole machine's when read back)."""
        def side(curve):
            if isinstance(curve, ScaledCurve):
                return {"scale": curve.scale, **({} if curve.per_context_s is None else
                                                  {"per_context_token_us": curve.per_context_s * 1e6})}
            return _curve_dict(curve, explicit_context)

        return {"name": self.name, "draft_share": self.draft_share,
                **{m: side(getattr(self, m)) for m in MODELS}}


def _per_context_s(spec: dict) -> float | None:
    """A curve's ``per_context_token_us`` in seconds, or None where it gives none."""
    if "per_context_token_us" not in spec:
        return None
    value = float(spec["per_context_token_us"]) * 1e-6
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"per_context_token_us must be finite and >= 0, got {spec['per_context_token_us']}")
    return value


def _curve(spec: dict, scale: float, per_context_s: float) -> PassCurve:
    """A ``points`` or ``fixed_ms``/``per_token_ms`` curve; ``scale``: seconds per unit of the
    points."""
    if "points" in spec:
        return PassCurve([(n, s * scale) for n, s in spec["points"]], per_context_s)
    return PassCurve.line(spec["fixed_ms"] * 1e-3, spec["per_token_ms"] * 1e-3, per_context_s)


def _curve_dict(curve: PassCurve, explicit_context: bool = False) -> dict:
    return {"points": [[n, s * 1e3] for n, s in curve.points],
            **({"per_context_token_us": curve.per_context_s * 1e6}
               if curve.per_context_s or explicit_context else {})}


def parse_splits(entries, whole: dict, scale: float) -> list[SplitCost]:
    splits = [SplitCost.from_dict(e, whole, scale) for e in entries or []]
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"cost profile splits must have distinct names: {names}")
    return splits


@dataclass
class CostProfile:
    target: PassCurve
    draft: PassCurve
    name: str = "custom"
    machine: str = "unspecified"
    sources: dict = field(default_factory=dict)
    step_overhead: StepOverhead = field(default_factory=StepOverhead)  # none unless the profile says
    splits: list[SplitCost] = field(default_factory=list)  # frontier pipeline; none: serial

    def seconds(self, model: str, tokens: int, context: float = 0.0) -> float:
        """One pass of ``model`` over ``tokens`` tokens whose attention reads ``context`` tokens
        of KV in all (cached + fed, summed over the pass's requests; module docstring)."""
        return (self.target if model == "target" else self.draft).seconds(tokens, context)

    @property
    def has_context_term(self) -> bool:
        return bool(self.target.per_context_s or self.draft.per_context_s)

    def describe(self) -> str:
        return f"cost profile {self.name!r} ({self.machine})"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "CostProfile":
        scale = {"ms": 1e-3, "s": 1.0}[data.get("units", "ms")]
        curves = {}
        for model in MODELS:
            spec = data.get(model)
            if spec is None:
                raise ValueError(f"cost profile has no {model!r} entry")
            curves[model] = _curve(spec, scale, _per_context_s(spec) or 0.0)
        overhead = StepOverhead.from_dict(data["step_overhead"], 1e-3) if "step_overhead" in data else StepOverhead()
        splits = parse_splits(data.get("splits"), curves, scale)
        return cls(curves["target"], curves["draft"], data.get("name", "custom"),
                   data.get("machine", "unspecified"), data.get("sources", {}), overhead, splits)

    @classmethod
    def from_text(cls, text: str) -> "CostProfile":
        """``--speculative-cost-profile`` syntax: ``target=FIXED_MS+PER_TOKEN_MS,draft=...``."""
        costs = parse_cost_profile(text)
        return cls(PassCurve.line(*costs["target"]), PassCurve.line(*costs["draft"]),
                   name=text, machine="given as --speculative-cost-profile")

    @classmethod
    def from_curves(cls, target_curve, draft_curve, name: str = "learnt", machine: str = "unspecified",
                    target_sizes=(1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 256, 512),
                    draft_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> "CostProfile":
        """From two ``adaptive.CostCurve`` objects (what a policy learnt from measured passes),
        sampled at the given sizes."""
        return cls(PassCurve([(n, target_curve.predict(n)) for n in target_sizes]),
                   PassCurve([(n, draft_curve.predict(n)) for n in draft_sizes]), name, machine)

    def to_dict(self) -> dict:
        return {"name": self.name, "machine": self.machine, "units": "ms", "sources": self.sources,
                **{m: _curve_dict(getattr(self, m)) for m in MODELS},
                "step_overhead": self.step_overhead.to_dict(),
                **({"splits": [s.to_dict(self.has_context_term) for s in self.splits]} if self.splits else {})}


def load_cost_profile(spec: str) -> CostProfile:
    """A built-in name, a JSON file, or ``--speculative-cost-profile`` text."""
    if spec in BUILTIN:
        return CostProfile.from_dict(json.loads(BUILTIN[spec].read_text()))
    if spec.endswith(".json") or Path(spec).is_file():
        return CostProfile.from_dict(json.loads(Path(spec).read_text()))
    if "target=" in spec:
        return CostProfile.from_text(spec)
    raise ValueError(f"cost profile {spec!r} is not one of {sorted(BUILTIN)}, a JSON file, or "
                     "'target=FIXED_MS+PER_TOKEN_MS,draft=FIXED_MS+PER_TOKEN_MS'")
