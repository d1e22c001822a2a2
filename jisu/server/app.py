"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (both
also as server-sent events), /health and /metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jisu.server.async_engine import AsyncEngine, Delta, EngineDead, EngineOverloaded, Failed, Finished
from jisu.server.metrics import Metrics
from jisu.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("jisu.server")

MAX_BODY_BYTES = 16 * 2**20
ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


class ServerState:
    def __init__(self, llm, model_name: str, api_key: str | None, max_queue: int, log_prompts: bool):
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.model_name = model_name
        self.aliases = {model_name, Path(llm.path).name, Path(llm.path).stem, str(llm.path)}
        self.api_key = api_key
        self.log_prompts = log_prompts
        self.metrics = Metrics(llm.engine)
        self.engine = AsyncEngine(llm, max_queue=max_queue, metrics=self.metrics)
        self.created = int(time.time())

    # ---- request checks -----------------------------------------------------------------
    def token_text(self, token_id: int) -> tuple[bytes, str]:
        """A token's bytes, and them as text (a partial UTF-8 character shows as U+FFFD)."""
        b = self.tokenizer.token_bytes(token_id, skip_special=False)
        return b, b.decode("utf-8", errors="replace")

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def encode(self, text: str, where: str) -> list[int]:
        try:
            return self.llm._encode_prompt(text)
        except ValueError as e:          # text that is not valid Unicode (a lone surrogate)
            raise APIError(400, f"{where}: {e}", param=where) from None

    def check_prompt(self, ids: list[int], max_tokens: int | None, where: str) -> None:
        try:
            self.llm.engine.check_prompt(ids)
        except ValueError as e:
            raise APIError(400, f"{where}: {e}", param=where.split("[")[0]) from None
        room = self.llm.max_model_len - len(ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens ({max_tokens}) plus the prompt's {len(ids)} tokens exceeds the "
                           f"model's context of {self.llm.max_model_len} tokens", param="max_tokens")

    def submit(self, prompts: list[list[int]], params) -> tuple[list, asyncio.Queue]:
        if len(prompts) * params.n > self.engine.capacity:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={params.n} sequences exceed what this server "
                           f"holds at once ({self.engine.capacity}); split the request", param="n")
        try:
            self.engine.check_capacity(len(prompts) * params.n)
        except EngineOverloaded as e:
            raise APIError(429, str(e), type="server_overloaded", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise APIError(503, str(e), type="server_error", headers={"Retry-After": "30"}) from None
        out: asyncio.Queue = asyncio.Queue()
        streams = [self.engine.submit(ids, params, out, tag) for tag, ids in enumerate(prompts)]
        return streams, out


async def read_json(request: Request, model: type[BaseModel]):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {errors[0]['msg']}") from None
        loc = errors[0]["loc"]
        field = str(loc[0]) if loc else None
        if len(errors) > 1 and all(err["loc"][:1] == loc[:1] for err in errors):   # no branch of a union fit
            msg = "; or ".join(dict.fromkeys(err["msg"] for err in errors))
        else:
            msg = errors[0]["msg"]
        raise APIError(400, f"{field or 'body'}: {msg}", param=field) from None


async def events(state: ServerState, streams: list, q: asyncio.Queue):
    """(prompt index, Delta | Finished) until every stream finished; aborts what is left when
    the consumer stops early (a client gone, an error)."""
    remaining = len(streams)
    try:
        while remaining:
            tag, item = await q.get()
            if isinstance(item, Failed):
                raise APIError(500, item.message, type="server_error")
            if isinstance(item, Finished):
                remaining -= 1
            yield tag, item
    finally:
        for s in streams:
            state.engine.abort(s.request_id)


async def collect(request: Request, state: ServerState, streams: list, q: asyncio.Queue) -> list | None:
    """All events of a non-streaming request, or None when the client disconnected while it
    waited (its sequences are then aborted, which frees their blocks)."""
    items: list = []

    async def drain():
        async for item in events(state, streams, q):
            items.append(item)

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                return items
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for s in streams:
            state.engine.abort(s.request_id)


CLIENT_GONE = 499       # nginx's code for "client closed the request"; nobody receives it


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompts: list[list[int]], finished: list[Finished]) -> dict:
    p, c = sum(len(x) for x in prompts), sum(f.num_output_tokens for f in finished)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def by_choice(items: list, num_choices: int, n: int) -> tuple[list[list[Delta]], list[Finished]]:
    """A finished request's events: the deltas of each choice (index prompt * n + sample), in
    order, and the Finished records."""
    deltas: list[list[Delta]] = [[] for _ in range(num_choices)]
    for tag, item in items:
        if isinstance(item, Delta):
            deltas[tag * n + item.index].append(item)
    return deltas, [x for _, x in items if isinstance(x, Finished)]


def finish_reason(deltas: list[Delta]) -> str | None:
    return next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None)


def create_app(llm, model_name: str, api_key: str | None = None, max_queue: int = 256,
               log_prompts: bool = False) -> FastAPI:
    state = ServerState(llm, model_name, api_key, max_queue, log_prompts)

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        log.info("serving %s (context %d tokens)", model_name, llm.max_model_len)
        yield
        await state.engine.shutdown()

    app = FastAPI(title="jisu", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jisu = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    # a plain ASGI middleware: starlette's BaseHTTPMiddleware would hide client disconnects
    # from request.is_disconnected()
    def count_requests(inner):
        async def middleware(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    state.metrics.requests.labels(path, str(message["status"])).inc()
                await send(message)
            await inner(scope, receive, counting_send)
        return middleware
    app.add_middleware(count_requests)

    @app.get("/health")
    async def health():
        if state.engine.error:
            return JSONResponse({"status": "error", "error": state.engine.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "jisu", "max_model_len": llm.max_model_len}]}

    # ---- completions --------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        state.check_auth(request)
        req = await read_json(request, CompletionRequest)
        state.check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        p = req.prompt
        if isinstance(p, str):
            texts, prompts = [p], [state.encode(p, "prompt")]
        elif p and all(isinstance(x, str) for x in p):
            texts, prompts = list(p), [state.encode(x, "prompt") for x in p]
        elif p and all(isinstance(x, int) for x in p):
            texts, prompts = [None], [list(p)]
        elif p:
            texts, prompts = [None] * len(p), [list(x) for x in p]
        else:
            raise APIError(400, "prompt is empty", param="prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = req.sampling_params(max_tokens, req.logprobs)
        for i, ids in enumerate(prompts):
            state.check_prompt(ids, max_tokens, f"prompt[{i}]" if len(prompts) > 1 else "prompt")
        if state.log_prompts:
            log.info("completion prompts: %r", texts)
        streams, q = state.submit(prompts, params)
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n

        def logprobs_of(deltas: list[Delta], text_offset: int) -> dict | None:
            if req.logprobs is None:
                return None
            tokens, lps, tops, offsets = [], [], [], []
            for d in deltas:
                if d.logprob is None:
                    continue
                tokens.append(state.token_text(d.token_id)[1])
                lps.append(d.logprob["logprob"])
                tops.append({state.token_text(t)[1]: lp for t, lp in d.logprob["top"]} if req.logprobs else None)
                offsets.append(text_offset)
                text_offset += len(d.text)
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                finished, offsets = [], {}
                async for tag, item in events(state, streams, q):
                    if isinstance(item, Finished):
                        finished.append(item)
                        continue
                    if not item.text and item.finish_reason is None and item.logprob is None:
                        continue
                    index = tag * n + item.index
                    choice = {"index": index, "text": item.text, "logprobs": logprobs_of([item], offsets.get(index, 0)),
                              "finish_reason": item.finish_reason}
                    offsets[index] = offsets.get(index, 0) + len(item.text)
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [choice]})
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(prompts, finished)})
                yield "data: [DONE]\n\n"
            return EventStream(guard(stream()), state, streams)

        items = await collect(request, state, streams, q)
        if items is None:
            return Response(status_code=CLIENT_GONE)
        deltas, finished = by_choice(items, len(prompts) * n, n)
        choices = [{"index": i, "text": "".join(d.text for d in ds), "logprobs": logprobs_of(ds, 0),
                    "finish_reason": finish_reason(ds)} for i, ds in enumerate(deltas)]
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(prompts, finished)}

    # ---- chat ---------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.check_auth(request)
        req = await read_json(request, ChatCompletionRequest)
        state.check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages is empty: give at least one message", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            text = state.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages],
                                                       add_generation_prompt=True)
        except Exception as e:    # the template's own raise_exception, or a jinja error
            raise APIError(400, f"messages do not fit the model's chat template: {e}", param="messages") from None
        ids = state.encode(text, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        state.check_prompt(ids, max_tokens, "messages")
        if state.log_prompts:
            log.info("chat prompt: %r", text)
        streams, q = state.submit([ids], params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprob_entry(d: Delta) -> dict:
            def one(t, lp):
                b, text = state.token_text(t)
                return {"token": text, "logprob": lp, "bytes": list(b)}
            return {**one(d.token_id, d.logprob["logprob"]), "top_logprobs": [one(t, lp) for t, lp in d.logprob["top"]]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, **extra):
                return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "choices": choices, **extra})

            async def stream():
                finished = []
                for i in range(params.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for _, item in events(state, streams, q):
                    if isinstance(item, Finished):
                        finished.append(item)
                        continue
                    lp = {"content": [logprob_entry(item)]} if item.logprob is not None else None
                    if item.text or lp:
                        yield chunk([{"index": item.index, "delta": {"content": item.text}, "logprobs": lp,
                                      "finish_reason": None}])
                    if item.finish_reason:
                        yield chunk([{"index": item.index, "delta": {}, "logprobs": None,
                                      "finish_reason": item.finish_reason}])
                if include_usage:
                    yield chunk([], usage=usage([ids], finished))
                yield "data: [DONE]\n\n"
            return EventStream(guard(stream()), state, streams)

        items = await collect(request, state, streams, q)
        if items is None:
            return Response(status_code=CLIENT_GONE)
        deltas, finished = by_choice(items, params.n, params.n)
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(d.text for d in ds)},
                    "logprobs": {"content": [logprob_entry(d) for d in ds if d.logprob]} if req.logprobs else None,
                    "finish_reason": finish_reason(ds)} for i, ds in enumerate(deltas)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage([ids], finished)}

    return app


class EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends: a client that
    leaves before the first event never enters the generator, so its `finally` cannot."""

    def __init__(self, content, state: ServerState, streams: list):
        super().__init__(content, media_type="text/event-stream")
        self._state, self._streams = state, streams

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self._streams:
                self._state.engine.abort(s.request_id)


async def guard(agen):
    """Ends a stream with an error event instead of a broken connection if the engine fails."""
    try:
        async for piece in agen:
            yield piece
    except APIError as e:
        yield sse(e.body())
        yield "data: [DONE]\n\n"
