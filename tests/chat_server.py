"""A loopback OpenAI-compatible chat-completions server that injects faults on request."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

CRITIQUE = ("Lighting: The light is soft. Emotion & narrative: The scene is calm. Composition: The subject "
            "is placed with care. Color: The palette is restrained. Exposure: The tones hold detail. "
            "Overall, it is {tone}.")


class ChatServer:
    """``fault(n, body)`` picks what request n (0-based) gets: ok, 429, 500, timeout, malformed, empty, 400,
    ``429:<seconds>`` (with ``Retry-After``), and answers with usage: blank (whitespace content), refusal
    (``content: null``), length (``finish_reason: length``)."""

    def __init__(self, fault: Callable[[int, dict], str] = lambda n, body: "ok", latency_s: float = 0.0,
                 hang_s: float = 5.0):
        self.fault, self.latency_s, self.hang_s = fault, latency_s, hang_s
        self.requests: list[dict] = []
        self.times: list[float] = []  # time.monotonic() at each request's arrival
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.times.append(time.monotonic())
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                action = server.fault(n, body)
                time.sleep(server.latency_s)
                if action == "timeout":
                    time.sleep(server.hang_s)
                    return self._send(200, b"{}")
                status, _, wait = action.partition(":")
                if status in ("429", "500", "400"):
                    return self._send(int(status), b'{"error": {"message": "injected"}}',
                                      {"Retry-After": wait} if wait else {})
                if action == "malformed":
                    return self._send(200, b'{"choices": [ {"message": ')
                if action == "empty":
                    return self._send(200, json.dumps({"choices": []}).encode())
                text = body["messages"][1]["content"][0]["text"]
                tone = "strong" if "strong" in text else "weak" if "weak" in text else "middling"
                message = {"role": "assistant", "content": CRITIQUE.format(tone=tone)}
                finish = "stop"
                if action == "blank":
                    message["content"] = "  "
                elif action == "refusal":
                    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
                elif action == "length":
                    message["content"], finish = message["content"][:30], "length"
                payload = {"choices": [{"message": message, "finish_reason": finish}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": 40}}
                self._send(200, json.dumps(payload).encode())

            def _send(self, status, data, headers=None):
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): nothing to answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
