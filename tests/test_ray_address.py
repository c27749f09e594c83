"""`--ray-address` where no Ray cluster runs: every command that takes it says so in one line, how to start one or to
drop the flag, with no traceback (issue 32.2). The cluster checks that need a running cluster are in
tests/test_ray_serve.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raycluster import free_port

pytest.importorskip("ray")


def _commands(tiny_data, tmp_path, address):
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "library.json").write_text('{"format": 1, "base_model": {}, "adapters": {}}')
    return {"train-loras": ["train-loras", "--tasks", "quiz", "--data", str(tiny_data), "--out", str(tmp_path / "out"),
                            "--ray-address", address],
            "serve": ["serve", "--library", str(lib), "--ray-address", address],
            "bench replicas": ["bench", "replicas", "--ray-address", address, "--no-kill"],
            "eval": ["eval", "--library", str(lib), "--data", str(tiny_data), "--out", str(tmp_path / "out"),
                     "--ray-address", address],
            "reproduce": ["reproduce", "--work", str(tmp_path / "out"), "--out", str(tmp_path / "out"),
                          "--ray-address", address]}


def _check(rc, err, address):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"error: --ray-address {address}: no Ray cluster at that address"), err[-3000:]
    assert "ray start --head" in lines[-1] and "drop --ray-address" in lines[-1]


def test_host_port_without_a_cluster(tiny_data, tmp_path, capsys):
    from dlplora import cli

    address = f"127.0.0.1:{free_port()}"
    for name, argv in _commands(tiny_data, tmp_path, address).items():
        rc = cli.main(argv)
        _check(rc, capsys.readouterr().err, address)
    assert not (tmp_path / "out").exists()  # refused before the library was created


def test_auto_without_a_cluster(tiny_data, tmp_path):
    """'auto' looks for a cluster started on this machine (under the temporary directory): none in a fresh one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for name, argv in _commands(tiny_data, tmp_path, "auto").items():
        r = subprocess.run([sys.executable, "-m", "dlplora.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=300)
        _check(r.returncode, r.stderr, "auto")
