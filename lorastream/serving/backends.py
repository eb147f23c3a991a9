"""The inference servers' runtime-LoRA APIs: vLLM and SGLang, behind one small interface.

Both load a PEFT directory under a name and unload it by name; they differ in paths,
answers and in what ``GET /v1/models`` shows:

=========  ===========================  ============================  ====================
server     load / unload                already loaded / unknown      ``/v1/models``
=========  ===========================  ============================  ====================
vLLM       ``/v1/load_lora_adapter``    400 / 404                     base and adapters
SGLang     ``/load_lora_adapter``       400 + ``error_message``       base only
=========  ===========================  ============================  ====================

Loading a name that is already loaded and unloading one that is not are answered as
successes here (``Loaded.ALREADY``, ``False``), so that a caller may repeat either.
A server that cannot be reached, or answers 5xx, raises :class:`BackendUnavailable`;
a load refused because the server holds as many adapters as it may raises
:class:`BackendFull`; any other refusal raises :class:`BackendRefused`.

A 200 is not proof of a load (vLLM has answered 200 for a path it does not serve,
vllm#18372), so :meth:`Backend.confirm` asks the server whether it now holds the name:
vLLM through ``GET /v1/models``, SGLang through the ``loaded_adapters`` its load answer
carries.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from lorastream.serving.exceptions import BackendFull, BackendRefused, BackendUnavailable

__all__ = ["Backend", "BackendKind", "Loaded", "ModelCard", "SglangBackend", "VllmBackend", "make"]

BackendKind = Literal["vllm", "sglang"]

# Loading reads the adapter from disk and may compile; a busy server answers slowly.
TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5, sock_connect=5)


class Loaded(enum.Enum):
    """What a load did: ``NEW`` the server loaded it now, ``ALREADY`` it had it."""

    NEW = "new"
    ALREADY = "already"


@dataclass(frozen=True)
class ModelCard:
    """One entry of ``GET /v1/models``: ``parent`` is None for the base model."""

    id: str
    root: str | None
    parent: str | None


class Backend:
    """A runtime-LoRA HTTP API; use as ``async with`` (it owns one ``ClientSession``)."""

    kind: BackendKind
    load_path = "/v1/load_lora_adapter"
    unload_path = "/v1/unload_lora_adapter"
    lists_adapters = True
    """Whether ``/v1/models`` lists the loaded adapters (else the caller keeps its own record)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Backend:
        self._session = aiohttp.ClientSession(timeout=TIMEOUT, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, str]:
        if self._session is None:
            raise RuntimeError("use the backend as `async with`")
        doing = f"{method} {path}"
        try:
            async with self._session.request(method, self.url + path, json=body) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendUnavailable(self.url, doing, _reason(exc)) from exc
        if response.status >= 500:
            raise BackendUnavailable(self.url, doing, f"HTTP {response.status}: {_short(text)}")
        return response.status, text

    async def models(self) -> list[ModelCard]:
        """``GET /v1/models``: the base model (``parent`` None) and whatever else it lists."""
        status, text = await self._call("GET", "/v1/models")
        if status != 200:
            raise BackendRefused(self.url, "GET /v1/models", f"HTTP {status}: {_short(text)}")
        try:
            data = json.loads(text)["data"]
            return [
                ModelCard(str(card["id"]), card.get("root"), card.get("parent")) for card in data
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendRefused(
                self.url, "GET /v1/models", f"not an OpenAI model list: {_short(text)}"
            ) from exc

    async def base(self) -> ModelCard:
        """The base model the server serves: the first card without a parent."""
        cards = await self.models()
        for card in cards:
            if card.parent is None:
                return card
        raise BackendRefused(self.url, "GET /v1/models", "lists no base model")

    async def adapters(self) -> set[str] | None:
        """The adapters loaded now, or None when the server does not say (SGLang)."""
        if not self.lists_adapters:
            return None
        return {card.id for card in await self.models() if card.parent is not None}

    async def load(self, name: str, path: str) -> Loaded:
        """Load the PEFT directory ``path`` as ``name``; never ``load_inplace``."""
        doing = f"loading {name} from {path}"
        status, text = await self._call(
            "POST", self.load_path, {"lora_name": name, "lora_path": path}
        )
        if status == 200 and self._succeeded(text):
            return Loaded.NEW
        if status == 400 and "already" in text.lower():
            return Loaded.ALREADY
        if 400 <= status < 500 and any(sign in text.lower() for sign in _FULL):
            raise BackendFull(self.url, doing, f"HTTP {status}: {_short(text)}")
        raise BackendRefused(self.url, doing, f"HTTP {status}: {_short(text)}")

    async def confirm(self, name: str) -> bool | None:
        """Whether the server holds ``name`` now, as it says itself; None when it keeps no
        list serve can read."""
        listed = await self.adapters()
        return None if listed is None else name in listed

    async def unload(self, name: str) -> bool:
        """Unload ``name``; False when the server did not have it."""
        status, text = await self._call("POST", self.unload_path, {"lora_name": name})
        if status == 200 and self._succeeded(text):
            return True
        if self._unknown(status, text):
            return False
        raise BackendRefused(self.url, f"unloading {name}", f"HTTP {status}: {_short(text)}")

    def _succeeded(self, text: str) -> bool:
        return True

    def _unknown(self, status: int, text: str) -> bool:
        return status == 404

    def model_for(self, name: str, base: str) -> str:
        """The ``model`` a request sends to use adapter ``name`` on base model ``base``."""
        return name


class VllmBackend(Backend):
    """vLLM's OpenAI server (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``, ``--enable-lora``)."""

    kind: BackendKind = "vllm"


class SglangBackend(Backend):
    """SGLang's server (``--enable-lora``): no ``/v1`` on the LoRA paths, JSON answers
    ``{"success", "error_message"}``, adapters not listed in ``/v1/models``."""

    kind: BackendKind = "sglang"
    load_path = "/load_lora_adapter"
    unload_path = "/unload_lora_adapter"
    lists_adapters = False

    _listed: set[str] | None = None

    async def load(self, name: str, path: str) -> Loaded:
        self._listed = None
        return await super().load(name, path)

    async def confirm(self, name: str) -> bool | None:
        """From the ``loaded_adapters`` of the last load's answer, where it had one."""
        return None if self._listed is None else name in self._listed

    def _succeeded(self, text: str) -> bool:
        try:
            answer = json.loads(text)
        except ValueError:
            return True
        if not isinstance(answer, dict):
            return True
        listed = answer.get("loaded_adapters")
        if isinstance(listed, dict | list):
            self._listed = {str(n) for n in listed}
        return answer.get("success", True) is not False

    def _unknown(self, status: int, text: str) -> bool:
        lowered = text.lower()
        return status in (400, 404) and ("not loaded" in lowered or "not found" in lowered)

    def model_for(self, name: str, base: str) -> str:
        """SGLang's OpenAI API names an adapter as ``<base>:<adapter>``."""
        return f"{base}:{name}"


# How a server says it holds as many adapters as it may (SGLang's --max-loaded-loras:
# "Maximum number of loaded LoRA adapters is N. Please unload some LoRA adapters ...").
_FULL = ("maximum number of loaded lora", "unload some lora")


def make(kind: BackendKind, url: str) -> VllmBackend | SglangBackend:
    if kind == "vllm":
        return VllmBackend(url)
    if kind == "sglang":
        return SglangBackend(url)
    raise ValueError(f"backend must be vllm or sglang, not {kind!r}")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
