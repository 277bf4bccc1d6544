"""The FastAPI app: endpoints over the loaded models, bounded by the scheduler, plus the page in static/.

    GET  /health         liveness, queue state
    GET  /models         the loaded models, their kinds and options
    POST /generate       text generation, streamed as server-sent events (or one JSON with stream=false)
    POST /codefix        HumanEvalFix-style bug fixing: buggy function in, fixed function out
    POST /text-to-image  ERNIE-ViLG: caption in, PNG (base64) out
    POST /caption        ERNIE-ViLG: PNG/JPEG (base64) in, caption out
    POST /fold           HelixFold: FASTA in, PDB and per-residue pLDDT out

Errors: 400 a request the model cannot serve (named in `detail`), 404 unknown model, 413 body too large,
422 malformed request, 429 queue full, 503 not done within the request timeout.
"""
import asyncio
import base64
import binascii
import contextlib
import json
import time
from pathlib import Path
from typing import List, Literal, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ppzoo.errors import PpzooError

from apps.web.config import Limits
from apps.web.models import DecodeOptions, codefix_prompt
from apps.web.scheduler import END, QueueFull, Scheduler

STATIC = Path(__file__).resolve().parent / "static"
MAX_TEXT = 100_000  # schema-level bound on any text field; the configured limits are checked per request


# ---------------------------------------------------------------------------------------------------- schemas
class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    model: Optional[str] = Field(None, max_length=200, description="a text model's name (default: the first)")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0: greedy")
    top_k: int = Field(0, ge=0, le=100_000)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: List[str] = Field(default_factory=list, max_length=8)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    strategy: Literal["base", "alternating", "verified"] = Field(
        "base", description="RecycleGPT decoding (alternating, verified) needs a RecycleGPT checkpoint")
    kcache_top_n: Optional[float] = Field(
        None, gt=0.0, le=100_000, description="KCache: value rows fetched per head and step, a count (>= 1) or a "
                                              "fraction (< 1) of the positions so far; null: dense cache")
    stream: bool = Field(True, description="server-sent events (token, done, error); false: one JSON answer")


class GenerateResponse(BaseModel):
    model: str
    text: str
    tokens: int
    batch_size: int
    seconds: float


class CodeFixRequest(BaseModel):
    code: str = Field(min_length=1, max_length=MAX_TEXT, description="the buggy Python function")
    entry_point: Optional[str] = Field(None, max_length=200, description="the function to fix (default: the first)")
    tests: Optional[str] = Field(None, max_length=MAX_TEXT, description="tests shown to the model")
    model: Optional[str] = Field(None, max_length=200, description="a text model (default: a CCT one if loaded)")
    max_new_tokens: int = Field(128, ge=1, le=4096)


class CodeFixResponse(BaseModel):
    model: str
    entry_point: str
    body: str
    fixed_code: str


class TextToImageRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=1000)
    model: Optional[str] = Field(None, max_length=200)
    candidates: int = Field(2, ge=1, le=16, description="images sampled, reranked by caption likelihood")
    top_k: int = Field(32, ge=1, le=100_000)
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class TextToImageResponse(BaseModel):
    model: str
    png_base64: str
    caption_log_likelihood: float
    candidates: int


class CaptionRequest(BaseModel):
    image_base64: str = Field(min_length=1, max_length=3_000_000, description="a PNG or JPEG, base64")
    model: Optional[str] = Field(None, max_length=200)
    beam: int = Field(1, ge=1, le=8)


class CaptionResponse(BaseModel):
    model: str
    caption: str


class FoldRequest(BaseModel):
    fasta: str = Field(min_length=1, max_length=MAX_TEXT, description="a FASTA record or a bare sequence")
    model: Optional[str] = Field(None, max_length=200)
    recycles: Optional[int] = Field(None, ge=0, le=8)
    num_predictions: int = Field(1, ge=1, le=4)


class FoldResponse(BaseModel):
    model: str
    name: str
    sequence: str
    pdb: str
    plddt: List[float]
    mean_plddt: float
    recycles: int


# ---------------------------------------------------------------------------------------------------- app
def sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(models, limits: Limits = None):
    """The app over `models` (wrappers from apps.web.models, in config order)."""
    limits = limits or Limits()
    by_name = {m.name: m for m in models}
    scheduler = Scheduler(limits)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="ppzoo", version="0.1", lifespan=lifespan,
                  description="Text generation, code fixing, text-to-image, captioning and protein folding with "
                              "ppzoo models.")
    app.state.scheduler, app.state.models, app.state.limits = scheduler, by_name, limits

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return JSONResponse({"detail": f"request body over {limits.max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    def pick(name, kind, what, prefer_module=None):
        if name is not None:
            model = by_name.get(name)
            if model is None:
                raise HTTPException(404, f"no model named {name!r}; loaded: {', '.join(by_name) or 'none'}")
            if model.kind != kind:
                raise HTTPException(400, f"model {name!r} is a {model.kind} model; {what} needs a {kind} model")
            return model
        # Default: the first model of the kind, a preferred family first (CCT for code fixing).
        candidates = [m for m in models if m.kind == kind]
        preferred = [m for m in candidates if getattr(m, "module_name", None) == prefer_module]
        model = (preferred or candidates or [None])[0]
        if model is None:
            raise HTTPException(503, f"no {kind} model is loaded, so {what} is unavailable")
        return model

    def check_text(value, field):
        if value is not None and len(value) > limits.max_prompt_chars:
            raise HTTPException(422, f"{field} has {len(value)} characters; the limit is {limits.max_prompt_chars}")

    def check_tokens(n):
        if n > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {n} is over this server's limit of {limits.max_new_tokens}")

    def admit(submit, *args):
        try:
            return submit(*args)
        except QueueFull as exc:
            raise HTTPException(429, f"server busy: {exc}; retry later", headers={"Retry-After": "1"}) from None

    async def call(fn):
        """Run fn on the worker within the request timeout; PpzooError -> 400, timeout -> 503."""
        job = admit(scheduler.submit_call, fn)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), limits.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"not done within the request timeout of {limits.request_timeout:g} s",
                                headers={"Retry-After": "5"}) from None
        except PpzooError as exc:
            raise HTTPException(400, str(exc)) from None
        finally:
            job.cancel()  # no-op once done; frees the slot of a timed-out or disconnected request

    async def generation(model, prompt, options):
        """Async iterator of text pieces of one queued generation, ending at END; the slot is freed when the
        consumer stops (done, timeout, or the client went away)."""
        try:
            model.check(prompt, options)
        except PpzooError as exc:
            raise HTTPException(400, str(exc)) from None
        job = admit(scheduler.submit_generation, model, prompt, options)
        deadline = time.monotonic() + limits.request_timeout

        async def pieces():
            try:
                while True:
                    item = await asyncio.wait_for(job.items.get(), max(deadline - time.monotonic(), 0.001))
                    if item is END:
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                job.cancel()
        return job, pieces()

    # ----------------------------------------------------------------------------------------- endpoints
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health():
        return {"status": "ok", "models": len(models), "queue": scheduler.status()}

    @app.get("/models")
    def list_models():
        return {"models": [m.describe() for m in models],
                "limits": {k: v for k, v in vars(limits).items()}}

    @app.post("/generate", response_model=GenerateResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "stream=true: events `token` {text}, then `done` {tokens, "
                                              "batch_size, seconds} or `error` {detail}"}})
    async def generate(req: GenerateRequest):
        check_text(req.prompt, "prompt")
        check_tokens(req.max_new_tokens)
        model = pick(req.model, "text", "text generation")
        options = DecodeOptions(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=tuple(req.stop),
                                seed=req.seed, strategy=req.strategy, kcache_top_n=req.kcache_top_n)
        start = time.monotonic()
        job, pieces = await generation(model, req.prompt, options)

        if not req.stream:
            text = ""
            try:
                async for piece in pieces:
                    text += piece
            except asyncio.TimeoutError:
                raise HTTPException(503, f"not done within the request timeout of {limits.request_timeout:g} s",
                                    headers={"Retry-After": "5"}) from None
            except PpzooError as exc:
                raise HTTPException(400, str(exc)) from None
            return GenerateResponse(model=model.name, text=text, tokens=model.count_tokens(text),
                                    batch_size=job.batch_size or 1, seconds=round(time.monotonic() - start, 4))

        async def events():
            text = ""
            try:
                async for piece in pieces:
                    text += piece
                    yield sse("token", {"text": piece})
            except asyncio.TimeoutError:
                yield sse("error", {"detail": f"stopped at the request timeout of {limits.request_timeout:g} s",
                                    "text": text})
                return
            except Exception as exc:  # the headers are sent: a failure can only end the stream as an event
                detail = str(exc) if isinstance(exc, PpzooError) else f"{type(exc).__name__}: {exc}"
                yield sse("error", {"detail": detail, "text": text})
                return
            yield sse("done", {"model": model.name, "tokens": model.count_tokens(text), "text": text,
                               "batch_size": job.batch_size or 1, "seconds": round(time.monotonic() - start, 4)})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/codefix", response_model=CodeFixResponse)
    async def codefix(req: CodeFixRequest):
        from ppzoo.eval.humanevalfix.harness import STOP_STRINGS, truncate_completion

        for value, field in ((req.code, "code"), (req.tests, "tests")):
            check_text(value, field)
        check_tokens(req.max_new_tokens)
        model = pick(req.model, "text", "code fixing", prefer_module="CCT")
        try:
            prompt, declaration, entry_point = codefix_prompt(req.code, req.entry_point, req.tests)
        except PpzooError as exc:
            raise HTTPException(400, str(exc)) from None
        options = DecodeOptions(max_new_tokens=req.max_new_tokens, stop=tuple(STOP_STRINGS))
        _, pieces = await generation(model, prompt, options)
        text = ""
        try:
            async for piece in pieces:
                text += piece
        except asyncio.TimeoutError:
            raise HTTPException(503, f"not done within the request timeout of {limits.request_timeout:g} s") from None
        body = truncate_completion(text)
        return CodeFixResponse(model=model.name, entry_point=entry_point, body=body, fixed_code=declaration + body)

    @app.post("/text-to-image", response_model=TextToImageResponse)
    async def text_to_image(req: TextToImageRequest):
        model = pick(req.model, "vilg", "text-to-image")
        result = await call(lambda: model.text_to_image(req.prompt, req.candidates, req.top_k, req.temperature,
                                                        req.seed))
        return TextToImageResponse(model=model.name, **result)

    @app.post("/caption", response_model=CaptionResponse)
    async def caption(req: CaptionRequest):
        model = pick(req.model, "vilg", "captioning")
        try:
            data = base64.b64decode(req.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, "image_base64 is not valid base64") from None
        result = await call(lambda: model.caption(data, req.beam))
        return CaptionResponse(model=model.name, **result)

    @app.post("/fold", response_model=FoldResponse)
    async def fold(req: FoldRequest):
        check_text(req.fasta, "fasta")
        model = pick(req.model, "folding", "protein folding")
        result = await call(lambda: model.fold(req.fasta, req.recycles, req.num_predictions, limits.max_residues))
        return FoldResponse(model=model.name, **result)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
