"""Contract servers: a fake vLLM and a fake SGLang, written from their documented HTTP API.

Neither real server runs here (vLLM on PyPI is CUDA-only), so these play their part of the
contract exactly as documented, status codes and bodies included:

vLLM (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true vllm serve BASE --enable-lora``)
    ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` → 200 ``Success: ...`` (plain
    text); 400 when the name is already loaded; 404 when no adapter is found at the path.
    ``POST /v1/unload_lora_adapter {"lora_name"}`` → 200 ``Success: ...``; 404 for an unknown
    name. ``GET /v1/models`` lists the base (``parent`` null) and every loaded adapter
    (``id`` = name, ``root`` = path, ``parent`` = base id). A request names an adapter in its
    ``model`` field.
SGLang (``python -m sglang.launch_server --enable-lora ...``)
    ``POST /load_lora_adapter`` and ``POST /unload_lora_adapter`` (no ``/v1``), same bodies;
    answers JSON ``{"success": ..., "error_message": ...}`` with 200, or 400 on failure
    (already loaded, unknown name, missing path). ``GET /v1/models`` lists the base model only.
    Its OpenAI API names an adapter as ``model: "<base>:<adapter>"``.

Both: ``/v1/chat/completions`` and ``/v1/completions`` answer with the model actually used
(in ``model`` and in the text), ``stream: true`` as SSE chunks then ``data: [DONE]``.

Two ways a server goes wrong under serve, off unless asked for:

``capacity=N`` (or ``server.capacity = N``) refuses a load past N adapters, as SGLang's
``--max-loaded-loras`` did from sglang#8650 until sglang#11526 made it an LRU cache: 400
``{"success": false, "error_message": "Cannot load LoRA adapter ... Maximum number of loaded
LoRA adapters is N. Please unload some LoRA adapters before loading new ones."}`` (the vLLM
kind answers the same words in vLLM's error shape; real vLLM never refuses for room: its
``--max-cpu-loras`` is an LRU cache). ``lie_loads = K`` answers the next K loads with
success without loading anything, as vLLM has answered 200 for a path that does not exist
(vllm#18372): ``/v1/models`` (and SGLang's ``loaded_adapters``) do not list them.

Controls: ``down()`` stops listening (connections are refused), ``up()`` listens again on the
same port with the same adapters, ``restart()`` forgets every adapter (as a real restart
does: runtime-loaded adapters are lost), ``failing = 503`` answers every request with that
status until set back to ``None``.

Use::

    async with contract_server("vllm", base="/models/base") as server:
        server.url, server.loaded, server.events, server.requests
        await server.down(); await server.up(); await server.restart()

or the ``vllm_server`` / ``sglang_server`` / ``contract`` fixtures in ``tests/serving/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from lorastream.dev.ports import free_port

Kind = Literal["vllm", "sglang"]

__all__ = ["ContractServer", "Kind", "contract_server"]

STREAM_DELAY = 0.02


class ContractServer:
    """One fake inference server; see the module docstring for what it answers."""

    def __init__(
        self,
        kind: Kind,
        base: str = "base-model",
        root: str | None = None,
        capacity: int | None = None,
        lie_loads: int = 0,
    ) -> None:
        if kind not in ("vllm", "sglang"):
            raise ValueError(f"kind must be 'vllm' or 'sglang', not {kind!r}")
        self.kind: Kind = kind
        self.base = base
        self.root = root if root is not None else base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loaded: dict[str, str] = {}
        self.events: list[tuple[float, str, str]] = []
        self.requests: list[str] = []
        self.failing: int | None = None
        self.capacity = capacity
        """The most adapters held at once; a load past it is refused (see the docstring)."""
        self.lie_loads = lie_loads
        """How many of the next loads are answered with success but not done."""
        self.restarts = 0
        self._runner: web.AppRunner | None = None
        self._app = self._make_app()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    async def up(self) -> None:
        """Listen (again) on the same port; adapters loaded before ``down()`` are kept."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self._app, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        for attempt in range(50):
            try:
                await site.start()
                break
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        self._runner = runner
        self.events.append((time.time(), "up", ""))

    async def down(self) -> None:
        """Stop listening: new connections are refused, open ones are closed."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            self.events.append((time.time(), "down", ""))

    async def restart(self) -> None:
        """A server restart: down, every runtime-loaded adapter forgotten, up again."""
        await self.down()
        self.loaded.clear()
        self.restarts += 1
        self.events.append((time.time(), "restart", ""))
        await self.up()

    # -- what tests read -------------------------------------------------------------------

    def loads(self) -> list[str]:
        """Names loaded, in order, every load counted (so a name twice means loaded twice)."""
        return [name for _, action, name in self.events if action == "load"]

    def unloads(self) -> list[str]:
        return [name for _, action, name in self.events if action == "unload"]

    # -- the HTTP API ----------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._failing_middleware])
        prefix = "/v1" if self.kind == "vllm" else ""
        app.router.add_post(f"{prefix}/load_lora_adapter", self._load)
        app.router.add_post(f"{prefix}/unload_lora_adapter", self._unload)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/health", self._health)
        return app

    @web.middleware
    async def _failing_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.failing is not None:
            return web.json_response(
                {"error": {"message": "Service Unavailable", "code": self.failing}},
                status=self.failing,
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    def _vllm_error(self, message: str, kind: str, status: int) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        return web.json_response(body, status=status)

    def _sglang_answer(self, success: bool, message: str | None = None) -> web.Response:
        body = {"success": success, "error_message": message, "loaded_adapters": dict(self.loaded)}
        return web.json_response(body, status=200 if success else 400)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def _load(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            message = "Both 'lora_name' and 'lora_path' must be provided."
            if self.kind == "vllm":
                return self._vllm_error(message, "InvalidUserInput", 400)
            return self._sglang_answer(False, message)
        if name in self.loaded:
            if self.kind == "vllm":
                message = f"The lora adapter '{name}' has already been loaded."
                return self._vllm_error(message, "InvalidUserInput", 400)
            return self._sglang_answer(
                False, f"Failed to load LoRA adapter {name} because it is already loaded"
            )
        if not (Path(path) / "adapter_config.json").is_file():
            message = f"Loading lora {name} failed: No adapter found for {path}"
            if self.kind == "vllm":
                return self._vllm_error(message, "NotFoundError", 404)
            return self._sglang_answer(False, message)
        if self.lie_loads > 0:
            self.lie_loads -= 1
            self.events.append((time.time(), "lie", name))
            if self.kind == "vllm":
                return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")
            return self._sglang_answer(True)
        if self.capacity is not None and len(self.loaded) >= self.capacity:
            self.events.append((time.time(), "full", name))
            message = (
                f"Cannot load LoRA adapter {name} at path {path}. Maximum number of loaded "
                f"LoRA adapters is {self.capacity}. Please unload some LoRA adapters before "
                "loading new ones."
            )
            if self.kind == "vllm":
                return self._vllm_error(message, "BadRequestError", 400)
            return self._sglang_answer(False, message)
        self.loaded[name] = path
        self.events.append((time.time(), "load", name))
        if self.kind == "vllm":
            return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")
        return self._sglang_answer(True)

    async def _unload(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("lora_name")
        if not name or name not in self.loaded:
            if self.kind == "vllm":
                message = f"The lora adapter '{name}' cannot be found."
                return self._vllm_error(message, "NotFoundError", 404)
            return self._sglang_answer(False, f"LoRA adapter {name} is not loaded.")
        del self.loaded[name]
        self.events.append((time.time(), "unload", name))
        if self.kind == "vllm":
            return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
        return self._sglang_answer(True)

    def _card(self, model_id: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": self.kind,
            "root": root,
            "parent": parent,
            "max_model_len": 2048,
        }

    async def _models(self, request: web.Request) -> web.Response:
        data = [self._card(self.base, self.root, None)]
        if self.kind == "vllm":
            data += [self._card(n, p, self.base) for n, p in self.loaded.items()]
        return web.json_response({"object": "list", "data": data})

    def _resolve(self, body: dict[str, Any]) -> tuple[str | None, web.Response | None]:
        """The model a request is served by, or the error response the real server gives."""
        model = str(body.get("model") or self.base)
        if self.kind == "vllm":
            if model == self.base or model in self.loaded:
                return model, None
            message = f"The model `{model}` does not exist."
            return None, self._vllm_error(message, "NotFoundError", 404)
        adapter: str | None = None
        if ":" in model:
            model, adapter = model.split(":", 1)
        elif body.get("lora_path"):
            adapter = str(body["lora_path"])
        if adapter is None:
            return model, None
        if adapter not in self.loaded:
            message = f"LoRA adapter {adapter} is not loaded."
            return None, web.json_response(
                {"object": "error", "message": message, "type": "BadRequestError", "code": 400},
                status=400,
            )
        return f"{self.base}:{adapter}", None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._body(request)
        self.requests.append(str(body.get("model")))
        used, error = self._resolve(body)
        if error is not None:
            return error
        assert used is not None
        ident = f"cmpl-{uuid.uuid4().hex[:12]}"
        words = ["served", "by", used]
        if not body.get("stream"):
            text = " ".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": used,
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(words):
            piece = word if i == 0 else f" {word}"
            last = i == len(words) - 1
            if chat:
                chunk_choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}}
            else:
                chunk_choice = {"index": 0, "text": piece}
            chunk_choice["finish_reason"] = "stop" if last else None
            chunk = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": used,
                "choices": [chunk_choice],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(STREAM_DELAY)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@asynccontextmanager
async def contract_server(
    kind: Kind = "vllm",
    base: str = "base-model",
    root: str | None = None,
    capacity: int | None = None,
    lie_loads: int = 0,
) -> AsyncIterator[ContractServer]:
    """A running contract server; ``base`` is the base model's id, ``root`` its path (defaults
    to ``base``, as when ``vllm serve /path/to/model`` names the model by its path);
    ``capacity`` and ``lie_loads`` as in the module docstring."""
    server = ContractServer(kind, base=base, root=root, capacity=capacity, lie_loads=lie_loads)
    await server.up()
    try:
        yield server
    finally:
        await server.down()
