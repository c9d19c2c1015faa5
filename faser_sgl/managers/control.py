"""Control messages from the front half: answer what we support, refuse the rest clearly.

The TokenizerManager awaits a reply of the matching *Output type for most control requests, so an
unsupported one still gets an answer (success=False and a message) instead of hanging the HTTP
call; nothing here may crash the scheduler.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("faser_sgl.scheduler")


class ControlHandler:
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def handle(self, msg):
        from sglang.srt.managers import io_struct as io

        name = type(msg).__name__
        if isinstance(msg, io.FlushCacheReqInput):
            return io.FlushCacheReqOutput(success=self.scheduler.flush_cache())
        if isinstance(msg, io.GetInternalStateReq):
            return io.GetInternalStateReqOutput(internal_state=self.scheduler.internal_state())
        if isinstance(msg, io.FreezeGCReq):
            gc.freeze()
            # SGLang forwards it so the detokenizer freezes its heap too.
            self.scheduler.sockets.send_detokenizer(msg)
            return None
        if isinstance(msg, io.ShutdownReq):
            self.scheduler.gracefully_exit = True
            return None
        if isinstance(msg, io.HealthCheckOutput):
            return None
        return self._refuse(msg, name, io)

    def _refuse(self, msg, name: str, io):
        text = f"{name} is not supported by faser_sgl"
        logger.warning(text)
        reply_cls = None
        for candidate in (name.replace("ReqInput", "ReqOutput"), name.replace("Req", "ReqOutput"),
                          name + "Output"):
            reply_cls = getattr(io, candidate, None)
            if reply_cls is not None and candidate != name:
                break
            reply_cls = None
        if reply_cls is None:
            return None
        # Fill what the reply type requires: success=False and our message where it has those
        # fields; any other required field is echoed from the request when it has one (the front
        # half matches some replies by it, e.g. session_id), else None.
        import msgspec

        kwargs = {}
        for f in msgspec.structs.fields(reply_cls):
            if f.name == "success":
                kwargs["success"] = False
            elif f.name in ("message", "error_message", "error"):
                kwargs[f.name] = text
            elif f.required:
                kwargs[f.name] = getattr(msg, f.name, None)
        try:
            reply = reply_cls(**kwargs)
        except (TypeError, ValueError, msgspec.ValidationError):
            logger.warning("cannot build a %s reply for %s", reply_cls.__name__, name)
            return None
        reply.rid = getattr(msg, "rid", None)
        reply.http_worker_ipc = getattr(msg, "http_worker_ipc", None)
        return reply
