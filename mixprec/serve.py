"""OpenAI-compatible HTTP server over the continuous-batching Engine.

    python -m mixprec serve CONFIG --host 127.0.0.1 --port 8000 [--max-batch 16 --max-len 4096]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), GET /health,
GET /metrics (the engine's metrics as JSON). Errors are OpenAI-style bodies
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad requests, 429 when
the queue is full, 503 when the engine is down. A client that disconnects cancels its request.
Needs the `serve` extra: pip install 'mixprec[serve]' (fastapi, uvicorn, jinja2).
"""
import argparse
import asyncio
import json
import re
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from .argtypes import at_least, device
from .errors import MixprecError
from .runtime.engine import Engine, EngineStopped, QueueFull, stop_prefix_tail
from .runtime.prefill import GRAPH_TOKENS
from .runtime.sampling import MAX_BIAS, MAX_LOGPROBS, MAX_PENALTY, SamplingParams

MAX_STOP = 16                  # stop strings per request
MAX_CHOICES = 64               # prompts x n of one request (each is an engine request)
MAX_BIAS_TOKENS = 300          # logit_bias entries per request (OpenAI's bound)
MAX_STOP_CHARS = 1024          # per stop string: the engine thread checks them after every token
_UNSUPPORTED = {               # field -> value that means "off" (anything else is rejected)
    "best_of": (None, 1),
    "suffix": (None, ""),
    "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),      # JSON modes need constrained decoding
}


def _require():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the server needs fastapi and uvicorn ({e.name} is missing): "
                          "pip install 'mixprec[serve]'") from None


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request parsing ---------------------------------------------------------------------------
_TYPES = {"integer": (int,), "number": (int, float), "boolean": (bool,), "string": (str,),
          "array": (list,), "object": (dict,)}


def _field(body: dict, name: str, kind: str, default=None, required: bool = False):
    """body[name] checked against a JSON type (bool is not an integer / number here)."""
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is a required property", name, "missing_required_parameter")
        return default
    v = body[name]
    if not isinstance(v, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(v, bool)):
        raise APIError(400, f"'{name}' must be of type {kind}, got {type(v).__name__}: {json.dumps(v)[:80]}",
                       name, "invalid_type")
    return v


def _sampling(body: dict, n_prompt: int, max_len: int, eos: tuple[int, ...], chat: bool,
              defaults: dict | None = None) -> SamplingParams:
    """The request's SamplingParams; fields it leaves out take `defaults` (the checkpoint's
    generation_config.json under --generation-config auto), else OpenAI's."""
    defaults = defaults or {}
    for name, off in _UNSUPPORTED.items():
        if name in body and not any(body[name] == o and type(body[name]) is type(o) for o in off):
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if n_prompt >= max_len:
        raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, your "
                            f"prompt has {n_prompt} tokens.", "messages" if chat else "prompt",
                       "context_length_exceeded")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, name, "integer", max_len - n_prompt)
    # echo with max_tokens 0 scores the prompt only: the engine generates one token, which run() drops
    score_only = max_tokens == 0 and body.get("echo") is True and not chat
    if max_tokens < 1 and not score_only:
        raise APIError(400, f"'{name}' must be at least 1 (0 only with echo), got {max_tokens}", name,
                       "invalid_value")
    if score_only and body.get("stream"):
        raise APIError(400, "max_tokens 0 (scoring an echoed prompt) is not streamed", "stream", "invalid_value")
    max_tokens = max(max_tokens, 1)
    if n_prompt + max_tokens > max_len:
        raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                            f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                            f"{max_tokens} in the completion). Please reduce the prompt or '{name}'.",
                       name, "context_length_exceeded")
    temperature = _field(body, "temperature", "number", defaults.get("temperature", 1.0))
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature", "invalid_value")
    top_p = _field(body, "top_p", "number", defaults.get("top_p", 1.0))
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    top_k = _field(body, "top_k", "integer", defaults.get("top_k", 0))
    if not -1 <= top_k < 2**63:
        raise APIError(400, f"'top_k' must be in [0, 2**63) (0 or -1: off), got {top_k}", "top_k", "invalid_value")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        v = penalties[name] = float(_field(body, name, "number", defaults.get(name, 0.0)))
        if not -MAX_PENALTY <= v <= MAX_PENALTY:
            raise APIError(400, f"'{name}' must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v}", name, "invalid_value")
    seed = _field(body, "seed", "integer")
    if seed is not None and not -2**63 <= seed < 2**63:
        raise APIError(400, f"'seed' must fit in 64 bits, got {seed}", "seed", "invalid_value")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty "
                            f"strings", "stop", "invalid_type")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"'stop' strings may have at most {MAX_STOP_CHARS} characters", "stop", "invalid_value")
    # vLLM's extension for benchmarks: generate to max_tokens even past the end-of-text token
    if _field(body, "ignore_eos", "boolean", False):
        eos = ()
    logprobs = _logprobs(body, chat)
    bias = _field(body, "logit_bias", "object", {})
    try:        # OpenAI's: token ids as JSON object keys (strings), values in [-100, 100]
        bias = tuple((int(t), float(v)) for t, v in bias.items())
    except (TypeError, ValueError):
        raise APIError(400, "'logit_bias' maps token ids to numbers", "logit_bias", "invalid_type") from None
    if any(t < 0 or not -MAX_BIAS <= v <= MAX_BIAS for t, v in bias) or len(bias) > MAX_BIAS_TOKENS:
        raise APIError(400, f"'logit_bias': at most {MAX_BIAS_TOKENS} token ids >= 0, values in "
                            f"[-{MAX_BIAS:g}, {MAX_BIAS:g}]", "logit_bias", "invalid_value")
    # completions' echo: the prompt before the completion, with logprobs its tokens' too
    echo = _field(body, "echo", "boolean", False)
    if echo and chat:
        raise APIError(400, "'echo' is a /v1/completions parameter", "echo", "unsupported_parameter")
    _field(body, "stream", "boolean")      # (stream_options: checked where run() reads it)
    return SamplingParams(temperature=float(temperature), top_k=max(top_k, 0), top_p=float(top_p), seed=seed,
                          max_new_tokens=max_tokens, stop_token_ids=eos, stop=tuple(stop), logprobs=logprobs,
                          prompt_logprobs=logprobs if echo else None, logit_bias=bias, **penalties)


def _logprobs(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs from the request: chat `logprobs` (bool) + `top_logprobs`;
    completions `logprobs` (the number of top tokens; 0: the chosen token's only)."""
    if chat:
        on = _field(body, "logprobs", "boolean", False)
        top = _field(body, "top_logprobs", "integer")
        if top and not on:      # 0 / null without logprobs: off, as before
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        n, name = (top or 0) if on else None, "top_logprobs"
    else:
        v = body.get("logprobs")
        n = None if v is None or v is False else _field(body, "logprobs", "integer")
        name = "logprobs"
    if n is not None and not 0 <= n <= MAX_LOGPROBS:
        raise APIError(400, f"'{name}' must be in [0, {MAX_LOGPROBS}], got {n}", name, "invalid_value")
    return n


def _logprob_entries(logprobs, tokenizer, chat: bool, offset: int = 0) -> dict | None:
    """OpenAI's logprobs object for a run of tokens: (Delta.logprobs entry, token id) pairs ->
    chat's {"content": [...]} or completions' {"tokens", "token_logprobs", "top_logprobs",
    "text_offset"} (offsets from `offset`; an entry None, an echoed prompt's first token: nulls)."""
    if not logprobs:
        return None

    def entry(i: int, lp: float | None) -> dict:      # chat's shape; completions keep token / logprob
        b = tokenizer.token_bytes(i)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
    if chat:
        return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top]}
                            for (lp, top), i in logprobs], "refusal": None}
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e, i in logprobs:
        t = entry(i, None)["token"]
        out["tokens"].append(t)
        out["token_logprobs"].append(None if e is None else e[0])
        out["top_logprobs"].append(None if e is None else {entry(j, v)["token"]: v for j, v in e[1]})
        out["text_offset"].append(offset)
        offset += len(t)
    return out


def _completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """The prompts of a completions request: a string, a list of token ids, or a list of those
    (a batch: one choice each, `index` in order)."""
    if body.get("prompt") is None:
        raise APIError(400, "'prompt' is a required property", "prompt", "missing_required_parameter")
    out = []
    for x in _prompt_batch(body):
        if isinstance(x, str):
            if tokenizer is None:
                raise APIError(400, "text prompts need the checkpoint's tokenizer.json; send token ids", "prompt")
            ids = _encode(tokenizer, x, "prompt")
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            ids = x
        else:
            raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of those",
                           "prompt", "invalid_type")
        if not ids:
            raise APIError(400, "'prompt' is empty", "prompt", "invalid_value")
        out.append(ids)
    return out


def _prompt_batch(body: dict) -> list:
    """A completions request's prompts as sent: a list of strings / token-id lists, or one of those."""
    p = body.get("prompt")
    return p if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p) else [p]


def _choices(body: dict, n_prompts: int) -> int:
    """n (choices per prompt), checked against the request's prompts."""
    n = _field(body, "n", "integer", 1)
    if not 1 <= n or n * n_prompts > MAX_CHOICES:
        raise APIError(400, f"n={n} with {n_prompts} prompt(s): expected n >= 1 and at most {MAX_CHOICES} "
                            f"choices in all", "n", "invalid_value")
    return n


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    msgs = _field(body, "messages", "array", required=True)
    if not msgs:
        raise APIError(400, "'messages' must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise APIError(400, f"{where}.role must be one of system, user, assistant, tool, developer; "
                                f"got {json.dumps(role)[:40]}", f"{where}.role", "invalid_value")
        if isinstance(content, list):              # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts",
                           f"{where}.content", "invalid_type")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and m.get("tool_calls"):     # earlier calls, as the template renders them
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise APIError(400, f"{where}.tool_calls must be a list of {{function: {{name, arguments}}}}",
                               f"{where}.tool_calls", "invalid_type")
            msg["tool_calls"] = calls
        out.append(msg)
    if tokenizer is None or not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template (tokenizer_config.json): use /v1/completions")
    # the template's own variables, as vLLM / SGLang take them (Qwen3: {"enable_thinking": false})
    kw = _field(body, "chat_template_kwargs", "object", {})
    if {"messages", "add_generation_prompt", "tools"} & set(kw):
        raise APIError(400, "'chat_template_kwargs' may not set messages, add_generation_prompt or tools",
                       "chat_template_kwargs", "invalid_value")
    tools = _tools(body)
    if tools:
        kw = {**kw, "tools": tools}
    from jinja2 import TemplateError
    try:
        text = tokenizer.apply_chat_template(out, add_generation_prompt=True, **kw)
    except ValueError as e:                             # the template's raise_exception()
        raise APIError(400, f"chat template: {e}", "messages") from None
    except (TypeError, TemplateError) as e:             # e.g. kwargs of a type the template cannot use
        raise APIError(400, f"chat template: {e}", "chat_template_kwargs" if kw else "messages") from None
    return _encode(tokenizer, text, "messages")


def _tools(body: dict) -> list | None:
    """The request's `tools` for the chat template, or None (none given, or tool_choice "none").
    The model's calls are parsed from its text afterwards (_tool_calls, _ToolStream when
    streamed), so a call cannot be forced: tool_choice "required" or a named function is refused."""
    tools = _field(body, "tools", "array")
    choice = body.get("tool_choice", "auto")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        return None
    if not all(isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
               and isinstance(t["function"].get("name"), str) for t in tools):
        raise APIError(400, "'tools' must be a list of {type: function, function: {name, ...}}", "tools",
                       "invalid_type")
    if choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice: only 'auto' and 'none' (this server cannot force a call)",
                       "tool_choice", "unsupported_parameter")
    return None if choice == "none" else tools


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _tool_calls(text: str) -> tuple[str | None, list]:
    """Qwen3's (Hermes-style) calls in a completion: each <tool_call>{"name", "arguments"}</tool_call>
    block that parses becomes an OpenAI tool call (arguments as a JSON string) and leaves the
    content; blocks that do not parse stay in it. -> (content or None, tool calls)."""
    calls, keep, last = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
            name, args = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError(name)
        except (ValueError, KeyError, TypeError):
            continue
        keep.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}})
    keep.append(text[last:])
    content = "".join(keep).strip()
    return (content or None) if calls else text, calls


class _ToolStream:
    """_tool_calls over a stream of content pieces: feed(piece) -> (content to send, calls to send).
    Text outside <tool_call> blocks passes through (a tail that could open a block waits); a block
    waits for its </tool_call> and goes out as a call when it parses, else as content (as the
    non-streamed parse keeps it); an unfinished block at the end is content. Trailing whitespace
    waits for more content and is dropped at the end once calls went out (the non-streamed
    content is stripped then; leading whitespace before a call is the one difference)."""
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.buf, self.blank, self.calls = "", "", 0

    def feed(self, piece: str, final: bool = False) -> tuple[str, list]:
        self.buf += piece
        out, calls = [], []
        while (i := self.buf.find(self.OPEN)) >= 0:
            j = self.buf.find(self.CLOSE, i)
            if j < 0:
                break
            block, rest = self.buf[i:j + len(self.CLOSE)], self.buf[j + len(self.CLOSE):]
            found = _tool_calls(block)[1]
            out += [self.buf[:i]] + ([] if found else [block])
            calls += found
            self.buf = rest
        i = self.buf.find(self.OPEN)
        if i < 0 and not final:    # hold a tail that may grow into <tool_call>
            i = len(self.buf) - stop_prefix_tail(self.buf, (self.OPEN,))
        if final or i < 0:
            i = len(self.buf)
        out.append(self.buf[:i])
        self.buf = self.buf[i:]
        self.calls += len(calls)
        text = self.blank + "".join(out)
        body = text.rstrip()
        self.blank = "" if final else text[len(body):]     # trailing blanks wait for more content
        return (text if final and not self.calls else body), calls


THINK, END_THINK = "<think>", "</think>"


def _split_reasoning(text: str) -> tuple[str | None, str]:
    """Qwen3's reasoning split off a completion (vLLM's qwen3 reasoning parser): a completion
    that opens with <think> has its text up to </think> as the reasoning and the rest as content
    (all reasoning if it ran out before </think>); any other is content only. (A prompt that ends
    in <think>, as newer thinking templates write it, has THINK put before the completion.)"""
    s = text.lstrip()
    if not s.startswith(THINK):
        return None, text
    head, sep, tail = s[len(THINK):].partition(END_THINK)
    return head.strip("\n"), (tail.lstrip("\n") if sep else "")


class _ReasoningStream:
    """_split_reasoning over a stream of text pieces: feed(piece) -> (reasoning, content) to send
    now. A completion that starts with <think> is reasoning up to </think>; otherwise it is all
    content. Newlines next to the tags and a tail that could start </think> wait for the next
    piece, so the pieces add up to _split_reasoning's result."""

    def __init__(self):
        self.state, self.buf, self.strip = "start", "", False

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        self.buf += piece
        if self.state == "start":
            s = self.buf.lstrip()
            if s.startswith(THINK):
                self.state, self.buf, self.strip = "think", s[len(THINK):], True
            elif THINK.startswith(s) and not final:
                return "", ""                   # may still become <think>
            else:
                self.state = "content"
        if self.strip:                          # newlines after a tag
            self.buf = self.buf.lstrip("\n")
            self.strip = not self.buf
        if self.state == "think":
            i = self.buf.find(END_THINK)
            if i >= 0:
                reasoning, self.buf = self.buf[:i].rstrip("\n"), self.buf[i + len(END_THINK):]
                self.state, self.strip = "content", True
                return reasoning, self.feed("", final)[1]
            keep = len(self.buf)
            if not final:
                keep -= stop_prefix_tail(self.buf, (END_THINK,))
                keep = len(self.buf[:keep].rstrip("\n"))      # newlines before a possible </think>
            out, self.buf = self.buf[:keep], self.buf[keep:]
            return (out.rstrip("\n") if final else out), ""
        out, self.buf = self.buf, ""
        return "", out


def _encode(tokenizer, text: str, param: str) -> list[int]:
    try:
        text.encode("utf-8")           # a lone surrogate ("\ud800") is valid JSON but no text
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{param}' is not valid Unicode text: {e}", param, "invalid_value") from None
    return tokenizer.encode(text)


# -- the app ---------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, model_name: str, defaults: dict | None = None, reasoning: bool = False):
    """The FastAPI app serving `engine` as `model_name` (the engine's lifetime is the caller's);
    `defaults`: sampling values for fields a request leaves out (else OpenAI's defaults);
    `reasoning`: chat completions' <think> part goes to `reasoning_content` (_split_reasoning).
    (No `from __future__ import annotations` in this file: FastAPI must see the real `Request`
    class in the handlers' annotations, and it is imported lazily here.)"""
    _require()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mixprec", docs_url=None, redoc_url=None)
    created = int(time.time())
    eos = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):        # unknown routes / methods, OpenAI-style too
        return JSONResponse(APIError(e.status_code, str(e.detail), code=None).body(), status_code=e.status_code,
                            headers=e.headers)         # e.g. a 405's Allow

    async def parse(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", None, "invalid_json")
        model = _field(body, "model", "string", required=True)
        if model != model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server has `{model_name}`)",
                           "model", "model_not_found")
        return body

    def submit(ids: list[int], params: SamplingParams):
        try:
            return engine.submit(ids, params)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", None, "queue_full", "rate_limit_error") from None
        except EngineStopped as e:
            raise APIError(503, str(e), None, "engine_stopped", "server_error") from None
        except ValueError as e:     # a RequestError names its field (_sampling checked the ranges before)
            raise APIError(400, str(e), getattr(e, "param", None)) from None

    def usage(prompts: list, reqs: list, n: int, score_only: bool = False) -> dict:
        """Each prompt counted once (its first choice's cached tokens: K/V reused, not computed,
        Engine prefix_reuse), every choice's output (none when only scoring an echoed prompt)."""
        p = sum(map(len, prompts))
        m = 0 if score_only else sum(len(r.output_ids) for r in reqs)
        cached = sum(reqs[k].cached_tokens for k in range(0, len(reqs), n))
        return {"prompt_tokens": p, "completion_tokens": m, "total_tokens": p + m,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def failed(req) -> APIError | None:
        if req.finish_reason == "error":
            return APIError(500, f"generation failed: {req.error!r}", None, "engine_error", "server_error")
        if req.finish_reason in ("abort", "cancelled"):
            return APIError(503, "the engine stopped before this request finished", None, "engine_stopped",
                            "server_error")
        return None

    async def run(request: Request, chat: bool):
        body = await parse(request)
        prompts = [_chat_prompt(body, tokenizer)] if chat else _completion_prompts(body, tokenizer)
        n = _choices(body, len(prompts))
        stream = bool(body.get("stream"))
        include_usage = bool(_field(_field(body, "stream_options", "object", {}), "include_usage", "boolean"))
        # one engine request per (prompt, choice); n > 1 with a seed: seed, seed + 1, ... per prompt
        jobs = []
        for ids in prompts:
            params = _sampling(body, len(ids), engine.max_len, eos, chat, defaults)
            for j in range(n):
                jobs.append((ids, params if j == 0 or params.seed is None else replace(params, seed=params.seed + j)))
        reqs = []
        try:
            for ids, params in jobs:
                reqs.append(submit(ids, params))
        except APIError:
            for r in reqs:          # all or nothing
                engine.cancel(r)
            raise
        echo = [_echo_text(body, ids, k) for k, ids in enumerate(prompts)] if body.get("echo") else None
        tools_on = chat and bool(_tools(body))
        thinks = reasoning and chat and _opens_think(prompts[0])     # chat: one prompt
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if stream:      # every choice's chunks as they come, each with its index
            streams = []
            for i, req in enumerate(reqs):
                split = _ReasoningStream() if reasoning and chat else None
                if thinks:
                    split.feed(THINK)
                tools = _ToolStream() if tools_on else None
                streams.append(_choice_events(req, i, head, chat, include_usage, echo[i // n] if echo else None,
                                              split, tools))
            use = (lambda: usage(prompts, reqs, n)) if include_usage else None
            return StreamingResponse(_events(streams, reqs, head, use),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await _wait_or_cancel(request, reqs):
            return JSONResponse({}, status_code=499)          # nobody is listening any more
        for req in reqs:
            err = failed(req)
            if err is not None:
                raise err
        choices = []
        score_only = body.get("max_tokens") == 0        # echo only (_sampling): drop the one token made
        for index, req in enumerate(reqs):
            entries = [x for d in req.deltas() if d.logprobs for x in zip(d.logprobs, d.token_ids)]
            text = req.text
            if score_only:
                entries, text = [], ""
            if echo is not None:
                if req.params.logprobs is not None:
                    entries = _prompt_entries(req) + entries
                text = echo[index // n] + text
            lps = _logprob_entries(entries, tokenizer, chat)
            if chat:
                msg, finish = {"role": "assistant", "content": req.text}, req.finish_reason
                if reasoning:
                    think, msg["content"] = _split_reasoning(THINK + req.text if thinks else req.text)
                    msg["reasoning_content"] = think
                if tools_on:
                    msg["content"], calls = _tool_calls(msg["content"])
                    if calls:
                        msg["tool_calls"] = calls
                        finish = "tool_calls" if finish == "stop" else finish
                choices.append({"index": index, "message": msg, "logprobs": lps, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": lps,
                                "finish_reason": "length" if score_only else req.finish_reason})
        if chat:
            head["object"] = "chat.completion"
        return {**head, "choices": choices, "usage": usage(prompts, reqs, n, score_only)}

    def _echo_text(body: dict, ids: list[int], k: int) -> str:
        p = _prompt_batch(body)[k]
        return p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False)

    def _opens_think(ids: list[int]) -> bool:
        """The prompt ends in <think> (newer thinking templates): the completion is reasoning first."""
        return tokenizer.decode(ids[-16:], skip_special_tokens=False).rstrip().endswith(THINK)

    def _prompt_entries(req) -> list:
        return list(zip(req.prompt_logprobs, req.prompt_ids)) if req.prompt_logprobs is not None else []

    async def _wait_or_cancel(request: Request, reqs: list) -> bool:
        """Wait for reqs; if the client disconnects first, cancel them (False)."""
        done = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in reqs)))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if done.done():
            return True
        for r in reqs:
            engine.cancel(r)
        done.cancel()
        return False

    async def _events(streams: list, reqs: list, head: dict, use):
        """A request's SSE stream: its choices' chunks as they come, then the usage (use: makes it
        once they finished; None: not asked for) and [DONE]."""
        try:
            async for event in (streams[0] if len(streams) == 1 else _merged(streams)):
                yield event
            if use is not None and not any(failed(r) for r in reqs):
                yield _sse({**head, "choices": [], "usage": use()})
            yield "data: [DONE]\n\n"
        finally:                                    # client gone (task cancelled) or done
            for r in reqs:
                if not r.done:
                    engine.cancel(r)

    async def _choice_events(req, index: int, head: dict, chat: bool, include_usage: bool, echo: str | None,
                             split: "_ReasoningStream | None", tools: "_ToolStream | None"):
        """One choice's chunks: role, echo, text (reasoning and tool calls split off), finish; an
        error body instead where its request failed."""
        pending: list = []      # log-probabilities of tokens whose text has not been sent yet
        sent = 0                # completions' text_offset of the next chunk's first token

        def chunk(text: str | None, finish: str | None, role: bool = False, think: str | None = None,
                  calls: list | None = None) -> str:
            nonlocal sent
            lps = None
            if not role:
                lps = _logprob_entries(pending, tokenizer, chat, sent)
                sent += len(text or "")
                pending.clear()
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                if think:
                    delta = {"reasoning_content": think, **({"content": text} if text else {})}
                if calls:       # numbered across the stream, as OpenAI's deltas are
                    first = tools.calls - len(calls)
                    delta = {"tool_calls": [{"index": first + k, **c} for k, c in enumerate(calls)]}
                choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": lps, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

        if chat:
            yield chunk(None, None, role=True)
        async for d in req.stream():
            if echo is not None:          # the prompt first (its logprobs are set by now)
                if req.params.logprobs is not None:
                    pending.extend(_prompt_entries(req))
                yield chunk(echo, None)
                echo = None
            if d.logprobs:
                pending.extend(zip(d.logprobs, d.token_ids))
            if d.finish_reason is not None:
                err = failed(req)
                if err is not None:
                    yield _sse(err.body())
                    break
            final = d.finish_reason is not None
            think, text = split.feed(d.text, final) if split is not None else ("", d.text)   # _ReasoningStream
            calls = []
            if tools is not None:         # <tool_call> blocks out of the content (_ToolStream)
                text, calls = tools.feed(text, final)
            if think or text:
                yield chunk(text or None, None, think=think or None)
            if calls:
                yield chunk(None, None, calls=calls)
            if final:
                called = tools is not None and tools.calls and d.finish_reason == "stop"
                yield chunk(None, "tool_calls" if called else d.finish_reason)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mixprec", "max_model_len": engine.max_len}]}

    @app.get("/health")
    async def health():
        if engine.healthy:
            return {"status": "ok"}
        return JSONResponse({"status": "error", "message": "the engine loop is not running"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    return app


async def _disconnected(request) -> None:
    """Returns when the client has gone (the body is already read, so only http.disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _merged(gens: list):
    """Items of several async generators, in the order they come (each one's own order kept)."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(g):
        try:
            async for x in g:
                await q.put(x)
        finally:
            await q.put(done)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        left = len(tasks)
        while left:
            x = await q.get()
            if x is done:
                left -= 1
            else:
                yield x
    finally:
        for t in tasks:
            t.cancel()


# -- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixprec serve", description="OpenAI-compatible server for a mix")
    p.add_argument("config", help="mix YAML, or one checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=at_least(0, hi=65535), default=8000)
    p.add_argument("--max-batch", type=at_least(1), default=16, help="requests decoded together (KV cache rows)")
    p.add_argument("--max-len", type=at_least(2), default=None,
                   help="context per request, prompt + completion (default: the model's, at most 4096)")
    p.add_argument("--max-queue", type=at_least(1), default=256, help="waiting requests before 429")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: config name)")
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--prefill-tokens", type=at_least(16), default=4096,
                   help="prompt tokens prefilled between two decode steps; a longer prompt is prefilled in "
                        "chunks of this many, so running requests keep getting tokens meanwhile")
    p.add_argument("--prefill-graph-tokens", type=at_least(0), default=GRAPH_TOKENS,
                   help="prefills up to this many padded tokens replay CUDA graphs (their staging KV "
                        "cache holds this many tokens), and so do the rests of prompts after a reused "
                        "prefix and prefill chunks up to this many; 0: eager prefill")
    p.add_argument("--warmup", action="store_true",
                   help="capture every decode and prefill CUDA graph before serving (no request waits on a "
                        "capture; takes longer to start)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt whole (default: a prompt longer than the prefill graphs that starts "
                        "with tokens a KV cache row holds, e.g. a chat's history, takes their K/V)")
    p.add_argument("--tp", type=at_least(1), default=None, help="tensor parallel size (under torchrun; default: config)")
    p.add_argument("--ep", type=at_least(1), default=None, help="expert parallel size (under torchrun; default: config)")
    p.add_argument("--generation-config", choices=["auto", "openai"], default="auto",
                   help="defaults of the sampling fields a request leaves out: auto, the base checkpoint's "
                        "generation_config.json (temperature, top_k, top_p, penalties; as vLLM), else "
                        "OpenAI's; openai: OpenAI's (temperature 1, no top-k / top-p)")
    p.add_argument("--reasoning-parser", choices=["none", "qwen3"], default="none",
                   help="qwen3: a chat completion's <think>...</think> part goes to message.reasoning_content "
                        "(delta.reasoning_content when streamed), as vLLM's --reasoning-parser qwen3")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _require()
    import uvicorn

    from .api import load
    try:    # bad config / checkpoint / engine sizes: a message, not a traceback
        model = load(a.config, device=a.device, dtype=a.dtype, tp=a.tp, ep=a.ep)
        tok = model.tokenizer
        defaults = tok.generation_defaults if a.generation_config == "auto" and tok is not None else {}
        try:
            SamplingParams(**defaults).validate()
        except ValueError as e:
            raise ValueError(f"the base checkpoint's generation_config.json: {e} (fix it, or serve with "
                             f"--generation-config openai)") from None
        engine = Engine(model, max_batch=a.max_batch, max_len=a.max_len, max_queue=a.max_queue,
                        use_cuda_graphs=False if a.no_cuda_graphs else None,
                        prefill_tokens=a.prefill_tokens, prefill_graph_tokens=a.prefill_graph_tokens, warmup=a.warmup,
                        prefix_reuse=not a.no_prefix_reuse)
    except (MixprecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = a.served_model_name or Path(a.config).resolve().name.removesuffix(".yaml").removesuffix(".yml")
    ctx = getattr(model, "parallel", None)
    if ctx is not None and not ctx.is_main:   # tp x ep run: rank 0 serves, this rank follows it
        failure = engine.join()
        return 0 if failure is None else 1
    if a.warmup:
        engine.ready.wait()
        if not engine.healthy:
            print(f"error: warm-up failed: {engine.join(0)!r}", file=sys.stderr)
            return 1
        print(f"warm-up: {engine.metrics()['cuda_graphs']} CUDA graphs in {engine.warmup_s:.1f} s", file=sys.stderr)
    print(f"serving {name!r} on http://{a.host}:{a.port}/v1 (max_batch={engine.max_batch}, "
          f"max_len={engine.max_len}, device={engine.device}; sampling defaults: "
          f"{defaults or 'OpenAI'}{' from generation_config.json' if defaults else ''})", file=sys.stderr)
    try:
        uvicorn.run(create_app(engine, tok, name, defaults, reasoning=a.reasoning_parser == "qwen3"), host=a.host,
                    port=a.port, log_level=a.log_level)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
