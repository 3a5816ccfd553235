"""The README's first command ends in `pipeline demo`: run it for real, in its own process."""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_reports_a_real_accuracy(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo brings its own S3
    result = subprocess.run([sys.executable, "-m", "pipeline", "demo"], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Traceback" not in result.stderr
    assert re.search(r"inputs\s+543\s+\(1 other files skipped", out)
    assert re.search(r"predicted\s+540", out) and re.search(r"errors\s+3\s+\(", out)
    accuracy = float(re.search(r"Accuracy from the Parquet output: ([\d.]+)%", out).group(1))
    assert accuracy > 90.0
    # Its report: a thumbnail sheet of every digit, fetched from the demo's S3 while it ran.
    html = (tmp_path / "demo-report.html").read_text()
    assert all(f"<h3>{digit} <span" in html for digit in range(10))
    assert html.count('<img src="data:image/jpeg') >= 50 and "decode.truncated" in html
