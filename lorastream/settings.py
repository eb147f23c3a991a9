"""Typed settings, read once at the edge: flags, then environment, then defaults.

Only this module reads the environment. ``load_settings(**flags)`` builds a
frozen :class:`Settings` in which every flag that was given overrides its
variable; the stages get plain values and configuration objects from it and
never look at the environment themselves. A bad value is a
:class:`SettingsError` naming the variable, the field and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import Topics
from schemas.errors import LorastreamError
from streams.scoring import Thresholds

__all__ = ["Settings", "SettingsError", "load_settings"]


class SettingsError(LorastreamError):
    """A configuration value is missing or wrong."""


def _default_home() -> Path:
    return Path(os.environ.get("LORASTREAM_HOME") or Path.home() / ".cache" / "lorastream")


class Settings(BaseSettings):
    """lorastream's configuration; each field names the variable that sets it."""

    # Not populate_by_name: pydantic-settings would then also read each field's own name from
    # the environment, so HOME would set `home` and SEED `seed`. Flags are passed by variable.
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    bootstrap_servers: Annotated[str, Field(min_length=1)] = Field(
        "127.0.0.1:9092", validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS")
    )
    topic_prefix: str = Field("", validation_alias=AliasChoices("LORASTREAM_TOPIC_PREFIX"))
    adapter_dir: Path = Field(
        Path("adapters"), validation_alias=AliasChoices("LORASTREAM_ADAPTER_DIR")
    )
    window_size: int = Field(16, ge=1, validation_alias=AliasChoices("LORASTREAM_WINDOW_SIZE"))
    # retention.ms of the history topics (learning events, adapter updates, quarantine):
    # they are the training set and the lineage, so -1, Kafka's "forever", by default.
    history_retention_ms: int = Field(
        -1, ge=-1, validation_alias=AliasChoices("LORASTREAM_HISTORY_RETENTION_MS")
    )
    base_model: Path | None = Field(None, validation_alias=AliasChoices("LORASTREAM_BASE_MODEL"))
    seed: int = Field(0, ge=0, validation_alias=AliasChoices("LORASTREAM_SEED"))
    home: Path = Field(
        default_factory=_default_home, validation_alias=AliasChoices("LORASTREAM_HOME")
    )

    rouge_threshold: float = Field(0.7, validation_alias=AliasChoices("LORASTREAM_ROUGE_THRESHOLD"))
    breakthrough_entropy: float = Field(
        -0.1, validation_alias=AliasChoices("LORASTREAM_BREAKTHROUGH_ENTROPY")
    )
    qualify_entropy: float = Field(
        0.15, ge=0, validation_alias=AliasChoices("LORASTREAM_QUALIFY_ENTROPY")
    )

    max_tries: int = Field(3, ge=1, validation_alias=AliasChoices("LORASTREAM_MAX_TRIES"))
    max_wait_seconds: float | None = Field(
        None, gt=0, validation_alias=AliasChoices("LORASTREAM_MAX_WAIT_SECONDS")
    )
    device: str = Field("auto", validation_alias=AliasChoices("LORASTREAM_DEVICE"))
    lora_r: int = Field(8, ge=1, validation_alias=AliasChoices("LORASTREAM_LORA_R"))
    lora_alpha: float = Field(16, gt=0, validation_alias=AliasChoices("LORASTREAM_LORA_ALPHA"))
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, validation_alias=AliasChoices("LORASTREAM_LORA_DROPOUT")
    )
    lora_target_modules: str = Field(
        "q_proj,v_proj",
        min_length=1,
        validation_alias=AliasChoices("LORASTREAM_LORA_TARGET_MODULES"),
    )
    learning_rate: float | None = Field(
        None, gt=0, validation_alias=AliasChoices("LORASTREAM_LEARNING_RATE")
    )
    instance_id: str = Field(
        "0",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        validation_alias=AliasChoices("LORASTREAM_INSTANCE_ID"),
    )
    # Fault injection for the crash tests (trainer/faults.py); never set in production.
    faults: str | None = Field(None, validation_alias=AliasChoices("LORASTREAM_FAULTS"))
    metrics_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=AliasChoices("LORASTREAM_METRICS_PORT")
    )

    security_protocol: str = Field(
        "PLAINTEXT",
        pattern=r"^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
        validation_alias=AliasChoices("KAFKA_SECURITY_PROTOCOL"),
    )
    sasl_mechanism: str | None = Field(None, validation_alias=AliasChoices("KAFKA_SASL_MECHANISM"))
    sasl_username: str | None = Field(None, validation_alias=AliasChoices("KAFKA_SASL_USERNAME"))
    sasl_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SASL_PASSWORD")
    )
    ssl_cafile: Path | None = Field(None, validation_alias=AliasChoices("KAFKA_SSL_CAFILE"))
    ssl_certfile: Path | None = Field(None, validation_alias=AliasChoices("KAFKA_SSL_CERTFILE"))
    ssl_keyfile: Path | None = Field(None, validation_alias=AliasChoices("KAFKA_SSL_KEYFILE"))

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL is {self.security_protocol}, which needs "
                "KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        Thresholds(self.rouge_threshold, self.breakthrough_entropy, self.qualify_entropy)
        return self

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
    def transactional_id(self) -> str:
        return f"{self.topic_prefix}lorastream-trainer-{self.instance_id}"

    def replay_transactional_id(self, target: str) -> str:
        """One per target lineage: a rerun of the replay fences and aborts a killed one."""
        return f"{self.topic_prefix}lorastream-replay-{target}"

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options in aiokafka's names, for every client we create."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return options

    def faust_credentials(self) -> Any:
        """The same security settings as Faust's credentials object, or None."""
        import faust

        ssl_context = self.kafka_client_options().get("ssl_context")
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


def _variable(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field


def load_settings(**flags: Any) -> Settings:
    """Settings from the given flags (None = not given), the environment and defaults."""
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return Settings(**{_variable(name): value for name, value in given.items()})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = error["loc"][0] if error["loc"] else ""
            field = next(
                (n for n in Settings.model_fields if n == loc or _variable(n) == loc), str(loc)
            )
            message = error["msg"].removeprefix("Value error, ")
            where = f"{_variable(field)} ({field})" if field else "settings"
            source = "flag" if field in given else "environment or default"
            problems.append(f"{where}, from the {source}: {message}; got {error.get('input')!r}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from exc
