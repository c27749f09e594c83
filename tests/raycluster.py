"""A real local Ray cluster for the tests that scale out (head on 127.0.0.1, 2 CPUs, or a head and a worker node),
always stopped."""

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
def local_ray_cluster(before_shutdown=None, cpus: int = 2, worker_cpus: int | None = None, env: dict | None = None):
    """Start `ray start --head` on a free port with `cpus` CPUs (and with `worker_cpus`, a second node that joins it,
    on 127.0.0.1 too; `env`: more environment for the cluster's processes); yield its address; on the way out (even on
    failure) call `before_shutdown()` (e.g. serve.shutdown), disconnect this process and stop the cluster."""
    import os

    import ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets cap path length
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats",
                            f"--temp-dir={temp}"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **(env or {})})
    assert start.returncode == 0, start.stderr[-2000:]
    if worker_cpus is not None:
        join = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                               f"--num-cpus={worker_cpus}", "--disable-usage-stats"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
        if join.returncode != 0:
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        assert join.returncode == 0, join.stderr[-2000:]
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
