"""A job runs with credentials scoped to its input and output prefixes (the policy infra/README.md recommends),
on a moto server of its own that enforces IAM users and policies.

moto evaluates a policy's actions and resources but not its conditions (moto/iam/access_control.py), so it
cannot refuse a listing outside the `s3:prefix` condition. The job's requests therefore pass through a recording
proxy (tests/faults.py, no faults), and every one of them is checked to stay inside the two prefixes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import parse_qs, unquote

import boto3
import pyarrow.dataset as pads
import pyarrow.fs
import pytest
from botocore.exceptions import ClientError

from conftest import encode, photo
from faults import FaultyProxy
from pipeline.cli.commands import main
from pipeline.dev.local_s3 import CREDENTIALS, LocalS3Server
from test_cli_errors import assert_one_line

BUCKET = "photos"
IMAGES = {f"in/day {i}/img{i}.png": encode(photo(seed=i), "PNG") for i in range(4)}
# AWS evaluates the s3:prefix condition on ListBucket; moto ignores it (see the module docstring).
# s3:DeleteObject on the bucket's ARN grants nothing on AWS, which checks DeleteObjects key by key; moto checks
# it against the bucket.
JOB_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}",
     "Condition": {"StringLike": {"s3:prefix": ["in/*", "out/*"]}}},
    {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/in/*"},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
     "Resource": f"arn:aws:s3:::{BUCKET}/out/*"},
    {"Effect": "Allow", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{BUCKET}"},
]}
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def client(service: str, endpoint: str, keys: dict[str, str]):
    return boto3.session.Session().client(service, endpoint_url=endpoint, region_name="us-east-1",
                                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                                          aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])


def new_user(iam, name: str, policy: dict | None) -> dict[str, str]:
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture(scope="module")
def iam_s3():
    """A moto server that checks every request after its first three: those make the admin that sets up the rest."""
    with LocalS3Server(environ={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        admin = new_user(client("iam", server.endpoint_url, CREDENTIALS), "admin", ADMIN_POLICY)
        iam, s3 = client("iam", server.endpoint_url, admin), client("s3", server.endpoint_url, admin)
        s3.create_bucket(Bucket=BUCKET)
        for key, data in {**IMAGES, "other/not-for-this-job.png": encode(photo(), "PNG")}.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        yield server, {"admin": admin, "job": new_user(iam, "job", JOB_POLICY), "nobody": new_user(iam, "nobody", None)}


def outside_the_job(target: str) -> bool:
    """A request (path and query, path-style) that names a key, or lists a prefix, outside in/ and out/."""
    path, _, query = target.partition("?")
    if not (path == f"/{BUCKET}" or path.startswith(f"/{BUCKET}/")):
        return True
    key = unquote(path.removeprefix(f"/{BUCKET}").lstrip("/"))
    params = parse_qs(query, keep_blank_values=True)
    if key:
        return not key.startswith(("in/", "out/"))
    if "delete" in params:  # DeleteObjects: the keys are in the body, each checked by the server
        return False
    return not params.get("prefix", [""])[0].startswith(("in/", "out/"))


def test_a_job_runs_with_credentials_scoped_to_its_prefixes(iam_s3, tmp_path, classifier_files):
    server, users = iam_s3
    keys = users["job"]
    s3 = client("s3", server.endpoint_url, keys)
    # The policy is enforced, and is least-privilege: HeadBucket and objects outside the prefixes are refused.
    for refused in (lambda: s3.head_bucket(Bucket=BUCKET),
                    lambda: s3.get_object(Bucket=BUCKET, Key="other/not-for-this-job.png")):
        with pytest.raises(ClientError, match="403|AccessDenied"):
            refused()

    spec = tmp_path / "job.yaml"  # one model actor: the storage requests are what is tested, not the pool
    spec.write_text(json.dumps({"compute": {"min_actors": 1, "max_actors": 1}}))
    with FaultyProxy(server.endpoint_url, fail_rate=0, reset_rate=0, stall_rate=0) as proxy:
        env = {**os.environ, **keys, "AWS_ENDPOINT_URL": proxy.url}
        env.pop("RAY_ADDRESS", None)  # its own local Ray, whose workers inherit these credentials
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", str(spec), "--input", f"s3://{BUCKET}/in", "--output",
             f"s3://{BUCKET}/out", "--model", classifier_files["model"], "--weights", classifier_files["weights"],
             "--labels", classifier_files["labels"]], env=env, capture_output=True, text=True, timeout=600)
        requests = list(proxy.history)
    assert result.returncode == 0, result.stderr[-3000:]

    admin = users["admin"]  # pyarrow's reader asks HeadObject of the key `out` itself, outside the job's policy
    s3fs = pyarrow.fs.S3FileSystem(access_key=admin["AWS_ACCESS_KEY_ID"], secret_key=admin["AWS_SECRET_ACCESS_KEY"],
                                   endpoint_override=server.endpoint_url, region="us-east-1")
    table = pads.dataset(f"{BUCKET}/out", filesystem=s3fs, format="parquet").to_table()
    assert sorted(table["uri"].to_pylist()) == sorted(f"s3://{BUCKET}/{k}" for k in IMAGES)
    assert table["error"].null_count == len(IMAGES)
    assert requests and [t for _, t, _ in requests if outside_the_job(t)] == []
    assert any(m == "DELETE" or "delete" in t for m, t, _ in requests)  # it cleaned up its staging


def test_credentials_without_access_are_one_line(iam_s3, capsys, monkeypatch, tmp_path, classifier_files):
    server, users = iam_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    for name, value in users["nobody"].items():
        monkeypatch.setenv(name, value)
    code = main(["run", "--input", f"s3://{BUCKET}/in", "--output", str(tmp_path / "out"),
                 "--model", classifier_files["model"], "--weights", classifier_files["weights"],
                 "--labels", classifier_files["labels"]])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "input.uri", f"access to bucket '{BUCKET}' denied", "AccessDenied",
                    "check the AWS credentials and the bucket policy")
