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
}


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
    for flag, reason in refused_features(server_args):
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
    return refused
