"""The fault-injecting proxy (tests/faults.py) itself, in front of the session's moto server."""

from __future__ import annotations

import io
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.retries.standard
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from faults import FaultyProxy


def client(url: str, attempts: int = 10, read_timeout: float = 2):
    """attempts counts the first try too (botocore's `max_attempts` counts only the retries)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=url, region_name="us-east-1",
        config=Config(retries={"mode": "standard", "total_max_attempts": attempts},
                      read_timeout=read_timeout, connect_timeout=2))


def no_faults(**overrides) -> dict:
    return {"fail_rate": 0, "reset_rate": 0, "stall_rate": 0, **overrides}


def test_without_faults_requests_and_answers_pass_through_whole(s3_server, bucket):
    body = bytes(range(256)) * 4000  # ~1 MB
    with FaultyProxy(s3_server.endpoint_url, **no_faults()) as proxy:
        s3 = client(proxy.url, attempts=1)
        s3.put_object(Bucket=bucket, Key="bytes", Body=body)
        s3.put_object(Bucket=bucket, Key="file", Body=io.BytesIO(body))  # sends Expect: 100-continue
        assert s3.get_object(Bucket=bucket, Key="bytes")["Body"].read() == body
        assert s3.get_object(Bucket=bucket, Key="file", Range="bytes=10-19")["Body"].read() == body[10:20]
        assert s3.head_object(Bucket=bucket, Key="file")["ContentLength"] == len(body)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["bytes", "file"]
        s3.delete_object(Bucket=bucket, Key="bytes")
        assert proxy.stats == {"requests": 7, "forwarded": 7, "fail": 0, "reset": 0, "stall": 0, "cut": 0,
                               "client_gone": 0, "errors": 0}


def test_fail_answers_an_s3_error_without_forwarding(s3_server, bucket):
    with FaultyProxy(s3_server.endpoint_url, **no_faults(fail_rate=1.0)) as proxy:
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{proxy.url}/{bucket}/missing", timeout=5)
        assert raised.value.code in (500, 503)
        code = {500: "InternalError", 503: "SlowDown"}[raised.value.code]
        assert f"<Code>{code}</Code>" in raised.value.read().decode()
        assert proxy.stats["fail"] == 1 and proxy.stats["forwarded"] == 0


def test_reset_drops_the_connection_with_an_rst_and_no_answer(s3_server, bucket):
    with FaultyProxy(s3_server.endpoint_url, **no_faults(reset_rate=1.0)) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            with pytest.raises(ConnectionResetError):
                sock.recv(1024)
        assert proxy.stats["reset"] == 1 and proxy.stats["forwarded"] == 0


def test_faults_apply_only_to_the_chosen_methods(s3_server, bucket):
    s3_server_client = client(s3_server.endpoint_url)
    s3_server_client.put_object(Bucket=bucket, Key="k", Body=b"v")
    with FaultyProxy(s3_server.endpoint_url, **no_faults(fail_rate=1.0), methods={"put"}) as proxy:
        s3 = client(proxy.url, attempts=1)
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
        with pytest.raises(ClientError, match="SlowDown|InternalError"):
            s3.put_object(Bucket=bucket, Key="k", Body=b"w")
    assert s3_server_client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_stall_delays_the_answer_past_a_short_read_timeout(s3_server, bucket):
    client(s3_server.endpoint_url).put_object(Bucket=bucket, Key="k", Body=b"v")
    with FaultyProxy(s3_server.endpoint_url, **no_faults(stall_rate=1.0), stall_seconds=1.0) as proxy:
        with pytest.raises(ReadTimeoutError):
            client(proxy.url, attempts=1, read_timeout=0.3).get_object(Bucket=bucket, Key="k")
        # A stall shorter than the read timeout only slows the answer down.
        assert client(proxy.url, attempts=1, read_timeout=3).get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
        assert proxy.stats["stall"] == 2


def test_boto3_with_retries_round_trips_objects_through_faults(s3_server, bucket, monkeypatch):
    # botocore backs off up to 1, 2, 4... s after a SlowDown; what is under test is that retries happen
    # and succeed, not how long they wait, so keep the waits short.
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.02)
    bodies = {f"obj/{i:02d}": bytes([i]) * (1000 * i + 1) for i in range(16)}
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0.2, reset_rate=0.1, stall_rate=0.05,
                     stall_seconds=1.0, seed=7) as proxy:
        s3 = client(proxy.url, read_timeout=0.5)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), bodies.items()))
            read = dict(zip(bodies, pool.map(
                lambda key: s3.get_object(Bucket=bucket, Key=key)["Body"].read(), bodies)))
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 5}) for o in page["Contents"]]
        stats = proxy.stats
    assert read == bodies
    assert keys == sorted(bodies)
    assert stats["fail"] > 0 and stats["reset"] > 0 and stats["errors"] == 0
    assert stats["requests"] > len(bodies) * 2 + 4  # the faulted attempts were retried
