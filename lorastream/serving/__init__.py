"""The serving stage: announced adapter versions → an inference server (vLLM, SGLang).

:class:`Serve` (``serving.serve``) composes two tasks: the follower
(``serving.follower``) reads ``adapter-updates`` into the announced versions
(``serving.versions``); the reconciler (``serving.reconciler``) verifies each version
(``serving.verify``) and keeps the newest K loaded under never-reused names through the
server's runtime-LoRA API (``serving.backends``). ``serving.proxy`` is the
OpenAI-compatible front that maps ``model: <adapter>`` to the live version.
"""

from lorastream.serving.backends import Backend, SglangBackend, VllmBackend
from lorastream.serving.config import ServeConfig
from lorastream.serving.exceptions import (
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ServingError,
)
from lorastream.serving.metrics import ServeMetrics
from lorastream.serving.serve import Serve
from lorastream.serving.versions import version_name

__all__ = [
    "Backend",
    "BackendError",
    "BackendRefused",
    "BackendUnavailable",
    "Serve",
    "ServeConfig",
    "ServeMetrics",
    "ServingError",
    "SglangBackend",
    "VllmBackend",
    "version_name",
]
