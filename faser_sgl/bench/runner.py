"""Drive one workload against a server with SGLang's own benchmark client.

The request function (streaming ``/generate``, TTFT and inter-token latencies), the arrival
scheduler (``get_request`` replaying timestamps) and the metric calculation
(``calculate_metrics``) are ``sglang.bench_serving``'s, so our numbers mean what SGLang's mean.
What we add: arrivals decided up front, the server's speculation counters around the run, and
each request's text so settings can be checked for identical output."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import requests
from tqdm.asyncio import tqdm

from faser_sgl.bench.workloads import Workload

# The speculation counters of /get_server_info that a run's delta is taken of.
SPEC_COUNTERS = ("spec_verify_steps", "spec_drafted_tokens", "spec_accepted_tokens", "spec_pipelined_steps")
# Early exit's counters (its ``spec_early_exit`` statistics), as ``exit_<name>``: whether its
# drafts were scored at all (worth_scoring) and what it pruned.
EXIT_COUNTERS = ("scored_steps", "unscored_steps", "probe_steps", "draft_rows", "rows_pruned")


def client_args(temperature: float, ignore_eos: bool) -> argparse.Namespace:
    """The module-level ``args`` that sglang's request function reads."""
    return argparse.Namespace(
        temperature=temperature, top_p=1.0, disable_ignore_eos=not ignore_eos,
        disable_stream=False, return_logprob=False, return_routed_experts=False,
        logprob_start_len=-1, top_logprobs_num=0, token_ids_logprob=None, cache_report=False,
        header=None)


def server_counters(base_url: str) -> dict:
    """The counters summed over the servers behind base_url (every worker of a router)."""
    from faser_sgl.bench.server_process import backend_urls, internal_state

    states = [internal_state(url) for url in backend_urls(base_url)]
    counters = {name: sum(state.get(name) or 0 for state in states) for name in SPEC_COUNTERS}
    for name in EXIT_COUNTERS:
        counters[f"exit_{name}"] = sum((state.get("spec_early_exit") or {}).get(name) or 0 for state in states)
    return counters


async def _send_all(base_url: str, workload: Workload, show_progress: bool, label: str):
    from sglang.benchmark.datasets.common import DatasetRow
    from sglang.benchmark.serving import RequestFuncInput, async_request_sglang_generate, get_request

    rows = [DatasetRow(prompt=p, prompt_len=n, output_len=workload.output_len, timestamp=t * 1000.0)
            for p, n, t in zip(workload.prompts, workload.prompt_lens, workload.arrivals_s)]
    pbar = tqdm(total=len(rows), desc=label, disable=not show_progress)
    start = time.perf_counter()
    tasks = []
    async for row in get_request(rows, float("inf"), use_trace_timestamps=True):
        request = RequestFuncInput(
            prompt=row.prompt, api_url=f"{base_url}/generate", prompt_len=row.prompt_len,
            output_len=row.output_len, model="", lora_name=None, image_data=None,
            extra_request_body={})
        tasks.append(asyncio.create_task(async_request_sglang_generate(request, pbar)))
    outputs = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    pbar.close()
    return rows, outputs, duration


def run_workload(base_url: str, workload: Workload, tokenizer, temperature: float = 0.0,
                 ignore_eos: bool = False, show_progress: bool = True, label: str = "") -> dict:
    """Send every request of ``workload`` at its arrival offset, wait for all of them and return
    one result record (plain JSON types)."""
    from sglang.benchmark import serving

    serving.set_global_args(client_args(temperature, ignore_eos))
    before = server_counters(base_url)
    rows, outputs, duration = asyncio.run(_send_all(base_url, workload, show_progress, label))
    after = server_counters(base_url)
    metrics, _ = serving.calculate_metrics(rows, outputs, duration, tokenizer, "sglang")
    spec = {name: after[name] - before[name] for name in after}
    return {
        "workload": workload.name,
        "rate": workload.rate,
        "num_requests": workload.num_requests,
        "failed": sum(not o.success for o in outputs),
        "errors": sorted({o.error.splitlines()[0][:200] for o in outputs if not o.success and o.error}),
        "duration_s": duration,
        "metrics": {k: float(v) for k, v in dataclasses.asdict(metrics).items()},
        "spec": {
            **spec,
            "accept_rate": spec["spec_accepted_tokens"] / spec["spec_drafted_tokens"]
            if spec["spec_drafted_tokens"] else None,
        },
        "requests": [
            {"arrival_s": t, "prompt_len": row.prompt_len, "output_len": o.output_len,
             "success": o.success, "ttft_s": o.ttft, "latency_s": o.latency, "text": o.generated_text}
            for t, row, o in zip(workload.arrivals_s, rows, outputs)],
        "detail": workload.detail,
    }
