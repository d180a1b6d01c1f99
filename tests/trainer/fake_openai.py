"""A small OpenAI-compatible chat server (http.server) for the eval tests: deterministic answers, injected
failures, and counts of what it received."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Reply = Callable[[dict[str, Any]], str]


class FakeOpenAI:
    """Serves ``POST /v1/chat/completions`` on 127.0.0.1 with ``reply(request_json) -> text``.

    Attributes the tests set or read: ``fail_first`` (per distinct prompt, that many 503s before success),
    ``fail_always`` (every request 500), ``fail_prompts`` (these prompts always 503), ``delay_s`` (per
    request), ``models`` (names accepted; others 404), ``requests`` (every request body received), ``max_in_flight``.
    """

    def __init__(self, reply: Reply, models: tuple[str, ...] = ("fake",)) -> None:
        self.reply = reply
        self.models = models
        self.fail_first = 0
        self.fail_always = False
        self.fail_prompts: set[str] = set()
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    outer._handle(self, body)
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handle(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if body.get("model") not in self.models:
            return _send(h, 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                            "type": "NotFoundError", "code": 404}})
        prompt = body["messages"][-1]["content"]
        with self._lock:
            failed = self.failures.get(prompt, 0)
            fail = self.fail_always or prompt in self.fail_prompts or failed < self.fail_first
            if fail:
                self.failures[prompt] = failed + 1
        if fail:
            return _send(h, 500 if self.fail_always else 503, {"error": {"message": "injected failure"}})
        text = self.reply(body)
        _send(h, 200, {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 2}})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
