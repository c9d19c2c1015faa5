"""SGLang server flags whose meaning lives in the scheduler or model runner, which this server
replaces: each is honoured, refused at start-up with the reason, or ignored with a warning where
ignoring it changes nothing a request can observe.  docs/sglang_flags.md lists them all; flags
of SGLang's front half (HTTP, API keys, tokenizer, detokenizer, logging) are SGLang's own code
here and mean what they mean there.
"""

from __future__ import annotations

# Given explicitly, these are accepted and have no effect here; the warning says why.
IGNORED = {
    **{flag: "this executor does not capture CUDA graphs yet"
       for flag in ("--cuda-graph-max-bs-decode", "--cuda-graph-max-bs-prefill",
                    "--cuda-graph-bs-decode", "--cuda-graph-bs-prefill")},
    "--scheduler-recv-interval": "the scheduler reads its sockets once per step without blocking, "
                                 "which is the overhead the flag would save",
    "--disable-chunked-prefix-cache": "it concerns DeepSeek's MLA prefill, which this executor does not run",
    **{flag: "it concerns sliding-window, Mamba or NPU KV layouts of model families this executor "
             "does not load" for flag in ("--swa-full-tokens-ratio", "--swa-prefix-tails",
                                          "--disable-hybrid-swa-memory", "--max-mamba-cache-size",
                                          "--mamba-full-memory-ratio", "--c128-page-size")},
    "--prefill-decode-interval-min-bs": "it only acts with --prefill-decode-interval, which faser_sgl refuses",
    "--prefill-only-disable-kv-cache": "it concerns embedding prefill, which this server does not serve",
    **{flag: "it only acts with --enable-prefill-delayer, which faser_sgl refuses"
       for flag in ("--prefill-delayer-max-delay-passes", "--prefill-delayer-token-usage-low-watermark",
                    "--prefill-delayer-forward-passes-buckets", "--prefill-delayer-wait-seconds-buckets",
                    "--prefill-delayer-queue-min-ratio", "--prefill-delayer-max-delay-ms")},
    **{flag: "it only acts with --enable-priority-scheduling, which faser_sgl does not serve"
       for flag in ("--default-priority-value", "--schedule-low-priority-values-first",
                    "--priority-scheduling-preemption-threshold", "--disable-priority-preemption")},
}


def refused_schedule_flags(server_args, argv: list[str]) -> list[tuple[str, str]]:
    """(flag, reason) for scheduling features asked for that this scheduler does not have."""
    def value(name, default=None):
        return getattr(server_args, name, default)

    refused = []
    if value("enable_priority_scheduling"):
        refused.append(("--enable-priority-scheduling", "priority scheduling is not implemented; "
                        "requests run in --schedule-policy order (fcfs or lpm)"))
    if value("retraction_policy", "length") not in (None, "length"):
        refused.append(("--retraction-policy", "only 'length' (retract the newest request first "
                        "here); 'priority' needs priority scheduling"))
    if (value("num_continuous_decode_steps") or 1) != 1:
        refused.append(("--num-continuous-decode-steps", "every step is planned anew (one decode "
                        "step per plan); multi-step decoding is not implemented"))
    if given(argv, "--prefill-decode-interval") and (value("prefill_decode_interval") or 0) > 0:
        refused.append(("--prefill-decode-interval", "prefill chunks always run beside the decodes "
                        "(mixed chunks), so there are no decode-only rounds to count"))
    if given(argv, "--page-size") and value("page_size") not in (None, 1):
        refused.append(("--page-size", "the KV cache is paged one token per slot"))
    if value("enable_dynamic_chunking"):
        refused.append(("--enable-dynamic-chunking", "it sizes chunks for pipeline parallelism, "
                        "which is not implemented"))
    if value("enable_prefill_delayer"):
        refused.append(("--enable-prefill-delayer", "it balances DP-attention ranks, which this "
                        "server does not have"))
    if given(argv, "--min-free-slots-delay") and (value("min_free_slots_delay") or 1) > 1:
        refused.append(("--min-free-slots-delay", "admission does not hold prefills back for "
                        "batching; it admits whatever fits each step"))
    limit = value("prefill_max_requests")
    if limit is not None and limit < 1:
        refused.append(("--prefill-max-requests", f"must be at least 1, got {limit}"))
    return refused


def given(argv: list[str], flag: str) -> bool:
    """Whether argv passes flag explicitly (``--flag value`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def check_server_args(server_args, argv: list[str]) -> list[str]:
    """Raise SystemExit naming the reason for a flag value this server refuses; return one
    warning per ignored flag given in argv."""
    from faser_sgl.managers.batch_planner import BatchPlanner

    policy = server_args.schedule_policy or "fcfs"
    if policy not in BatchPlanner.SCHEDULE_POLICIES:
        raise SystemExit(f"--schedule-policy {policy} is not supported by faser_sgl: it schedules "
                         f"{' or '.join(BatchPlanner.SCHEDULE_POLICIES)} (lpm: longest cached prefix first)")
    conservativeness = server_args.schedule_conservativeness
    if conservativeness is not None and not conservativeness >= 0:
        raise SystemExit(f"--schedule-conservativeness must be >= 0, got {conservativeness}")
    fraction = server_args.mem_fraction_static
    if given(argv, "--mem-fraction-static") and not (fraction is not None and 0 < fraction <= 1):
        raise SystemExit(f"--mem-fraction-static must be in (0, 1], got {fraction}")
    for flag, reason in refused_features(server_args) + refused_schedule_flags(server_args, argv):
        raise SystemExit(f"{flag} is not supported by faser_sgl: {reason}")
    return [f"{flag} is ignored by faser_sgl: {why}" for flag, why in IGNORED.items() if given(argv, flag)]


def refused_features(server_args) -> list[tuple[str, str]]:
    """(flag, reason) for every feature asked for that this server does not serve."""
    def value(name, default=None):
        return getattr(server_args, name, default)

    refused = []
    if (value("tp_size") or 1) > 1:
        refused.append(("--tp-size", "tensor parallelism is not implemented; a server runs on one "
                                     "device (python -m faser_sgl.launch_cluster runs replicas)"))
    if (value("pp_size") or 1) > 1:
        refused.append(("--pp-size", "pipeline parallelism is not implemented"))
    if value("speculative_algorithm"):
        refused.append(("--speculative-algorithm", "this server's speculation is its own: "
                        "--speculative-policy fixed|adaptive|faser|batch-ema|batch-table with "
                        "--speculative-draft-model-path (python -m faser_sgl.launch_server --help)"))
    if value("enable_lora") or value("lora_paths"):
        refused.append(("--enable-lora/--lora-paths", "LoRA adapters are not served"))
    if value("quantization"):
        refused.append(("--quantization", "the executor runs unquantized float32/bfloat16 weights"))
    if (value("kv_cache_dtype") or "auto") != "auto":
        refused.append(("--kv-cache-dtype", "the KV cache has the executor's dtype"))
    if (value("grammar_backend") or "xgrammar") != "xgrammar":
        refused.append(("--grammar-backend", f"constrained decoding runs on xgrammar only (asked: "
                        f"{value('grammar_backend')}); outlines and llguidance are not served"))
    return refused
