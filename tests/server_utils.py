"""Start a real faser_sgl server (SGLang front half + our scheduler) on 127.0.0.1 for tests:
the load-test harness's launcher with the model path as the first argument."""

from __future__ import annotations

import json
from pathlib import Path

from faser_sgl.bench import server_process
from faser_sgl.bench.server_process import Server


def start_server(model_path: str, log_dir: Path, extra_args: list[str] | None = None,
                 timeout: float = 300.0, **kwargs) -> Server:
    """kwargs: env, host, api_key (faser_sgl.bench.server_process.start_server)."""
    return server_process.start_server(["--model-path", str(model_path), *(extra_args or [])],
                                       log_dir, timeout, **kwargs)


def stream_events(response) -> list[dict]:
    """SGLang's streaming responses: ``data: {json}`` lines (for /generate, each with all output
    ids so far), ended by ``data: [DONE]``."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            events.append(json.loads(data))
    return events
