"""The scheduler's ZMQ sockets, as SGLang's PortArgs lay them out.

The front half (TokenizerManager, DetokenizerManager) binds every address; the scheduler
connects.  Messages are SGLang io_struct objects encoded by io_struct.sock_send/sock_recv
(msgspec msgpack, or pickle with SGLANG_USE_PICKLE_IPC=1).
"""

from __future__ import annotations

import zmq


class SchedulerSockets:
    def __init__(self, port_args):
        from sglang.srt.managers import io_struct

        self._io = io_struct
        self.context = zmq.Context(2)
        self.from_tokenizer = self._connect(zmq.PULL, port_args.scheduler_input_ipc_name)
        self.to_detokenizer = self._connect(zmq.PUSH, port_args.detokenizer_ipc_name)
        self.to_tokenizer = self._connect(zmq.PUSH, port_args.tokenizer_ipc_name)
        self.rpc = self._connect(zmq.DEALER, port_args.rpc_ipc_name)
        self.poller = zmq.Poller()
        self.poller.register(self.from_tokenizer, zmq.POLLIN)
        self.poller.register(self.rpc, zmq.POLLIN)

    def _connect(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind in (zmq.PUSH, zmq.DEALER):
            sock.setsockopt(zmq.SNDHWM, 0)
        if kind in (zmq.PULL, zmq.DEALER):
            sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint)
        return sock

    def receive(self, timeout_ms: int) -> list[tuple[object, bool]]:
        """Drain both inboxes; wait up to timeout_ms for the first message.

        Returns (message, came_from_rpc) pairs: RPC requests are answered on the RPC socket.
        """
        if timeout_ms > 0 and not self.poller.poll(timeout_ms):
            return []
        received: list[tuple[object, bool]] = []
        for sock, is_rpc in ((self.from_tokenizer, False), (self.rpc, True)):
            while True:
                try:
                    received.append((self._io.sock_recv(sock, zmq.NOBLOCK), is_rpc))
                except zmq.Again:
                    break
        return received

    def send_detokenizer(self, obj) -> None:
        self._io.sock_send(self.to_detokenizer, obj)

    def send_tokenizer(self, obj) -> None:
        self._io.sock_send(self.to_tokenizer, obj)

    def send_rpc(self, obj) -> None:
        self._io.sock_send(self.rpc, obj)

    def close(self) -> None:
        self.context.destroy(linger=0)
