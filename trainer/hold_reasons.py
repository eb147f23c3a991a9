"""Why an adapter is held: a LoRA setting that differs from its lineage's, or a file not
as announced.

The core raises :class:`~trainer.exceptions.AdapterHeld` with these reasons
before it steps on a lineage's newest version; ``status`` and ``adapters
list`` show the same reasons (:func:`hold_reason`), by the trainer's own checks.
"""

from __future__ import annotations

from schemas import AdapterUpdate, LoraSpec
from trainer.exceptions import AdapterStoreError
from trainer.store import AdapterStore

__all__ = ["hold_reason", "settings_differ"]

# The LoRA settings a lineage keeps for life, with the variable that sets each.
_LINEAGE_SETTINGS = (
    ("r", "LORASTREAM_LORA_R"),
    ("alpha", "LORASTREAM_LORA_ALPHA"),
    ("target_modules", "LORASTREAM_LORA_TARGET_MODULES"),
    ("dropout", "LORASTREAM_LORA_DROPOUT"),
)


def settings_differ(lineage: LoraSpec, configured: LoraSpec) -> str | None:
    """None when a trainer with ``configured`` may continue a lineage made with
    ``lineage``; else one sentence naming the variable, the lineage's value and the new one.
    (A lineage's settings are its first version's: every version carries them.)"""
    for name, variable in _LINEAGE_SETTINGS:
        theirs, ours = getattr(lineage, name), getattr(configured, name)
        if name == "target_modules":
            same = sorted(theirs) == sorted(ours)
            theirs, ours = ",".join(theirs), ",".join(ours)
        else:
            same = float(theirs) == float(ours)
        if not same:
            return (
                f"{variable} is {ours}, but the lineage was trained with {theirs}; a lineage "
                f"keeps its LoRA settings: set {variable}={theirs} again, or train a new "
                "lineage with the new value (lorastream replay --adapter NAME --into NEW)"
            )
    return None


def hold_reason(store: AdapterStore, update: AdapterUpdate, configured: LoraSpec) -> str | None:
    """Why a trainer with LoRA settings ``configured`` holds the adapter whose newest version
    is ``update`` (a setting that differs, or a file not as announced), or None. What
    ``status`` and ``adapters list`` show, by the trainer's own checks."""
    differs = settings_differ(update.lora, configured)
    if differs is not None:
        return differs
    try:
        store.verify(update.adapter, update.version, update.manifest_sha256, update.sha256)
    except AdapterStoreError as exc:
        return str(exc)
    return None
