"""Realistic pod objects for tests and benchmarks, without randomness.

``make_pod`` builds a pod as the API server returns it from a GET: an nginx
Deployment pod (or a Job pod once it has finished), about 6 KB of compact JSON,
with fields in the API server's order (Go struct order, not alphabetical),
managedFields for kube-controller-manager and kubelet, a projected
service-account token volume, the default tolerations, and a status that
matches the asked-for phase and health. Everything in it (uid, timestamps, IPs,
container IDs) derives from the arguments, so equal arguments give equal pods.

``generate`` yields many such pods quickly (150,000 for the benchmark).
"""

import datetime
import hashlib
import json
import re

EPOCH = datetime.datetime(2025, 1, 6, 9, 0, 0, tzinfo=datetime.UTC)
NAMESPACES = ("default", "kube-system", "monitoring", "payments", "search", "web")
IMAGE = "nginx:1.27.3"
INIT_IMAGE = "busybox:1.36.1"
JOB_IMAGE = "python:3.11-slim"
TOKEN_VOLUME_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' SafeEncodeString alphabet
SUFFIX_MULTIPLIER = 7_368_787  # coprime with 27**5, so _suffix is one-to-one
PHASES = ("Running", "Pending", "Succeeded", "Failed")


def _digest(*parts):
    """A stable SHA-256 hex digest of the parts."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _uid(digest):
    """A UUID-shaped string from a digest."""
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


def _safe(digest, length):
    """Characters of the Kubernetes name-suffix alphabet, from a digest."""
    value = int(digest[:24], 16)
    chars = []
    for _ in range(length):
        value, index = divmod(value, len(HASH_ALPHABET))
        chars.append(HASH_ALPHABET[index])
    return "".join(chars)


def _suffix(i):
    """A distinct 5-character pod-name suffix for each i below 27**5."""
    value = (i * SUFFIX_MULTIPLIER) % len(HASH_ALPHABET) ** 5
    chars = []
    for _ in range(5):
        value, index = divmod(value, len(HASH_ALPHABET))
        chars.append(HASH_ALPHABET[index])
    return "".join(chars)


def _time(seconds):
    """An RFC 3339 UTC timestamp, seconds after EPOCH."""
    return (EPOCH + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _split_name(name, digest):
    """The app name and pod-template-hash behind a Deployment pod name."""
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and 8 <= len(parts[1]) <= 10 and len(parts[2]) == 5:
        return parts[0], parts[1]
    return name, _safe(digest, 10)


def _condition(kind, status, at, reason=None, message=None):
    condition = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": at}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _conditions_fields(kinds):
    return {
        f'k:{{"type":"{kind}"}}': {
            ".": {},
            "f:lastProbeTime": {},
            "f:lastTransitionTime": {},
            "f:message": {},
            "f:reason": {},
            "f:status": {},
            "f:type": {},
        }
        for kind in kinds
    }


def _container_fields(name, ports):
    fields = {
        ".": {},
        "f:env": {".": {}, 'k:{"name":"NGINX_PORT"}': {".": {}, "f:name": {}, "f:value": {}}},
        "f:image": {},
        "f:imagePullPolicy": {},
        "f:livenessProbe": {
            ".": {},
            "f:failureThreshold": {},
            "f:httpGet": {".": {}, "f:path": {}, "f:port": {}, "f:scheme": {}},
            "f:periodSeconds": {},
            "f:successThreshold": {},
            "f:timeoutSeconds": {},
        },
        "f:name": {},
        "f:readinessProbe": {
            ".": {},
            "f:failureThreshold": {},
            "f:httpGet": {".": {}, "f:path": {}, "f:port": {}, "f:scheme": {}},
            "f:periodSeconds": {},
            "f:successThreshold": {},
            "f:timeoutSeconds": {},
        },
        "f:resources": {
            ".": {},
            "f:limits": {".": {}, "f:memory": {}},
            "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}},
        },
        "f:terminationMessagePath": {},
        "f:terminationMessagePolicy": {},
    }
    if ports:
        fields["f:ports"] = {
            ".": {},
            'k:{"containerPort":80,"protocol":"TCP"}': {
                ".": {},
                "f:containerPort": {},
                "f:name": {},
                "f:protocol": {},
            },
        }
    return {f'k:{{"name":"{name}"}}': fields}


def _probe(path):
    return {
        "httpGet": {"path": path, "port": 80, "scheme": "HTTP"},
        "timeoutSeconds": 1,
        "periodSeconds": 10,
        "successThreshold": 1,
        "failureThreshold": 3,
    }


def make_pod(
    namespace,
    name,
    *,
    phase="Running",
    healthy=True,
    init_container=False,
    resource_version="1",
    node="worker-1",
    image=IMAGE,
    restarts=None,
):
    """A realistic pod dict, as ``GET /api/v1/namespaces/NS/pods/NAME`` returns it.

    ``phase`` is Running or Pending (an nginx Deployment pod), Succeeded or
    Failed (a finished Job pod). ``healthy=False`` on a Running pod gives a
    container waiting in CrashLoopBackOff, Ready and ContainersReady False.
    ``init_container`` adds an init container (terminated, exit code 0, once
    the pod has started). ``restarts`` defaults to 0, or 5 when unhealthy.
    """
    shape = _shape(phase, healthy, init_container, node, image, restarts)
    ident = _identity(namespace, name, resource_version, shape)
    return {"apiVersion": "v1", "kind": "Pod", **_build(ident, shape)}


def _shape(phase, healthy, init_container, node, image, restarts):
    """The arguments of make_pod that are not the pod's identity, checked."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    crash = phase == "Running" and not healthy
    if restarts is None:
        restarts = 5 if crash else 0
    return (phase, crash, init_container, node, image, restarts)


def _identity(namespace, name, resource_version, shape):
    """The strings that differ between pods of one shape, derived from the name."""
    phase, _, init_container, _, _, _ = shape
    digest = _digest(namespace, name)
    offset = int(digest[32:38], 16) % (86400 * 30)
    ident = {
        "namespace": namespace,
        "name": name,
        "uid": _uid(digest),
        "resource_version": str(resource_version),
        "created": _time(offset),
        "restarted_at": _time(offset - 3600),
        "started": _time(offset + 1),
        "running_since": _time(offset + 3 + (2 if init_container else 0)),
        "pod_ip": f"10.244.{int(digest[38:40], 16)}.{int(digest[40:42], 16) % 254 + 1}",
        "host_ip": f"172.18.0.{int(digest[42:44], 16) % 16 + 2}",
        "token_volume": f"kube-api-access-{_safe(digest[24:], 5)}",
        "container_id": f"containerd://{_digest('container', digest)}",
        "last_container_id": f"containerd://{_digest('last', digest)}",
        "init_container_id": f"containerd://{_digest('init', digest)}",
    }
    if phase in ("Succeeded", "Failed"):
        app = name.rsplit("-", 1)[0] if "-" in name else name
        ident.update(
            app=app,
            owner_name=app,
            owner_hash="",
            generate_name=f"{app}-",
            owner_uid=_uid(_digest("job", namespace, app)),
        )
    else:
        app, owner_hash = _split_name(name, digest)
        owner_name = f"{app}-{owner_hash}"
        ident.update(
            app=app,
            owner_name=owner_name,
            owner_hash=owner_hash,
            generate_name=f"{owner_name}-",
            owner_uid=_uid(_digest("replicaset", namespace, owner_name)),
        )
    return ident


def _build(ident, shape):
    """The pod (without apiVersion/kind) of this identity and shape."""
    phase, crash, init_container, node, image, restarts = shape
    is_job = phase in ("Succeeded", "Failed")
    name, namespace, app = ident["name"], ident["namespace"], ident["app"]
    created = ident["created"]
    running_since, pod_ip = ident["running_since"], ident["pod_ip"]
    owner_name, owner_uid = ident["owner_name"], ident["owner_uid"]
    token_volume = ident["token_volume"]
    container_name = "worker" if is_job else "nginx"
    container_image = JOB_IMAGE if is_job else image
    if is_job:
        owner_kind, owner_api = "Job", "batch/v1"
        labels = {
            "batch.kubernetes.io/controller-uid": owner_uid,
            "batch.kubernetes.io/job-name": app,
            "controller-uid": owner_uid,
            "job-name": app,
        }
    else:
        owner_kind, owner_api = "ReplicaSet", "apps/v1"
        labels = {"app": app, "pod-template-hash": ident["owner_hash"]}

    controller_fields = {
        "f:metadata": {
            "f:generateName": {},
            "f:labels": {".": {}, **{f"f:{k}": {} for k in labels}},
            "f:ownerReferences": {".": {}, f'k:{{"uid":"{owner_uid}"}}': {}},
        },
        "f:spec": {
            "f:containers": _container_fields(container_name, not is_job),
            "f:dnsPolicy": {},
            "f:enableServiceLinks": {},
            "f:restartPolicy": {},
            "f:schedulerName": {},
            "f:securityContext": {},
            "f:terminationGracePeriodSeconds": {},
        },
    }
    if init_container:
        controller_fields["f:spec"]["f:initContainers"] = _container_fields("init-config", False)
    condition_kinds = ["ContainersReady", "Initialized", "PodReadyToStartContainers", "Ready"]
    kubelet_status = {
        "f:conditions": _conditions_fields(condition_kinds),
        "f:containerStatuses": {},
        "f:hostIP": {},
        "f:hostIPs": {},
        "f:phase": {},
        "f:podIP": {},
        "f:podIPs": {".": {}, f'k:{{"ip":"{pod_ip}"}}': {".": {}, "f:ip": {}}},
        "f:startTime": {},
    }
    if init_container:
        kubelet_status["f:initContainerStatuses"] = {}

    metadata = {
        "name": name,
        "generateName": ident["generate_name"],
        "namespace": namespace,
        "uid": ident["uid"],
        "resourceVersion": ident["resource_version"],
        "creationTimestamp": created,
        "labels": labels,
        "annotations": {
            "kubectl.kubernetes.io/restartedAt": ident["restarted_at"],
            "prometheus.io/port": "9113",
            "prometheus.io/scrape": "true",
        },
        "ownerReferences": [
            {
                "apiVersion": owner_api,
                "kind": owner_kind,
                "name": owner_name,
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        "managedFields": [
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "apiVersion": "v1",
                "time": created,
                "fieldsType": "FieldsV1",
                "fieldsV1": controller_fields,
            },
            {
                "manager": "kubelet",
                "operation": "Update",
                "apiVersion": "v1",
                "time": running_since,
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": kubelet_status},
                "subresource": "status",
            },
        ],
    }
    if is_job:
        del metadata["annotations"]

    mount = {"name": token_volume, "readOnly": True, "mountPath": TOKEN_VOLUME_MOUNT}
    container = {
        "name": container_name,
        "image": container_image,
        "env": [{"name": "NGINX_PORT", "value": "80"}],
        "resources": {
            "limits": {"memory": "256Mi"},
            "requests": {"cpu": "100m", "memory": "128Mi"},
        },
        "volumeMounts": [mount],
        "livenessProbe": _probe("/healthz"),
        "readinessProbe": _probe("/ready"),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    if is_job:
        container["command"] = ["python", "-c", "print('done')"]
        container["env"] = [{"name": "JOB_NAME", "value": app}]
    else:
        container = {
            "name": container_name,
            "image": container_image,
            "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
            **{k: v for k, v in container.items() if k not in ("name", "image")},
        }
    spec = {
        "volumes": [
            {
                "name": token_volume,
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        ],
        "containers": [container],
        "restartPolicy": "Never" if is_job else "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "nodeName": node,
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    if init_container:
        init = {
            "name": "init-config",
            "image": INIT_IMAGE,
            "command": ["sh", "-c", "cp /config/* /work/"],
            "resources": {},
            "volumeMounts": [mount],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        }
        volumes = spec.pop("volumes")
        spec = {"volumes": volumes, "initContainers": [init], **spec}

    status = _status(ident, shape, container_name, container_image, mount)
    return {"metadata": metadata, "spec": spec, "status": status}


def _status(ident, shape, container_name, container_image, mount):
    """The kubelet's status for a pod in this phase and health."""
    phase, crash, init_container, _, _, restarts = shape
    created, started, running_since = ident["created"], ident["started"], ident["running_since"]
    pod_ip, host_ip = ident["pod_ip"], ident["host_ip"]
    ready = phase == "Running" and not crash
    done = phase in ("Succeeded", "Failed")
    pending = phase == "Pending"
    unready = f"containers with unready status: [{container_name}]"
    if ready:
        not_ready = {}
    elif done:
        not_ready = {"reason": "PodCompleted"}
    else:
        not_ready = {"reason": "ContainersNotReady", "message": unready}
    conditions = [
        _condition("PodReadyToStartContainers", "False" if pending or done else "True", started),
        _condition("Initialized", "True", started if not init_container else running_since),
        _condition("Ready", "True" if ready else "False", running_since, **not_ready),
        _condition("ContainersReady", "True" if ready else "False", running_since, **not_ready),
        _condition("PodScheduled", "True", created),
    ]
    status_mount = {**mount, "recursiveReadOnly": "Disabled"}
    image_digest = _digest("image", container_image)
    image_id = f"docker.io/library/{container_image.split(':')[0]}@sha256:{image_digest}"
    if phase == "Running" and not crash:
        state, last_state = {"running": {"startedAt": running_since}}, {}
    elif crash:
        state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off 2m40s restarting failed container={container_name} "
                f"pod={ident['name']}_{ident['namespace']}({ident['uid']})",
            }
        }
        last_state = {
            "terminated": {
                "exitCode": 1,
                "reason": "Error",
                "startedAt": running_since,
                "finishedAt": running_since,
                "containerID": ident["last_container_id"],
            }
        }
    elif pending:
        state, last_state = {"waiting": {"reason": "ContainerCreating"}}, {}
    else:
        code = 0 if phase == "Succeeded" else 1
        state = {
            "terminated": {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": running_since,
                "finishedAt": running_since,
                "containerID": ident["container_id"],
            }
        }
        last_state = {}
    container_status = {
        "name": container_name,
        "state": state,
        "lastState": last_state,
        "ready": ready,
        "restartCount": restarts,
        "image": f"docker.io/library/{container_image}",
        "imageID": "" if pending else image_id,
    }
    if not pending:
        container_status["containerID"] = ident["container_id"]
    container_status["started"] = ready
    container_status["volumeMounts"] = [status_mount]
    status = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
    }
    if not pending:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    status["startTime"] = started
    if init_container:
        status["initContainerStatuses"] = [
            {
                "name": "init-config",
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": started,
                        "finishedAt": running_since,
                        "containerID": ident["init_container_id"],
                    }
                },
                "lastState": {},
                "ready": True,
                "restartCount": 0,
                "image": f"docker.io/library/{INIT_IMAGE}",
                "imageID": f"docker.io/library/busybox@sha256:{_digest('image', INIT_IMAGE)}",
                "containerID": ident["init_container_id"],
                "started": False,
                "volumeMounts": [status_mount],
            }
        ]
    status["containerStatuses"] = [container_status]
    status["qosClass"] = "Burstable"
    return status


def _names(n, namespaces, apps_per_namespace, start):
    """(i, namespace, name) of the pods that generate() makes."""
    for i in range(start, start + n):
        namespace = namespaces[i % len(namespaces)]
        app = f"app-{(i // len(namespaces)) % apps_per_namespace:03d}"
        yield i, namespace, f"{app}-{_safe(_digest(namespace, app), 10)}-{_suffix(i)}"


def _is_healthy(i, unhealthy_every):
    return not (unhealthy_every and i % unhealthy_every == unhealthy_every - 1)


def generate(n, namespaces=NAMESPACES, *, apps_per_namespace=50, unhealthy_every=0, start=0):
    """Yield ``n`` Running Deployment pods (dicts) spread over ``namespaces``.

    Pod i is in namespace ``i % len(namespaces)``, belongs to one of
    ``apps_per_namespace`` Deployments there and has resourceVersion i + 1;
    with ``unhealthy_every=k`` every k-th pod crash-loops. ``start`` offsets
    i, to make further pods. Names are distinct for i below 27**5.
    """
    for i, namespace, name in _names(n, namespaces, apps_per_namespace, start):
        yield make_pod(
            namespace, name, healthy=_is_healthy(i, unhealthy_every), resource_version=str(i + 1)
        )


def generate_items(n, namespaces=NAMESPACES, *, apps_per_namespace=50, unhealthy_every=0, start=0):
    """Yield the pods of ``generate`` as ``(namespace, name, bytes)``, fast.

    The bytes are the pod as a PodList item: compact JSON without
    ``apiVersion``/``kind``, ready for ``FakeKubeAPI.load_items``. They are
    filled into a template per shape instead of built and serialised, about
    ten times faster than ``generate``.
    """
    templates = {}
    for i, namespace, name in _names(n, namespaces, apps_per_namespace, start):
        shape = _shape("Running", _is_healthy(i, unhealthy_every), False, "worker-1", IMAGE, None)
        ident = _identity(namespace, name, str(i + 1), shape)
        parts = templates.get(shape)
        if parts is None:
            parts = templates[shape] = _template(ident, shape)
        yield (
            namespace,
            name,
            "".join([part if j % 2 == 0 else ident[part] for j, part in enumerate(parts)]).encode(),
        )


def _template(ident, shape):
    """A pod of this shape as compact JSON split around its identity's fields.

    Even entries are literal text, odd entries are keys of the identity. The
    identity's values must need no JSON escaping (true of generated names).
    """
    marks = {key: f"@@{key}@@" for key in ident}
    text = json.dumps(_build(marks, shape), separators=(",", ":"), ensure_ascii=False)
    return re.split(r"@@(\w+)@@", text)


def pod_size(pod):
    """The size of a pod in compact JSON, in bytes."""
    return len(json.dumps(pod, separators=(",", ":")).encode())
