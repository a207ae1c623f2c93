"""A tiny stdlib HTTP stand-in for a teacher server (`vllm serve`), for FAULT INJECTION only: 5xx, timeouts, short or
re-tokenised answers, another model / tokenizer, a temperature it ignores. The happy path is tested against the real
engine (tests/vllm_real/test_teacher_server.py). Listens on 127.0.0.1 only; `stop()` closes it.

Its log-probs are made up and recognisable: log pi(x_i | x_<i) = -x_i / 1000 / T (T = 1 when it ignores the
temperature), so a test can check which token each value landed on."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeTeacherServer:
    """`state` steers the answers (the test may change it while a run is going):
      model          the served id (and root)
      max_model_len  reported by /v1/models
      tokenize       callable text -> ids (the local tokenizer: "same tokenizer"), or None: 404
      ok_calls       completions answered before faults start (None: never)
      fail_first     completions that get the fault before answers start (0: none)
      fault          "503" | "sleep" | "short" | "retokenised" | "positive": what a faulty answer is
      sleep_s        for "sleep"
      ignore_temperature  the log-probs do not depend on the request's temperature (vLLM <= 0.32)"""

    def __init__(self, **state):
        self.state = {"model": "teacher", "max_model_len": 4096, "tokenize": None, "ok_calls": None, "fault": "503",
                      "sleep_s": 2.0, "ignore_temperature": True, "fail_first": 0, **state}
        self.requests: list[dict] = []  # every completions payload received
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict | str):
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_GET(self):
                if self.path == "/v1/models":
                    s = fake.state
                    return self._send(200, {"data": [{"id": s["model"], "root": s["model"],
                                                      "max_model_len": s["max_model_len"]}]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    if fake.state["tokenize"] is None:
                        return self._send(404, {"error": "not found"})
                    return self._send(200, {"tokens": fake.state["tokenize"](payload["prompt"]), "count": 0})
                if self.path != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                with fake.lock:
                    fake.requests.append(payload)
                    n = len(fake.requests)
                s = fake.state
                faulty = n <= s["fail_first"] or (s["ok_calls"] is not None and n > s["ok_calls"])
                fault = s["fault"] if faulty else None
                if fault == "503":
                    return self._send(503, {"error": "overloaded"})
                if fault == "sleep":
                    time.sleep(s["sleep_s"])
                T = 1.0 if s["ignore_temperature"] else payload.get("temperature", 1.0)
                choices = []
                for i, ids in enumerate(payload["prompt"]):
                    lps = [None] + [-t / 1000 / T for t in ids[1:]]
                    toks = [f"token_id:{t}" for t in ids]
                    if fault == "short":
                        lps = lps[:-1]
                    if fault == "retokenised":
                        toks = toks[:-1] + [f"token_id:{ids[-1] + 1}"]
                    if fault == "positive":
                        lps = [None] + [1.5 for _ in ids[1:]]
                    choices.append({"index": i, "text": "", "logprobs": {"token_logprobs": lps, "tokens": toks}})
                self._send(200, {"choices": choices})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
