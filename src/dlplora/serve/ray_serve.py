"""The same OpenAI API on Ray Serve replicas: ``dlp-lora serve --ray-address ADDR --replicas N``.

    ray start --head --num-cpus 2                                  # a local cluster (or an existing one)
    dlp-lora serve --library lib --ray-address auto --replicas 2 --threads 1
    dlp-lora serve --library lib --ray-address HOST:6379 --min-replicas 1 --max-replicas 8     # autoscaling

Each replica of the deployment ``DLPLoRA`` is a whole engine: it loads the library, the plugin and the
continuous-batching scheduler, and answers with the FastAPI app of :func:`dlplora.serve.app.create_app`, so every
route (chat, completions, streaming, models, ``routing``, ``adapters``, pins, errors, the API key) is the
single-process server's own. Ray Serve brings the HTTP proxy, restarts a replica that dies or fails its health
check (the scheduler thread stopped), and scales between ``--min-replicas`` and ``--max-replicas`` on the requests
in flight per replica. Nothing here is imported without ``--ray-address``.

Placement (``--placement``), which replica gets a request:

``serve``    (default) the proxy hands each request to an engine replica with Serve's default request router (power
             of two choices on queue length); the replica routes it with its plugin. One hop.
``by-set``   an ingress deployment (no CPU reserved) reads the body, routes the request once, as the engine would
             (:meth:`dlplora.engine.DLPLoRA.route_with_reasons` on the same plugin and settings; a pinned adapter or
             an ``adapters`` mix is its own set), and sends it through a Serve handle, the set in a header the
             replicas trust only behind the ingress; the request router :class:`SetAffinityRouter` sends requests
             of the same adapter set (its names) to the same replica: rendezvous hashing over the running replicas,
             with bounded load (a replica over 1.25x the mean of the requests in flight passes its sets on to the
             next in the hash order). Two hops.
``ingress``  the same two hops with Serve's default request router: what ``by-set`` is measured against
             (``dlp-lora bench replicas``).

``/metrics`` is the sum over the live replicas (every replica pushes its counters to a deployment-scoped actor every
2 s, and the answering one adds its own of now), with ``dlp_lora_replicas`` counting them; a replica that
restarts starts its counters from zero, which Prometheus reads as a counter reset. Every response carries the
header ``x-dlp-lora-replica`` naming the replica that answered.

Runtime adapter loads and unloads (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, with
``--allow-runtime-adapters``) reach every replica: a deployment-scoped actor (:mod:`dlplora.serve.library_actor`)
owns the served names, their routing states, ``library.json`` and the router, and the replicas follow it
(:mod:`dlplora.serve.live_replicas`): the call returns when every replica applied the change between two decode steps,
the router is retrained once (by the replica that took the call) and handed to every replica, and a replica that
starts later takes the current library before it serves. The library directory (and ``--adapter-root``) must be
readable at the same path on every node. Without ``--allow-runtime-adapters``, change the library on disk
(``dlp-lora library add`` / ``remove``) and deploy again: the library's stamp is part of the replicas' arguments, so
Serve replaces them one by one.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import DLPLoRAError
from .config import ServeConfig

PLACEMENTS = ("serve", "by-set", "ingress")
ENGINE, INGRESS = "DLPLoRA", "DLPLoRAIngress"  # the deployments' names
APP = "dlp-lora"  # the Serve application's default name


def replica_spec(library: str | Path, config: ServeConfig, model=None, plugin=None, routing=None, dtype=None,
                 device=None, quantize=None, threads: int = 1) -> dict:
    """What every replica loads (:func:`dlplora.serve.ray_replicas.load_engine`): the library at its absolute path
    (the same path on every node), its stamp (see module doc), the engine's options, `threads` torch threads, and
    the server's configuration."""
    from .ray_replicas import library_stamp

    root = Path(library).expanduser().resolve()
    if not (root / "library.json").is_file():
        raise DLPLoRAError(f"--library {library}: no library.json there")
    return {"library": str(root), "stamp": library_stamp(root), "model": str(model) if model else None,
            "plugin": str(Path(plugin).expanduser().resolve()) if plugin else None, "routing": routing,
            "dtype": dtype, "device": device, "quantize": quantize, "threads": int(threads), "config": config.check()}


def check_scaling(replicas: int | None, min_replicas: int | None, max_replicas: int | None,
                  placement: str) -> None:
    """Refuse impossible replica counts and placements with a message naming the flag."""
    if placement not in PLACEMENTS:
        raise DLPLoRAError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise DLPLoRAError("give either --replicas N (a fixed count) or --min-replicas / --max-replicas "
                           "(autoscaling), not both")
    for flag, v in (("--replicas", replicas), ("--min-replicas", min_replicas), ("--max-replicas", max_replicas)):
        if v is not None and v < (0 if flag == "--min-replicas" else 1):
            raise DLPLoRAError(f"{flag} must be {'>= 0' if flag == '--min-replicas' else '>= 1'}, got {v}")
    if (min_replicas is not None) != (max_replicas is not None):
        raise DLPLoRAError("autoscaling needs both --min-replicas and --max-replicas")
    if min_replicas is not None and min_replicas > max_replicas:
        raise DLPLoRAError(f"--min-replicas {min_replicas} is over --max-replicas {max_replicas}")


def build_app(spec: dict, replicas: int | None = 1, min_replicas: int | None = None, max_replicas: int | None = None,
              placement: str = "serve", cpus: float = 1.0, gpus: float = 0.0, target_ongoing: int | None = None,
              load_factor: float = 1.25):
    """The Serve application of :func:`deploy` (bound deployments). A replica takes up to max_batch_size + max_queue
    requests (beyond: its own 503); autoscaling aims at `target_ongoing` requests per replica (default: a full
    batch)."""
    from ray import serve
    from ray.serve.config import DeploymentActorConfig, RequestRouterConfig

    from .ray_replicas import LIBRARY_ACTOR, METRICS_ACTOR, EngineBehindIngress, EngineHTTP, Ingress, MetricsHub

    check_scaling(replicas if max_replicas is None else None, min_replicas, max_replicas, placement)
    cfg = spec["config"]
    if max_replicas is None:
        scaling = {"num_replicas": replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                          "initial_replicas": max(1, min_replicas),
                                          "target_ongoing_requests": target_ongoing or cfg.max_batch_size}}
    actors = [DeploymentActorConfig(name=METRICS_ACTOR, actor_class=MetricsHub, actor_options={"num_cpus": 0})]
    if cfg.allow_runtime_adapters:
        from .library_actor import LibraryHub

        actors.append(DeploymentActorConfig(name=LIBRARY_ACTOR, actor_class=LibraryHub, actor_options={"num_cpus": 0},
                                            init_kwargs={"library": spec["library"], "plugin_dir": spec.get("plugin")}))
    opts = dict(name=ENGINE, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                max_ongoing_requests=cfg.max_batch_size + cfg.max_queue, graceful_shutdown_timeout_s=cfg.request_timeout,
                health_check_period_s=10, max_constructor_retry_count=3, deployment_actors=actors, **scaling)
    if placement == "serve":
        return serve.deployment(serve.ingress()(EngineHTTP), **opts).bind(spec)
    if placement == "by-set":
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="dlplora.serve.ray_replicas.SetAffinityRouter",
            request_router_kwargs={"load_factor": load_factor})
    engine = serve.deployment(EngineBehindIngress, **opts).bind(spec)
    return serve.deployment(serve.ingress()(Ingress), name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=100_000).bind(engine, spec, placement == "by-set")


def connect(address: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Join the Ray cluster at `address` ('auto' or HOST:PORT) and start Serve's HTTP proxy on host:port (a Serve
    already running on the cluster keeps its own proxy options)."""
    from ray import serve

    from ..cluster import join_ray

    join_ray(address)
    serve.start(http_options={"host": host, "port": port})


def deploy(spec: dict, name: str = APP, route_prefix: str = "/", **scaling) -> None:
    """Deploy (or update in place: Serve replaces the replicas one by one) the application `name` and wait until
    its replicas are running; `scaling`: :func:`build_app`'s options."""
    from ray import serve

    try:
        serve.run(build_app(spec, **scaling), name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        why = ""
        try:
            app = serve.status().applications.get(name)
            why = "; ".join(f"{d}: {s.message}" for d, s in (app.deployments if app else {}).items() if s.message)
        except Exception:  # pragma: no cover - the status is only for the message
            pass
        raise DLPLoRAError(f"the Ray Serve deployment failed: {exc} {why[-3000:]}") from None


def replica_actors(name: str = APP, deployment: str = ENGINE) -> dict:
    """{actor name: Ray actor} of the application's live engine replicas (benchmarks kill one with ``ray.kill``)."""
    import ray
    from ray.util import list_named_actors

    prefix = f"SERVE_REPLICA::{name}#{deployment}#"
    out = {}
    for a in list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            try:
                out[a["name"]] = ray.get_actor(a["name"], namespace=a["namespace"])
            except ValueError:  # it died between the listing and the lookup
                pass
    return out


def running_replicas(name: str = APP, deployment: str = ENGINE) -> int:
    """How many of the deployment's replicas Serve reports running."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None or deployment not in app.deployments:
        return 0
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


def serve_on_ray(spec: dict, address: str, host: str = "127.0.0.1", port: int = 8000, name: str = APP,
                 detach: bool = False, log=print, **scaling) -> None:
    """`dlp-lora serve --ray-address`: connect, deploy, then wait until interrupted and delete the application
    (`detach`: return at once and leave it running)."""
    from ray import serve

    from ..cluster import check_cpus

    connect(address, host, port)
    if name not in serve.status().applications:  # (an update in place reuses its replicas' CPUs)
        n = max(1, scaling.get("min_replicas") or 0) if scaling.get("max_replicas") else scaling.get("replicas") or 1
        cpus = scaling.get("cpus", 1.0)
        check_cpus(n * cpus, f"{n} replica{'s' if n > 1 else ''} of {cpus:g} CPU{'s' if cpus != 1 else ''}", address)
    try:
        deploy(spec, name=name, **scaling)
        log(f"deployed {name!r} on Ray Serve at {address}: http://{host}:{port}/v1", flush=True)
        if detach:
            log(f"left running; stop it with: python -c \"import ray; from ray import serve; "
                f"ray.init(address='{address}'); serve.delete('{name}')\"", flush=True)
            return
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        if detach:  # interrupted while deploying: what is deployed stays, as asked
            raise
    finally:
        if not detach:  # interrupted while deploying or serving, or the deployment failed: nothing stays behind
            serve.delete(name)
            log(f"deleted {name!r}", flush=True)
