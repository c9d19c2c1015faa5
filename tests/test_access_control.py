"""Access control as SGLang does it, on a real server: --api-key guards every generation,
OpenAI, information and control route; with --admin-api-key the control routes take only the
admin key; /health and /metrics stay open for probes and scrapers; and the server listens on
127.0.0.1 unless told otherwise."""

from __future__ import annotations

import psutil
import pytest
import requests

from server_utils import start_server

USER, ADMIN = "user-secret", "admin-secret"

GENERATION = [
    ("POST", "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2}),
]
INFORMATION = [("GET", "/v1/models", None), ("GET", "/get_model_info", None),
               ("GET", "/get_server_info", None)]
CONTROL = [("POST", "/flush_cache", None), ("POST", "/abort_request", {"rid": "nobody"}),
           ("POST", "/update_weights_from_disk", {"model_path": "/nonexistent"}),
           ("POST", "/pause_generation", {}), ("POST", "/continue_generation", {})]
OPEN = [("GET", "/health", None), ("GET", "/metrics", None)]


def call(server, method, path, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, server.base_url + path, json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_path, tmp_path_factory):
    # No --host: the default must be loopback.
    server = start_server(tiny_model_path, tmp_path_factory.mktemp("keys"),
                          ["--max-total-tokens", "4096", "--enable-metrics", "--api-key", USER,
                           "--admin-api-key", ADMIN], host=None, api_key=USER)
    yield server
    server.stop()


@pytest.mark.parametrize("method,path,body", GENERATION + INFORMATION)
def test_user_routes_need_the_api_key(keyed_server, method, path, body):
    assert call(keyed_server, method, path, body).status_code == 401
    assert call(keyed_server, method, path, body, key="wrong").status_code == 401
    assert call(keyed_server, method, path, body, key=ADMIN).status_code == 401
    r = call(keyed_server, method, path, body, key=USER)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path,body", CONTROL)
def test_control_routes_need_the_admin_key(keyed_server, method, path, body):
    assert call(keyed_server, method, path, body).status_code == 401
    assert call(keyed_server, method, path, body, key=USER).status_code == 401
    r = call(keyed_server, method, path, body, key=ADMIN)
    # Past the guard: answered (a refusal of what faser_sgl does not support is fine).
    assert r.status_code not in (401, 403), r.text
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("method,path,body", OPEN)
def test_probes_stay_open(keyed_server, method, path, body):
    assert call(keyed_server, method, path, body).status_code == 200


def test_listens_on_loopback_by_default(keyed_server):
    port = int(keyed_server.base_url.rsplit(":", 1)[1])
    process = psutil.Process(keyed_server.proc.pid)
    listening = [c.laddr.ip for p in [process, *process.children(recursive=True)]
                 for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"]


def test_api_key_alone_guards_control_routes_too(tiny_model_path, tmp_path):
    server = start_server(tiny_model_path, tmp_path, ["--max-total-tokens", "4096", "--api-key", USER],
                          api_key=USER)
    try:
        for method, path, body in GENERATION + CONTROL:
            assert call(server, method, path, body).status_code == 401, path
            assert call(server, method, path, body, key=USER).status_code not in (401, 403), path
    finally:
        server.stop()
