"""A real local Ray cluster for the tests that scale out (head on 127.0.0.1, 2 CPUs), always stopped."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray_cluster(before_shutdown=None):
    """Start `ray start --head` on a free port; yield its address; on the way out (even on failure) call
    `before_shutdown()` (e.g. serve.shutdown), disconnect this process and stop the cluster."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets cap path length
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        try:
            if before_shutdown is not None and ray.is_initialized():
                before_shutdown()
        finally:
            try:
                ray.shutdown()
            finally:
                subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
                shutil.rmtree(temp, ignore_errors=True)
