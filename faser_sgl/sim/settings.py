"""A simulated server setting, read from the same server arguments the load harness starts with.

``--setting NAME="SERVER ARGS"`` means the same in ``python -m faser_sgl.bench`` and here: the
faser_sgl options are parsed by the server's own parser (``FaserOptions``), the few SGLang
arguments that shape scheduling are read too, and everything else (model paths, ports, ...) is
ignored, so one settings list drives real and simulated runs alike.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from faser_sgl.managers.step_budget import step_token_budget
from faser_sgl.options import FaserOptions

# A CPU server's pool without --max-total-tokens (FaserOptions.default_kv_slots), and the
# context of the Qwen2.5 pair the profiles were measured on (max_position_embeddings).
DEFAULT_CONTEXT_LEN = 32768
DEFAULT_MAX_RUNNING = 64  # Scheduler: server_args.max_running_requests or 64


@dataclass
class SimSetting:
    name: str
    args: str  # the server arguments, as given
    options: FaserOptions
    max_total_tokens: int
    max_running_requests: int
    max_step_tokens: int
    context_len: int

    @property
    def speculative(self) -> bool:
        return self.options.speculative_policy != "none"

    @property
    def pipelined(self) -> bool:
        """Whether the real server may pipeline frontiers here (``--faser-frontier-size`` auto or
        N > 0; the faser policy's default): simulated by ``pipeline.SimulatedFrontierGenerator``
        where the cost profile prices splits, serially (with a note) where it does not."""
        return self.speculative and self.options.frontier_size_value != 0


def parse_setting(name: str, args: str) -> SimSetting:
    parser = argparse.ArgumentParser(add_help=False)
    FaserOptions.add_cli_args(parser)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--chunked-prefill-size", type=int, default=None)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--max-prefill-tokens", type=int, default=None)
    parsed, _ignored = parser.parse_known_args(shlex.split(args))
    options = FaserOptions.from_cli_args(parsed)
    max_running = parsed.max_running_requests or DEFAULT_MAX_RUNNING
    return SimSetting(
        name=name, args=args, options=options,
        max_total_tokens=parsed.max_total_tokens or options.default_kv_slots,
        max_running_requests=max_running,
        max_step_tokens=step_token_budget(parsed.chunked_prefill_size, options.max_step_tokens,
                                          parsed.context_length or DEFAULT_CONTEXT_LEN,
                                          parsed.max_prefill_tokens, max_running),
        context_len=parsed.context_length or DEFAULT_CONTEXT_LEN,
    )
