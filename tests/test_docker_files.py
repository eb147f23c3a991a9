"""The Dockerfile and the compose files, read as files: no Docker engine, no broker.

What a user of ``docker compose up`` relies on and cannot see until it goes wrong: the
metrics reach the host, the adapters land in a host directory at the path the
announcements name, the GPU file says how to use it, the demo's input trains a version
per adapter, and the image is built from files that exist. Compose's ``${VAR:-default}``
interpolation is applied here by a small evaluator; where a compose CLI is installed, one
more test asks it to resolve the files as ``docker compose config`` does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from lorastream.ops.produce import validate_file
from lorastream.settings import Settings, load_settings, variable_of
from schemas import GenerationResult
from streams.scoring import Thresholds, score

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://pypi.org/simple"
COMBINE = "docker compose -f docker-compose.yml -f docker-compose.gpu.yml"
HOST_USER = "${UID:-1000}:${GID:-1000}"

# ── compose, read as compose reads it ────────────────────────────────────────

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, defaults nested."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            out.append(_expression(text[i + 2 : j - 1], env))
            i = j
        elif text[i] == "$" and (name := _NAME.match(text, i + 1)):
            out.append(env.get(name.group(), ""))
            i = name.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expression(inner: str, env: Mapping[str, str]) -> str:
    name = _NAME.match(inner)
    assert name, f"not a variable: ${{{inner}}}"
    value, rest = env.get(name.group()), inner[name.end() :]
    for operator, if_empty in ((":-", True), ("-", False), (":?", True), ("?", False)):
        if rest.startswith(operator):
            argument = rest[len(operator) :]
            missing = value is None or (if_empty and value == "")
            if "?" in operator and missing:
                raise ValueError(f"${{{inner}}}: {interpolate(argument, env)}")
            return interpolate(argument, env) if missing else str(value)
    assert rest == "", f"unsupported interpolation: ${{{inner}}}"
    return value or ""


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, env) for value in node]
    return node


def load(path: Path) -> dict[str, Any]:
    """A compose file with its anchors and ``<<`` merges applied (PyYAML does both)."""
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name} is not a YAML mapping"
    return document


def services(path: Path) -> dict[str, dict[str, Any]]:
    return load(path).get("services") or {}


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def mounts_of(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each volume as ``{type, source, target, creates}``, short syntax included;
    ``creates``: a missing host directory is made (the short syntax always does)."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":", 1)[0]
            kind = "bind" if source[:1] in ("/", ".", "~", "$") else "volume"
            mounts.append({"type": kind, "source": source, "target": target, "creates": True})
        else:
            mounts.append(
                {
                    "type": str(volume.get("type", "volume")),
                    "source": str(volume.get("source", "")),
                    "target": str(volume["target"]),
                    "creates": bool((volume.get("bind") or {}).get("create_host_path")),
                }
            )
    return mounts


def host_path(source: str, env: Mapping[str, str]) -> Path:
    """A bind mount's source on the host: relative paths start at the compose file's folder."""
    path = Path(interpolate(source, env)).expanduser()
    return path if path.is_absolute() else (ROOT / path).resolve()


def published(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Each published port as ``(host_ip, host_port, container_port)``."""
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports.append(
                (str(port.get("host_ip", "")), str(port["published"]), str(port["target"]))
            )
            continue
        parts = str(port).split(":")
        while len(parts) < 3:
            parts.insert(0, "")
        ports.append((parts[0], parts[1], parts[2].split("/")[0]))
    return ports


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("#"))


# ── the Dockerfile ───────────────────────────────────────────────────────────


def instructions() -> Iterator[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined, comments dropped."""
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not logical:
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            keyword, _, arguments = logical.strip().partition(" ")
            yield keyword.upper(), arguments.strip()
        logical = ""


def copies() -> list[tuple[list[str], PurePosixPath]]:
    """Each COPY from the build context as ``(sources, absolute destination)``."""
    workdir = PurePosixPath("/")
    result = []
    for keyword, arguments in instructions():
        if keyword == "WORKDIR":
            workdir = workdir / arguments
        elif keyword == "COPY":
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            assert "--from" not in arguments, "a COPY --from is not from the build context"
            *sources, destination = words
            copies_to = workdir / destination
            result.append((sources, copies_to))
    return result


def build_context_file(container_path: str) -> Path | None:
    """The file of the build context that the image holds at ``container_path``."""
    wanted = PurePosixPath(container_path)
    for sources, destination in copies():
        for source in sources:
            if destination == wanted:
                return ROOT / source
            if wanted.is_relative_to(destination) and (ROOT / source).is_dir():
                return ROOT / source / wanted.relative_to(destination)
            if len(sources) > 1 and destination / PurePosixPath(source).name == wanted:
                return ROOT / source
    return None


# ── the tests ────────────────────────────────────────────────────────────────

HERE = {"PWD": str(ROOT)}


def metrics_services() -> dict[str, dict[str, Any]]:
    found = {}
    for name, service in services(BASE).items():
        env = environment_of(service)
        if "LORASTREAM_METRICS_PORT" in env or "--metrics-port" in command_of(service):
            found[name] = service
    return found


def test_scorer_and_trainer_serve_metrics_on_all_interfaces_published_on_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serving = metrics_services()
    assert {"scorer", "trainer"} <= set(serving), "the scorer and the trainer serve metrics"
    assert "LORASTREAM_METRICS_HOST" in {variable_of(f) for f in Settings.model_fields}, (
        "LORASTREAM_METRICS_HOST is not a setting: the compose files would set nothing"
    )
    for name, service in serving.items():
        command = command_of(service)
        flag = None
        if "--metrics-port" in command:
            flag = command[command.index("--metrics-port") + 1]
        env = resolve(environment_of(service), HERE)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = load_settings(metrics_port=flag)
        assert settings.metrics_host == "0.0.0.0", (
            f"{name}: inside a container the metrics server must bind 0.0.0.0, "
            f"or the published port reaches nothing (LORASTREAM_METRICS_HOST is "
            f"{env.get('LORASTREAM_METRICS_HOST')!r})"
        )
        port = str(settings.metrics_port)
        loopback = ("127.0.0.1", port, port)
        assert loopback in published(service), f"{name}: port {port} is not on 127.0.0.1:{port}"


def test_kafka_is_published_on_loopback_only() -> None:
    kafka = services(BASE)["kafka"]
    ports = published(resolve(kafka, HERE))
    assert ports, "Kafka publishes no port: nothing on the host could produce"
    assert all(ip == "127.0.0.1" for ip, _, _ in ports), f"Kafka is open beyond loopback: {ports}"
    advertised = resolve(environment_of(kafka), HERE)["KAFKA_ADVERTISED_LISTENERS"]
    for _, host_port, _ in ports:
        assert f"EXTERNAL://127.0.0.1:{host_port}" in advertised, (
            "clients on the host are sent to an address other than the published one"
        )


@pytest.mark.parametrize(
    "env",
    [
        HERE,
        {"PWD": "/somewhere/else", "LORASTREAM_ADAPTER_DIR": "/srv/lorastream/adapters"},
    ],
    ids=["run-from-the-repository", "adapter-dir-given"],
)
@pytest.mark.parametrize("variable", ["LORASTREAM_ADAPTER_DIR", "LORASTREAM_HOME"])
def test_state_is_a_host_directory_at_the_same_absolute_path(
    variable: str, env: dict[str, str]
) -> None:
    """The announced ``uri`` (and the built-in ``base_model``) are paths inside the
    container; mounted at the same path, they are valid on the host too."""
    top_level = load(BASE).get("volumes") or {}
    for name in ("scorer", "trainer"):
        service = resolve(services(BASE)[name], env)
        path = environment_of(service).get(variable)
        assert path, f"{name} does not set {variable}"
        assert PurePosixPath(path).is_absolute(), f"{name}: {variable}={path} is not absolute"
        mounts = [m for m in mounts_of(service) if m["target"] == path]
        assert mounts, f"{name}: nothing is mounted at {variable}={path}"
        mount = mounts[0]
        assert mount["type"] == "bind", (
            f"{name}: {path} is a named volume, which the host can't use"
        )
        assert mount["source"] not in top_level, f"{name}: {path} is a named volume"
        assert mount["creates"], f"{name}: without create_host_path, a missing {path} stops up"
        if variable == "LORASTREAM_HOME" and "LORASTREAM_ADAPTER_DIR" in env:
            continue  # the home follows PWD; only the adapter directory takes a variable
        assert host_path(mount["source"], env) == Path(path), (
            f"{name}: {variable} is {path} inside, but the host directory is "
            f"{host_path(mount['source'], env)}: announced paths would not open on the host"
        )


def test_workers_run_as_the_host_user() -> None:
    for name in ("scorer", "trainer", "demo-producer", "follow"):
        assert services(BASE)[name].get("user") == HOST_USER, f"{name} runs as the image's user"


def test_gpu_file_is_a_documented_override_that_builds_the_cuda_trainer() -> None:
    gpu = services(GPU)
    standalone = "kafka" in gpu and all("image" in s or "build" in s for s in gpu.values())
    if not standalone:
        assert COMBINE in header(GPU), f"the GPU file's header must say to run `{COMBINE}`"
        undefined = set(gpu["trainer"].get("depends_on") or {}) - set(gpu)
        assert undefined, (
            "used alone, the override must fail at once, naming a service of the base file, "
            "rather than start a trainer with no broker"
        )
        assert COMBINE in (ROOT / "docker-compose.yml").read_text(), "the base file's header"
    trainer = gpu["trainer"]
    args = (trainer.get("build") or {}).get("args") or {}
    assert args.get("TORCH_INDEX") == CUDA_INDEX, "the GPU trainer needs the CUDA build of torch"
    assert trainer.get("image") not in (None, services(BASE)["trainer"].get("image")), (
        "the CUDA image needs its own tag, or it overwrites the CPU image the others run"
    )
    assert trainer.get("environment", {}).get("LORASTREAM_DEVICE") == "cuda"
    reservation = trainer["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]


def test_dockerfile_takes_the_torch_index_as_a_build_argument() -> None:
    args = {
        arguments.split("=", 1)[0]: arguments.partition("=")[2]
        for keyword, arguments in instructions()
        if keyword == "ARG"
    }
    assert args.get("TORCH_INDEX") == CPU_INDEX, "ARG TORCH_INDEX, the CPU build by default"
    runs = [arguments for keyword, arguments in instructions() if keyword == "RUN"]
    assert any(re.search(r'--index-url "?\$\{?TORCH_INDEX\b', run) for run in runs), (
        "no RUN installs torch from $TORCH_INDEX"
    )
    assert re.search(r"^torch==\S+$", (ROOT / "constraints.txt").read_text(), re.M), (
        "the Dockerfile installs the torch that constraints.txt pins, and it pins none"
    )
    for path in (BASE, GPU):
        for name, service in services(path).items():
            build = service.get("build")
            build_args = build.get("args", {}) if isinstance(build, dict) else {}
            assert set(build_args) <= set(args), f"{path.name}: {name} passes an unknown ARG"
    base_args = services(BASE)["scorer"]["build"]["args"]
    assert base_args["TORCH_INDEX"] == CPU_INDEX, "the base file builds the small CPU image"


def test_dockerfile_copies_files_that_exist_and_the_demo_input() -> None:
    for sources, _ in copies():
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile: COPY {source}: no such file"
    assert "demo-producer" in services(BASE), "no demo producer: the image needs no demo input"
    producer = services(BASE)["demo-producer"]
    command = command_of(producer)
    assert command[0] == "produce", "the demo producer runs `lorastream produce FILE`"
    assert build_context_file(command[-1]) is not None, f"the image has no {command[-1]}"


def test_demo_producer_trains_a_version_of_each_adapter() -> None:
    base = services(BASE)
    assert {"demo-producer", "follow"} <= set(base), "nothing shows the pipeline at work"
    producer, follower = base["demo-producer"], base["follow"]
    for service in (producer, follower):
        assert "demo" in (service.get("profiles") or []), "demo services are in the demo profile"
    assert command_of(follower) == ["adapters", "follow", "--from-beginning"]
    assert producer.get("restart") == "no", "a one-shot producer must not produce again"

    data = build_context_file(command_of(producer)[-1])
    assert data is not None and data.is_file(), f"no demo input at {data}"
    report = validate_file(data)
    assert not report.bad, [error.at_line_of(data) for error in report.bad]
    window = int(
        interpolate(environment_of(base["trainer"]).get("LORASTREAM_WINDOW_SIZE", "16"), {})
    )
    qualifying: dict[str, int] = {}
    for line in data.read_text().splitlines():
        result = GenerationResult.model_validate_json(line)
        if score(result, Thresholds()).qualifies:
            qualifying[result.adapter] = qualifying.get(result.adapter, 0) + 1
    assert len(qualifying) >= 2, f"the demo shows one adapter only: {qualifying}"
    for adapter, count in qualifying.items():
        assert count >= window, f"{adapter}: {count} qualifying results fill no window of {window}"


# ── with a compose CLI, as compose itself resolves the files ─────────────────


def compose_cli() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, check=False
        )
        if version.returncode == 0 and not version.stdout.strip().startswith("1."):
            return command
    return None


def test_compose_cli_resolves_the_files_as_this_test_reads_them() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (docker compose v2 or later) on PATH")

    # As from a shell in the repository with none of the variables the files read.
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LORASTREAM_") and key not in ("UID", "GID")
    }
    environment["PWD"] = str(ROOT)

    def config(*files: Path, profile: str = "demo") -> subprocess.CompletedProcess[str]:
        options = [arg for f in files for arg in ("-f", str(f))]
        return subprocess.run(
            [*cli, *options, "--profile", profile, "config", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=environment,
            check=False,
        )

    alone = config(GPU)
    assert alone.returncode != 0, "the GPU override alone must not start anything"
    assert "undefined service" in alone.stderr, alone.stderr
    for files in ((BASE,), (BASE, GPU)):
        run = config(*files)
        assert run.returncode == 0, run.stderr
        project = json.loads(run.stdout)["services"]
        trainer = project["trainer"]
        adapter_dir = trainer["environment"]["LORASTREAM_ADAPTER_DIR"]
        assert adapter_dir == str(ROOT / "adapters")
        bind = next(v for v in trainer["volumes"] if v["target"] == adapter_dir)
        assert (bind["type"], bind["source"]) == ("bind", adapter_dir)
        index = trainer["build"]["args"]["TORCH_INDEX"]
        assert index == (CUDA_INDEX if GPU in files else CPU_INDEX)
        assert project["scorer"]["build"]["args"]["TORCH_INDEX"] == CPU_INDEX


# ── the monitoring profile ───────────────────────────────────────────────────

PROMETHEUS = ROOT / "docker" / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "lorastream.json"
PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"


def defined_metrics() -> set[str]:
    """Every sample name our metric classes can serve (a counter's ``_total``, a
    histogram's ``_bucket``, ``_sum``, ``_count``)."""
    from lorastream.serving.metrics import ServeMetrics
    from streams.metrics import ScoringMetrics
    from trainer.metrics import ReplayMetrics, TrainerMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for metrics in (ScoringMetrics(), TrainerMetrics(), ReplayMetrics(), ServeMetrics()):
        for family in metrics.registry.collect():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    document = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in document["panels"]
        for target in panel.get("targets", [])
    ]


def test_every_metric_on_the_dashboard_is_one_we_define() -> None:
    defined = defined_metrics()
    exprs = dashboard_exprs()
    used = {(title, name) for title, e in exprs for name in re.findall(r"lorastream_\w+", e)}
    unknown = sorted(f"{title}: {name}" for title, name in used if name not in defined)
    assert not unknown, f"the dashboard queries metrics no stage serves: {unknown}"
    shown = {name for _, name in used}
    for needed in (
        "lorastream_scored_total",
        "lorastream_dead_letters_total",
        "lorastream_adapter_version",
        "lorastream_train_loss",
        "lorastream_step_seconds_bucket",
        "lorastream_consumer_lag",
        "lorastream_pending_events",
        "lorastream_adapter_quarantined_total",
        "lorastream_serve_loads_total",
        "lorastream_serve_refusals_total",
        "lorastream_serve_live_version",
    ):
        assert needed in shown, f"the dashboard has no panel for {needed}"


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    document = json.loads(DASHBOARD.read_text())
    for panel in document["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def test_prometheus_scrapes_every_service_that_serves_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    for name, service in metrics_services().items():
        port = environment_of(service).get("LORASTREAM_METRICS_PORT")
        assert f"{name}:{port}" in targets, f"prometheus.yml does not scrape {name}:{port}"
    assert any(t.endswith(":9102") for t in targets), "serve (port 9102) is not scraped"


def test_the_monitoring_profile_adds_prometheus_and_grafana_only() -> None:
    profiled = {
        name: s for name, s in services(BASE).items() if "monitoring" in (s.get("profiles") or [])
    }
    assert set(profiled) == {"prometheus", "grafana"}
    for name, service in profiled.items():
        for host_ip, _, _ in published(service):
            assert host_ip == "127.0.0.1", f"{name} is published beyond this host's loopback"
        for mount in mounts_of(service):
            source = ROOT / mount["source"]
            assert source.exists(), f"{name} mounts {mount['source']}, which does not exist"
    mounted = {m["target"]: m["source"] for m in mounts_of(profiled["prometheus"])}
    assert Path(mounted["/etc/prometheus/prometheus.yml"]).name == PROMETHEUS.name
    grafana = {m["target"]: m["source"] for m in mounts_of(profiled["grafana"])}
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "lorastream.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert grafana[f"{path}/{DASHBOARD.name}"] == "./docker/grafana/lorastream.json"
    assert grafana["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
