"""Joining the Ray cluster a `--ray-address` names, with one clear line when there is none, and checking that it has
the CPUs a command is about to reserve. Ray is imported only here, when a command was given --ray-address."""

from __future__ import annotations

import socket

from .errors import DLPLoRAError

START_HINT = "start one with `ray start --head --num-cpus N` (then --ray-address auto), or drop --ray-address"


def no_cluster(address: str, why: str) -> DLPLoRAError:
    return DLPLoRAError(f"--ray-address {address}: no Ray cluster at that address ({why}); {START_HINT}")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """HOST:PORT must accept a connection: Ray itself retries an unreachable address for minutes."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DLPLoRAError(f"--ray-address {address}: expected 'auto' or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise no_cluster(address, f"nothing answers at {host}:{port}: {exc.strerror or exc}") from None


def join_ray(address: str) -> None:
    """ray.init on the cluster at `address` ('auto' or HOST:PORT); a DLPLoRAError naming the address when there is
    no cluster there (instead of Ray's ConnectionError traceback, or minutes of retries)."""
    import ray

    _check_reachable(address)
    host = address.rsplit(":", 1)[0]
    local = {"_node_ip_address": host} if host in ("127.0.0.1", "localhost") else {}
    if ray.is_initialized() and address != "auto":
        # already connected (an earlier call in this process): to another cluster, or to one since stopped, ray.init
        # with ignore_reinit_error would keep the old connection and every actor would be created there
        if ray.get_runtime_context().gcs_address != address:
            ray.shutdown()
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **local)
    except ConnectionError as exc:
        raise no_cluster(address, str(exc).split(". ")[0]) from None


def check_cpus(need: float, what: str, address: str) -> None:
    """Refuse to reserve `need` CPUs (`what` says for what) on a cluster whose free CPUs cannot hold them: Ray
    would wait for them forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    free = ray.available_resources().get("CPU", 0.0)
    if need > free + 1e-9:
        raise DLPLoRAError(f"the Ray cluster at {address} has {free:g} of its {total:g} CPUs free, and {what} needs "
                           f"{need:g}: {need - free:g} CPUs are missing; start the cluster with more "
                           f"(`ray start --head --num-cpus {int(-(-(need + total - free) // 1))}`) or reserve less")
