"""The FastAPI application: OpenAI's chat and completion routes, models, health and Prometheus metrics.

The artifact is opened in the application's lifespan (so uvicorn listens only once it can answer, and
a Ray Serve replica opens its own copy), and closed after the engine has finished what it admitted.
Nothing a client sends names a file: the artifact path is fixed when the application is built, and
the request's ``model`` is only compared with the served name.
"""


import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llmopt._deps import require
from llmopt.runners.base import max_prompt_tokens
from llmopt.serve import protocol
from llmopt.serve.engine import BatchEngine, Detokenizer, EngineStopped, Job, QueueFull

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5


@dataclass
class ServeOptions:
    model_name: Optional[str] = None  # the name clients send as ``model``; the artifact directory's name by default
    capacity: int = 64  # requests queued or running; more are refused with 429
    batch_window_ms: float = 10.0  # pinned-batch artifacts: how long the first request waits for company
    continuous: bool = True  # OpenVINO artifacts: openvino-genai's continuous batching (else pinned batches)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers, self.kind = status, message, param, code, headers, kind


def open_engine(runner, options: ServeOptions):
    from llmopt.serve import continuous

    if options.continuous and continuous.supports(runner):
        return continuous.ContinuousEngine(runner, options.capacity)
    return BatchEngine(runner, options.capacity, options.batch_window_ms / 1000.0)


class Served:
    """One opened artifact: its runner, engine, tokenizer and default sampling."""

    def __init__(self, artifact: Path, options: ServeOptions, open_runner: Callable, sampling_from: Callable):
        self.runner = open_runner(artifact)
        self.tokenizer = self.runner.tokenizer
        self._sampling_from = sampling_from
        self.defaults = self.sampling(**{})
        self.engine = open_engine(self.runner, options)
        self.name = options.model_name or artifact.resolve().name

    def sampling(self, **overrides):
        """The artifact's sampling defaults (as ``llmopt run`` resolves them) under a request's fields."""
        return self._sampling_from(self.runner.manifest, self.runner.path, self.runner.repetition_penalty, **overrides)

    def close(self) -> None:
        self.engine.stop()
        self.runner.close()

    def encode_chat(self, messages: list[protocol.Message]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this artifact's tokenizer has no chat template; use /v1/completions", param="messages")
        turns = [{"role": "system" if message.role == "developer" else message.role, "content": message.content}
                 for message in messages]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def job(self, body, prompt_ids: list[int], param: str) -> Job:
        runner = self.runner
        limit = max_prompt_tokens(runner.sequence_length)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty after tokenization", param=param)
        if len(prompt_ids) > limit:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens but this artifact accepts at most {limit} "
                           f"(sequence_length {runner.sequence_length} minus one generated token)",
                           param=param, code="context_length_exceeded")
        room = runner.sequence_length - len(prompt_ids)
        wanted = body.token_limit or self.defaults.max_new_tokens
        overrides = {"max_new_tokens": min(wanted, room)}
        for name in ("temperature", "top_p", "seed"):
            if getattr(body, name) is not None:
                overrides[name] = getattr(body, name)
        sampling = self.sampling(**overrides)
        detokenizer = Detokenizer(self.tokenizer, runner.eos_token_ids, body.stops, sampling.max_new_tokens)
        return Job(prompt_ids, sampling, detokenizer, seeded=body.seed is not None,
                   loop=asyncio.get_running_loop(), events=asyncio.Queue())


class Metrics:
    def __init__(self, served_pending: Callable[[], int]):
        prometheus = require("prometheus_client", extra="serve", package="prometheus-client")
        self.registry = prometheus.CollectorRegistry()
        self.requests = prometheus.Counter("llmopt_requests", "Requests answered, by route and HTTP status.",
                                           ["route", "status"], registry=self.registry)
        self.queue = prometheus.Gauge("llmopt_queue_depth", "Requests admitted and not finished (queued or running).",
                                      registry=self.registry)
        self.queue.set_function(served_pending)
        self.ttft = prometheus.Histogram("llmopt_time_to_first_token_seconds", "From admission to the first token.",
                                         registry=self.registry,
                                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.rate = prometheus.Histogram("llmopt_decode_tokens_per_second", "Per request: tokens after the first, "
                                         "over the time after the first.", registry=self.registry,
                                         buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600))
        self.tokens = prometheus.Counter("llmopt_tokens", "Tokens processed, by kind (prompt, completion).",
                                         ["kind"], registry=self.registry)
        self.latest = prometheus.generate_latest

    def observe(self, job: Job) -> None:
        self.tokens.labels("prompt").inc(len(job.prompt_ids))
        self.tokens.labels("completion").inc(job.detokenizer.count)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.created)
            decoded = job.detokenizer.count - 1
            if decoded > 0 and job.finished_at and job.finished_at > job.first_token_at:
                self.rate.observe(decoded / (job.finished_at - job.first_token_at))


def build_app(artifact: str | Path, options: ServeOptions, open_runner: Callable, sampling_from: Callable,
              served: Optional[Served] = None):
    """The ASGI application serving ``artifact``; ``open_runner(path)`` and ``sampling_from(manifest)`` as in llmopt.api.

    ``served``: the artifact already opened (so a broken one fails before the server starts), else it is
    opened at startup (a Ray Serve replica opens its own)."""
    fastapi = require("fastapi", extra="serve")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    artifact = Path(artifact)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        opened = served or await asyncio.to_thread(Served, artifact, options, open_runner, sampling_from)
        state["served"], state["metrics"] = opened, Metrics(lambda: opened.engine.pending)
        try:
            yield
        finally:
            await asyncio.to_thread(opened.close)  # uvicorn has drained the connections; finish the engine's work

    app = fastapi.FastAPI(title="llmopt serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(exc: ApiError, route: str):
        if "metrics" in state:
            state["metrics"].requests.labels(route, str(exc.status)).inc()
        return JSONResponse(protocol.error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.middleware("http")
    async def _replica_header(request, call_next):
        response = await call_next(request)
        response.headers["X-Llmopt-Replica"] = str(os.getpid())  # which process answered (Ray Serve replicas)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error(validation_error(exc.errors()), request.url.path)

    @app.get("/health")
    async def health():
        served = state.get("served")
        if served is None or not served.engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": served.name, "engine": served.engine.kind, "pending": served.engine.pending,
                "pid": os.getpid()}

    @app.get("/v1/models")
    async def models():
        served = state["served"]
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "llmopt",
                                             "max_model_len": served.runner.sequence_length}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state["metrics"].latest(state["metrics"].registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: fastapi.Request):
        served = checked_model(state["served"], body.model)
        job = served.job(body, served.encode_chat(body.messages), "messages")
        return await answer(served, job, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: fastapi.Request):
        served = checked_model(state["served"], body.model)
        job = served.job(body, served.encode_text(body.prompt), "prompt")
        return await answer(served, job, body, request, chat=False)

    async def answer(served: Served, job: Job, body, request, chat: bool):
        route, metrics = request.url.path, state["metrics"]
        try:
            served.engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}; retry later", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except EngineStopped as exc:
            raise ApiError(503, str(exc), code="shutting_down", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            metrics.requests.labels(route, "200").inc()
            events = stream(served, job, body, request_id, chat, request)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts: list[str] = []
        try:
            while True:
                kind, value = await next_event(job, request)
                if kind == "gone":
                    return Response(status_code=499)
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    raise ApiError(500, value, kind="server_error")
                else:
                    break
        finally:
            if not job.done:
                served.engine.cancel(job)  # the client went away: its slot is free now
        metrics.observe(job)
        metrics.requests.labels(route, "200").inc()
        make = protocol.chat_response if chat else protocol.completion_response
        return make(request_id, served.name, "".join(parts), value, len(job.prompt_ids), job.detokenizer.count)

    async def next_event(job: Job, request) -> tuple:
        """The job's next event, or ("gone", None) once its client has disconnected."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return "gone", None

    async def stream(served: Served, job: Job, body, request_id: str, chat: bool, request):
        created = int(time.time())

        def chunk(text: str, finish: Optional[str] = None, usage: Optional[dict] = None) -> str:
            if chat:
                delta = {"content": text} if text or finish is None else {}
                data = protocol.chat_chunk(request_id, served.name, created, delta, finish, usage)
            else:
                data = protocol.completion_chunk(request_id, served.name, created, text, finish, usage)
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                data = protocol.chat_chunk(request_id, served.name, created, {"role": "assistant", "content": ""})
                yield f"data: {json.dumps(data)}\n\n"
            while True:
                kind, value = await next_event(job, request)
                if kind == "gone":
                    return
                if kind == "text":
                    yield chunk(value)
                elif kind == "error":
                    yield f"data: {json.dumps(protocol.error_body(value, 'server_error'))}\n\n"
                    break
                else:
                    usage = protocol.usage(len(job.prompt_ids), job.detokenizer.count)
                    yield chunk("", value, usage)  # usage in the last chunk of every stream
                    if body.stream_options is not None and body.stream_options.include_usage:
                        data = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": served.name, "choices": [], "usage": usage}
                        yield f"data: {json.dumps(data)}\n\n"
                    state["metrics"].observe(job)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:
                served.engine.cancel(job)  # the client disconnected mid-stream: free its slot, stop its tokens

    return app


def checked_model(served: Served, model: str) -> Served:
    if model != served.name:
        raise ApiError(404, f"model '{model}' is not served here; this server serves '{served.name}'",
                       param="model", code="model_not_found")
    return served


def validation_error(errors) -> ApiError:
    """FastAPI's validation errors as one OpenAI error naming the first bad field: 400 for bad JSON, else 422."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return ApiError(400, f"malformed JSON body: {reason}", code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    if first.get("type") == "extra_forbidden":
        message = f"unknown field '{field}'"
    elif first.get("type") == "missing":
        message = f"missing field '{field}'"
    else:
        message = f"field '{field}': {first.get('msg')}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(422, message + more, param=field, code="invalid_field")
