"""The any-to-any service on Ray Serve: a FastAPI ingress and a generator deployment.

    serve run serve/config.yaml                         # settings and resources from the file
    serve run serve.app:build_app model=runs/demo/model  # or the builder with arguments
    python -m serve --model runs/demo/model              # local, on 127.0.0.1:8000

`Frontend` (CPU) validates each request, decodes its media into codec inputs, and answers every
bad request with a 4xx that says what to fix; nothing a client sends produces a 5xx, and no error
carries a stack trace. `Generator` loads the model directory and its codecs once per replica and
batches concurrent requests (`@serve.batch`): each group of compatible requests (same task and
sampling parameters) is one sampler call, guidance branches included, and a request's outputs are
the same as when it runs alone (`omniflow.inference`).

Endpoints: `POST /v1/generate` (JSON, or multipart with a `request` JSON field and `image` /
`audio` files), `GET /v1/models`, `GET /healthz`, and the OpenAPI schema at `/openapi.json`.
"""

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from omniflow import storage as st
from omniflow.codecs.media import MediaError
from omniflow.inference import AnyToAny, InputPreparer, Outputs, Prepared, SamplingParams
from omniflow.model_dir import fetch_model_dir, read_model_info
from serve.schema import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Limits,
    ServeConfig,
    check_request,
)

logger = logging.getLogger("ray.serve")
ERRORS = {400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
          422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


class BadRequest(Exception):
    """A request that cannot be served as sent; `status` is its 4xx code."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class GenerationFailed(Exception):
    """The generator could not serve one request (the others in its batch are unaffected)."""


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class Generator:
    """Loads the model once per replica; batches concurrent requests into sampler calls."""

    def __init__(self, config: dict):
        from pipelines.resources import resolve_device

        self.config = ServeConfig.model_validate(config)
        device = str(resolve_device(self.config.device))
        local = fetch_model_dir(self.config.model, self.config.storage)
        self.pipe = AnyToAny.load(local, device=device, dtype=self.config.dtype, conventions=self.config.conventions)
        self.generate_batch.set_max_batch_size(self.config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.described = {
            "id": self.config.model.rstrip("/").rsplit("/", 1)[-1],
            "path": self.config.model,
            "preset": self.pipe.info.get("preset"),
            "tasks": self.pipe.tasks(),
            "modalities": [m.value for m in self.pipe.streams],
            "latent_shapes": {m.value: list(s) for m, s in self.pipe.latent_shapes.items()},
            "codecs": read_model_info(local, resolve=False)["codecs"],  # as in the directory
            "device": device,
            "dtype": self.config.dtype,
            "conventions": self.pipe.conventions.model_dump(),
            "max_batch_size": self.config.max_batch_size,
        }
        logger.info("Generator: %s on %s, tasks %s", self.config.model, device, self.described["tasks"])

    def describe(self) -> dict:
        return self.described

    async def generate(self, request: Prepared) -> Outputs:
        queued = time.perf_counter()
        result = await self.generate_batch(request)
        if isinstance(result, Exception):
            raise result
        result.timings = {"queue_and_batch_s": round(time.perf_counter() - queued - sum(result.timings.values()), 4),
                          **result.timings}
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, requests: list[Prepared]) -> list[Outputs | Exception]:
        # The sampler runs in a thread, so the replica keeps accepting (and batching) requests.
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[Prepared]) -> list[Outputs | Exception]:
        try:
            return self.pipe.run(requests)
        except Exception:
            logger.exception("a batch of %d requests failed; running them one at a time", len(requests))
        results: list[Outputs | Exception] = []
        for request in requests:
            try:
                results.append(self.pipe.run([request])[0])
            except Exception as err:
                logger.exception("request for task %s failed", request.task)
                results.append(GenerationFailed(f"{type(err).__name__}: {err}"))
        return results


app = FastAPI(
    title="OmniFlow any-to-any",
    summary="Generate images, text and audio from any of the others.",
    version="1",
    responses=ERRORS,
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@app.exception_handler(BadRequest)
async def _bad_request(_: Request, err: BadRequest) -> JSONResponse:
    return _error(err.status, str(err))


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    return _error(422, describe_validation_error(err.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


@app.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    logger.exception("unexpected error")  # the trace goes to the replica's log, never to the client
    return _error(500, "internal error; the service log has the details")


def describe_validation_error(errors: list[dict]) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
        message = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["request"],
                "properties": {
                    "request": {"type": "string", "description": "GenerateRequest as JSON, without image / audio"},
                    "image": {"type": "string", "format": "binary", "description": "PNG or JPEG file"},
                    "audio": {"type": "string", "format": "binary", "description": "WAV or FLAC file"},
                },
            }},
        },
    }
}


def _openapi() -> dict:
    """FastAPI's schema, plus `GenerateRequest`: /v1/generate reads its body itself (JSON or
    multipart), so FastAPI does not see the model there."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        request = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["GenerateRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


@serve.deployment(name="Frontend", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
@serve.ingress(app)
class Frontend:
    """Validation, media decoding and the HTTP API, in front of `Generator`."""

    def __init__(self, generator: DeploymentHandle, limits: dict, codecs: dict):
        self.generator = generator
        self.limits = Limits.model_validate(limits)
        self.prepare = InputPreparer(codecs, max_image_pixels=self.limits.max_image_pixels,
                                     max_text_chars=self.limits.max_text_chars)
        self._described: dict | None = None

    async def described(self) -> dict:
        """The generator's description, asked once (it does not change while the replica lives)."""
        if self._described is None:
            self._described = await self.generator.describe.remote()
        return self._described

    @app.get("/healthz", summary="liveness: the ingress and a generator replica answer")
    async def healthz(self) -> dict:
        try:
            await asyncio.wait_for(self.generator.describe.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - any failure means not healthy
            raise BadRequest(f"generator unavailable: {type(err).__name__}", status=503) from None
        return {"status": "ok"}

    @app.get("/v1/models", summary="the served model: tasks, modalities, latent shapes, limits")
    async def models(self) -> dict:
        return {"models": [{**await self.described(), "limits": self.limits.model_dump()}]}

    @app.post("/v1/generate", response_model=GenerateResponse, openapi_extra=GENERATE_BODY,
              summary="generate the task's target modalities from its inputs")
    async def generate(self, request: Request) -> GenerateResponse:
        start = time.perf_counter()
        body, files = await self._read(request)
        try:
            parsed = GenerateRequest.model_validate({**body, **{k: "" for k in files}}).with_seed()
        except ValidationError as err:
            raise BadRequest(describe_validation_error(err.errors())) from None
        try:
            check_request(parsed, self.limits)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        media = {name: files[name] if name in files else self._base64(name, getattr(parsed, name))
                 for name in ("image", "audio")}
        try:
            inputs = self.prepare(text=parsed.text, image=media["image"], audio=media["audio"])
        except MediaError as err:
            raise BadRequest(str(err)) from None
        prepared = Prepared(
            task=parsed.task, inputs=inputs, seed=parsed.seed, num_outputs=parsed.num_outputs,
            params=SamplingParams(steps=parsed.steps, shift=parsed.shift, guidance=parsed.guidance),
        )
        tasks = (await self.described())["tasks"]
        if parsed.task not in tasks:
            raise BadRequest(f"this model cannot run task {parsed.task}; it serves {tasks}")
        try:
            outputs = await self.generator.generate.remote(prepared)
        except GenerationFailed as err:
            raise BadRequest(f"generation failed: {err}", status=422) from None

        def b64(items: list[bytes] | None) -> list[str] | None:
            return None if items is None else [base64.b64encode(x).decode() for x in items]

        return GenerateResponse(
            task=parsed.task, seed=parsed.seed, text=outputs.text, image=b64(outputs.image), audio=b64(outputs.audio),
            timings={**outputs.timings, "total_s": round(time.perf_counter() - start, 4)}, batch_size=outputs.batch_size,
        )

    async def _read(self, request: Request) -> tuple[dict, dict[str, bytes]]:
        """(the JSON fields, uploaded files by field name), within the body limit."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"request body is {int(declared):,} bytes, above the limit of {limit:,}", status=413)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise BadRequest(f"request body is above the limit of {limit:,} bytes", status=413)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            return await self._multipart(request, bytes(raw))
        if content_type not in ("application/json", ""):
            raise BadRequest(f"content type {content_type!r} is not supported; send application/json or "
                             "multipart/form-data", status=415)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"request body is not valid JSON: {err}", status=400) from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", status=400)
        return body, {}

    async def _multipart(self, request: Request, raw: bytes) -> tuple[dict, dict[str, bytes]]:
        from starlette.datastructures import UploadFile

        async def replay() -> dict:
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as err:  # noqa: BLE001 - a malformed multipart body
            raise BadRequest(f"multipart body could not be parsed: {err}", status=400) from None
        files, body = {}, {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("image", "audio"):
                    raise BadRequest(f"unexpected file field {name!r}; upload image and/or audio", status=400)
                files[name] = await value.read()
            elif name == "request":
                try:
                    body = json.loads(value)
                except json.JSONDecodeError as err:
                    raise BadRequest(f"the request field is not valid JSON: {err}", status=400) from None
            else:
                raise BadRequest(f"unexpected form field {name!r}; send the parameters as JSON in 'request'",
                                 status=400)
        if not isinstance(body, dict):
            raise BadRequest("the request field must be a JSON object", status=400)
        for name in files:
            if body.get(name) is not None:
                raise BadRequest(f"{name} is both uploaded and in the JSON; send it once", status=400)
        return body, files

    @staticmethod
    def _base64(name: str, value: str | None) -> bytes | None:
        if value is None:
            return None
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{name} is not valid base64") from None
        if not data:
            raise BadRequest(f"{name} is empty")
        return data


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder for `serve run` and `serve deploy`: Ray Serve calls it with the
    `args` of `serve/config.yaml` (or the `key=value` pairs of `serve run serve.app:build_app ...`),
    which are `serve.schema.ServeConfig` fields. Replicas and resources come from the config's
    `deployments` section."""
    return application(ServeConfig.model_validate(args))


def application(config: ServeConfig, *, generator: serve.Deployment = Generator) -> serve.Application:
    """The application for `config`; `generator` is `Generator` with other options (replicas,
    resources), as `python -m serve` sets them."""
    info = _model_info(config)
    generator = generator.bind(config.model_dump(mode="json"))
    return Frontend.bind(generator, config.limits.model_dump(), info["codecs"])


def _model_info(config: ServeConfig) -> dict:
    """The model directory's omniflow.json, read where the application is built."""
    path = st.join(config.model, "omniflow.json")
    if not st.exists(path, config.storage):
        raise ValueError(f"{config.model} has no omniflow.json: not a model directory exported by jobs.train or jobs.merge")
    info = json.loads(st.read_bytes(path, config.storage))
    if "codecs" not in info:
        raise ValueError(f"{path} names no codecs; export the model with jobs.train or jobs.merge")
    return info
