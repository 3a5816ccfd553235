"""infra/: the KubeRay and Kubernetes manifests validate against their schemas (Kubernetes' own, via
kubernetes-validate; KubeRay's CRDs, vendored from KubeRay v1.7.0) and say what the deployment needs; the
Dockerfile passes a lint of the rules this image must keep, and its entrypoint runs a real job here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import encode, photo
from pipeline.job.config import load_job

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "infra" / "kuberay"
KUBERNETES_VERSION = "1.33"
RAY_SCHEMAS = {"RayJob": "rayjob-v1.json", "RayCluster": "raycluster-v1.json"}


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}", doc))
    return found


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not define. A CRD's structural schema silently prunes them on the server, so a typo
    (`minReplica`) would be lost without an error: catch it here."""
    found = []
    if isinstance(doc, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, value in doc.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in schema:
                found.append(f"{path}.{key}")
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in doc.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize("name, doc", manifests(), ids=[name for name, _ in manifests()])
def test_manifest_validates_against_its_schema(name, doc):
    if doc["kind"] in RAY_SCHEMAS:
        schema = json.loads((KUBERAY / "schemas" / RAY_SCHEMAS[doc["kind"]]).read_text())
        jsonschema.validate(doc, schema)
        assert unknown_fields(doc, schema) == []
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_typo_in_a_ray_manifest_is_caught():
    doc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][1]["minReplica"] = 0
    schema = json.loads((KUBERAY / "schemas" / "raycluster-v1.json").read_text())
    assert unknown_fields(doc, schema) == [".spec.workerGroupSpecs[1].minReplica"]
    doc["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_the_nightly_rayjob_runs_the_same_cluster_as_raycluster():
    (job,), (cluster,) = by_kind("RayJob"), by_kind("RayCluster")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and "generateName" in job["metadata"]


def test_cluster_shape():
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"].startswith(re.search(r'"ray\[[^\]]*\]==([\d.]+)', (ROOT / "pyproject.toml").read_text())[1].rstrip("*."))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver lives there, the actors do not
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and gpu["rayStartParams"]["num-gpus"] == "1"
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for group, pod in zip(["head", *groups], pods):
        (container,) = pod["spec"]["containers"]
        wants_gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        assert wants_gpu == (group == "gpu"), group
        assert pod["spec"]["serviceAccountName"] == "pipeline"  # S3 through the service account's identity
        names = [e["name"] for e in container.get("env", [])] + [str(e.get("envFrom")) for e in container.get("env", [])]
        assert not [n for n in names if re.search(r"SECRET|ACCESS_KEY|SESSION_TOKEN|PASSWORD", n)], group
        assert any(v["name"] == "shm" for v in pod["spec"]["volumes"])  # the object store's /dev/shm
        object_store = int((spec["headGroupSpec"] if group == "head" else groups[group])["rayStartParams"]["object-store-memory"])
        shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"]
        assert object_store <= int(shm.removesuffix("Gi")) * 2**30, group
    sa = next(doc for doc in by_kind("ServiceAccount") if doc["metadata"]["name"] == "pipeline")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]


def test_the_job_spec_comes_from_a_configmap_and_is_a_valid_job():
    (cluster,) = by_kind("RayCluster")
    (job,) = by_kind("RayJob")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job-spec")
    volume = next(v for v in head["volumes"] if v["name"] == "job-spec")
    assert volume["configMap"]["name"] == "pipeline-job-spec"
    spec_path = job["spec"]["entrypoint"].split()[-1]
    assert job["spec"]["entrypoint"].startswith("pipeline run ") and spec_path.startswith(mount["mountPath"] + "/")
    # The ConfigMap is made from the repository's job spec (infra/README.md), which must be a valid job.
    load_job(str(ROOT / "jobs" / Path(spec_path).name), {})


def test_the_schedule_forbids_overlap_and_creates_the_rayjob():
    (cron,) = by_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    assert "kubectl create -f /templates/rayjob.yaml" in script and "jobDeploymentStatus" in script
    assert next(v for v in pod["volumes"] if v["name"] == "templates")["configMap"]["name"] == "pipeline-rayjob"
    role = next(r for r in by_kind("Role") if r["metadata"]["name"] == pod["serviceAccountName"])
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "infra" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_lint():
    steps = dockerfile()
    kinds = [k for k, _ in steps]
    base = steps[0][1]
    assert kinds[0] == "FROM" and ":" in base and not base.endswith(":latest") and "cuda" in base
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert kinds.index("USER") < max(i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install" in a)
    for kind, args in steps:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", args, re.I), args
        if kind == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args
            assert "wget" in args  # KubeRay's probes
        if kind == "COPY":
            for source in args.split()[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), source
        if kind == "ADD":
            pytest.fail("use COPY, not ADD")
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["pipeline", "run"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_image_entrypoint_runs_a_job(tmp_path, s3_server):
    """The ENTRYPOINT, as the image runs it, on a small local job (the package is on PATH as in the image)."""
    entrypoint = json.loads(dict(dockerfile())["ENTRYPOINT"])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"p{i}.jpg").write_bytes(encode(photo(seed=i), "JPEG"))
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"input": {"uri": str(images)}, "output": {"uri": str(tmp_path / "out")},
                                "model": {"name": "counting_model:build",
                                          "preprocess": {"resize_size": 64, "crop_size": 64}}}))
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
           "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("RAY_ADDRESS", None)
    help_run = subprocess.run([*entrypoint, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "usage: pipeline run" in help_run.stdout
    result = subprocess.run([*entrypoint, str(spec)], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predicted   3" in result.stdout
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("*.parquet")) == 3
