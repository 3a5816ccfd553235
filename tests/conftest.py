"""Shared real parts: one moto S3 server on 127.0.0.1 and one local Ray for the whole session."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.dev.local_s3 import LocalS3Server, use_server
from pipeline.io.storage import Storage

# Tests talk to their own local Ray only; token auth is for clusters (production manifests keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No model hub is reachable here: a stray hub lookup fails at once instead of retrying for 20-46 s (timm,
# transformers, huggingface_hub read it at import; jobs the tests start inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
# A private torchvision weights cache, set before Ray starts so its workers share it (see torch_home).
TORCH_HOME = tempfile.mkdtemp(prefix="pipeline-tests-torch-home-")
atexit.register(shutil.rmtree, TORCH_HOME, ignore_errors=True)  # up to 200 MB of weights per test process
os.environ["TORCH_HOME"] = TORCH_HOME


# ---- lanes (issue 27) ------------------------------------------------------------------------------------------
# Every test is in one lane, a marker: `unit` (no job on Ray, no `pipeline run` in a subprocess; seconds), `e2e`
# (whole jobs on a local Ray or `pipeline ...` in a subprocess), `kill` (SIGKILLs and crashes mid-job, then the
# rerun), `cluster` (`ray start` nodes, the autoscaler) and `browser` (reports in headless Chromium). All but `unit`
# are also `slow`: a developer runs `pytest -m "not slow"` in a few minutes, the README's `pytest` runs every lane.
# A file named nowhere below is `e2e`, until it is listed as `unit`; in a unit file, a test on the session's Ray is
# `e2e`, and a test may name its own lane (`@pytest.mark.kill`).
LANES = {
    "unit": ("test_cli_errors", "test_config", "test_decode", "test_dicom", "test_distinct", "test_faults_proxy",
             "test_dedup", "test_folding", "test_format_delta", "test_format_iceberg", "test_hashes", "test_layout",
             "test_model", "test_odd_files", "test_progress", "test_run", "test_progress_bar", "test_report_truth",
             "test_review_selection", "test_review_tables", "test_run_keys", "test_sink", "test_storage", "test_truth"),
    "cluster": ("test_autoscaling", "test_cluster", "test_submit"),
    "kill": ("test_crash", "test_incremental", "test_backfill_medical", "test_privacy", "test_faults",
             "test_least_privilege", "test_output", "test_privacy_spellings"),
    "browser": ("test_report",),
}
# The order lanes start in, longest first, so that parallel workers (pytest-xdist) finish together.
LANE_ORDER = ("cluster", "browser", "kill", "e2e", "unit")
# A stall fails its test after this many seconds (pytest-timeout; pyproject's `timeout`, 300 s, for unit tests),
# above the tests' own deadlines: a job in a subprocess gets up to 300 s (the demo 600 s), a cluster test waits up to
# 400 s for nodes the autoscaler starts and stops. A module-scoped fixture's jobs count in its first test's time.
LANE_TIMEOUT_S = {"e2e": 600, "kill": 600, "browser": 600, "cluster": 900}
# Files whose module fixtures take long (a model trained, a cluster of models built) start first within their lane, so
# that the other worker's files run meanwhile instead of this one running alone at the end.
FIRST_IN_LANE = ("test_zero_shot", "test_source_huggingface", "test_source_onnx_exported")
# Files whose tests share nothing costly (no module-scoped job): pytest-xdist may spread them over its workers one
# test at a time. Every other file runs whole on one worker, so its module-scoped fixtures run once.
SPREAD = ("test_output", "test_odd_files", "test_pipeline", "test_cli_errors", "test_progress_bar", "test_clouds")


def lane_of(item: pytest.Item) -> str:
    named = [lane for lane in LANE_ORDER if item.get_closest_marker(lane)]
    if named:
        return named[0]
    module = item.module.__name__
    lane = next((lane for lane, modules in LANES.items() if module in modules), "e2e")
    return "e2e" if lane == "unit" and "ray_session" in item.fixturenames else lane


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    lanes = {item: lane_of(item) for item in items}
    module_rank: dict[str, int] = {}
    for item, lane in lanes.items():
        item.add_marker(getattr(pytest.mark, lane))
        if lane != "unit":
            item.add_marker(pytest.mark.slow)
        if lane in LANE_TIMEOUT_S:
            item.add_marker(pytest.mark.timeout(LANE_TIMEOUT_S[lane]))
        module = item.module.__name__
        if module not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(module))
        module_rank[module] = min(module_rank.get(module, len(LANE_ORDER)), LANE_ORDER.index(lane))
    # Whole files stay together (a module-scoped fixture is set up once), ordered by their slowest lane.
    items.sort(key=lambda item: (module_rank[item.module.__name__], item.module.__name__ not in FIRST_IN_LANE))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups above, read from the test ids: a file whole on one worker, a SPREAD file's
    tests one by one.

    pytest-xdist 3.8 groups by appending `@group` to an item's `_nodeid`, which pytest 9.2 no longer reads (its
    nodeid is `_id`): every xdist_group mark was ignored and each test went to whichever worker was free, so a
    module-scoped fixture ran once per worker (test_report's runs twice, two autoscaling clusters at once on two
    cores). The controller sees only ids, so the scope is computed from the id's file here; an id that does carry
    `@group` (a pytest where xdist's suffix works) is grouped by xdist's own rule, which gives the same groups."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):
                return super()._split_scope(nodeid)
            path = nodeid.split("::", 1)[0]
            return nodeid if os.path.splitext(os.path.basename(path))[0] in SPREAD else path

    return FileGroups(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Label Studio's venv (tests/label_studio_server.py) starts building now if a test will use the server."""
    if any("label_studio" in getattr(item, "fixturenames", ()) for item in session.items):
        import label_studio_server

        label_studio_server.start_building()


@pytest.fixture(scope="session")
def label_studio():
    """A Label Studio server (its own venv, SQLite, offline) for the session."""
    import label_studio_server

    server = label_studio_server.server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    with LocalS3Server() as server:
        use_server(server)  # before Ray starts, so its workers inherit the endpoint and credentials
        yield server


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory):
    """Azurite for the session; AZURE_STORAGE_CONNECTION_STRING points every client (and `pipeline` subprocess)
    at it."""
    from emulators import azurite

    with azurite(tmp_path_factory.mktemp("azurite")) as connection_string:
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = connection_string
        yield connection_string
        os.environ.pop("AZURE_STORAGE_CONNECTION_STRING", None)


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server for the session; STORAGE_EMULATOR_HOST points every client at it."""
    from emulators import fake_gcs_server

    with fake_gcs_server() as endpoint:
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield endpoint
        os.environ.pop("STORAGE_EMULATOR_HOST", None)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray

    # Ray's workers import custom test models (`color_boxes:build`) from here, as a cluster would from its image.
    tests = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    if ray.is_initialized():  # a job an earlier test ran in-process left its own Ray, without this PYTHONPATH
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def storage(s3_server) -> Storage:
    return Storage.from_env()


def ensure_bucket(storage: Storage, name: str) -> None:
    """A fixed-name bucket (a job spec's own), created once per server."""
    from botocore.exceptions import ClientError

    try:
        storage.s3_client.create_bucket(Bucket=name)
    except ClientError:  # already there: created by an earlier test
        pass


def download_prefix(storage: Storage, bucket: str, prefix: str, folder) -> None:
    """An analyst's local copy of s3://bucket/prefix (as `aws s3 sync` makes it), keys kept as paths."""
    for page in storage.s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = folder / obj["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(f"s3://{bucket}/{obj['Key']}"))


@pytest.fixture
def bucket(storage) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client.create_bucket(Bucket=name)
    return name


def photo(width: int = 96, height: int = 72, seed: int = 0) -> Image.Image:
    """A small RGB image with structure (gradients plus noise), different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noisy = base + rng.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def photo_jpeg(seed: int) -> bytes:
    """A photo-sized JPEG (~95 KB). The model actors take whole blocks of encoded files (run/plan.BLOCK_BYTES,
    about 11 of these), so tests that need rows to arrive over many blocks use these, not thumbnails."""
    return encode(photo(480, 360, seed=seed), "JPEG", quality=90)


def encoded_batch(payloads: list[bytes], uri: str = "img{}") -> dict[str, np.ndarray]:
    """A batch as the read stage hands it to decode: `uri`, `bytes` and empty error columns."""
    n = len(payloads)
    data = np.empty(n, dtype=object)
    data[:] = payloads  # bytes of equal length would otherwise become a 2-D array
    return {"uri": np.array([uri.format(i) for i in range(n)], dtype=object), "bytes": data,
            "error": np.full(n, None, dtype=object), "error_type": np.full(n, None, dtype=object)}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def classifier_files(tmp_path_factory) -> dict[str, str]:
    """A resnet18 with 4 classes and fixed random weights, saved as a checkpoint plus labels file."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    torch.save(model.state_dict(), folder / "resnet18.pt")
    (folder / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    return {"model": "resnet18", "weights": str(folder / "resnet18.pt"), "labels": str(folder / "labels.txt")}


@pytest.fixture(scope="session")
def cached_imagenet_resnet18():
    """Seed TORCH_HOME with a file where torchvision keeps ResNet18_Weights.IMAGENET1K_V1.

    No model hub is reachable here, so the file holds seeded random weights; everything else, from the
    weights name to torchvision's own cache lookup and metadata, is the real loading path.
    """
    return cache_torchvision_weights(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, torchvision.models.resnet18,
                                     seed=1)


def cache_torchvision_weights(weights, build, seed: int):
    """Put seeded random weights for `build()` where torchvision's cache looks for `weights` (see above)."""
    folder = os.path.join(TORCH_HOME, "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build().state_dict(), os.path.join(folder, os.path.basename(weights.url)))
    return weights
