"""``--faser-record-steps PATH``: one JSON line per scheduler step, for fitting the simulator.

The simulator prices a step as its forward passes plus a per-step overhead (everything the
scheduler process does besides the passes: planning, sampling over the vocabulary, stop checks,
output messages, reading the sockets).  Both are measured here, on the running server, under
the load being simulated: ``scripts/profile_from_steps.py`` fits a cost profile from these lines.

A line::

    {"t": 12.345, "wall": 0.412, "gap": 0.003, "passes": [["draft", 31, 0.118], ["target", 5, 0.39]],
     "requests": 2, "decodes": 1, "prefill_tokens": 0, "emitted": 3, "preempted": false}

``t``: seconds since the recorder started; ``wall``: from planning to the outputs sent;
``gap``: from the previous step's end to this one's start when the scheduler had work all along
(the loop's socket reads and bookkeeping between steps), else null; ``passes``: in the order
they ended (a pipelined step's draft and target passes overlap).  Speculative policies add
``predicted`` and ``predicted_no_draft``: their cost model's seconds for the step as chosen and
for the same step without drafts, so that a wrong cost model shows itself beside ``wall``, and
``choice``: per decode the draft length chosen (``k``), the tokens the draft model lagged behind
(``lag``) and, for policies that estimate it, the acceptance estimate (``accept_est``).
"""

from __future__ import annotations

import json
import logging
import time

logger = logging.getLogger(__name__)


def _is_decode(chunk) -> bool:
    """SpeculativeGenerator's rule: a one-token chunk that samples the next token."""
    return chunk.needs_logits and len(chunk.tokens) == 1


class StepRecorder:
    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a", buffering=1)  # a line per write: readable while serving
        self._origin = time.perf_counter()
        self._passes: list[list] = []
        self._start = 0.0
        self._last_end: float | None = None  # None: the scheduler went idle after the last step

    def on_pass(self, model: str, tokens: int, seconds: float) -> None:
        self._passes.append([model, tokens, round(seconds, 6)])

    def begin(self) -> None:
        self._start = time.perf_counter()
        self._passes = []  # (start-up calibration's passes, or a failed step's, are not this step's)

    def end(self, chunks, emitted: int, preempted: bool, still_busy: bool,
            prediction: tuple[float, float] | None = None, choice: dict | None = None) -> None:
        """``prediction``: the speculative generator's (predicted seconds of the step as its
        policy chose it, of the same step without drafts), or None."""
        end = time.perf_counter()
        line = {"t": round(self._start - self._origin, 6), "wall": round(end - self._start, 6),
                "gap": round(self._start - self._last_end, 6) if self._last_end is not None else None,
                "passes": self._passes, "requests": len(chunks),
                "decodes": sum(1 for c in chunks if _is_decode(c)),
                "prefill_tokens": sum(len(c.tokens) for c in chunks if not _is_decode(c)),
                "emitted": emitted, "preempted": preempted}
        if prediction is not None:
            line["predicted"], line["predicted_no_draft"] = (round(x, 6) for x in prediction)
        if choice is not None:
            line["choice"] = choice
        self._last_end = end if still_busy else None
        try:
            self._file.write(json.dumps(line) + "\n")
        except (OSError, ValueError) as exc:  # a trace must never stop serving
            logger.warning("step record not written to %s: %s", self.path, exc)

    def close(self) -> None:
        self._file.close()
