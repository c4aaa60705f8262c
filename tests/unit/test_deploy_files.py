"""The deployment files, checked without a Docker engine or a cluster: each against its
format's schema or linter, and against the code (settings, metrics, commands, time limits)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract.settings import Settings, load_settings
from listing_vision.supervisor import worker_stop_timeout

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS = Path(sys.executable).parent  # check-jsonschema and hadolint come with the dev extras
KUBERNETES = "1.37"
LV_NAME = re.compile(r"\bLV_[A-Z0-9_]+\b")
METRIC = re.compile(r"\blv_[a-z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")


COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_FILES = [COMPOSE, DEPLOY / "compose.gpu-host.yml"]  # the first host; further GPU hosts


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    return dict(compose(path)["services"])


def all_services() -> list[tuple[str, dict[str, Any]]]:
    return [(name, service) for path in COMPOSE_FILES for name, service in services(path).items()]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted((DEPLOY / "k8s").rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def containers(kind: str | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource, container) for every container of a Deployment or Job."""
    found = []
    for _, doc in manifests():
        if doc["kind"] in ("Deployment", "Job") and kind in (None, doc["kind"]):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found.append((doc, container))
    return found


def setting_names() -> set[str]:
    return {f"LV_{name.upper()}" for name in Settings.model_fields}


def interpolated(value: str) -> str:
    """A compose value as compose would fill it from an empty .env: defaults, or a stand-in
    for a required variable."""
    return INTERPOLATION.sub(lambda m: m.group(3) if m.group(2) == "-" else "required", value)


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values


# --- each file against its format ------------------------------------------------------------


def test_every_file_parses() -> None:
    assert compose()["services"]
    assert len(manifests()) >= 8
    for path in (DEPLOY / "prometheus.yml", DEPLOY / "prometheus-rules.yml"):
        assert yaml.safe_load(path.read_text())
    assert json.loads((DEPLOY / "grafana" / "listing-vision.json").read_text())["panels"]


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOOLS / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_the_compose_files_follow_the_compose_specification(path: Path) -> None:
    answer = _check_compose(path)
    assert answer.returncode == 0, answer.stdout + answer.stderr


def test_the_compose_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"  # the check can fail: a misspelt key
    broken.write_text(
        (ROOT / "docker-compose.yml").read_text().replace("    hostname: beat", "    hostnme: beat")
    )
    assert _check_compose(broken).returncode != 0


def test_the_manifests_follow_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    for path, doc in manifests():
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.relative_to(ROOT)}: {error}")
    misspelt = dict(manifests()[0][1], metdata={"name": "x"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES, strict=True)


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOOLS / "hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    answer = _hadolint(DEPLOY / "Dockerfile")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    careless = tmp_path / "Dockerfile"  # the linter can fail: an unpinned base, root, cd
    careless.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install -y python3\n")
    assert _hadolint(careless).returncode != 0


# --- against the code: settings ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".env.example",
        "docker-compose.yml",
        "deploy/Dockerfile",
        *[str(p.relative_to(ROOT)) for p in sorted((DEPLOY / "k8s").rglob("*.yaml"))],
    ],
)
def test_every_lv_variable_is_a_real_setting(path: str) -> None:
    named = set(LV_NAME.findall((ROOT / path).read_text()))
    assert named <= setting_names(), sorted(named - setting_names())


def test_the_deployment_is_configured_by_lv_variables() -> None:
    for path in (".env.example", "docker-compose.yml", "deploy/k8s/config.yaml"):
        assert len(set(LV_NAME.findall((ROOT / path).read_text()))) >= 10, path


def test_the_example_values_and_compose_defaults_are_valid_settings() -> None:
    example = {k: v for k, v in env_example().items() if k.startswith("LV_") and v}
    load_settings(**{k.removeprefix("LV_").lower(): v for k, v in example.items()})
    text = "".join(path.read_text() for path in COMPOSE_FILES)
    for name, kind, default in INTERPOLATION.findall(text):
        if name.startswith("LV_") and kind == "-" and default:
            load_settings(**{name.removeprefix("LV_").lower(): default})
    config = next(doc for _, doc in manifests() if doc["metadata"]["name"] == "listing-vision")
    load_settings(**{k.removeprefix("LV_").lower(): v for k, v in config["data"].items()})


# --- against the code: metrics ---------------------------------------------------------------


def exported() -> tuple[set[str], set[str]]:
    """(family names, sample names) the workers and the exporter serve."""
    from listing_vision.exporter import METRICS
    from worker.metrics import WorkerMetrics

    families, samples = set(METRICS), set(METRICS)
    for family in WorkerMetrics("m").registry.collect():
        families.add(family.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}
        samples.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return families, samples


def referenced(path: Path) -> set[str]:
    return set(METRIC.findall(path.read_text()))


@pytest.mark.parametrize(
    "path",
    [
        "deploy/grafana/listing-vision.json",
        "deploy/prometheus-rules.yml",
        "deploy/k8s/examples/worker-autoscaling.yaml",
    ],
)
def test_every_metric_queried_is_a_series_the_code_exports(path: str) -> None:
    _, samples = exported()
    names = referenced(ROOT / path)
    assert names, path
    assert names <= samples, sorted(names - samples)


@pytest.mark.parametrize("path", ["deploy/README.md", "docs/operations.md"])
def test_every_metric_the_docs_name_exists(path: str) -> None:
    families, samples = exported()
    names = referenced(ROOT / path) - {"lv_stats"}  # a Celery control command, not a metric
    assert names <= families | samples, sorted(names - families - samples)


def test_the_dashboard_shows_every_metric() -> None:
    families, _ = exported()
    dashboard = json.loads((DEPLOY / "grafana" / "listing-vision.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all(exprs)
    shown = {family for family in families if any(family in expr for expr in exprs)}
    assert shown == families, sorted(families - shown)


def test_prometheus_scrapes_every_worker_and_the_exporter() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {"exporter:9808"}
    for name, service in services().items():
        if name.startswith("worker-"):
            expected.add(f"{service['hostname']}:{service['environment']['LV_METRICS_PORT']}")
    assert expected == targets
    assert services()["exporter"]["environment"]["LV_EXPORTER_PORT"] == "9808"


# --- against the code: commands and time limits ----------------------------------------------


def parse(argv: list[str]) -> None:
    """Parse a `listing-vision` command line as the CLI would (options, their types), without
    running it."""
    from typer.main import get_command

    from listing_vision import health_command, run_commands  # noqa: F401  (register)
    from listing_vision.cli import app

    name, *rest = argv
    commands = get_command(app).commands  # type: ignore[attr-defined]
    assert name in commands, f"no command {name!r}"
    commands[name].make_context(name, list(rest))


def command_lines() -> list[list[str]]:
    """Every listing-vision command line the deployment runs: container commands (the image's
    entry point is `listing-vision`) and health checks."""
    lines = []
    for _, service in all_services():
        if "listing-vision" not in str(service.get("image", "")):
            continue
        lines.append([interpolated(part) for part in service["command"]])
        test = service.get("healthcheck", {}).get("test", [])
        if test[1:2] == ["listing-vision"]:
            lines.append([interpolated(part) for part in test[2:]])
    for _, container in containers():
        lines.append(container["args"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            if command:
                assert command[0] == "listing-vision"
                lines.append(command[1:])
    return lines


def test_every_command_and_health_check_is_a_real_cli_command() -> None:
    lines = command_lines()
    assert any(line[0] == "health" for line in lines)
    for line in lines:
        parse(line)
    from typer.exceptions import TyperException

    for wrong in (["health", "--no-such-option"], ["health", "--stall", "soon"]):
        with pytest.raises(TyperException):  # the check can fail
            parse(wrong)


def test_compose_and_kubernetes_check_health_with_listing_vision_health() -> None:
    for name, service in all_services():
        if name.startswith("worker-") or name == "beat":
            test = service["healthcheck"]["test"]
            assert test[1:3] == ["listing-vision", "health"], name
    for doc, container in containers("Deployment"):
        if container["args"][0] in ("worker", "beat"):
            probe = container["livenessProbe"]["exec"]["command"]
            assert probe[:2] == ["listing-vision", "health"], doc["metadata"]["name"]


def _seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def test_a_stopping_worker_has_time_for_its_longest_attempt() -> None:
    config = next(doc for _, doc in manifests() if doc["metadata"]["name"] == "listing-vision")
    configured = load_settings(
        **{k.removeprefix("LV_").lower(): v for k, v in config["data"].items()}
    )
    defaults = load_settings()
    workers = [(d, c) for d, c in containers("Deployment") if c["args"][0] == "worker"]
    assert workers
    for doc, _ in workers:
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > defaults.task_time_limit
        assert grace >= worker_stop_timeout(defaults)
        assert grace >= worker_stop_timeout(configured)
    for name, service in all_services():
        if name.startswith("worker-"):
            assert _seconds(service["stop_grace_period"]) >= worker_stop_timeout(defaults), name


# --- what the issue asks of each file ---------------------------------------------------------


def test_compose_runs_the_whole_stack_as_the_issue_asks() -> None:
    found = services()
    redis = " ".join(found["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert "pgvector" in found["postgres"]["image"]
    assert found["migrate"]["command"] == ["migrate"] and found["migrate"]["restart"] == "no"
    workers = [(n, s) for n, s in all_services() if n.startswith("worker-")]
    assert len(workers) >= 4  # two on the first host, two on a further GPU host
    for name, service in workers:
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and len(device["device_ids"]) == 1, name
        assert service["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
        assert "--model" in service["command"] and "--gpu" in service["command"]
    for name, service in found.items():
        if "listing-vision" in str(service.get("image", "")) and name != "migrate":
            after = service["depends_on"]["migrate"]["condition"]
            assert after == "service_completed_successfully", name
    flower = found["flower"]
    assert flower["command"][:3] == ["flower", "--address", "0.0.0.0"]
    for variable in ("LV_FLOWER_USER", "LV_FLOWER_PASSWORD"):
        assert ":?" in flower["environment"][variable]  # compose refuses to start without it
    assert found["exporter"]["command"][0] == "exporter"
    assert found["beat"]["command"] == ["beat"]


def test_kubernetes_has_a_gpu_worker_per_model_one_beat_flower_and_the_exporter() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}
    workers = [(d, c) for d, c in containers("Deployment") if c["args"][0] == "worker"]
    for doc, container in workers:
        model = container["args"][container["args"].index("--model") + 1]
        assert doc["metadata"]["labels"]["listing-vision/model"] == model
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert f"--model {model}" in " ".join(container["livenessProbe"]["exec"]["command"])
    beat = kinds[("Deployment", "lv-beat")]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert ("Deployment", "lv-flower") in kinds and ("Deployment", "lv-exporter") in kinds
    assert ("Job", "listing-vision-migrate") in kinds
    secret = kinds[("Secret", "listing-vision-secrets")]["stringData"]
    assert {"LV_FLOWER_USER", "LV_FLOWER_PASSWORD"} <= set(secret)
    hpa = kinds[("HorizontalPodAutoscaler", "lv-worker-clip-vit-b32")]["spec"]
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "lv_queue_messages"


def test_the_image_runs_as_a_user_on_a_cuda_runtime_without_weights() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text)
    (user,) = [line for line in lines if line.startswith("USER ")]
    assert not re.match(r"USER (root|0)\b", user)
    assert 'VOLUME ["/models"]' in text
    fetching = re.compile(r"huggingface-cli|snapshot_download|from_pretrained|wget|curl|\.pt\b")
    assert not [line for line in lines if fetching.search(line)]
    assert shutil.which("hadolint", path=str(TOOLS))
