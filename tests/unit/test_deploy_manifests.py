"""The deployment files in deploy/, checked without a container engine or a cluster.

- Every Kubernetes manifest in deploy/k8s/ is validated against the Kubernetes JSON schemas that
  the `kubernetes-validate` package ships (strict: no unknown fields), for the oldest Kubernetes
  version Tandem supports and the newest the package knows.
- The CloudNativePG `Cluster` is a custom resource, in none of those schemas: it is checked
  structurally (apiVersion, kind, the fields this deployment relies on), and the Secret the
  operator generates from it is the one the pods read DATABASE_URL from.
- What the schemas cannot know: each Deployment has its probes and resources, every API a
  Service and an autoscaler, every runner Deployment two replicas in runner mode, and every
  environment variable a pod gets (directly or from a ConfigMap or Secret) names a setting of
  that service's settings class; secret values are placeholders.
- deploy/compose.yaml: the services, their healthchecks on /readyz, runner containers, the
  collector and the trace viewer, and the same check of environment names against settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.common.settings import REPO_ROOT, ServiceSettings
from services.gateway.settings import GatewaySettings
from services.goals.settings import GoalsSettings
from services.metrics.settings import MetricsSettings

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS: dict[str, type[ServiceSettings]] = {"goals": GoalsSettings, "metrics": MetricsSettings,
                                              "gateway": GatewaySettings}
PORTS = {"goals": 8001, "metrics": 8002, "gateway": 8000}
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
CRD_KINDS = {("postgresql.cnpg.io/v1", "Cluster")}
PLACEHOLDER = "change-me"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
SERVICE_MODULE = re.compile(r"^services\.(goals|metrics|gateway)\.main$")


def setting_names(settings_class: type[ServiceSettings]) -> set[str]:
    """The environment variables a settings class reads: TANDEM_ + the field's name, or the
    field's alias (DATABASE_URL, OTEL_EXPORTER_OTLP_ENDPOINT)."""
    prefix = settings_class.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        names.add((alias if isinstance(alias, str) else prefix + name).upper())
    return names


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = load_all()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in of_kind(kind)}


def service_of(command: list[str]) -> str:
    """The service a container runs, from `python -m services.<service>.main ...`."""
    assert command[:2] == ["python", "-m"], command
    match = SERVICE_MODULE.match(command[2])
    assert match, command
    return match.group(1)


def is_runner(command: list[str]) -> bool:
    return "--projections-only" in command


def deployment_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(d, c) for d in of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


# Kubernetes ------------------------------------------------------------------------------

def test_there_are_manifests_and_kustomize_lists_them_all() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    namespace = kustomization["namespace"]
    for path, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, (path.name, doc["metadata"]["name"])
    assert namespace in by_name("Namespace")
    images = {c["image"] for _, c in deployment_containers()}
    assert images == {i["name"] for i in kustomization["images"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path, doc", [pytest.param(p, d, id=f"{p.name}:{d['kind']}/{d['metadata']['name']}")
                                       for p, d in DOCS if (d["apiVersion"], d["kind"]) not in CRD_KINDS])
def test_each_manifest_is_valid_against_the_kubernetes_schema(path: Path, doc: dict[str, Any], version: str) -> None:
    """Custom resources are left to test_the_postgres_cluster_is_a_cloudnativepg_cluster."""
    assert kubernetes_validate.validate(doc, version, strict=True)


def test_an_invalid_manifest_is_caught() -> None:
    """The validation above is not vacuous: a misspelt field and a wrong type both fail."""
    deployment = yaml.safe_load((K8S / "goals.yaml").read_text().split("\n---\n")[0])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    service = by_name("Service")["goals"]
    broken = {**service, "spec": {**service["spec"], "ports": [{"port": "eight thousand"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_postgres_cluster_is_a_cloudnativepg_cluster() -> None:
    """CloudNativePG's Cluster (postgresql.cnpg.io/v1), checked for the fields its CRD requires
    or this deployment relies on, and the generated Secret `<cluster>-app` (key `uri`) is where
    every pod's DATABASE_URL comes from."""
    clusters = [doc for _, doc in DOCS if (doc["apiVersion"], doc["kind"]) in CRD_KINDS]
    assert len(clusters) == 1
    cluster = clusters[0]
    assert set(cluster) == {"apiVersion", "kind", "metadata", "spec"}
    spec = cluster["spec"]
    assert isinstance(spec["instances"], int) and spec["instances"] >= 2  # a replica to fail over to
    assert QUANTITY.match(spec["storage"]["size"])
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"]
    for value in spec.get("postgresql", {}).get("parameters", {}).values():
        assert isinstance(value, str)  # the CRD types every parameter as a string
    for section in ("requests", "limits"):
        for value in spec.get("resources", {}).get(section, {}).values():
            assert QUANTITY.match(str(value))
    generated = f"{cluster['metadata']['name']}-app"
    for deployment, container in deployment_containers():
        database_url = next(e for e in container["env"] if e["name"] == "DATABASE_URL")
        assert database_url["valueFrom"]["secretKeyRef"] == {"name": generated, "key": "uri"}, \
            deployment["metadata"]["name"]


def test_every_deployment_has_probes_resources_and_a_matching_selector() -> None:
    for deployment, container in deployment_containers():
        name = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": PORTS[service_of(container["command"])]}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        for section in ("requests", "limits"):
            assert set(container["resources"][section]) == {"cpu", "memory"}, name
            assert all(QUANTITY.match(str(v)) for v in container["resources"][section].values()), name
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_every_api_has_a_service_and_an_autoscaler_and_runs_no_projection() -> None:
    services, autoscalers = of_kind("Service"), of_kind("HorizontalPodAutoscaler")
    apis = [(d, c) for d, c in deployment_containers() if not is_runner(c["command"])]
    assert sorted(service_of(c["command"]) for _, c in apis) == sorted(SETTINGS)
    for deployment, container in apis:
        name = deployment["metadata"]["name"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TANDEM_RUN_PROJECTIONS"] == "false", name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert len(matching) == 1, name
        assert [p["targetPort"] for p in matching[0]["spec"]["ports"]] == ["http"]
        scaling = [h for h in autoscalers if h["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": name}]
        assert len(scaling) == 1, name
        assert scaling[0]["apiVersion"] == "autoscaling/v2"
        assert 1 <= scaling[0]["spec"]["minReplicas"] <= scaling[0]["spec"]["maxReplicas"]


def test_every_service_has_a_runner_deployment_with_a_standby() -> None:
    runners = [(d, c) for d, c in deployment_containers() if is_runner(c["command"])]
    assert sorted(service_of(c["command"]) for _, c in runners) == sorted(SETTINGS)
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind("HorizontalPodAutoscaler")}
    for deployment, container in runners:
        name = deployment["metadata"]["name"]
        assert deployment["spec"]["replicas"] == 2, name  # one holds the lock, one stands by
        assert name not in scaled, name  # more replicas would only stand by too
        assert "TANDEM_RUN_PROJECTIONS" not in {e["name"] for e in container["env"]}, name
        # The runners verify no token: they get no signing secret.
        assert all("secretRef" not in source for source in container.get("envFrom", [])), name


def test_every_environment_variable_a_pod_gets_is_a_setting_of_its_service() -> None:
    config_maps, secrets = by_name("ConfigMap"), by_name("Secret")
    for deployment, container in deployment_containers():
        service = service_of(container["command"])
        allowed = setting_names(SETTINGS[service])
        names = {e["name"] for e in container["env"]}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                names |= set(config_maps[source["configMapRef"]["name"]]["data"])
            else:
                secret = secrets[source["secretRef"]["name"]]
                names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
        unknown = names - allowed
        assert not unknown, f"{deployment['metadata']['name']}: {sorted(unknown)} are not settings of {service}"
        assert "DATABASE_URL" in names and "TANDEM_PORT" in names


def test_secrets_hold_only_placeholders() -> None:
    secrets = of_kind("Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret, secret["metadata"]["name"]
        assert secret["stringData"] and set(secret["stringData"].values()) == {PLACEHOLDER}
    text = (K8S / "secrets.yaml").read_text()
    assert "PLACEHOLDERS, NOT SECRETS" in text


# Compose ---------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
TANDEM_CONTAINERS = {name: s for name, s in COMPOSE["services"].items()
                     if s.get("command", [None])[0] == "python"}


def test_compose_runs_the_whole_stack() -> None:
    services = COMPOSE["services"]
    assert set(TANDEM_CONTAINERS) == {"goals", "metrics", "gateway", "goals-projections",
                                      "metrics-projections", "gateway-projections"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services), name
    build = TANDEM_CONTAINERS["goals"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_every_tandem_container_has_a_readyz_healthcheck_on_its_port() -> None:
    for name, service in TANDEM_CONTAINERS.items():
        command = service["command"]
        svc = service_of(command)
        assert is_runner(command) == name.endswith("-projections"), name
        port = service["environment"]["TANDEM_PORT"]
        assert port == str(PORTS[svc]), name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[-1] == f"http://127.0.0.1:{port}/readyz", name
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}, name
        if not is_runner(command):
            assert service["environment"]["TANDEM_RUN_PROJECTIONS"] == "false", name
            assert service["ports"] == [f"{port}:{port}"], name


def test_every_compose_environment_variable_is_a_setting_of_its_service() -> None:
    for name, service in TANDEM_CONTAINERS.items():
        svc = service_of(service["command"])
        unknown = set(service["environment"]) - setting_names(SETTINGS[svc])
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of {svc}"


def test_compose_sends_traces_through_the_collector_to_jaeger() -> None:
    services = COMPOSE["services"]
    for name, service in TANDEM_CONTAINERS.items():
        assert service["environment"]["TANDEM_TELEMETRY_EXPORTER"] == "otlp", name
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
    mount = services["otel-collector"]["volumes"][0].split(":")
    config = yaml.safe_load((DEPLOY / mount[0]).read_text())
    assert f"--config={mount[1]}" in services["otel-collector"]["command"]
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    exporters = [config["exporters"][e] for e in traces["exporters"]]
    assert any(e.get("endpoint") == "jaeger:4317" for e in exporters)
    for pipeline in config["service"]["pipelines"].values():
        assert set(pipeline["processors"]) <= set(config["processors"])
        assert set(pipeline["exporters"]) <= set(config["exporters"])


def test_the_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), source


# The runner mode the manifests start -----------------------------------------------------

@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_projections_only_serves_health_and_readiness_alone(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m services.<service>.main --projections-only` builds the runner app (only
    /healthz and /readyz) on the service's port; without the flag, the API."""
    import importlib

    from services.common import runner

    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("TANDEM_TELEMETRY_EXPORTER", "none")
    served: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(runner.uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    main = importlib.import_module(f"services.{service}.main")
    monkeypatch.setattr("sys.argv", ["main", "--projections-only"])
    main.main()
    app, options = served[-1]
    assert options["port"] == PORTS[service]
    assert [getattr(r, "path", None) for r in app.routes] == ["/healthz", "/readyz"]
    monkeypatch.setattr("sys.argv", ["main"])
    main.main()
    api, _ = served[-1]
    assert api.openapi_url is not None and api.openapi()["paths"]  # the API: /v1/... or /graphql
    monkeypatch.setenv("TANDEM_RUN_API", "false")
    main.main()
    app, _ = served[-1]
    assert [getattr(r, "path", None) for r in app.routes] == ["/healthz", "/readyz"]
