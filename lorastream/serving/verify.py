"""The checks an announced adapter version passes before it is loaded into a server.

Each returns None or a :class:`Refusal` whose ``reason`` is a short label (the
metric's) and whose ``detail`` is a sentence naming the file or value at fault.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lorastream.serving.backends import ModelCard
from schemas import AdapterUpdate
from schemas.limits import sha256_file
from trainer import manifest
from trainer.exceptions import AdapterStoreError

__all__ = [
    "GATE_REASONS",
    "VLLM_RANKS",
    "Refusal",
    "check_base",
    "check_files",
    "check_general",
    "check_regression",
    "judge_versions",
    "sha256_file",
]

# The refusals of the promotion gate: it doing its job, where the other reasons are faults.
GATE_REASONS = frozenset({"regression", "general-regression"})

# vLLM's --max-lora-rank accepts only these (its LoRAConfig validator).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Refusal:
    reason: str
    detail: str


def check_files(update: AdapterUpdate, max_rank: int) -> Refusal | None:
    """The files at ``update.uri``: weights present with the announced sha256, every file
    as the announced manifest lists it (``manifest_sha256``; older announcements have
    none), a config with ``r`` (and every ``rank_pattern`` rank) at most ``max_rank`` and
    ``bias`` "none". Reads every file: call it off the event loop."""
    directory = Path(update.uri)
    weights, config = directory / WEIGHTS, directory / CONFIG
    for path in (weights, config):
        if not path.is_file():
            return Refusal("missing", f"{path} does not exist")
    try:
        digest = sha256_file(weights)
    except OSError as exc:
        return Refusal("missing", f"{weights} cannot be read: {exc.strerror or exc}")
    if digest != update.sha256:
        return Refusal(
            "sha256",
            f"{weights} has sha256 {digest}, announced {update.sha256}: changed or corrupt",
        )
    if update.manifest_sha256 is not None:
        try:
            manifest.verify(
                directory, f"{update.adapter} v{update.version}", update.manifest_sha256
            )
        except AdapterStoreError as exc:
            return Refusal("manifest", str(exc))
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return Refusal("config", f"{config} is not a readable JSON object: {exc}")
    ranks = [settings.get("r", 8)]
    pattern = settings.get("rank_pattern") or {}
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        return Refusal("config", f"{config} has a rank that is not an integer: {ranks}")
    if max(ranks) > max_rank:
        return Refusal(
            "rank", f"{config} has rank {max(ranks)}, above the server's --max-lora-rank {max_rank}"
        )
    bias = settings.get("bias", "none")
    if bias != "none":
        return Refusal("bias", f'{config} has bias "{bias}"; the servers load only bias "none"')
    return None


def _same_path(a: str, b: str | None) -> bool:
    if not b:
        return False
    return a == b or os.path.normpath(a) == os.path.normpath(b)


def check_base(
    update: AdapterUpdate,
    server_base: ModelCard,
    served_base: str | None = None,
    trainer_base: str | None = None,
) -> Refusal | None:
    """Whether the server's base model is the one ``update`` was trained on.

    By default the announcement's ``base_model`` (the trainer's absolute base directory)
    must be the server base's ``root`` or ``id`` (``vllm serve /models/llama`` lists both as
    that path). ``served_base`` declares instead that the server's base id names the same
    model (a ``--served-model-name``, a hub id, another mount point): then the server's id
    must be ``served_base``, and the announcement must name ``trainer_base`` when it is
    known (LORASTREAM_BASE_MODEL).
    """
    where = f"server base model {server_base.id!r} (root {server_base.root!r})"
    if served_base is not None:
        if server_base.id != served_base:
            return Refusal(
                "base_model", f"--served-base is {served_base!r} but the server serves {where}"
            )
        if trainer_base is not None and not _same_path(update.base_model, trainer_base):
            return Refusal(
                "base_model",
                f"trained on {update.base_model}, not on {trainer_base} (LORASTREAM_BASE_MODEL) "
                f"that --served-base {served_base!r} stands for",
            )
        return None
    if _same_path(update.base_model, server_base.root) or _same_path(
        update.base_model, server_base.id
    ):
        return None
    return Refusal(
        "base_model",
        f"trained on {update.base_model} but the {where} differs; "
        "pass --served-base if the server names the same model otherwise",
    )


def check_regression(
    update: AdapterUpdate, live: Iterable[AdapterUpdate], max_regression: float
) -> Refusal | None:
    """The promotion gate: refuse ``update`` when its held-out eval loss is worse than the
    best (lowest) eval loss among the ``live`` versions by more than ``max_regression``
    (a fraction: 0.02 allows 2 %), i.e. when ``loss > best * (1 + max_regression)``.

    A version without ``eval`` (its adapter had no held-out events yet) passes, and so
    does any version when no live version has ``eval``: there is nothing to compare.
    """
    if update.eval is None:
        return None
    measured = [(u.eval.loss, u.version) for u in live if u.eval is not None]
    if not measured:
        return None
    best_loss, best_version = min(measured, key=lambda m: (m[0], -m[1]))
    threshold = best_loss * (1 + max_regression)
    if update.eval.loss <= threshold:
        return None
    return Refusal(
        "regression",
        f"eval loss {update.eval.loss:.4f} is above {threshold:.4f}, the best live version's "
        f"(v{best_version}: {best_loss:.4f}) plus --max-regression {max_regression:g}",
    )


def check_general(update: AdapterUpdate, max_general_regression: float | None) -> Refusal | None:
    """The general-drift gate: refuse ``update`` when its loss on the general set is above
    the base model's by more than ``max_general_regression`` (a fraction), i.e. when
    ``general_eval.loss > general_eval.base_loss * (1 + max_general_regression)``: it learnt
    its task at the cost of everything else. Off (None), and for a version without
    ``general_eval`` (its trainer had no LORASTREAM_GENERAL_EVAL), it passes.
    """
    general = update.general_eval
    if max_general_regression is None or general is None:
        return None
    threshold = general.base_loss * (1 + max_general_regression)
    if general.loss <= threshold:
        return None
    return Refusal(
        "general-regression",
        f"general-set loss {general.loss:.4f} is above {threshold:.4f}, the base model's "
        f"({general.base_loss:.4f}) plus --max-general-regression {max_general_regression:g}",
    )


def judge_versions(
    updates: Mapping[int, AdapterUpdate],
    verdicts: dict[int, Refusal | None],
    keep: int,
    max_regression: float,
    refused: Container[int] = frozenset(),
    max_general_regression: float | None = None,
) -> None:
    """The promotion gate over one adapter's versions: a verdict for each version that has
    none in ``verdicts`` yet, in version order, added to ``verdicts``. A verdict once made
    stands (serve makes them as announcements come).

    Version v is compared (:func:`check_regression`) with the newest ``keep`` versions
    before it that the gate let through and that are not in ``refused`` (versions another
    check refused: never live). From the announcements alone (``refused`` empty) this is
    what ``lorastream serve --keep K --max-regression F`` decides, and ``adapters list``
    shows it. With ``max_general_regression``, a version that fails
    :func:`check_general` is refused first, and never counts as live.
    """
    promoted = sorted(v for v, verdict in verdicts.items() if verdict is None)
    for version in sorted(updates.keys() - verdicts.keys()):
        live: list[AdapterUpdate] = []
        for earlier in reversed(promoted[: bisect.bisect_left(promoted, version)]):
            if len(live) == keep:
                break
            if earlier not in refused:
                live.append(updates[earlier])
        verdict = check_general(updates[version], max_general_regression) or check_regression(
            updates[version], live, max_regression
        )
        verdicts[version] = verdict
        if verdict is None:
            bisect.insort(promoted, version)
