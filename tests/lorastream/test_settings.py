"""Settings: flags, then environment, then defaults; errors name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorastream.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "LORASTREAM_TOPIC_PREFIX",
        "LORASTREAM_WINDOW_SIZE",
        "KAFKA_SECURITY_PROTOCOL",
        "LORASTREAM_ROUGE_THRESHOLD",
        "LORASTREAM_SEED",
        "LORASTREAM_DEVICE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.window_size == 16
    assert settings.topics.learning_events == "learning-events"
    assert settings.instance_id is None  # claimed at start: HOSTNAME-N (trainer.claims)
    assert settings.trainer_id_prefix == "lorastream-trainer-"


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASTREAM_WINDOW_SIZE", "8")
    monkeypatch.setenv("LORASTREAM_TOPIC_PREFIX", "run1.")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    settings = load_settings()
    assert settings.window_size == 8
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.topics.dead_letters == "run1.generation-results.dlq"
    assert settings.scorer_app_id == "run1.lorastream-scorer"
    assert settings.trainer_group_id == "run1.lorastream-trainer"
    assert load_settings(window_size=4, topic_prefix=None).window_size == 4


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("LORASTREAM_WINDOW_SIZE", "zero", "LORASTREAM_WINDOW_SIZE (window_size)"),
        ("LORASTREAM_WINDOW_SIZE", "0", "greater than or equal to 1"),
        ("LORASTREAM_ROUGE_THRESHOLD", "1.5", "rouge"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL", "KAFKA_SASL_MECHANISM"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS", "KAFKA_SECURITY_PROTOCOL"),
        ("LORASTREAM_SEED", "-1", "LORASTREAM_SEED"),
        ("KAFKA_BOOTSTRAP_SERVERS", "nonsense", "'nonsense' is not HOST:PORT"),
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost:notaport", "'localhost:notaport' is not HOST:PORT"),
        ("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,:9093", "':9093' is not HOST:PORT"),
        ("KAFKA_BOOTSTRAP_SERVERS", "k1:70000", "KAFKA_BOOTSTRAP_SERVERS"),
        ("LORASTREAM_TOPIC_PREFIX", "my run/", "LORASTREAM_TOPIC_PREFIX"),
        ("LORASTREAM_TOPIC_PREFIX", "p" * 224, "at most 223 characters"),
        ("LORASTREAM_DEVICE", "gpu", "LORASTREAM_DEVICE (device)"),
        ("LORASTREAM_DEVICE", "cuda:x", "LORASTREAM_DEVICE"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert needle in str(info.value)


def test_a_bad_flag_says_it_came_from_the_flag() -> None:
    with pytest.raises(SettingsError, match="from the flag"):
        load_settings(window_size=-3)


def test_only_the_documented_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A field's own name must not be read from the environment: HOME is the user's home,
    # not LORASTREAM_HOME, and SEED or DEVICE belong to somebody else.
    monkeypatch.delenv("LORASTREAM_HOME", raising=False)
    monkeypatch.setenv("HOME", "/somewhere/else")
    monkeypatch.setenv("SEED", "5")
    monkeypatch.setenv("DEVICE", "cuda:3")
    monkeypatch.setenv("WINDOW_SIZE", "2")
    settings = load_settings()
    assert settings.home == Path("/somewhere/else/.cache/lorastream")
    assert (settings.seed, settings.device, settings.window_size) == (0, "auto", 16)
    monkeypatch.setenv("LORASTREAM_HOME", "/data/ls")
    assert load_settings().home == Path("/data/ls")
    assert load_settings(home=Path("/flag")).home == Path("/flag")


def test_good_servers_prefixes_and_devices_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-0.kafka:9092, 10.0.0.7:19092,[::1]:9092")
    monkeypatch.setenv("LORASTREAM_TOPIC_PREFIX", "team_a.run-7.")
    monkeypatch.setenv("LORASTREAM_DEVICE", "cuda:1")
    settings = load_settings()
    assert settings.device == "cuda:1" and settings.topic_prefix == "team_a.run-7."


def test_the_documented_learning_rate_is_the_steps_own_default() -> None:
    from lorastream.settings import shown_default
    from trainer.config import LoraSettings

    assert float(shown_default("learning_rate")) == LoraSettings().learning_rate


def test_the_kafka_connection_carries_the_security_options_in_aiokafkas_names() -> None:
    """One frozen object from the settings to every client: aiokafka's keyword arguments
    come out of it only where a client is made, and the password never shows in a repr."""
    import dataclasses

    plain = load_settings(bootstrap_servers="k1:9092,k2:9092").kafka_connection()
    assert str(plain) == "k1:9092,k2:9092" and not plain.secured
    assert plain.options() == {"security_protocol": "PLAINTEXT"}
    assert plain.client_kwargs() == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "security_protocol": "PLAINTEXT",
    }
    sasl = load_settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="tutor",
        sasl_password="hunter2",
    ).kafka_connection()
    assert sasl.secured
    assert sasl.options() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "tutor",
        "sasl_plain_password": "hunter2",
    }
    assert "hunter2" not in repr(sasl)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sasl.servers = "elsewhere:9092"  # type: ignore[misc]
    tls = load_settings(security_protocol="SSL").kafka_connection()
    assert tls.ssl_context is not None and set(tls.options()) == {
        "security_protocol",
        "ssl_context",
    }


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
@pytest.mark.parametrize(
    "variable",
    [
        "LORASTREAM_LEARNING_RATE",
        "LORASTREAM_LORA_ALPHA",
        "LORASTREAM_EVAL_FRACTION",
        "LORASTREAM_ROUGE_THRESHOLD",
        "LORASTREAM_QUALIFY_ENTROPY",
        "LORASTREAM_MAX_WAIT_SECONDS",
        "LORASTREAM_HOLD_RECHECK_SECONDS",
    ],
)
def test_no_setting_takes_infinity_or_not_a_number(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorastream.settings import SettingsError, load_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"{variable} .*finite number; got '{value}'"):
        load_settings()


@pytest.mark.parametrize("field", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
def test_a_missing_tls_file_is_named_with_its_variable(field: str, tmp_path: Path) -> None:
    from lorastream.settings import SettingsError, load_settings, variable_of

    missing = tmp_path / "nonexistent.pem"
    with pytest.raises(SettingsError) as raised:
        load_settings(security_protocol="SSL", **{field: str(missing)})
    assert f"{variable_of(field)} ({field})" in str(raised.value)
    assert f"no such file or directory; got {str(missing)!r}" in str(raised.value)
    # and one that goes away after the settings were read, when a client is made
    missing.write_text("")
    settings = load_settings(security_protocol="SSL", **{field: str(missing)})
    missing.unlink()
    with pytest.raises(SettingsError) as raised:
        settings.kafka_connection()
    assert (
        str(raised.value) == f"{variable_of(field)} ({field}): no such file; got {str(missing)!r}"
    )


@pytest.mark.parametrize("value", ["GSSAPI", "OAUTHBEARER", "scram-sha-1"])
def test_an_unsupported_sasl_mechanism_is_one_line_naming_the_accepted_ones(value: str) -> None:
    """GSSAPI was `AssertionError: gssapi library required` (#22)."""
    with pytest.raises(SettingsError) as raised:
        load_settings(sasl_mechanism=value)
    message = str(raised.value)
    assert "KAFKA_SASL_MECHANISM" in message and repr(value) in message
    assert "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512" in message


def test_a_sasl_mechanism_is_read_in_any_case_and_empty_is_none() -> None:
    assert load_settings(sasl_mechanism="scram-sha-512").sasl_mechanism == "SCRAM-SHA-512"
    assert load_settings(sasl_mechanism="").sasl_mechanism is None


def test_an_unknown_lorastream_name_is_found_with_the_closest_known_one() -> None:
    from lorastream.settings import unknown_variables

    environ = {
        "LORASTREAM_WINDOWSIZE": "4",
        "LORASTREAM_XYZZY": "1",
        "LORASTREAM_WINDOW_SIZE": "4",
        "LORASTREAM_STORM": "10",
        "OTHER": "x",
    }
    assert unknown_variables(environ) == [
        ("LORASTREAM_WINDOWSIZE", "LORASTREAM_WINDOW_SIZE"),
        ("LORASTREAM_XYZZY", None),
    ]


def test_a_taken_metrics_port_is_one_line_naming_the_port_and_its_variable() -> None:
    import socket

    from prometheus_client import CollectorRegistry

    from lorastream.cli.stage import start_stage
    from lorastream.settings import SettingsError, load_settings

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = load_settings(metrics_port=port, metrics_host="127.0.0.1")
        with pytest.raises(SettingsError) as raised:
            start_stage(settings, CollectorRegistry(), logs=False)
    message = str(raised.value)
    assert message.startswith("LORASTREAM_METRICS_PORT (metrics_port): cannot serve metrics on "), (
        message
    )
    assert f"127.0.0.1:{port}: Address already in use" in message, message
