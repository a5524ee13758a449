"""Request validation and response shapes for the OpenAI-compatible HTTP API.

Parsing is hand-written instead of pydantic models so every rejection names the exact OpenAI
field (`param`) in the error object, the way OpenAI's own API does, and so that the rules for
"ignored" versus "rejected" fields live in one visible table below.

Policy for fields dsd cannot honour:
  * fields that only carry bookkeeping (user, metadata, store, service_tier, ...) are ignored;
  * fields that would change the answer in a way dsd cannot reproduce (n > 1, logprobs, a
    forced tool_choice, legacy functions, JSON response_format, non-zero presence/frequency
    penalty, logit_bias, suffix, best_of > 1) get a 400 naming the field, so a client never
    silently gets something it did not ask for.
Tools: `tools` goes to the chat template; the calls the model writes come back as `tool_calls`
and its thinking as `reasoning_content` (daemon/reasoning.py parses them).
Unknown fields are ignored (vLLM and llama-server do the same; OpenAI SDKs send extras).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

# Sampling extensions accepted on top of OpenAI's fields (vLLM/llama-server spell them the same).
_EXTENSIONS = {"top_k": "int", "min_p": "number", "repetition_penalty": "number", "ignore_eos": "bool",
               "timeout": "number"}   # timeout: seconds before the daemon cancels the request


class ApiError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.headers = headers or {}     # e.g. Retry-After on a 503
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, why: str) -> ApiError:
    return bad(param, f"'{param}' is not supported by dsd: {why}", "unsupported_parameter")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 telling what is wrong with it."""
    def no_constants(name):   # NaN/Infinity are not JSON; Python's json would accept them
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(None, f"We could not parse the JSON body of your request ({e}). "
                        "Send a JSON object with Content-Type: application/json.", "invalid_json")
    except RecursionError:
        raise bad(None, "The JSON body of your request nests too deeply.", "invalid_json") from None
    if "\\u" in raw.decode("utf-8", "replace"):   # \ud800 escapes decode to lone surrogates
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad(None, f"The JSON body of your request holds an unpaired surrogate escape "
                            f"({e.object[e.start:e.end].encode('unicode_escape').decode()}), which is "
                            f"not a character; send valid Unicode.", "invalid_json") from None
        except RecursionError:
            raise bad(None, "The JSON body of your request nests too deeply.", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, f"The request body must be a JSON object, not {_kind(body)}.", "invalid_json")
    return body


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _type_error(param: str, want: str, v) -> ApiError:
    return bad(param, f"Invalid type for '{param}': expected {want}, but got {_kind(v)} instead.",
               "invalid_type")


def _get_int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if not -2**63 <= v < 2**63:
        raise bad(name, f"'{name}' is out of range: integers must fit in 64 bits (got {str(v)[:30]}"
                        f"{'...' if len(str(v)) > 30 else ''}).", "invalid_value")
    return v


def _get_num(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _type_error(name, "a number", v)
    return float(v)


def _get_bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


@dataclass
class ParsedRequest:
    """What the HTTP layer hands the backend: the prompt (messages or text) and sampling kwargs
    named like dsd.shard.sampling.SamplingParams fields."""
    kind: str                         # "chat" | "completion"
    model: str | None
    messages: list[dict] | None = None
    prompt: str | None = None
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    tools: list[dict] | None = None   # chat: OpenAI function tools, for the template


def _parse_sampling(body: dict) -> dict:
    s: dict = {}
    # max_completion_tokens is the newer spelling; when both are sent it wins, as in OpenAI's API
    for name in ("max_tokens", "max_completion_tokens"):
        n = _get_int(body, name)
        if n is not None:
            if n < 1:
                raise bad(name, f"'{name}' must be at least 1, got {n}.", "invalid_value")
            s["max_tokens"] = n
    t = _get_num(body, "temperature")
    if t is not None:
        if not 0 <= t <= 2:
            raise bad("temperature", f"'temperature' must be between 0 and 2, got {t}.", "invalid_value")
        s["temperature"] = t
    p = _get_num(body, "top_p")
    if p is not None:
        if not 0 <= p <= 1:
            raise bad("top_p", f"'top_p' must be between 0 and 1, got {p}.", "invalid_value")
        if p == 0:
            s["top_k"] = 1          # OpenAI accepts 0: keep only the most likely token
        else:
            s["top_p"] = p
    seed = _get_int(body, "seed")
    if seed is not None:
        # OpenAI seeds are signed 64-bit; dsd's RNG wants [0, 2**64): fold, deterministically
        s["seed"] = seed % (2 ** 64)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise _type_error("stop", "a string or an array of strings", stop)
        if len(stop) > 16:
            raise bad("stop", f"'stop' holds {len(stop)} strings; at most 16 are allowed.", "invalid_value")
        stop = [x for x in stop if x]
        if stop:
            s["stop"] = stop
    for name, kind in _EXTENSIONS.items():
        v = {"int": _get_int, "number": _get_num, "bool": _get_bool}[kind](body, name)
        if v is not None:
            s[name] = v
    if "timeout" in s and not s["timeout"] > 0:
        raise bad("timeout", "'timeout' must be a number of seconds > 0.", "invalid_value")
    if s.get("top_k", 0) < 0:
        raise bad("top_k", "'top_k' must be >= 0 (0 disables it).", "invalid_value")
    if not 0 <= s.get("min_p", 0) <= 1:
        raise bad("min_p", "'min_p' must be between 0 and 1.", "invalid_value")
    if s.get("repetition_penalty", 1) <= 0:
        raise bad("repetition_penalty", "'repetition_penalty' must be > 0 (1 disables it).", "invalid_value")
    return s


def _check_unsupported(body: dict) -> None:
    n = _get_int(body, "n")
    if n is not None and n != 1:
        raise unsupported("n", "dsd returns one choice per request; send n=1 or leave it out")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _get_num(body, name)
        if v:
            raise unsupported(name, "use the 'repetition_penalty' extension instead, or send 0")
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise _type_error("logit_bias", "an object", lb)
        if lb:
            raise unsupported("logit_bias", "leave it out or send {}")
    lp = body.get("logprobs")
    if lp is not None and lp is not False and lp != 0:
        raise unsupported("logprobs", "log-probabilities are not returned")
    tlp = body.get("top_logprobs")
    if tlp is not None and tlp != 0:
        raise unsupported("top_logprobs", "log-probabilities are not returned")
    if body.get("functions"):
        raise unsupported("functions", "send the tools as 'tools' (OpenAI's current form)")
    tc = body.get("tool_choice")
    if tc is not None and tc not in ("auto", "none"):
        raise unsupported("tool_choice", "dsd cannot force a tool call; send 'auto' or 'none'")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict):
            raise _type_error("response_format", "an object", rf)
        if rf.get("type", "text") != "text":
            raise unsupported("response_format", "only {\"type\": \"text\"} is available")
    mods = body.get("modalities")
    if mods is not None and mods != ["text"]:
        raise unsupported("modalities", "dsd produces text only")
    if body.get("audio") is not None:
        raise unsupported("audio", "dsd produces text only")


def _parse_stream(body: dict, req: ParsedRequest) -> None:
    req.stream = bool(_get_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _type_error("stream_options", "an object", so)
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise _type_error("stream_options.include_usage", "a boolean", iu)
        req.include_usage = bool(iu) and req.stream


def _model(body: dict) -> str | None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise _type_error("model", "a string", m)
    return m


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _message_text(content, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type_error(param, "a string or an array of content parts", content)
    out = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _type_error(p, "an object", part)
        kind = part.get("type")
        if kind != "text":
            raise unsupported(f"{p}.type", f"content part type {kind!r} (only 'text' parts are read)")
        text = part.get("text")
        if not isinstance(text, str):
            raise _type_error(f"{p}.text", "a string", text)
        out.append(text)
    return "".join(out)


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _type_error("tools", "an array", tools)
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise bad(f"tools[{i}]", f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": "
                                     f"{{\"name\": ..., \"parameters\": ...}}}}.", "invalid_value")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise bad(f"tools[{i}].function.name", "a tool needs a non-empty string 'name'.",
                      "invalid_value")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise _type_error(f"tools[{i}].function.parameters", "an object", f["parameters"])
    return tools or None


def _tool_calls(calls, param: str) -> list[dict]:
    """An assistant message's tool_calls, for the template: arguments as an object (templates
    iterate over them or write them with tojson), as transformers' chat format has them."""
    if not isinstance(calls, list):
        raise _type_error(param, "an array", calls)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad(f"{param}[{j}]", f"'{param}[{j}]' must be {{\"type\": \"function\", \"id\": ..., "
                                       f"\"function\": {{\"name\": ..., \"arguments\": ...}}}}.",
                      "invalid_value")
        args = f.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass           # the template gets the text as it came
        out.append({"id": str(c.get("id") or ""), "type": "function",
                    "function": {"name": f["name"], "arguments": args}})
    return out


def parse_chat(body: dict) -> ParsedRequest:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "Missing required parameter: 'messages'.", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise _type_error("messages", "an array", msgs)
    if not msgs:
        raise bad("messages", "'messages' must hold at least one message.", "invalid_value")
    messages = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(p, "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad(f"{p}.role", f"Invalid value for '{p}.role': {role!r}; expected one of "
                                   f"{', '.join(sorted(_ROLES))}.", "invalid_value")
        # 'developer' is OpenAI's newer name for the system role; chat templates know 'system'
        msg = {"role": "system" if role == "developer" else role,
               "content": _message_text(m.get("content"), f"{p}.content")}
        for k in ("tool_call_id", "name", "reasoning_content"):
            if isinstance(m.get(k), str):
                msg[k] = m[k]
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{p}.tool_calls")
        messages.append(msg)
    _check_unsupported(body)
    req = ParsedRequest("chat", _model(body), messages=messages, sampling=_parse_sampling(body))
    if body.get("tool_choice") != "none":
        req.tools = _tools(body.get("tools"))
    _parse_stream(body, req)
    return req


def parse_completion(body: dict) -> ParsedRequest:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(x, str) for x in prompt):
            raise unsupported("prompt", "send one prompt per request (batched prompts need n > 1 choices)")
        elif prompt and all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in prompt):
            raise unsupported("prompt", "token-id prompts are not accepted; send the text")
        else:
            raise _type_error("prompt", "a string", prompt)
    if not isinstance(prompt, str):
        raise _type_error("prompt", "a string", prompt)
    if not prompt:
        raise bad("prompt", "'prompt' must not be empty.", "invalid_value")
    _check_unsupported(body)
    if body.get("suffix"):
        raise unsupported("suffix", "fill-in-the-middle is not implemented")
    best_of = _get_int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise unsupported("best_of", "send best_of=1 or leave it out")
    req = ParsedRequest("completion", _model(body), prompt=prompt, sampling=_parse_sampling(body))
    req.echo = bool(_get_bool(body, "echo"))
    _parse_stream(body, req)
    return req


# -- responses -----------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens whose KV the
    prefix cache supplied."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def tool_call_obj(call: dict, index: int | None = None) -> dict:
    """OpenAI's tool call from a daemon/reasoning.py one (with "index" in a stream delta)."""
    return {**({"index": index} if index is not None else {}), "id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def full_response(req: ParsedRequest, rid: str, model: str, text: str, finish: str,
                  u: dict, reasoning: str = "", tool_calls: list | None = None) -> dict:
    created = int(time.time())
    if req.kind == "chat":
        msg = {"role": "assistant", "content": text if text or not tool_calls else None,
               "refusal": None}
        if reasoning:
            msg["reasoning_content"] = reasoning
        if tool_calls:
            msg["tool_calls"] = [tool_call_obj(c) for c in tool_calls]
        choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": (req.prompt + text) if req.echo else text,
                  "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": u}


def stream_chunk(req: ParsedRequest, rid: str, created: int, model: str, *, text: str | None = None,
                 role: bool = False, finish: str | None = None, u: dict | None = None,
                 usage_only: bool = False, reasoning: str | None = None,
                 tool_call: dict | None = None, tool_index: int = 0) -> dict:
    """One SSE chunk. Chat deltas carry the role once (first chunk), then content, then an
    empty delta with finish_reason; with include_usage every chunk has "usage": null and a
    last chunk with no choices carries the totals, as OpenAI sends them."""
    if req.kind == "chat":
        obj = "chat.completion.chunk"
        if usage_only:
            choices = []
        else:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
                delta["content"] = ""
            if text is not None:
                delta["content"] = text
            if reasoning is not None:
                delta["reasoning_content"] = reasoning
            if tool_call is not None:
                delta["tool_calls"] = [tool_call_obj(tool_call, tool_index)]
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        obj = "text_completion"
        choices = [] if usage_only else [{"index": 0, "text": text or "", "logprobs": None,
                                          "finish_reason": finish}]
    out = {"id": rid, "object": obj, "created": created, "model": model,
           "system_fingerprint": None, "choices": choices}
    if req.include_usage:
        out["usage"] = u if usage_only else None
    return out
