"""A pytest plugin that points SGLang's own server tests at a faser_sgl server, unmodified.

SGLang's test files start their server with ``sglang.test.test_utils.popen_launch_server(model,
base_url, timeout, api_key=..., other_args=[...])`` and name their models by Hub ids
(``DEFAULT_SMALL_MODEL_NAME_FOR_TEST`` and its siblings).  Loaded before the test files are
imported (``pytest -p sglang_conformance_shim``), this plugin

- replaces ``popen_launch_server`` with one that starts ``python -m faser_sgl.launch_server`` on
  the same host, port and API key with the test's own flags, plus the flags in
  FASER_CONFORMANCE_SERVER_ARGS (the speculative policy under test), and waits for
  /health_generate as SGLang's does;
- maps every Hub model id in ``sglang.test.test_utils`` to the local model in
  FASER_CONFORMANCE_MODEL (default: the embedded target), since this machine has no model hub;
  the tests load their tokenizers from the same names, so they see the served model's.

Nothing else of the tests changes, except one flag spelling (RENAMED_FLAGS): the pinned copy of
test_srt_endpoint.py predates 0.5.23's split of --cuda-graph-max-bs into -decode/-prefill, and
0.5.23's own parser rejects the old spelling as ambiguous (SGLang 0.5.23 cannot start that test
either), so the shim passes it under the new name.  scripts/sglang_conformance.py runs the files
with it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import sglang.test.test_utils as sglang_test_utils

SERVER_ARGS_ENV = "FASER_CONFORMANCE_SERVER_ARGS"
MODEL_ENV = "FASER_CONFORMANCE_MODEL"
LOG_DIR_ENV = "FASER_CONFORMANCE_LOG_DIR"
# Another port for the tests' server (DEFAULT_URL_FOR_TEST), so that two runs can go side by side.
PORT_ENV = "FASER_CONFORMANCE_PORT"
# Flags of older SGLang test copies under their 0.5.23 names (see the module docstring).
RENAMED_FLAGS = {"--cuda-graph-max-bs": "--cuda-graph-max-bs-decode"}


def _local_model() -> str:
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    from faser_sgl import default_models

    return default_models.default_target_path()


def _is_hub_id(value: object) -> bool:
    return isinstance(value, str) and "/" in value and not value.startswith(("/", "http")) \
        and " " not in value


def map_hub_models(module, local_path: str) -> dict[str, str]:
    """Point every DEFAULT_*MODEL* Hub id (or comma-separated list of them) at local_path."""
    mapped = {}
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith("DEFAULT_") and "MODEL" in name and _is_hub_id(value):
            setattr(module, name, ",".join(local_path for _ in value.split(",")))
            mapped[name] = value
    return mapped


def faser_command(model: str, base_url: str, api_key: str | None, other_args) -> list[str]:
    _, host, port = base_url.split(":")
    host = host.removeprefix("//")
    served = model if not _is_hub_id(model) else _local_model()
    args = [RENAMED_FLAGS.get(str(a), str(a)) for a in (other_args or [])]
    command = [sys.executable, "-m", "faser_sgl.launch_server", "--model-path", served,
               *args, "--host", host, "--port", port]
    if api_key:
        command += ["--api-key", api_key]
    return command + shlex.split(os.environ.get(SERVER_ARGS_ENV, ""))


def popen_launch_faser_server(model, base_url, timeout, api_key=None, other_args=None, env=None,
                              return_stdout_stderr=None, device="auto", pd_separated=False,
                              num_replicas=None):
    """SGLang's popen_launch_server, starting faser_sgl instead (same host, port, key, flags)."""
    if pd_separated or num_replicas is not None:
        raise NotImplementedError("prefill/decode disaggregation is not served by faser_sgl")
    other_args = list(other_args or [])
    if device not in ("auto", "cpu") and "--device" not in other_args:
        other_args += ["--device", device]
    merged = os.environ.copy()
    merged.update(env or {})
    command = faser_command(model, base_url, api_key, other_args)
    print(f"faser conformance shim: {shlex.join(command)}", flush=True)
    if return_stdout_stderr:
        stdout, stderr = return_stdout_stderr
    elif os.environ.get(LOG_DIR_ENV):
        log = open(os.path.join(os.environ[LOG_DIR_ENV], f"server_{base_url.rsplit(':', 1)[1]}.log"), "ab")
        stdout, stderr = log, subprocess.STDOUT
    else:
        stdout = stderr = None
    process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=merged)
    ok, error = sglang_test_utils._wait_for_server_health(process, base_url, api_key, timeout)
    if not ok:
        sglang_test_utils.kill_process_tree(process.pid)
        raise Exception(f"faser_sgl server did not come up: {error}")
    return process


def _install() -> None:
    if os.environ.get(PORT_ENV):
        sglang_test_utils.DEFAULT_URL_FOR_TEST = f"http://127.0.0.1:{int(os.environ[PORT_ENV])}"
    mapped = map_hub_models(sglang_test_utils, _local_model())
    sglang_test_utils.popen_launch_server = popen_launch_faser_server
    print(f"faser conformance shim: {len(mapped)} model ids mapped to {_local_model()}", flush=True)


_install()  # at plugin load, before pytest imports (and binds names from) any test file
