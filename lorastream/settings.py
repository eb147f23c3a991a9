"""Typed settings, read once at the edge: flags, then environment, then defaults.

Only this module reads the environment. ``load_settings(**flags)`` builds a
frozen :class:`Settings` in which every flag that was given overrides its
variable; the stages get plain values and configuration objects from it and
never look at the environment themselves. A bad value is a
:class:`SettingsError` naming the variable, the field and the problem.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import Topics
from schemas.errors import LorastreamError
from streams.scoring import Thresholds
from trainer.kafka import KafkaConnection

__all__ = [
    "Settings",
    "SettingsError",
    "help_for",
    "load_settings",
    "markdown_table",
    "shown_default",
    "unknown_variables",
    "variable_of",
]


class SettingsError(LorastreamError):
    """A configuration value is missing or wrong."""


# The SASL mechanisms a client can use with nothing but a user and a password: aiokafka's
# GSSAPI needs the gssapi library and Kerberos, OAUTHBEARER a token provider, neither of which
# lorastream sets up (GSSAPI failed with "AssertionError: gssapi library required", #22).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# Read by something other than these settings: the test suite's storm size, docker-compose's
# host port. Not a typo of a setting.
OTHER_VARIABLES = frozenset({"LORASTREAM_STORM", "LORASTREAM_KAFKA_HOST_PORT"})

# Kafka's longest topic name is 249 characters; ours add at most this many to the prefix.
MAX_PREFIX_LENGTH = 249 - len("learning-events.quarantine")


def _setting(
    default: Any,
    variable: str,
    description: str,
    *,
    shown: str | None = None,
    internal: bool = False,
    default_factory: Any = None,
    **constraints: Any,
) -> Any:
    """A field read from ``variable``, described once: the CLI's help and the README's
    table are made from this."""
    extra: dict[str, Any] = {"variable": variable, "shown": shown, "internal": internal}
    if default_factory is not None:
        return Field(
            default_factory=default_factory,
            validation_alias=AliasChoices(variable),
            description=description,
            json_schema_extra=extra,
            **constraints,
        )
    return Field(
        default,
        validation_alias=AliasChoices(variable),
        description=description,
        json_schema_extra=extra,
        **constraints,
    )


def default_home() -> Path:
    """``$LORASTREAM_HOME``, else ``~/.cache/lorastream``: the one place it is read. The
    CLI's broker lives in ``<it>/broker``, the jars Maven fetched in ``<it>/jars``."""
    return Path(os.environ.get("LORASTREAM_HOME") or Path.home() / ".cache" / "lorastream")


class Settings(BaseSettings):
    """lorastream's configuration; each field names the variable that sets it."""

    # Not populate_by_name: pydantic-settings would then also read each field's own name from
    # the environment, so HOME would set `home` and SEED `seed`. Flags are passed by variable.
    # No setting means infinity or "not a number": inf passed every bound as a float and
    # failed later with a traceback (#22).
    model_config = SettingsConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    bootstrap_servers: str = _setting(
        "127.0.0.1:9092",
        "KAFKA_BOOTSTRAP_SERVERS",
        "the Kafka cluster: HOST:PORT, comma-separated",
    )
    topic_prefix: str = _setting(
        "",
        "LORASTREAM_TOPIC_PREFIX",
        "prefixed to every topic, the Faust app id, the trainer's group and transactional id",
        shown="empty",
        max_length=MAX_PREFIX_LENGTH,
        pattern=r"^[A-Za-z0-9._-]*$",
    )
    adapter_dir: str = _setting(
        "adapters",
        "LORASTREAM_ADAPTER_DIR",
        "where versions are written, as DIR/ADAPTER/vVERSION/: a directory, or an object "
        "store's s3://BUCKET/PREFIX (with the AWS_* variables; AWS_ENDPOINT_URL for an "
        "S3-compatible server)",
        shown="./adapters",
        min_length=1,
    )
    adapter_cache: Path | None = _setting(
        None,
        "LORASTREAM_ADAPTER_CACHE",
        "where versions on an object store are kept on this machine (written, fetched to "
        "resume or serve)",
        shown="$LORASTREAM_HOME/cache/adapters",
    )
    window_size: int = _setting(16, "LORASTREAM_WINDOW_SIZE", "events per training window", ge=1)
    base_model: Path | None = _setting(
        None,
        "LORASTREAM_BASE_MODEL",
        "a local Hugging Face causal LM directory",
        shown="the built-in tiny model",
    )
    seed: int = _setting(0, "LORASTREAM_SEED", "seed of the initial LoRA weights", ge=0)
    max_tries: int = _setting(3, "LORASTREAM_MAX_TRIES", "tries per window before quarantine", ge=1)
    max_wait_seconds: float | None = _setting(
        None,
        "LORASTREAM_MAX_WAIT_SECONDS",
        "train a partial window once its oldest event has waited this long",
        shown="off: a window trains when full",
        gt=0,
    )
    device: str = _setting(
        "auto",
        "LORASTREAM_DEVICE",
        "one of auto, cpu, cuda, cuda:N (bf16 on CUDA, fp32 on CPU)",
        pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$",
    )
    lora_r: int = _setting(8, "LORASTREAM_LORA_R", "LoRA rank", ge=1)
    lora_alpha: float = _setting(16, "LORASTREAM_LORA_ALPHA", "LoRA alpha", gt=0)
    lora_dropout: float = _setting(0.0, "LORASTREAM_LORA_DROPOUT", "LoRA dropout", ge=0, lt=1)
    lora_target_modules: str = _setting(
        "q_proj,v_proj",
        "LORASTREAM_LORA_TARGET_MODULES",
        "the base model's modules that get LoRA, comma-separated",
        min_length=1,
    )
    eval_fraction: float = _setting(
        0.1,
        "LORASTREAM_EVAL_FRACTION",
        "share of each adapter's events held out of training (chosen by a hash of the event "
        "id) to evaluate every version on; 0 turns evaluation off",
        ge=0,
        lt=1,
    )
    eval_size: int = _setting(
        256,
        "LORASTREAM_EVAL_SIZE",
        "held-out events per adapter that each version is evaluated on (the newest)",
        ge=1,
    )
    eval_segment_windows: int = _setting(
        8,
        "LORASTREAM_EVAL_SEGMENT_WINDOWS",
        "held-out events fall in segments of this many versions (v1-v8, v9-v16 ...), unless "
        "an event's metadata.segment labels it: each version's loss per segment is the "
        "forgetting matrix (`adapters forgetting`)",
        ge=1,
    )
    general_eval: Path | None = _setting(
        None,
        "LORASTREAM_GENERAL_EVAL",
        'a JSONL file of {"prompt", "response"} general text that every version is measured '
        "on beside the base model, to see an adapter drift away from it (`serve "
        "--max-general-regression`)",
        shown="off",
    )
    learning_rate: float | None = _setting(
        None, "LORASTREAM_LEARNING_RATE", "AdamW learning rate", shown="2e-3", gt=0
    )
    max_length: int = _setting(
        2048,
        "LORASTREAM_MAX_LENGTH",
        "tokens of an example trained on; a longer one loses the start of its prompt first",
        ge=2,
    )
    token_budget: int = _setting(
        8192,
        "LORASTREAM_TOKEN_BUDGET",
        "padded tokens per micro-batch: a window is split so that none holds more (the "
        "memory a step needs grows with this, not with the window)",
        ge=1,
    )
    gradient_checkpointing: bool = _setting(
        False,
        "LORASTREAM_GRADIENT_CHECKPOINTING",
        "recompute the layers' activations in the backward pass: less memory, a slower step",
        shown="false",
    )
    compile: bool = _setting(
        False,
        "LORASTREAM_COMPILE",
        "compile the model's decoder layers with torch.compile on a GPU (ignored on the CPU): a faster "
        "step once each new window length has compiled",
        shown="false",
    )
    steps_per_window: int = _setting(
        1,
        "LORASTREAM_STEPS_PER_WINDOW",
        "AdamW steps on each window: more learn more from each event, at that many times "
        "the step's time",
        ge=1,
        le=64,
    )
    rehearsal: int = _setting(
        0,
        "LORASTREAM_REHEARSAL",
        "earlier trained events of the adapter (a sample of its rehearsal buffer) mixed into "
        "each step's window, so that it keeps what it learned; 0 turns rehearsal off",
        ge=0,
        le=4096,
    )
    rehearsal_buffer: int = _setting(
        256,
        "LORASTREAM_REHEARSAL_BUFFER",
        "trained events per adapter kept for rehearsal (a reservoir sample of its lineage, "
        "written with each version as rehearsal.jsonl)",
        ge=1,
        le=65536,
    )
    adapters_per_step: int = _setting(
        1,
        "LORASTREAM_ADAPTERS_PER_STEP",
        "full windows of up to this many adapters, closed in one batch of records, train in "
        "one forward and backward and commit in one transaction (each still its own "
        "version); 1 trains them one at a time",
        ge=1,
        le=256,
    )
    rouge_threshold: float = _setting(
        0.7, "LORASTREAM_ROUGE_THRESHOLD", "a breakthrough needs ROUGE-L above this"
    )
    breakthrough_entropy: float = _setting(
        -0.1, "LORASTREAM_BREAKTHROUGH_ENTROPY", "a breakthrough needs the entropy delta below this"
    )
    qualify_entropy: float = _setting(
        0.15,
        "LORASTREAM_QUALIFY_ENTROPY",
        "other results qualify when the absolute entropy delta is above this",
        ge=0,
    )
    instance_id: str | None = _setting(
        None,
        "LORASTREAM_INSTANCE_ID",
        "names the trainer's transactional id, one per live trainer; unset, each trainer "
        "takes HOSTNAME-N, the lowest N no live trainer holds (a restart gets its id back); "
        "set, a trainer whose id a live one holds is refused at start",
        shown="HOSTNAME-N, claimed at start",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
    )
    metrics_port: int | None = _setting(
        None,
        "LORASTREAM_METRICS_PORT",
        "serve Prometheus metrics on this port",
        shown="off",
        ge=1,
        le=65535,
    )
    metrics_host: str = _setting(
        "127.0.0.1",
        "LORASTREAM_METRICS_HOST",
        "the address the metrics server binds (0.0.0.0 in a container)",
        min_length=1,
    )
    log_format: str = _setting(
        "text",
        "LORASTREAM_LOG_FORMAT",
        "the log lines of `train` and `replay`: text, or json (one object per line: time, "
        "level, logger, message, and topic, partition, offset where a record has them)",
        pattern=r"^(text|json)$",
    )
    # retention.ms of the history topics (learning events, adapter updates, quarantine):
    # they are the training set and the lineage, so -1, Kafka's "forever", by default.
    history_retention_ms: int = _setting(
        -1,
        "LORASTREAM_HISTORY_RETENTION_MS",
        "retention.ms that `topics create` gives learning-events, adapter-updates and the "
        "quarantine topic (with retention.bytes=-1): the training set and the lineage",
        shown="-1 (forever)",
        ge=-1,
    )
    home: Path = _setting(
        None,
        "LORASTREAM_HOME",
        "the local broker, its jars, the built-in model",
        shown="~/.cache/lorastream",
        default_factory=default_home,
    )
    hold_recheck_seconds: float = _setting(
        30.0,
        "LORASTREAM_HOLD_RECHECK_SECONDS",
        "how often the trainer checks an adapter on hold again (its files repaired, its "
        "LoRA setting set back)",
        gt=0,
    )
    # Fault injection for the crash tests (trainer/faults.py); never set in production.
    faults: str | None = _setting(
        None,
        "LORASTREAM_FAULTS",
        "fault injection for tests; never set in production",
        internal=True,
    )

    security_protocol: str = _setting(
        "PLAINTEXT",
        "KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        pattern=r"^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
    )
    sasl_mechanism: str | None = _setting(
        None,
        "KAFKA_SASL_MECHANISM",
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (empty: none)",
        shown="none",
    )
    sasl_username: str | None = _setting(None, "KAFKA_SASL_USERNAME", "SASL user", shown="none")
    sasl_password: SecretStr | None = _setting(
        None, "KAFKA_SASL_PASSWORD", "SASL password", shown="none"
    )
    ssl_cafile: Path | None = _setting(
        None, "KAFKA_SSL_CAFILE", "CA bundle for TLS", shown="the system's"
    )
    ssl_certfile: Path | None = _setting(
        None, "KAFKA_SSL_CERTFILE", "client certificate for TLS", shown="none"
    )
    ssl_keyfile: Path | None = _setting(
        None, "KAFKA_SSL_KEYFILE", "client key for TLS", shown="none"
    )

    # `serve --listen`: what the proxy's clients can make the serve process hold.
    proxy_max_inflight_bytes: int = _setting(
        64 * 1024 * 1024,
        "LORASTREAM_PROXY_MAX_INFLIGHT_BYTES",
        "request body bytes that the proxy of `serve --listen` holds at once, across all "
        "requests; a request past it gets 503, a body larger than it 413",
        shown="67108864 (64 MiB)",
        ge=1,
    )
    proxy_client_timeout: float = _setting(
        30.0,
        "LORASTREAM_PROXY_CLIENT_TIMEOUT",
        "seconds the proxy of `serve --listen` waits for a client's request headers, for "
        "each piece of its body, and for it to take each piece of the response, before it "
        "closes the connection",
        gt=0,
    )
    announce_key: SecretStr | None = _setting(
        None,
        "LORASTREAM_ANNOUNCE_KEY",
        "a shared secret (16 characters or more): the trainer and replay sign every "
        "announcement with it (HMAC-SHA256), and every reader skips one that is not signed "
        "with it; `broker start --secure` makes one",
        shown="none: announcements are not signed or checked",
    )

    @field_validator("adapter_dir", mode="before")
    @classmethod
    def _adapter_dir(cls, value: object) -> object:
        if isinstance(value, Path):  # a directory given as a Path (from code)
            return str(value)
        if isinstance(value, str) and "://" in value:
            scheme, _, rest = value.partition("://")
            if scheme != "s3":
                raise ValueError(f"{scheme}:// is not supported: a directory or s3://BUCKET/PREFIX")
            if not rest.split("/")[0]:
                raise ValueError("s3:// needs a bucket: s3://BUCKET/PREFIX")
        return value

    @field_validator("announce_key", mode="before")
    @classmethod
    def _announce_key(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            if not value.strip():
                return None  # set but empty: as unset
            if len(value) < 16:
                raise ValueError(
                    "too short for a signing key: 16 characters or more (`lorastream broker "
                    "start --secure` makes a 64-character one)"
                )
        return value

    @field_validator("sasl_mechanism", mode="before")
    @classmethod
    def _sasl_mechanism(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None  # set but empty: as unset
            if value.strip().upper() not in SASL_MECHANISMS:
                raise ValueError(
                    f"not a SASL mechanism lorastream supports: {', '.join(SASL_MECHANISMS)}"
                )
            return value.strip().upper()
        return value

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile", mode="before")
    @classmethod
    def _existing_path(cls, value: object) -> object:
        # Checked here, whatever the protocol: a CA file that is not there was a
        # FileNotFoundError naming neither the variable nor the path (#22).
        if isinstance(value, str | Path):
            if not str(value).strip():
                raise ValueError("empty; unset the variable for the default")
            if not Path(value).exists():
                raise ValueError("no such file or directory")
        return value

    @field_validator("adapter_cache", "base_model", "general_eval", mode="before")
    @classmethod
    def _empty_path(cls, value: object) -> object:
        # An empty path would be "." (the current directory), never what was meant. The base
        # model is not looked for here: `serve` only compares it with the versions' (the
        # path may be on the trainer's machine); `train` checks it before it loads it.
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; unset the variable for the default")
        return value

    @field_validator("home", mode="before")
    @classmethod
    def _home(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return default_home()  # as default_home() reads an empty LORASTREAM_HOME
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        for server in value.split(","):
            host, colon, port = server.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"{server.strip()!r} is not HOST:PORT (a port from 1 to 65535); "
                    "several servers are separated by commas"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL is {self.security_protocol}, which needs "
                f"KAFKA_SASL_MECHANISM ({', '.join(SASL_MECHANISMS)})"
            )
        Thresholds(self.rouge_threshold, self.breakthrough_entropy, self.qualify_entropy)
        return self

    @property
    def adapter_cache_dir(self) -> Path:
        """Where versions on an object store are kept on this machine."""
        return self.adapter_cache or self.home / "cache" / "adapters"

    @property
    def topics(self) -> Topics:
        return Topics.named(self.topic_prefix)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.rouge_threshold, self.breakthrough_entropy, self.qualify_entropy)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())

    @property
    def scorer_app_id(self) -> str:
        return f"{self.topic_prefix}lorastream-scorer"

    @property
    def trainer_group_id(self) -> str:
        return f"{self.topic_prefix}lorastream-trainer"

    @property
    def trainer_id_prefix(self) -> str:
        """The trainer's transactional id is this and its instance id, explicit or claimed
        at start (trainer.claims)."""
        return f"{self.topic_prefix}lorastream-trainer-"

    def replay_transactional_id(self, target: str) -> str:
        """One per target lineage: a rerun of the replay fences and aborts a killed one."""
        return f"{self.topic_prefix}lorastream-replay-{target}"

    @property
    def announce_key_bytes(self) -> bytes | None:
        """The announcement signing key, or None (nothing signed, nothing checked)."""
        return self.announce_key.get_secret_value().encode() if self.announce_key else None

    def kafka_connection(self) -> KafkaConnection:
        """The servers and security options every client we create connects with; the
        TLS context is built here, once per call."""
        ssl_context = None
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            for field in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                path = getattr(self, field)
                if path is not None and not Path(path).is_file():
                    raise SettingsError(
                        f"{variable_of(field)} ({field}): no such file; got {str(path)!r}"
                    )
            ssl_context = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        sasl = bool(self.sasl_mechanism)
        return KafkaConnection(
            self.bootstrap_servers,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism if sasl else None,
            sasl_username=self.sasl_username if sasl else None,
            sasl_password=(
                self.sasl_password.get_secret_value() if sasl and self.sasl_password else None
            ),
            ssl_context=ssl_context,
            cafile=str(self.ssl_cafile) if ssl_context and self.ssl_cafile else None,
        )

    def faust_credentials(self) -> Any:
        """The same security settings as Faust's credentials object, or None."""
        import faust

        ssl_context = self.kafka_connection().ssl_context
        if self.sasl_mechanism:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value() if self.sasl_password else None,
                mechanism=self.sasl_mechanism,
                ssl_context=ssl_context,
            )
        if ssl_context is not None:
            return faust.SSLCredentials(ssl_context)
        return None


def variable_of(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field


_SECRETS = frozenset({"announce_key", "sasl_password"})  # never echoed in an error


def load_settings(**flags: Any) -> Settings:
    """Settings from the given flags (None = not given), the environment and defaults."""
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return Settings(**{variable_of(name): value for name, value in given.items()})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = error["loc"][0] if error["loc"] else ""
            field = next(
                (n for n in Settings.model_fields if n == loc or variable_of(n) == loc), str(loc)
            )
            message = error["msg"].removeprefix("Value error, ")
            where = f"{variable_of(field)} ({field})" if field else "settings"
            source = "flag" if field in given else "environment or default"
            got = "a secret" if field in _SECRETS else repr(error.get("input"))
            problems.append(f"{where}, from the {source}: {message}; got {got}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from exc


def known_variables() -> frozenset[str]:
    """Every variable a setting reads."""
    return frozenset(variable_of(field) for field in Settings.model_fields)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Each ``LORASTREAM_*`` variable in ``environ`` (default: this process's environment)
    that no setting reads, with the closest known name, or None: a misspelt
    ``LORASTREAM_WINDOWSIZE=4`` was silently ignored (#22)."""
    environ = os.environ if environ is None else environ
    prefix = "LORASTREAM_"
    known = known_variables()
    # Compared without the prefix, which every name shares: else LORASTREAM_XYZZY is
    # "close" to LORASTREAM_SEED.
    suffixes = sorted(name.removeprefix(prefix) for name in known if name.startswith(prefix))
    unknown = []
    for name in sorted(environ):
        if name.startswith(prefix) and name not in known and name not in OTHER_VARIABLES:
            close = difflib.get_close_matches(name.removeprefix(prefix), suffixes, n=1)
            unknown.append((name, prefix + close[0] if close else None))
    return unknown


def _extra(field: str) -> dict[str, Any]:
    extra = Settings.model_fields[field].json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def shown_default(field: str) -> str:
    """The default as users read it."""
    shown = _extra(field).get("shown")
    if shown is not None:
        return str(shown)
    default = Settings.model_fields[field].default
    return str(default)


def help_for(field: str, what: str | None = None) -> str:
    """A CLI option's help: the setting's description, its variable and its default."""
    description = what or Settings.model_fields[field].description or ""
    text = description[:1].upper() + description[1:]
    return f"{text} [env: {variable_of(field)}; default: {shown_default(field)}]"


def markdown_table() -> str:
    """The README's configuration table, one row per variable, from the fields above."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for field, info in Settings.model_fields.items():
        if _extra(field).get("internal"):
            continue
        shown = _extra(field).get("shown")
        literal = shown is None or (" " not in shown and shown not in ("empty", "none", "off"))
        default = f"`{shown_default(field)}`" if literal else shown
        rows.append(f"| `{variable_of(field)}` | {default} | {info.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
