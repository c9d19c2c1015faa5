"""Start an SGLang-compatible HTTP server whose scheduler is faser_sgl's.

    python -m faser_sgl.launch_server [SGLang server flags] [faser_sgl flags]

SGLang's front half (HTTP + OpenAI API, TokenizerManager, DetokenizerManager) runs unchanged;
only the scheduler process is replaced by faser_sgl.managers.scheduler.run_scheduler_process,
which owns batching and our own model executor.  Without --model-path the embedded default
model (Qwen2.5-Coder-1.5B-Instruct, see faser_sgl.default_models) is served.
"""

from __future__ import annotations

import argparse
import os
import sys

from faser_sgl.executor.onednn_cache import bound_primitive_cache
from faser_sgl.options import FaserOptions
from faser_sgl.sglang_flags import check_server_args, given


def split_argv(argv: list[str]) -> tuple[FaserOptions, list[str]]:
    """Take our own flags out of argv; the rest goes to SGLang's parser untouched."""
    parser = argparse.ArgumentParser(add_help=False)
    FaserOptions.add_cli_args(parser)
    ours, rest = parser.parse_known_args(argv)
    return FaserOptions.from_cli_args(ours), rest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a set-up error reported later
        return False


def prepare_args(argv: list[str]):
    """Return (ServerArgs, FaserOptions) for argv, with what our executor needs forced."""
    if "-h" in argv or "--help" in argv:
        _print_help()
        raise SystemExit(0)
    options, rest = split_argv(argv)
    if not given(rest, "--model-path") and not given(rest, "--model"):
        from faser_sgl import default_models

        if not default_models.is_ready(default_models.TARGET):
            raise SystemExit(
                "the embedded default model is not installed yet: run "
                "`python -m faser_sgl.default_models` (make serve does it) or pass --model-path"
            )
        rest = ["--model-path", default_models.default_target_path(), *rest]
    on_cuda = options.attention_backend == "flashinfer"
    if on_cuda and not _cuda_available():
        raise SystemExit("--faser-attention-backend flashinfer needs a CUDA device")
    if not given(rest, "--device"):
        rest += ["--device", "cuda" if on_cuda else "cpu"]
    # SGLang's CUDA graphs capture its own ModelRunner, which we do not use.
    if not given(rest, "--disable-cuda-graph"):
        rest += ["--disable-cuda-graph"]

    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(rest)
    for warning in check_server_args(server_args, rest):
        print(f"warning: {warning}", file=sys.stderr)
    if given(rest, "--mem-fraction-static"):
        options.mem_fraction_static = server_args.mem_fraction_static
    if (server_args.dp_size or 1) > 1:
        # SGLang's data-parallel controller would start its own schedulers, not ours.
        raise SystemExit(
            f"--dp-size {server_args.dp_size} is not supported: a faser_sgl server runs one "
            "scheduler. For data-parallel replicas behind SGLang's router use "
            f"`python -m faser_sgl.launch_cluster --replicas {server_args.dp_size} [server args]`")
    return server_args, options


def _print_help() -> None:
    parser = argparse.ArgumentParser(prog="python -m faser_sgl.launch_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    FaserOptions.add_cli_args(parser)
    parser.print_help()
    print("\nAll `python -m sglang.launch_server` flags are accepted as well (--model-path, --host, "
          "--port, --max-running-requests, --context-length, --max-total-tokens, ...).")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server_args, options = prepare_args(sys.argv[1:] if argv is None else argv)
    options.to_env()
    # Before the scheduler process starts: oneDNN reads it there when it builds its first primitive.
    bound_primitive_cache()

    from sglang.srt.entrypoints.http_server import app, launch_server
    from sglang.srt.utils import kill_process_tree

    from faser_sgl.managers import tokenizer_hooks
    from faser_sgl.managers.lifecycle import ShutdownGate
    from faser_sgl.managers.request_guard import RequestGuard
    from faser_sgl.managers.scheduler import run_scheduler_process
    from faser_sgl.managers.tokenizer_hooks import init_faser_tokenizer_manager

    app.add_middleware(ShutdownGate, manager=lambda: tokenizer_hooks.ACTIVE)
    app.add_middleware(RequestGuard, max_body_bytes=options.max_request_bytes or None,
                       manager=lambda: tokenizer_hooks.ACTIVE)

    try:
        launch_server(server_args, init_tokenizer_manager_func=init_faser_tokenizer_manager,
                      run_scheduler_process_func=run_scheduler_process)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
