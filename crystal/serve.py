"""`crystal serve RUN_OR_HF_DIR`: an OpenAI-compatible HTTP API for a trained model.

    GET  /v1/models             the one model, named after the directory
    POST /v1/completions        a prompt (text, or a list of token ids) continued
    POST /v1/chat/completions   messages rendered with the tokenizer's own chat template

both streamed (server-sent events, `data: [DONE]` last) and not, with max_tokens (chat also
max_completion_tokens), temperature, top_p, n, stop (a text or up to MAX_STOPS), seed, stream,
stream_options.include_usage, and `usage` counts (prompt tokens; completion tokens: every
token generated, over the n choices). Other fields are ignored, except those that would change
the answer and that this server does not do (logprobs, echo, suffix, best_of > n, tools): 400.

Sampling reuses crystal.sample and crystal.generate (`Worker`): choice i of a request draws
with `choose` from its own generator seeded seed + i, so it equals `crystal sample --seed S+i`
(a greedy completion is `crystal sample --temperature 0`'s); its text comes through a
`TextStream` (whole UTF-8 characters, cut before a stop text); the tokenizer's end-of-text ends
it (finish_reason "stop"; max_tokens: "length"). Without a seed, a request draws a random one.
A prompt longer than block_size continues from its last block_size tokens, and a context that
fills block_size slides (crystal.sample.context_window).

Concurrency: one worker thread owns the model and decodes the running requests together, as
rows of one KV-cache decoder: a request waits in a FIFO queue until its n rows are free, joins
the batch (its prompt computed once, into one row, and copied into its other n - 1), and leaves
it when its choices end, so a short request does not wait for a long one to finish. Bounds
(`Limits`): the body, the prompt's tokens, max_tokens, n, the stop texts, and the requests
queued or running; beyond one, the OpenAI error JSON with 400, 413 (body) or 429 (queue full),
at once. A client that disconnects (mid-stream, or while its answer is decoded) cancels its
request: its rows are freed before the next decode step.

Chat: the template is tokenizer_config.json's `chat_template` (or chat_template.jinja beside
it), rendered as transformers' apply_chat_template renders it (crystal.chat) (a sandboxed jinja2 environment
with trim_blocks and lstrip_blocks, `raise_exception`, `tojson`; messages, add_generation_prompt
true, the special tokens); the text is then encoded without adding special tokens. A model
without a template answers chat with 400 and completions as usual.

Security: binds 127.0.0.1 unless told; another host prints a warning. `--api-key KEY` requires
`Authorization: Bearer KEY` on every /v1 request (401 otherwise). Only Host headers naming the
bound address are answered (crystal.hostcheck; 421 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystal.chat import ChatTemplate, TemplateRefused, read_chat_template, special_tokens
from crystal.errors import CrystalError
from crystal.jsonio import parse_json

DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request checks that its client is there
MAX_STOPS = 4  # OpenAI's bound on stop texts
MAX_SEED = 2**63  # seeds are taken modulo this (OpenAI's are 64-bit integers)
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
               "logit_bias": (None, {})}  # a field and the values it may have here


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may wait."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 32_768  # longer than block_size continues from the last block_size
    max_tokens: int = 4096  # per choice
    max_n: int = 16
    max_queue: int = 64  # requests queued or running
    max_batch: int = 16  # choices decoded together (rows of the decoder's KV cache); >= max_n
    default_max_tokens: int = 16  # completions, as OpenAI's; chat defaults to max_tokens's bound


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- the model and its tokenizer -------------------------------------------------------------------

class ServedModel:
    """The model of RUN_OR_HF_DIR, its tokenizer, end-of-text token and chat template."""

    def __init__(self, path: str | Path, backend=None):
        from crystal.pretrained import checkpoint_tokenizer, load_checkpoint
        from crystal.sample import eos_token_id

        self.path = path = Path(path)
        if not path.exists():
            raise CrystalError(f"{path} does not exist: give a run directory or a Hugging Face GPT-2 directory")
        self.model = load_checkpoint(path, backend)
        self.tok = checkpoint_tokenizer(path, self.model.config)
        where = path if path.is_dir() else path.parent
        self.name = path.resolve().name or "crystal"
        source, config = read_chat_template(where)
        special = special_tokens(config)
        self.chat = None if source is None else ChatTemplate(source, special)
        eos_text, inner = special.get("eos_token"), getattr(self.tok, "tok", None)
        eos = inner.token_to_id(eos_text) if eos_text and inner is not None else None
        self.eos = eos if eos is not None else eos_token_id(self.tok)
        self.block_size = self.model.config.block_size

    def encode(self, text: str) -> list[int]:
        """A prompt's ids as the tokenizer gives them (no special tokens added)."""
        from crystal.sample import prompt_tokens

        return prompt_tokens(self.tok, text)


# --- the worker ------------------------------------------------------------------------------------

@dataclass
class Job:
    """One request: its prompt's ids, sampling and n, and where its events go (`emit`, called
    from the worker thread: ("text", i, piece), ("end", i, finish_reason), ("done", usage) or
    ("error", message))."""

    prompt: list[int]
    params: object  # crystal.sample.SamplingParams
    n: int
    emit: object
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Sequence:
    """One choice of a running job, in row `row` of the shared decoder."""

    job: Job
    index: int
    row: int
    ids: list[int]  # the prompt and the tokens drawn
    rng: object  # numpy Generator, seeded seed + index (crystal.sample's rule)
    stream: object  # crystal.sample.TextStream
    n_new: int = 0
    reason: str = "length"
    live: bool = True


class Worker:
    """One thread that owns the model and decodes every running request's choices together, as
    rows of one Decoder of `max_batch` rows and block_size positions (its KV cache allocated
    once, here). A request waits in a FIFO queue until `n` rows are free; it then joins the
    running batch: its prompt (its last block_size tokens) is computed once, into its first
    choice's row (Decoder.refill), and copied into the other choices' rows (Decoder.share); from
    then on each step decodes one token for every live row at once; a row that fills block_size
    slides (crystal.sample.context_window). Each row draws exactly as crystal.sample.Generation
    draws (choose, its own generator seeded seed + i), so a choice is the same text whether or not
    other requests were decoded beside it."""

    def __init__(self, served: ServedModel, max_queue: int, max_batch: int):
        from crystal.generate import Decoder

        self.served, self.max_queue = served, max_queue
        self.decoder = Decoder(served.model, max_batch, served.block_size)
        self.rows: list[Sequence | None] = [None] * max_batch
        self.jobs: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.running: dict[int, list[Sequence]] = {}  # id(job) -> its choices
        self._lock = threading.Lock()
        self.pending = 0  # queued or running
        self.cancelled = 0  # jobs given up because their client left
        self.peak_jobs = 0  # the most requests decoded in one step
        self._thread = threading.Thread(target=self._loop, name="crystal-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending >= self.max_queue:
                raise ApiError(429, f"the server is busy: {self.max_queue} requests are queued or running; "
                                    "retry later", code="queue_full")
            self.pending += 1
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def _finished(self, job: Job, cancelled: bool = False) -> None:
        for s in self.running.pop(id(job), []):
            self.rows[s.row] = None
        self.cancelled += cancelled
        with self._lock:
            self.pending -= 1

    def _loop(self) -> None:
        while True:
            try:  # wait for work only when nothing runs
                while True:
                    job = self.jobs.get(block=not self.running and not self.waiting)
                    if job is None:
                        return
                    self.waiting.append(job)
            except queue.Empty:
                pass
            try:
                self._step()
            except Exception as e:  # the running requests' failure is their answer, never the server's end
                message = str(e) if isinstance(e, CrystalError) else f"{type(e).__name__}: {e}"
                for seqs in list(self.running.values()):
                    seqs[0].job.emit(("error", message))
                    self._finished(seqs[0].job)

    def _step(self) -> None:
        from crystal.sample import context_window

        for seqs in list(self.running.values()):  # clients that left
            if seqs[0].job.cancelled.is_set():
                self._finished(seqs[0].job, cancelled=True)
        while self.waiting and (self.waiting[0].cancelled.is_set()
                                or self.waiting[0].n <= self.rows.count(None)):
            job = self.waiting.popleft()
            if job.cancelled.is_set():
                self._finished(job, cancelled=True)
            else:
                self._admit(job)
        if not self.running:
            return
        self.peak_jobs = max(self.peak_jobs, len(self.running))
        dec, T = self.decoder, self.served.block_size
        live = [s for s in self.rows if s is not None and s.live]
        full = [s for s in live if dec.lengths[s.row] >= dec.capacity]  # these slide
        step = [s for s in live if dec.lengths[s.row] < dec.capacity]
        if step:  # rows 0..the last in use (free rows are taken lowest first): the others are not computed
            used = max(s.row for s in step) + 1
            active, tokens = np.zeros(used, dtype=bool), np.zeros(used, dtype=np.int64)
            for s in step:
                active[s.row], tokens[s.row] = True, s.ids[-1]
            logits = dec.decode(tokens, active)
            for s in step:
                self._draw(s, logits[s.row])
        for s in full:
            self._draw(s, dec.refill(s.row, context_window(s.ids, T)))
        for seqs in list(self.running.values()):
            if not any(s.live for s in seqs):
                completion, prompt = sum(s.n_new for s in seqs), len(seqs[0].job.prompt)
                seqs[0].job.emit(("done", {"prompt_tokens": prompt, "completion_tokens": completion,
                                           "total_tokens": prompt + completion}))
                self._finished(seqs[0].job)

    def _admit(self, job: Job) -> None:
        """The job's choices in free rows, their prompts computed and first tokens drawn."""
        from crystal.sample import TextStream

        free = [r for r, s in enumerate(self.rows) if s is None][:job.n]
        seqs = [Sequence(job, i, r, list(job.prompt), np.random.default_rng(job.params.seed + i),
                         TextStream(self.served.tok, job.prompt, job.params.stop)) for i, r in enumerate(free)]
        self.running[id(job)] = seqs
        for s in seqs:
            self.rows[s.row] = s
        logits = self.decoder.refill(seqs[0].row, job.prompt[-self.served.block_size:])
        self.decoder.share(seqs[0].row, [s.row for s in seqs[1:]])  # the n choices share one prefill
        for s in seqs:
            self._draw(s, logits)
        self.decoder.release_workspaces()  # prompts of every length: keep none of their shapes

    def _draw(self, s: Sequence, logits) -> None:
        """The next token of `s` from its logits, its text sent; `s` ends at the end-of-text
        token, a stop text or max_tokens (as Generation and crystal sample end a sample)."""
        from crystal.sample import choose

        token = choose(logits, s.job.params, s.rng)
        s.ids.append(token)
        s.n_new += 1
        if token == self.served.eos:
            s.live, s.reason = False, "stop"
        else:
            if piece := s.stream.push(token):
                s.job.emit(("text", s.index, piece))
            if s.stream.stopped:
                s.live, s.reason = False, "stop"
        if s.n_new >= s.job.params.max_tokens:
            s.live = False
        if not s.live:
            if piece := s.stream.finish():
                s.job.emit(("text", s.index, piece))
            s.job.emit(("end", s.index, s.reason))


# --- requests --------------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Request:
    """A checked completions or chat request: the prompt's ids and how to sample."""

    prompt: list[int]
    params: object
    n: int
    stream: bool
    include_usage: bool


def parse_request(body: dict, served: ServedModel, limits: Limits, chat: bool) -> Request:
    """The request of a JSON body, or an ApiError(400/404) naming the field at fault."""
    from crystal.sample import SamplingParams

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string: the name /v1/models lists", "model")
    if model != served.name:
        raise ApiError(404, f"the model '{model}' does not exist; this server has '{served.name}'", "model",
                       "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if name in body and not any(body[name] == a and type(body[name]) is type(a) for a in allowed):
            raise ApiError(400, f"'{name}' is not supported by this server", name)

    def number(name, default, lo, hi, lo_open=False):
        x = body.get(name)
        if x is None:
            return default
        if not _is_number(x) or not (lo < x if lo_open else lo <= x) or not x <= hi:
            raise ApiError(400, f"'{name}' must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {x!r}", name)
        return float(x)

    def integer(name, default, lo, hi):
        x = body.get(name)
        if x is None:
            return default
        if not _is_int(x) or not lo <= x <= hi:
            raise ApiError(400, f"'{name}' must be an integer in [{lo}, {hi}], got {x!r}", name)
        return x

    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError(400, "'best_of' other than n is not supported by this server", "best_of")
    temperature = number("temperature", 1.0, 0, 2)
    top_p = number("top_p", 1.0, 0, 1, lo_open=True)
    n = integer("n", 1, 1, limits.max_n)
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default_max = limits.max_tokens if chat else limits.default_max_tokens
    max_tokens = integer(max_name, default_max, 1, limits.max_tokens)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    seed = secrets.randbelow(MAX_SEED) if seed is None else seed % MAX_SEED
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty text or a list of up to {MAX_STOPS}", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))

    prompt = chat_prompt(body.get("messages"), served) if chat else completion_prompt(body.get("prompt"), served)
    if len(prompt) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(prompt):,} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens:,}", "messages" if chat else "prompt",
                       "context_length_exceeded")
    params = SamplingParams(max_tokens, temperature, None, top_p, seed, tuple(stop))
    return Request(prompt, params, n, stream, include_usage)


def completion_prompt(prompt, served: ServedModel) -> list[int]:
    """A text (or a list of one text), or a list of token ids (or a list of one such list)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return served.encode(prompt)
    V = served.model.config.vocab_size
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < V for t in prompt):
            raise ApiError(400, f"token ids in 'prompt' must be in [0, {V})", "prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a text or a non-empty list of token ids (one prompt per request)",
                   "prompt")


def chat_prompt(messages, served: ServedModel) -> list[int]:
    if served.chat is None:
        raise ApiError(400, f"the model '{served.name}' has no chat template (tokenizer_config.json's "
                            "chat_template): use /v1/completions", "messages", "no_chat_template")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    checked = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message must be an object with a 'role' text", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, "only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "each message's 'content' must be a text", "messages")
        checked.append({**m, "content": content})
    try:
        text = served.chat.render(checked)
    except TemplateRefused as e:
        raise ApiError(400, str(e), "messages") from None
    ids = [int(i) for i in served.tok.encode(text)]
    if not ids:
        raise ApiError(400, "the chat template rendered these messages as no tokens", "messages")
    return ids


# --- the application -------------------------------------------------------------------------------

def make_app(served: ServedModel, worker: Worker, limits: Limits, api_key: str | None, hosts):
    """The ASGI application: the three endpoints behind the Host rule and the API key."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from crystal.hostcheck import HostCheck

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorize(request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(request) -> object:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            raise ApiError(413, f"the request body is larger than {limits.max_body_bytes:,} bytes")
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limits.max_body_bytes:
                    raise ApiError(413, f"the request body is larger than {limits.max_body_bytes:,} bytes")
        except ClientDisconnect:  # gone before its body came: nobody reads the answer
            raise ApiError(400, "the client disconnected before the request's end") from None
        try:
            return parse_json(bytes(data), "the request body")
        except CrystalError as e:  # not JSON, or nested too deep to answer
            raise ApiError(400, str(e)[:300]) from None

    async def models(request):
        try:
            authorize(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": served.name, "object": "model", "created": created, "owned_by": "crystal"}]})

    created = int(time.time())

    def endpoint(chat: bool):
        async def handle(request):
            try:
                authorize(request)
                body = await read_json(request)
                req = await run_in_threadpool(parse_request, body, served, limits, chat)
                return await answer(request, req, chat)
            except ApiError as e:
                return error(e)
        return handle

    async def answer(request, req: Request, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req.prompt, req.params, req.n, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        worker.submit(job)  # 429 when full
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        now = int(time.time())
        if req.stream:
            return StreamingResponse(stream(request, job, events, req, chat, rid, now), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        try:
            texts, reasons = [[] for _ in range(req.n)], [None] * req.n
            check = loop.time() + DISCONNECT_POLL_S
            while True:  # the events, and every DISCONNECT_POLL_S whether the client is still there
                try:
                    ev = await asyncio.wait_for(events.get(), max(0.0, check - loop.time()))
                except asyncio.TimeoutError:
                    ev = None
                if loop.time() >= check:
                    if await request.is_disconnected():
                        return JSONResponse({})  # nobody reads it
                    check = loop.time() + DISCONNECT_POLL_S
                if ev is None:
                    continue
                if ev[0] == "text":
                    texts[ev[1]].append(ev[2])
                elif ev[0] == "end":
                    reasons[ev[1]] = ev[2]
                elif ev[0] == "error":
                    raise ApiError(500, ev[1])
                else:
                    usage = ev[1]
                    break
        finally:
            job.cancelled.set()  # a no-op once done; frees the worker when the client left
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                        "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": now, "model": served.name, "choices": choices, "usage": usage})

    async def stream(request, job: Job, events: asyncio.Queue, req: Request, chat: bool, rid: str, now: int):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage=None) -> str:
            out = {"id": rid, "object": obj, "created": now, "model": served.name, "choices": choices}
            if usage is not None or (req.include_usage and choices):
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        def choice(i, text=None, reason=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

        try:
            for i in range(req.n if chat else 0):  # a chunk per choice, as OpenAI sends them
                yield chunk([choice(i, role=True)])
            while True:
                ev = await events.get()
                if ev[0] == "text":
                    yield chunk([choice(ev[1], ev[2])])
                elif ev[0] == "end":
                    yield chunk([choice(ev[1], reason=ev[2])])
                elif ev[0] == "error":
                    yield f"data: {json.dumps(ApiError(500, ev[1]).body())}\n\n"
                    break
                else:
                    if req.include_usage:
                        yield chunk([], ev[1])
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client left mid-stream (the generator is closed): free the worker

    async def not_found(request, exc):
        return error(ApiError(404, f"no such endpoint: {request.method} {request.url.path}"))

    async def not_allowed(request, exc):
        return error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def server_error(request, exc):  # a bug: still OpenAI's error JSON, no traceback sent
        return error(ApiError(500, f"internal error: {type(exc).__name__}"))

    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/completions", endpoint(False), methods=["POST"]),
                            Route("/v1/chat/completions", endpoint(True), methods=["POST"])],
                    exception_handlers={404: not_found, 405: not_allowed, Exception: server_error})
    return HostCheck(app, hosts)


class Server:
    """uvicorn serving the API of `served` on a socket already bound (crystal.watch.bind), in this
    thread (`serve`) or a daemon thread (`start`, for tests)."""

    def __init__(self, served: ServedModel, sock, host: str = "127.0.0.1", api_key: str | None = None,
                 limits: Limits = Limits()):
        try:
            import uvicorn
        except ImportError as e:
            raise CrystalError(f"crystal serve needs starlette, uvicorn and jinja2 (pip install 'crystal[serve]'): "
                               f"{e}") from None
        from crystal.hostcheck import HostRule

        self.sock, self.served = sock, served
        if limits.max_n > limits.max_batch:
            raise ValueError(f"max_n {limits.max_n} must be <= max_batch {limits.max_batch}")
        self.worker = Worker(served, limits.max_queue, limits.max_batch)
        app = make_app(served, self.worker, limits, api_key, HostRule.bound(host, sock.getsockname()[1]))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"

    def serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.worker.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="crystal-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)


def host_warning(host: str, api_key: str | None) -> str | None:
    """One line when the API would be reachable from other machines."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    key = ("requests need the --api-key bearer token" if api_key else
           "anyone who can reach it may use it; add --api-key KEY")
    return f"warning: --host {host} serves the model to every machine that can reach this one ({key})"
