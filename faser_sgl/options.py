"""faser_sgl's own server options, beside SGLang's ServerArgs.

SGLang spawns the scheduler process with only (server_args, port_args, ...), so our options
travel to it through one environment variable that the spawned process inherits.  Keeping them
out of ServerArgs means SGLang's argument resolution never sees (or rejects) them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from faser_sgl.managers.request_guard import MAX_BODY_BYTES

ENV_VAR = "FASER_SGL_OPTIONS"


@dataclass
class FaserOptions:
    # Attention implementation of our executor: "torch" (CPU reference) or "flashinfer" (CUDA).
    attention_backend: str = "torch"
    # Executor dtype; "auto" = bfloat16 on CUDA; on a CPU bfloat16 where it multiplies bf16
    # natively (AMX, AVX-512 BF16) and start-up timing confirms it is faster, else float32
    # (executor/cpu_dtype.py).  float32 keeps greedy output identical to a float32 reference.
    dtype: str = "auto"
    # KV slots of the pool on a CPU when --max-total-tokens is not given (a GPU sizes its pool
    # from the memory left after loading the weights).
    default_kv_slots: int = 32768
    # SGLang's --mem-fraction-static when given (launch_server sets it; None: not given, since
    # SGLang fills in a default of its own): weights + KV pools take this share of the device's
    # memory (executor/model_runner.py).  --max-total-tokens still wins.
    mem_fraction_static: float | None = None
    # Tokens a single forward pass may process (prefill chunks + decode tokens).
    max_step_tokens: int = 2048
    # Non-streaming requests still send their ids to the detokenizer every this many tokens,
    # so that its incremental state stays small.
    non_stream_flush_interval: int = 50
    # CPU float32 linear layers: "auto" = executor/cpu_linear.py (pre-packed oneDNN weights at
    # the row counts where start-up timing finds them faster), "off" = torch's F.linear.
    cpu_linear: str = "auto"
    # CPU: keep the weights as views of the checkpoint's page cache (shared by the replicas of
    # launch_cluster, evictable under memory pressure) instead of this process's own memory.
    share_weights_mmap: bool = False
    # Torch intra-op threads for the scheduler process (0 = torch default).
    num_threads: int = 0
    # Speculative decoding: none (target only), fixed (K drafts per request per step, the
    # SGLang/vLLM-style baseline), adaptive (per-request lengths up to K, chosen each step from
    # acceptance and measured cost) or faser; batch-ema / batch-table: SGLang's and vLLM's
    # batch-wide adaptive schemes as baselines (speculative/batch_ema.py, batch_table.py).
    speculative_policy: str = "none"
    speculative_draft_model_path: str | None = None
    speculative_num_draft_tokens: int = 4
    # Adaptive policy only: "target=FIXED_MS+PER_TOKEN_MS,draft=FIXED_MS+PER_TOKEN_MS" pins its
    # cost model instead of measuring it (None: calibrate at start-up and learn from passes).
    speculative_cost_profile: str | None = None
    # batch-table policy only: "START:K,..." (None: batch_table.DEFAULT_BATCH_TABLE); batch-ema
    # policy only: a JSON file like SGLang's --speculative-adaptive-config (None: its defaults).
    batch_table: str | None = None
    batch_ema_config: str | None = None
    # How sampled requests draw (faser_sgl.managers.request.uses_coupled_sampling): from their
    # own random stream with rejection sampling of drafts, or by coupled Gumbel-max whose text
    # does not depend on the draft lengths.
    sampling_scheme: str = "seeded-coupled"
    # FASER early exit inside verification (speculative/early_exit.py): None = on for the faser
    # policy, off for the others; exit layers ("auto" or "14,21"), the lens threshold (None:
    # "auto", calibrated online), the draft candidates per token, and the diagnostic mode (full
    # depth, predictions recorded).
    early_exit: bool | None = None
    exit_layers: str = "auto"
    exit_threshold: float | None = None
    exit_draft_prob: float = 0.5
    exit_candidates: int = 8
    exit_diagnostic: bool = False
    # FASER frontier pipeline (speculative/frontier.py): "default" (auto for the faser policy,
    # serial for the others), "auto", or a frontier size (0: serial draft-then-verify); the
    # draft side of the hardware split: None (candidates, chosen per step) or cores / SMs.
    frontier_size: str = "default"
    pipeline_split: int | None = None
    # SIGTERM: seconds the running requests get to finish before the rest are aborted
    # (managers/lifecycle.py); new requests are refused with 503 from the signal on.
    shutdown_timeout: float = 30.0
    # Work waiting and no forward pass for this many seconds at least (more after long steps:
    # managers/progress_watchdog.py): the scheduler answers what can never start, or exits.
    progress_timeout: float = 60.0
    # Largest body a generation endpoint accepts (413 above it, before it is buffered:
    # managers/request_guard.py); 0: no limit, as SGLang's own server has none.
    max_request_bytes: int = MAX_BODY_BYTES
    # Append each finished request's verification steps [(drafts, accepted), ...] to this JSONL
    # file (the simulator's acceptance traces, faser_sgl/sim/acceptance.py); None: off.
    record_acceptance: str | None = None
    record_steps: str | None = None

    @property
    def frontier_size_value(self) -> int | None:
        """0: serial steps; None: the controller chooses per step; n: frontiers of n."""
        from faser_sgl.speculative.frontier import parse_frontier_size

        if self.speculative_policy == "none":
            return 0
        if self.frontier_size == "default":
            return None if self.speculative_policy == "faser" else 0
        return parse_frontier_size(self.frontier_size)

    @property
    def early_exit_on(self) -> bool:
        if self.speculative_policy == "none":
            return False
        return self.speculative_policy == "faser" if self.early_exit is None else self.early_exit

    def to_env(self) -> None:
        os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_env() -> "FaserOptions":
        raw = os.environ.get(ENV_VAR)
        return FaserOptions(**json.loads(raw)) if raw else FaserOptions()

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("faser_sgl")
        group.add_argument("--faser-attention-backend", choices=["torch", "flashinfer"], default="torch",
                           help="attention implementation of faser_sgl's executor")
        group.add_argument("--faser-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                           default="auto", help="executor dtype (auto: bf16 on CUDA; on a CPU bf16 where its flags "
                                "(amx_bf16, avx512_bf16) and a start-up timing say bf16 products are "
                                "native and faster, else float32, which keeps greedy output identical "
                                "to a float32 reference)")
        group.add_argument("--faser-max-step-tokens", type=int, default=FaserOptions.max_step_tokens,
                           help="token budget of one forward pass (prefill chunks + decodes)")
        group.add_argument("--faser-cpu-linear", choices=["auto", "off"], default=FaserOptions.cpu_linear,
                           help="CPU float32 projections and LM head: auto = each weight kept in the "
                                "one form that timing at start-up finds faster on this CPU, oneDNN "
                                "pre-packed (verification passes of several tokens cost little more "
                                "than one) or plain; off = torch's F.linear everywhere")
        group.add_argument("--faser-share-weights-mmap", action=argparse.BooleanOptionalAction,
                           default=FaserOptions.share_weights_mmap,
                           help="CPU: keep the weights as views of a map of the checkpoint file, so "
                                "that every server of that checkpoint on this machine shares one copy "
                                "(launch_cluster passes it to its replicas); projections are then "
                                "neither fused nor packed. Risk: the kernel may evict those pages "
                                "under memory pressure, and a pass then waits for the disk. Default: "
                                "the weights are this process's own memory")
        group.add_argument("--faser-num-threads", type=int, default=0,
                           help="torch threads in the scheduler process (0: torch default)")
        group.add_argument("--speculative-policy",
                           choices=["none", "fixed", "adaptive", "faser", "batch-ema", "batch-table"],
                           default="none",
                           help="none: target only; fixed: K draft tokens per request per step; "
                                "adaptive: 0..K per request per step, chosen from its acceptance "
                                "and the measured cost of drafting and verifying; faser: adaptive + "
                                "early exit inside verification (each mechanism switchable); "
                                "baselines: batch-ema (SGLang's --speculative-adaptive: one length "
                                "for the batch from an average of accepted drafts per batch-size "
                                "bucket), batch-table (vLLM's dynamic speculative decoding: one "
                                "length for the batch from a batch-size table)")
        group.add_argument("--speculative-draft-model-path", default=None,
                           help="draft model directory (default: the embedded Qwen2.5-Coder-0.5B draft)")
        group.add_argument("--speculative-num-draft-tokens", type=int, default=4,
                           help="K of the fixed policy (the most the adaptive one drafts); a request "
                                "may override it with "
                                "sampling_params.custom_params.num_draft_tokens")
        group.add_argument("--speculative-cost-profile", default=None,
                           metavar="target=FIXED_MS+PER_TOKEN_MS,draft=FIXED_MS+PER_TOKEN_MS",
                           help="adaptive policy only: pin its cost model to these lines (milliseconds "
                                "per pass plus per token, e.g. target=30+0.01,draft=2+0.01 for a GPU) "
                                "instead of timing passes at start-up and while serving")
        group.add_argument("--faser-batch-table", default=None, metavar="BATCH_SIZE:K,...",
                           help="batch-table policy only: K for batches from each size up to the next "
                                "entry's, e.g. 1:4,8:2,32:1,64:0 (the default; the first size must be "
                                "1; K is clamped to --speculative-num-draft-tokens)")
        group.add_argument("--faser-batch-ema-config", default=None, metavar="PATH",
                           help="batch-ema policy only: a JSON file shaped like SGLang's "
                                "--speculative-adaptive-config (batch-size bucket keys with "
                                "candidate_steps and rules; default: SGLang 0.5.23's)")

        group.add_argument("--faser-sampling-scheme", choices=["rejection", "coupled", "seeded-coupled"],
                           default=FaserOptions.sampling_scheme,
                           help="how sampled (temperature > 0) requests draw tokens. rejection: each "
                                "request's own random stream, drafts judged by standard rejection "
                                "sampling (highest acceptance); coupled: Gumbel-max with noise of "
                                "(seed, output position), drafts accepted when they equal the "
                                "target's pick, so a seeded request's text is the same with any "
                                "draft length, batch or policy and equal to target-only sampling; "
                                "seeded-coupled: coupled for requests with a sampling_seed, "
                                "rejection for the rest")

        group.add_argument("--faser-early-exit", action=argparse.BooleanOptionalAction, default=None,
                           help="FASER token-wise early exit inside verification: drop draft tokens "
                                "predicted to be rejected from the remaining target layers (lossless; "
                                "default: on for --speculative-policy faser, off for the others)")
        group.add_argument("--faser-exit-layers", default=FaserOptions.exit_layers,
                           help="layers after which verification may prune: 'auto' (1/2 and 3/4 of "
                                "the depth) or comma-separated layer counts")
        group.add_argument("--faser-exit-threshold", default="auto",
                           help="'auto' (default): prune by the chance of a rejection that the exit "
                                "predictor's scores had so far, calibrated online on full-depth verdicts; "
                                "a number: prune draft token d when a draft alternative's intermediate "
                                "(logit-lens) logit beats d's by more than it (lower prunes more)")
        group.add_argument("--faser-exit-draft-prob", type=float, default=FaserOptions.exit_draft_prob,
                           help="with a numeric --faser-exit-threshold, prune only when the draft model "
                                "gave d less than this probability (1.0: whatever the draft's confidence)")
        group.add_argument("--faser-exit-candidates", type=int, default=FaserOptions.exit_candidates,
                           help="draft alternatives per draft token that the exit predictor compares")
        group.add_argument("--faser-frontier-size", default="default",
                           help="FASER frontier pipeline: verify each draft in frontiers of this many "
                                "tokens while the draft model produces the next frontier on its own "
                                "share of the hardware. 'auto': chosen per step from measured pass "
                                "costs (serial when overlap does not pay); 0: serial draft-then-"
                                "verify; default: auto for --speculative-policy faser, 0 otherwise")
        group.add_argument("--faser-pipeline-split", default="auto",
                           help="the draft model's share of the hardware while a frontier pipeline "
                                "runs: CPU cores (the target keeps the rest) or SMs on a GPU (green "
                                "contexts); 0: no partition (shared cores, plain CUDA streams); "
                                "'auto': a few candidates measured at start-up and chosen per step")
        group.add_argument("--faser-shutdown-timeout", type=float, default=FaserOptions.shutdown_timeout,
                           help="on SIGTERM, refuse new requests (503) and give the running ones this "
                                "many seconds to finish; the rest are aborted, then the server exits 0")
        group.add_argument("--faser-max-request-bytes", type=int, default=FaserOptions.max_request_bytes,
                           metavar="BYTES",
                           help="largest request body /generate and the OpenAI endpoints accept; a "
                                "larger one gets a 413 before it is read whole (default 32 MiB; 0: "
                                "no limit, as SGLang's own server)")
        group.add_argument("--faser-progress-timeout", type=float, default=FaserOptions.progress_timeout,
                           metavar="SECONDS",
                           help="work waiting and no forward pass for this long (at least; 50x the "
                                "longest recent step if that is more): the scheduler logs its "
                                "state, answers requests that can never start with the reason, and "
                                "otherwise exits like a dead scheduler (503s, exit code 70) instead "
                                "of hanging")
        group.add_argument("--faser-record-acceptance", default=None, metavar="PATH",
                           help="append every finished request's verification steps (drafts, "
                                "accepted) as a JSON line to PATH: acceptance traces for the "
                                "simulator (python -m faser_sgl.sim --acceptance PATH)")
        group.add_argument("--faser-record-steps", default=None, metavar="PATH",
                           help="append one JSON line per scheduler step to PATH: its wall time, "
                                "the idle-free gap before it, and every forward pass's model, tokens "
                                "and seconds (scripts/profile_from_steps.py fits a simulator cost "
                                "profile, step overhead included, from it)")
        group.add_argument("--faser-exit-diagnostic", action="store_true",
                           help="run verification at full depth and only record what early exit "
                                "would have pruned (precision/recall in /get_server_info)")

    @staticmethod
    def from_cli_args(args: argparse.Namespace) -> "FaserOptions":
        if args.faser_max_step_tokens < 1:
            raise SystemExit("--faser-max-step-tokens must be at least 1")
        if args.speculative_num_draft_tokens < 1:
            raise SystemExit("--speculative-num-draft-tokens must be at least 1")
        if args.faser_early_exit and args.speculative_policy == "none":
            raise SystemExit("--faser-early-exit needs a speculative policy (fixed, adaptive or faser)")
        if not args.faser_shutdown_timeout >= 0:
            raise SystemExit("--faser-shutdown-timeout must be a number of seconds >= 0")
        if args.faser_max_request_bytes < 0:
            raise SystemExit("--faser-max-request-bytes must be a number of bytes >= 0 (0: no limit)")
        if not args.faser_progress_timeout > 0:
            raise SystemExit("--faser-progress-timeout must be a number of seconds > 0")
        if args.faser_exit_candidates < 1:
            raise SystemExit("--faser-exit-candidates must be at least 1")
        layers = args.faser_exit_layers
        if layers.strip() != "auto" and not all(x.strip().isdigit() for x in layers.split(",")):
            raise SystemExit(f"--faser-exit-layers must be 'auto' or comma-separated layer counts, got {layers!r}")
        from faser_sgl.speculative.early_exit import parse_exit_threshold

        try:
            threshold = parse_exit_threshold(args.faser_exit_threshold)
        except ValueError as exc:
            raise SystemExit(f"--faser-exit-threshold: {exc}") from None
        from faser_sgl.speculative.frontier import parse_frontier_size
        from faser_sgl.speculative.lanes import parse_split

        frontier = args.faser_frontier_size
        try:
            if frontier != "default":
                parse_frontier_size(frontier)
            split = parse_split(args.faser_pipeline_split)
        except ValueError as exc:
            raise SystemExit(f"--faser-frontier-size/--faser-pipeline-split: {exc}") from None
        profile = args.speculative_cost_profile
        if profile is not None:
            if args.speculative_policy not in ("adaptive", "faser"):
                raise SystemExit("--speculative-cost-profile is only used by --speculative-policy adaptive or faser "
                                 f"(got --speculative-policy {args.speculative_policy})")
            from faser_sgl.speculative.adaptive import parse_cost_profile

            try:
                parse_cost_profile(profile)
            except ValueError as exc:
                raise SystemExit(f"--speculative-cost-profile {profile!r}: {exc}") from None
        batch_table, batch_ema_config = _baseline_options(args)
        draft = args.speculative_draft_model_path
        if args.speculative_policy != "none" and draft is None:
            from faser_sgl import default_models

            if not default_models.is_ready(default_models.DRAFT):
                raise SystemExit("the embedded draft model is not installed: run "
                                 "`python -m faser_sgl.default_models` or pass --speculative-draft-model-path")
            draft = default_models.default_draft_path()
        return FaserOptions(
            attention_backend=args.faser_attention_backend,
            dtype=args.faser_dtype,
            max_step_tokens=args.faser_max_step_tokens,
            num_threads=args.faser_num_threads,
            cpu_linear=args.faser_cpu_linear,
            share_weights_mmap=args.faser_share_weights_mmap,
            speculative_policy=args.speculative_policy,
            speculative_draft_model_path=draft,
            speculative_num_draft_tokens=args.speculative_num_draft_tokens,
            speculative_cost_profile=profile,
            batch_table=batch_table,
            batch_ema_config=batch_ema_config,
            sampling_scheme=args.faser_sampling_scheme,
            early_exit=args.faser_early_exit,
            exit_layers=layers,
            exit_threshold=threshold,
            exit_draft_prob=args.faser_exit_draft_prob,
            exit_candidates=args.faser_exit_candidates,
            exit_diagnostic=args.faser_exit_diagnostic,
            frontier_size=frontier,
            pipeline_split=split,
            shutdown_timeout=args.faser_shutdown_timeout,
            progress_timeout=args.faser_progress_timeout,
            max_request_bytes=args.faser_max_request_bytes,
            record_acceptance=args.faser_record_acceptance,
            record_steps=args.faser_record_steps,
        )


def _baseline_options(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """--faser-batch-table / --faser-batch-ema-config, checked at start-up: each belongs to its
    policy, and a table or file that does not parse is refused before any model loads."""
    policy, k = args.speculative_policy, args.speculative_num_draft_tokens
    table, config = args.faser_batch_table, args.faser_batch_ema_config
    if table is not None:
        if policy != "batch-table":
            raise SystemExit(f"--faser-batch-table is only used by --speculative-policy batch-table "
                             f"(got --speculative-policy {policy})")
        from faser_sgl.speculative.batch_table import parse_batch_table

        try:
            parse_batch_table(table)
        except ValueError as exc:
            raise SystemExit(f"--faser-batch-table {table!r}: {exc}") from None
    if config is not None:
        if policy != "batch-ema":
            raise SystemExit(f"--faser-batch-ema-config is only used by --speculative-policy batch-ema "
                             f"(got --speculative-policy {policy})")
        from faser_sgl.speculative.batch_ema import load_batch_ema_config

        try:
            load_batch_ema_config(config, k)
        except ValueError as exc:
            raise SystemExit(f"--faser-batch-ema-config {config}: {exc}") from None
    return table, config
