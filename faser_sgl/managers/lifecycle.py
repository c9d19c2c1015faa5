"""How the HTTP server process ends: a bounded drain on SIGTERM, and a prompt non-zero exit
when a child process (the scheduler, the detokenizer) dies.

SGLang 0.5.23 already drains on SIGTERM, but it keeps accepting new requests while it drains,
waits for them without a bound, and polls every 5 s.  When a child dies its watchdog SIGQUITs
the server, which kills itself at once: clients see a dropped connection instead of an answer.
Here (through FaserTokenizerManager, managers/tokenizer_hooks.py):

- SIGTERM: /health turns 503 (SGLang) and new generation requests get 503 (ShutdownGate); the
  running ones get ``shutdown_timeout`` seconds to finish, then the rest are aborted, each
  client getting its abort; then the scheduler is told to stop and the server exits 0.
- A dead child: every in-flight request is answered with a 503 naming the cause, and a moment
  later the server exits with EXIT_CHILD_DIED, so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from http import HTTPStatus

logger = logging.getLogger("faser_sgl.lifecycle")

EXIT_CHILD_DIED = 70  # EX_SOFTWARE: "internal software error", a restart is the cure
ANSWER_GRACE_S = 0.5  # time for the event loop to write the error answers before exiting
ABORT_GRACE_S = 5.0  # after a drain timeout, time for the scheduler to confirm its aborts

# Routes that start generation work (SGLang's own list of them, ollama/vertex aliases included).
GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses",
                    "/v1/messages", "/v1/embeddings", "/v1/score", "/v1/rerank", "/v1/classify",
                    "/encode", "/classify", "/invocations", "/vertex_generate", "/api/generate",
                    "/api/chat")


def fail_in_flight(manager, message: str, status: int) -> int:
    """Answer every request the TokenizerManager still waits on with an abort carrying an HTTP
    status (its client gets that status and message); returns how many."""
    from sglang.srt.managers.io_struct import AbortReq

    rids = list(manager.rid_to_state)
    reason = {"type": "abort", "message": message, "status_code": int(status),
              "err_type": "ServiceUnavailableError" if status == HTTPStatus.SERVICE_UNAVAILABLE else "Error"}
    for rid in rids:
        manager._handle_abort_req(AbortReq(rid=rid, finished_reason=reason, abort_message=message))
    return len(rids)


async def drain(manager, timeout: float) -> None:
    """Wait up to ``timeout`` s for the requests in flight to finish; abort what is left."""
    from sglang.srt.managers.tokenizer_manager import ServerStatus

    deadline = time.monotonic() + timeout
    while manager.rid_to_state and time.monotonic() < deadline \
            and manager.server_status != ServerStatus.UnHealthy:
        await asyncio.sleep(0.1)
    if not manager.rid_to_state:
        logger.info("SIGTERM: all requests finished; shutting down")
        return
    logger.warning("SIGTERM: %d request(s) still running after %.1fs; aborting them",
                   len(manager.rid_to_state), timeout)
    manager.abort_request(abort_all=True)
    deadline = time.monotonic() + ABORT_GRACE_S
    while manager.rid_to_state and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if manager.rid_to_state:  # the scheduler did not answer: answer for it
        fail_in_flight(manager, "the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)


def child_died(manager) -> None:
    """The SIGQUIT a dead child causes (SGLang's SubprocessWatchdog, or our scheduler's own
    last words): answer the clients, then exit non-zero."""
    from sglang.srt.utils import kill_process_tree

    logger.error("a server process died: failing the requests in flight and exiting with %d",
                 EXIT_CHILD_DIED)
    if getattr(manager, "_subprocess_watchdog", None) is not None:
        manager._subprocess_watchdog.stop()
    manager.child_died = True
    n = fail_in_flight(manager, "the scheduler process died; the server is exiting to be restarted",
                       HTTPStatus.SERVICE_UNAVAILABLE)
    if n:
        logger.error("answered %d request(s) in flight with 503", n)

    def exit_now():
        kill_process_tree(os.getpid(), include_parent=False)
        os._exit(EXIT_CHILD_DIED)

    asyncio.get_event_loop().call_later(ANSWER_GRACE_S, exit_now)


class ShutdownGate:
    """ASGI middleware: while the server shuts down (SIGTERM) or is about to exit (a dead
    child), new generation requests get 503 at once instead of a place in a queue that will
    not be served.  ``manager()`` returns the TokenizerManager (None before it exists)."""

    def __init__(self, app, manager):
        self.app = app
        self.manager = manager

    async def __call__(self, scope, receive, send):
        manager = self.manager()
        if scope["type"] == "http" and manager is not None and scope.get("method") == "POST" \
                and scope.get("path", "") in GENERATION_PATHS \
                and (manager.gracefully_exit or getattr(manager, "child_died", False)):
            body = b'{"error": {"message": "the server is shutting down", "code": 503}}'
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
