"""A small OpenAI-compatible HTTP server over any Backend, for fault injection (127.0.0.1, an ephemeral port).

Behaviour against a server no one here wrote is tested on `transformers serve` (tests/slow/test_transformers_serve.py),
this one exists for what a real server will not do on demand: 429/5xx/dropped connections, slow replies, and the
vLLM replies the backend must handle (documented in vLLM 0.33's `entrypoints/openai/completion/protocol.py`).

Serves `/v1/completions` (text or token-id prompt, n, seed, stop, max_tokens, echo + logprobs), `/v1/chat/completions`
and GET `/v1/models`. Knobs: `fail_first` (statuses answered before the real work), `retry_after` (the header sent
with them), `delay_s`, `api_key`, `echo_supported`, `bos_text` (a BOS token the server prepends to echoed prompts, as
vLLM does for text prompts), `max_model_len` (reported by /v1/models; `max_tokens` above it is a 400, as in vLLM),
`cached_tokens` (reported as `usage.prompt_tokens_details.cached_tokens`), `max_n` (a server that sends at most
this many choices whatever `n` asks), `decode_prompts` (token-id prompts reach the backend as `decode(ids)`),
`refuse_n` (a 400 naming `n` for n > 1), `reply_hook` (rewrites each 200 reply of `/v1/completions` and
`/v1/chat/completions`, given the request body and the reply: replies that break the API contract, which no real server
sends on demand).
`choices[].token_ids` come only with `return_token_ids: true`, as in vLLM. `log` records every request body.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ckptdpo.backends.base import Backend, GenerationRequest

# Every character belongs to one token: leading whitespace + a word, or + one punctuation character.
_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")


def regex_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the default echo tokenizer."""
    return [m.span() for m in _TOKEN.finditer(text)]


class OpenAIServer:
    """Start with `with OpenAIServer(backend) as srv:`; `srv.base_url` ends in /v1."""

    def __init__(
        self,
        backend: Backend,
        *,
        fail_first: list[int] | None = None,
        retry_after: str | None = None,
        delay_s: float = 0.0,
        api_key: str | None = None,
        echo_supported: bool = True,
        bos_text: str = "",
        spans: Callable[[str], list[tuple[int, int]]] = regex_spans,
        decode: Callable[[list[int]], str] | None = None,
        max_model_len: int | None = None,
        cached_tokens: int | None = None,
        max_n: int | None = None,
        decode_prompts: bool = False,
        refuse_n: bool = False,
        reply_hook: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.backend = backend
        self.fail_first = list(fail_first or [])
        self.retry_after, self.delay_s, self.api_key = retry_after, delay_s, api_key
        self.echo_supported, self.bos_text = echo_supported, bos_text
        self.spans, self.decode = spans, decode
        self.max_model_len, self.cached_tokens, self.max_n = max_model_len, cached_tokens, max_n
        self.decode_prompts = decode_prompts  # hand token-id prompts to the backend as text (the fake takes text)
        self.refuse_n = refuse_n  # answer 400 naming `n` to n > 1
        self.reply_hook = reply_hook
        self.log: list[dict[str, Any]] = []
        self.inflight = self.max_inflight = 0
        self._lock = threading.Lock()  # backends are not required to be thread-safe
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        # A short poll interval makes shutdown (and so each test) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # headers and body are separate writes: Nagle would add 40 ms each

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with server._lock:
                    server.log.append({"path": self.path, "method": "GET"})
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                card = {"id": "served-model", "object": "model", "owned_by": "vllm"}
                if server.max_model_len is not None:
                    card["max_model_len"] = server.max_model_len
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.log.append({"path": self.path, **body})
                    status = server.fail_first.pop(0) if server.fail_first else None
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    time.sleep(server.delay_s)
                    if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                        return self._send(401, {"error": {"message": "bad api key"}})
                    if status is not None:
                        extra = {"Retry-After": server.retry_after} if server.retry_after else {}
                        return self._send(status, {"error": {"message": f"injected {status}"}}, extra)
                    if self.path == "/v1/completions":
                        code, payload = server._completions(body)
                    elif self.path == "/v1/chat/completions":
                        code, payload = server._chat(body)
                    else:
                        code, payload = 404, {"error": {"message": f"no route {self.path}"}}
                    if code == 200 and server.reply_hook is not None:
                        payload = server.reply_hook(body, payload)
                    self._send(code, payload)
                finally:
                    with server._lock:
                        server.inflight -= 1

            def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = self.decode(prompt) if self.decode_prompts and self.decode else tuple(prompt)
        elif not isinstance(prompt, str):
            return 400, {"error": {"message": "prompt must be a string or a list of token ids"}}
        if self.max_model_len is not None and body.get("max_tokens", 16) > self.max_model_len:
            message = f"max_tokens={body['max_tokens']} cannot be greater than max_model_len={self.max_model_len}."
            return 400, {"error": {"message": message + " Please request fewer output tokens."}}
        if self.refuse_n and body.get("n", 1) > 1:
            return 400, {"error": {"message": "`n` must be 1 on this server", "param": "n"}}
        if body.get("echo"):
            return self._echo(prompt, body)
        req = GenerationRequest(
            prompt=prompt,
            n=min(body.get("n", 1), self.max_n or body.get("n", 1)),
            seed=body.get("seed"),
            max_tokens=body.get("max_tokens", 16),
            temperature=body.get("temperature", 1.0),
            top_p=body.get("top_p", 1.0),
            top_k=body.get("top_k", -1),
            stop=tuple(body.get("stop") or ()),
        )
        with self._lock:
            (res,) = self.backend.generate([req])
        if res.error:
            return 400, {"error": {"message": res.error}}
        choices = []
        for i, s in enumerate(res.samples):
            choice = {"index": i, "text": s.text, "logprobs": None}
            choice["finish_reason"] = "repetition" if s.finish_reason == "loop" else s.finish_reason
            if s.token_ids is not None and body.get("return_token_ids"):
                choice["token_ids"] = s.token_ids
            choices.append(choice)
        completion = sum(s.num_tokens for s in res.samples)
        usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": completion}
        usage["total_tokens"] = res.prompt_tokens + completion
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return 200, {"object": "text_completion", "model": body.get("model"), "choices": choices, "usage": usage}

    def _echo(self, prompt: str | tuple[int, ...], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Prompt + one generated token, with per-token logprobs from backend.score on each token."""
        if isinstance(prompt, tuple):
            if self.decode is None:
                return 400, {"error": {"message": "this server cannot decode token-id prompts"}}
            text = self.decode(list(prompt))
            pieces = [self.decode([t]) for t in prompt]
            contexts = [self.decode(list(prompt[:i])) for i in range(len(prompt))]
        else:
            text = prompt
            pieces = [prompt[a:b] for a, b in self.spans(prompt)]
            contexts = [prompt[:a] for a, _ in self.spans(prompt)]
        with self._lock:
            gen = ""
            if body.get("max_tokens", 16) > 0:
                (res,) = self.backend.generate([GenerationRequest(prompt=prompt, max_tokens=1, temperature=0.0)])
                gen = res.samples[0].text if res.samples else ""
            lps = self.backend.score(contexts[1:] + [text], pieces[1:] + [gen]) if self.echo_supported else []
        choice: dict[str, Any] = {"index": 0, "text": self.bos_text + text + gen, "finish_reason": "length"}
        if self.echo_supported:
            tokens = ([self.bos_text] if self.bos_text else []) + pieces + [gen]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            token_lps = [None] * (2 if self.bos_text else 1) + lps
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "text_offset": offsets}
            choice["logprobs"]["top_logprobs"] = [None] * len(tokens)
        else:
            choice["logprobs"] = None
        return 200, {"object": "text_completion", "model": body.get("model"), "choices": [choice]}

    def _chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            (reply,) = self.backend.chat(
                [body["messages"]], max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 0.0)
            )
        message = {"role": "assistant", "content": reply}
        return 200, {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
