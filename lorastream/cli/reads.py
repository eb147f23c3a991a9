"""The settings each command reads that none of its options sets, shown in its ``--help``.

A command's options show their own variables; the rest of what it reads (the Kafka
connection, the adapter directory and its key, the training settings that have no flag)
is listed here, once per command, and :func:`describe_settings` puts it at the end of
that command's ``--help``. ``tests/lorastream/test_help.py`` finds in the code what each
command reads and fails when a variable is missing from its help (#22: ``train --help``
lacked five), so this table cannot silently fall behind.
"""

from __future__ import annotations

import typer

from lorastream.settings import Settings, shown_default, variable_of

__all__ = ["READS", "describe_settings", "epilog_for"]

# Every command that talks to Kafka: the options before the command, and the security.
_KAFKA = (
    "bootstrap_servers",
    "topic_prefix",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)
# A reader of announcements: which files it trusts, and where it keeps fetched ones.
_TRUST = ("adapter_dir", "announce_key")
_CACHE = ("adapter_cache", "home")
# The training settings that have no flag of their own.
_TRAINING = (
    "eval_fraction",
    "eval_size",
    "max_length",
    "token_budget",
    "lora_dropout",
    "gradient_checkpointing",
    "rehearsal",
    "rehearsal_buffer",
    "eval_segment_windows",
    "general_eval",
    "adapters_per_step",
)
_ALL_TRAINING = (
    *_TRAINING,
    "window_size",
    "base_model",
    "seed",
    "max_tries",
    "device",
    "learning_rate",
    "steps_per_window",
    "compile",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
)

READS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("serve",): (*_KAFKA, *_TRUST, *_CACHE, "log_format"),
    ("status",): (*_KAFKA, *_TRUST, "eval_fraction"),
    ("score",): (*_KAFKA, "home", "log_format"),
    ("produce",): _KAFKA,
    ("train",): (*_KAFKA, *_TRUST, *_CACHE, *_TRAINING, "hold_recheck_seconds", "log_format"),
    ("replay",): (*_KAFKA, *_TRUST, *_CACHE, *_TRAINING, "log_format"),
    ("demo",): (
        *_KAFKA,
        "adapter_dir",
        "home",
        "seed",
        "rouge_threshold",
        "breakthrough_entropy",
        "qualify_entropy",
    ),
    ("broker", "start"): ("bootstrap_servers", "home"),
    ("broker", "stop"): ("bootstrap_servers", "home"),
    ("broker", "status"): ("bootstrap_servers", "home"),
    ("s3", "start"): ("home",),
    ("s3", "stop"): ("home",),
    ("s3", "status"): ("home",),
    ("topics", "create"): (*_KAFKA, "history_retention_ms"),
    ("topics", "list"): _KAFKA,
    ("topics", "delete"): _KAFKA,
    ("adapters", "list"): (*_KAFKA, *_TRUST, *_CACHE, "eval_fraction"),
    ("adapters", "repair"): (*_KAFKA, *_TRUST, *_CACHE, *_ALL_TRAINING),
    ("adapters", "fetch"): (*_KAFKA, *_TRUST, *_CACHE),
    ("adapters", "follow"): (*_KAFKA, *_TRUST),
    ("adapters", "forgetting"): (*_KAFKA, *_TRUST),
    ("dead-letters", "list"): _KAFKA,
    ("dead-letters", "export"): _KAFKA,
    ("quarantine", "list"): _KAFKA,
    ("quarantine", "retry"): (*_KAFKA, *_TRUST),
}


def epilog_for(fields: tuple[str, ...]) -> str:
    """One line per setting: its variable, what it does, its default. ``\\b`` keeps
    click from rewrapping the lines into one paragraph."""
    lines = ["\b", "Also reads (see also the README's configuration table):"]
    for field in dict.fromkeys(fields):
        description = Settings.model_fields[field].description or ""
        lines.append(f"  {variable_of(field)}: {description} [default: {shown_default(field)}]")
    return "\n".join(lines)


def describe_settings(app: typer.Typer, path: tuple[str, ...] = ()) -> None:
    """Give every command of ``app`` that :data:`READS` names the epilog of its settings;
    call it once, after every command is registered."""
    for info in app.registered_commands:
        fields = READS.get((*path, info.name or ""))
        if fields:
            info.epilog = epilog_for(fields)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            describe_settings(group.typer_instance, (*path, group.name or ""))
