"""The OpenAI-compatible HTTP API: FastAPI routes that parse, validate, hand requests to the engine
loop and format what comes back. Nothing here touches the model.

    GET  /v1/models, /v1/models/{id}     the one served model
    POST /v1/completions                 prompt(s) -> text; stream: true for server-sent events
    POST /v1/chat/completions            messages, rendered with the checkpoint's chat template
    GET  /health                         200 while the engine loop runs, else 503
    GET  /metrics                        Prometheus text format

With an API key, every /v1 route needs `Authorization: Bearer KEY`; /health and /metrics stay open
for load balancers and Prometheus (as in vLLM). Every error is OpenAI's JSON error body.
A client that disconnects, streaming or not, has its request cancelled and its slots freed.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from blitzgen.errors import BlitzgenError
from blitzgen.generate import Generator
from blitzgen.server.engine import Delta, Engine, EngineError, QueueFull
from blitzgen.server.engine import Request as EngineRequest
from blitzgen.server.metrics import Metrics
from blitzgen.server.protocol import MAX_CHOICES, ApiError, ChatRequest, CompletionRequest, validation_error

log = logging.getLogger("blitzgen.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (unknown paths as "other")."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/")
        endpoint = "/v1/models" if path.startswith("/v1/models/") else path if path in ENDPOINTS else "other"
        status = [500]

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


class _ClientGone(Exception):
    """The client disconnected before its (non-streaming) answer was ready; its request is cancelled."""


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(
    generator: Generator,
    *,
    model_name: str,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 256,
    max_prefill_tokens: int = 4096,
    max_body_bytes: int = 4 << 20,
    max_logprobs: int = 20,
) -> FastAPI:
    """The server for one Generator. Builds its slots (and, on GPU, compiles and captures the decode
    step) now; the engine thread starts and stops with the app's lifespan."""
    metrics = Metrics()
    engine = Engine(generator, max_batch_size=max_batch_size, max_queue=max_queue,
                    max_prefill_tokens=max_prefill_tokens, top_logprobs=max_logprobs or None, metrics=metrics)
    tokenizer, context, vocab_size = generator.tokenizer, generator.context, generator.config.vocab_size

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="blitzgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(_CountRequests, metrics=metrics)

    # ---- errors: always OpenAI's body ----------------------------------------------------------
    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(BlitzgenError)
    async def on_blitzgen_error(request, exc: BlitzgenError):
        return _error_response(ApiError(400, str(exc), code="invalid_value"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        return _error_response(validation_error(ValidationError.from_exception_data("request", exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                        else None, headers=dict(exc.headers or {})))

    @app.exception_handler(_ClientGone)
    async def on_client_gone(request, exc: _ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics count it

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):
        log.exception("unexpected error in %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}"))

    # ---- shared steps ------------------------------------------------------------------------------
    async def check_key(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request, model_class):
        length = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than {max_body_bytes} bytes",
                             code="request_too_large")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_large
        try:
            parsed = model_class.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise validation_error(exc) from None
        if parsed.model is not None and parsed.model != model_name:
            raise ApiError(404, f"the model '{parsed.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        parsed.check_unsupported()
        return parsed

    def check_prompt(ids: list[int], max_tokens: int, what: str):
        if not ids:
            raise ApiError(400, f"{what} is empty (no tokens)", param="prompt", code="invalid_value")
        if any(not 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"{what} has token ids outside [0, {vocab_size})", param="prompt",
                           code="invalid_value")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens, but {what} has {len(ids)} tokens and "
                           f"max_tokens is {max_tokens}: shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    def submit(request: EngineRequest, prompts: list[list[int]]):
        try:
            engine.submit(request)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy ({exc}); retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineError as exc:
            raise ApiError(exc.status, str(exc), code="engine_unavailable", headers={"Retry-After": "5"}) from None
        metrics.prompt_tokens.inc(sum(map(len, prompts)))

    async def deltas(http_request: Request, request: EngineRequest):
        """Lists of Delta as the engine produces them, until every choice has finished. An engine error
        raises ApiError, a client that goes away _ClientGone; either, or a consumer that stops early,
        cancels the request."""
        gone = asyncio.ensure_future(_client_gone(http_request))
        getter = None
        unfinished = len(request.choices)
        try:
            while unfinished:
                getter = asyncio.ensure_future(request.queue.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    raise _ClientGone()
                item = getter.result()
                if isinstance(item, EngineError):
                    raise ApiError(item.status, str(item))
                unfinished -= sum(d.finish_reason is not None for d in item)
                yield item
        finally:
            gone.cancel()
            if getter is not None:
                getter.cancel()
            if not request.done:
                engine.cancel(request)

    def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
        prompt_tokens = sum(map(len, prompts))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def event_stream(chunks):
        """Server-sent events of `chunks` (dicts), then [DONE]; an error mid-stream is one error event."""
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except ApiError as exc:
            yield sse(exc.body())
        except _ClientGone:
            return
        yield "data: [DONE]\n\n"

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def stream(http_request, request, body, prompts, chunk, opening, choice_of, every_token: bool):
        """The streamed response of either endpoint: a first chunk of `opening` choices (if any), then
        one chunk per delta that carries text, a finish reason or (every_token) a token's logprobs;
        with stream_options.include_usage every chunk says "usage": null and a last one the counts."""
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}

        async def chunks():
            generated = 0
            if opening:
                yield chunk(opening, **extra)
            async for step in deltas(http_request, request):
                generated += len(step)
                for d in step:
                    if d.text or d.finish_reason or every_token:
                        yield chunk([choice_of(d)], **extra)
            if include_usage:
                yield chunk([], usage=usage(prompts, generated))

        return StreamingResponse(event_stream(chunks()), media_type="text/event-stream")

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.alive:
            raise ApiError(503, "the engine loop is not running", code="engine_unavailable",
                           headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    model_card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "blitzgen",
                  "max_model_len": context}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def get_model(name: str):
        if name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(http_request: Request):
        body = await read_body(http_request, CompletionRequest)
        if body.logprobs is not None and (max_logprobs == 0 or body.logprobs > max_logprobs):
            raise ApiError(400, f"invalid 'logprobs': at most {max_logprobs} on this server" if max_logprobs else
                           "logprobs are turned off on this server (--max-logprobs 0)", param="logprobs",
                           code="invalid_value")
        max_tokens = body.max_tokens or 16
        prompts = body.prompts()
        if len(prompts) * body.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} choices in one request",
                           param="prompt", code="invalid_value")
        # Tokenizing a long prompt takes a while: not on the event loop.
        prompts = await run_in_threadpool(lambda: [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts])
        for i, ids in enumerate(prompts):
            check_prompt(ids, max_tokens, "the prompt" if len(prompts) == 1 else f"prompt {i}")
        params = body.sampling_params(max_tokens)
        request = EngineRequest(asyncio.get_running_loop(), want_logprobs=body.logprobs is not None)
        for ids in prompts:  # choice index = prompt index * n + j, as OpenAI numbers them
            for p in params:
                request.add_choice(ids, p, tokenizer)
        submit(request, prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = [tokenizer.decode(ids) if body.echo else "" for ids in prompts]
        offsets = [len(echoes[c.index // body.n]) for c in request.choices]  # text_offset of each choice's next token

        def logprobs_of(deltas: list[Delta]) -> dict | None:
            if body.logprobs is None:
                return None
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for d in deltas:
                text = token_text(d.token_id)
                top = {token_text(t): lp for t, lp in d.logprobs.top[: body.logprobs]}
                top.setdefault(text, d.logprobs.logprob)
                out["tokens"].append(text)
                out["token_logprobs"].append(d.logprobs.logprob)
                out["top_logprobs"].append(top)
                out["text_offset"].append(offsets[d.index])
                offsets[d.index] += len(text)
            return out

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, **extra}

        if body.stream:
            echoed = [{"index": c.index, "text": echoes[c.index // body.n], "logprobs": None, "finish_reason": None}
                      for c in request.choices] if body.echo else None
            return stream(http_request, request, body, prompts, chunk, echoed,
                          lambda d: {"index": d.index, "text": d.text, "logprobs": logprobs_of([d]),
                                     "finish_reason": d.finish_reason},
                          every_token=body.logprobs is not None)

        per_choice: list[list[Delta]] = [[] for _ in request.choices]
        async for step in deltas(http_request, request):
            for d in step:
                per_choice[d.index].append(d)
        choices = [{"index": i, "text": echoes[i // body.n] + "".join(d.text for d in ds),
                    "logprobs": logprobs_of(ds), "finish_reason": ds[-1].finish_reason}
                   for i, ds in enumerate(per_choice)]
        return chunk(choices, usage=usage(prompts, sum(map(len, per_choice))))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(http_request: Request):
        body = await read_body(http_request, ChatRequest)
        if tokenizer.chat_template is None:
            raise ApiError(400, f"the model '{model_name}' has no chat template (no chat_template.jinja or "
                           "chat_template in tokenizer_config.json); use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        top = body.top_logprobs or 0
        if body.logprobs and max_logprobs == 0:
            raise ApiError(400, "logprobs are turned off on this server (--max-logprobs 0)", param="logprobs",
                           code="invalid_value")
        if top > max_logprobs:
            raise ApiError(400, f"invalid 'top_logprobs': at most {max_logprobs} on this server",
                           param="top_logprobs", code="invalid_value")

        def render():
            text = tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=True)
            return tokenizer.encode(text, add_special_tokens=False)  # the template writes its own BOS

        ids = await run_in_threadpool(render)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(context - len(ids), 1)
        check_prompt(ids, max_tokens, "the conversation")
        request = EngineRequest(asyncio.get_running_loop(), want_logprobs=body.logprobs)
        for p in body.sampling_params(max_tokens):
            request.add_choice(ids, p, tokenizer)
        submit(request, [ids])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        def logprobs_of(deltas: list[Delta]) -> dict | None:
            if not body.logprobs:
                return None
            return {"content": [{**entry(d.token_id, d.logprobs.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in d.logprobs.top[:top]]} for d in deltas]}

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices, **extra}

        if body.stream:
            roles = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in request.choices]
            return stream(http_request, request, body, [ids], chunk, roles,
                          lambda d: {"index": d.index, "delta": {"content": d.text} if d.text else {},
                                     "logprobs": logprobs_of([d]), "finish_reason": d.finish_reason},
                          every_token=bool(body.logprobs))

        per_choice: list[list[Delta]] = [[] for _ in request.choices]
        async for step in deltas(http_request, request):
            for d in step:
                per_choice[d.index].append(d)
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(d.text for d in ds)},
                    "logprobs": logprobs_of(ds), "finish_reason": ds[-1].finish_reason}
                   for i, ds in enumerate(per_choice)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage([ids], sum(map(len, per_choice)))}

    return app


async def _client_gone(request: Request):
    """Returns once the client has disconnected (the body is read already, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
