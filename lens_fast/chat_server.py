"""A real, local OpenAI-compatible chat-completions server (loopback only).

It answers ``POST /v1/chat/completions`` with what a *handler* writes, so a pipeline that
talks to a VLM or LLM endpoint can run end to end on a machine without one: the tests of
the captioner, the judge and the reasoner start it as a separate process and talk to it over
HTTP exactly as to vLLM, and the toy demo puts its own captioner and judge behind it.

    python -m lens_fast.chat_server --handler echo               # prints {"url": ...} then serves
    python -m lens_fast.chat_server --handler mypkg.mod:answer --port 8011 --api-key KEY

A handler is ``fn(request: dict) -> str``: the parsed request body in, the assistant's text
out (``echo`` answers the last user text; ``lens_fast.chat_server:echo`` is the same).

Faults for tests are queued through a control route and consumed one per chat request
(``LocalChatServer.add_faults``): ``{"status": 429, "retry_after": 0.1}`` (an error status),
``{"delay_s": 2}`` (answer late: a client timeout), ``{"body": "..."}`` (raw, non-protocol
bytes with status 200), ``{"content": "..."}`` (a well-formed reply with this text instead
of the handler's), ``{"drop": true}`` (close the connection without an answer).
``GET /_control/stats`` reports the number of requests, the most in flight at once and the
last request bodies.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional

Handler = Callable[[dict], str]


def echo(request: dict) -> str:
    """The text of the last user message."""
    for message in reversed(request.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            return content or ""
    return ""


def load_handler(spec: str) -> Handler:
    if spec == "echo":
        return echo
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--handler {spec!r}: expected 'echo' or 'package.module:function'")
    return getattr(importlib.import_module(module), name)


class _State:
    def __init__(self, handler: Handler, model: str, api_key: Optional[str]):
        self.handler, self.model, self.api_key = handler, model, api_key
        self.lock = threading.Lock()
        self.faults: List[dict] = []
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.generation = 0  # bumped by reset: requests still running from before it are not counted after it
        self.bodies: List[dict] = []


def _make_handler_class(state: _State):
    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, payload, headers=()):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def do_GET(self):
            if self.path == "/v1/models":
                if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                    return self._send(401, {"error": {"message": "invalid API key"}})
                return self._send(200, {"object": "list", "data": [{"id": state.model, "object": "model"}]})
            if self.path == "/_control/stats":
                with state.lock:
                    return self._send(200, {"requests": state.requests, "max_in_flight": state.max_in_flight,
                                            "pending_faults": len(state.faults), "bodies": state.bodies[-50:]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            raw = self._body()
            if self.path == "/_control/faults":
                with state.lock:
                    state.faults.extend(json.loads(raw))
                return self._send(200, {"pending_faults": len(state.faults)})
            if self.path == "/_control/reset":
                with state.lock:
                    state.faults.clear()
                    state.requests = state.max_in_flight = state.in_flight = 0
                    state.generation += 1
                    state.bodies.clear()
                return self._send(200, {})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                return self._send(401, {"error": {"message": "invalid API key"}})
            with state.lock:
                state.requests += 1
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                generation = state.generation
                fault = state.faults.pop(0) if state.faults else {}
            try:
                self._answer(raw, fault)
            finally:
                with state.lock:
                    if generation == state.generation:
                        state.in_flight -= 1

        def _answer(self, raw: bytes, fault: dict):
            try:
                request = json.loads(raw)
            except json.JSONDecodeError:
                return self._send(400, {"error": {"message": "body is not JSON"}})
            with state.lock:
                state.bodies.append(request)
            if fault.get("delay_s"):
                time.sleep(float(fault["delay_s"]))
            if fault.get("drop"):
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if "status" in fault:
                headers = [("Retry-After", str(fault["retry_after"]))] if "retry_after" in fault else []
                return self._send(int(fault["status"]), {"error": {"message": f"injected {fault['status']}"}},
                                  headers)
            if "body" in fault:
                return self._send(200, fault["body"].encode())
            try:
                text = fault["content"] if "content" in fault else state.handler(request)
            except Exception as e:  # a handler bug is the server's 500, as a real server's would be
                return self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
            words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
            self._send(200, {
                "id": f"chatcmpl-{state.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", state.model),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": words, "completion_tokens": len(text.split()),
                          "total_tokens": words + len(text.split())}})

    return RequestHandler


def serve(handler: Handler, port: int = 0, model: str = "local", api_key: Optional[str] = None,
          host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A started server (in a daemon thread of this process) on ``host:port``."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"host={host!r}: this test server listens on loopback only")
    server = ThreadingHTTPServer((host, port), _make_handler_class(_State(handler, model, api_key)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class LocalChatServer:
    """Runs ``python -m lens_fast.chat_server`` as a child process (a real server, another
    process) and stops it on exit: ``with LocalChatServer("echo") as s: ChatEndpoint(s.url, ...)``."""

    def __init__(self, handler: str = "echo", model: str = "local", api_key: Optional[str] = None,
                 start_timeout_s: float = 60.0, env: Optional[dict] = None):
        cmd = [sys.executable, "-m", "lens_fast.chat_server", "--handler", handler, "--model", model]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        line = [None]
        reader = threading.Thread(target=lambda: line.__setitem__(0, self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(start_timeout_s)
        if not line[0]:
            self.stop()
            raise RuntimeError(f"chat server did not start: {self.proc.stderr.read()[-2000:]}")
        self.url = json.loads(line[0])["url"]
        self.root = self.url.rsplit("/v1", 1)[0]

    def _control(self, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.root + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def add_faults(self, *faults: dict) -> None:
        self._control("/_control/faults", list(faults))

    def stats(self) -> dict:
        return self._control("/_control/stats")

    def reset(self) -> None:
        self._control("/_control/reset", {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lens_fast.chat_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--handler", default="echo", help="'echo' or 'package.module:function'")
    p.add_argument("--port", type=int, default=0, help="0: any free port (the URL is printed)")
    p.add_argument("--model", default="local")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    args = p.parse_args(argv)
    server = serve(load_handler(args.handler), args.port, args.model, args.api_key)
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}/v1"}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
