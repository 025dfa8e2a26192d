"""finetune-route: serve a run's router (finetune.route.serve).

    finetune-route RUN_DIR [--strong-url URL --strong-model NAME] [--timeout S] [--threads N] [--router PATH]
        reads requests from stdin, one per line ({"input": "..."} or plain text), and writes one JSON line per
        decision to stdout
    finetune-route RUN_DIR --serve 127.0.0.1:8080 ...
        an HTTP server: POST /route {"input": "..."} answers with the decision; GET /health; every decision is
        also written to stdout as one JSON line

The strong endpoint comes from --strong-url/--strong-model, else FINETUNE_STRONG_URL/FINETUNE_STRONG_MODEL,
else router.json when the route stage used an endpoint; OPENAI_API_KEY is sent when set.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from finetune.core.errors import FinetuneError


def request_text(line: str) -> str:
    line = line.strip()
    if line.startswith("{"):
        data = json.loads(line)
        if not isinstance(data, dict) or not isinstance(data.get("input"), str):
            raise ValueError('a JSON request must be an object with a string "input"')
        return data["input"]
    return line


def emit(decision: dict, lock: threading.Lock) -> None:
    with lock:
        sys.stdout.write(json.dumps(decision, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def serve(router: Any, host: str, port: int) -> None:
    out_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._reply(200, {"ok": True, "task": router.cfg.task.name, "escalate_below": router.escalate_below})
            else:
                self._reply(404, {"error": "GET /health, POST /route"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/route":
                self._reply(404, {"error": "POST /route with {\"input\": \"...\"}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                text = request_text(self.rfile.read(length).decode("utf-8"))
                decision = router.answer(text)
            except (ValueError, UnicodeDecodeError) as exc:
                self._reply(400, {"error": str(exc)})
                return
            emit(decision, out_lock)
            self._reply(200, decision)

        def log_message(self, *args: Any) -> None:  # decisions are the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    print(json.dumps({"serving": f"http://{host}:{server.server_address[1]}"}), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-route", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--router", help="router.json (default: RUN_DIR/router.json)")
    parser.add_argument("--strong-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--strong-model", help="the model name at that endpoint")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the strong model (default route.timeout_s)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads for the small model")
    parser.add_argument("--serve", metavar="HOST:PORT", help="serve HTTP instead of reading stdin")
    args = parser.parse_args(argv)
    from finetune.route.serve import Router

    try:
        router = Router(args.run_dir, router_path=args.router, strong_url=args.strong_url,
                        strong_model=args.strong_model, timeout_s=args.timeout, n_threads=args.threads)
    except FinetuneError as exc:
        print(f"finetune-route: {exc}", file=sys.stderr)
        return 2
    try:
        if args.serve:
            host, _, port = args.serve.rpartition(":")
            serve(router, host or "127.0.0.1", int(port))
            return 0
        lock = threading.Lock()
        for n, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            try:
                decision = router.answer(request_text(line))
            except ValueError as exc:
                decision = {"error": f"request line {n}: {exc}"}
            emit(decision, lock)
        return 0
    finally:
        router.close()


if __name__ == "__main__":
    raise SystemExit(main())
