"""The evaluation grid on a Ray cluster: ``dlp-lora eval --ray-address ADDR`` (and ``reproduce``).

The harness (:mod:`dlplora.eval.harness`) still decides everything on the driver: the settings, the streams, the
routing of every prompt, the cache lookups and the batches (:func:`dlplora.eval.harness.run_method_items` sorts
a method's missing predictions and cuts them into batches exactly as on one machine). Only the batches travel: each
goes whole to one of N :class:`GridWorker` actors (a ``ray.util.ActorPool``, one CPU and one torch thread each,
spread over the nodes), which holds the method's model and computes it with the same code
(:func:`dlplora.eval.scoring.predict_batch`). Same batches, same code, same weights: the same predictions as one
machine (tested in tests/test_ray_eval.py).

Why actors and not Ray Data's ``map_batches``: the harness asks for a method's predictions many times in a run
(per setting, per multiturn turn: each turn needs the previous turn's answers), so the workers must keep their loaded
models across those calls, which a pool of actors does and a Dataset pipeline built per call does not (its actor
pool starts, loads the model, and stops each time); and a batch must stay whole to give the same predictions,
where Ray Data re-blocks rows. The driver hands out batches as workers free up, so a slow node takes fewer.

The cache: when the cache directory is shared storage (seen by a worker: a probe file the driver writes), each
worker appends its predictions to its own file there (``<method>.<worker>.jsonl``, which
:class:`dlplora.eval.cache.PredictionCache` reads with the others), as soon as a batch is done; an interrupted run
then resumes from them on one machine or many. Elsewhere the driver writes what comes back.

Workers build the runners lazily, from the driver's recipe: the fused engine (base, LoRA, DLP-LoRA), PEFT's Arrow,
the TIES merge and the static merges (merge-all, each multi-task adapter), with the precision the driver resolved.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util import ActorPool

from ..errors import DLPLoRAError
from .cache import append_records

START_TIMEOUT = 300  # seconds for every worker actor to be placed and started


@ray.remote(num_cpus=1)
class GridWorker:
    """One worker of the grid: the runners of the methods it was given batches of, loaded once."""

    def __init__(self, recipe: dict, cache_dir: str, probe: str):
        import torch

        torch.set_num_threads(1)
        self.recipe, self.runners = recipe, {}
        self.cache_dir = cache_dir if (Path(cache_dir) / probe).is_file() else None
        self.name = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def runner(self, key: str):
        if key not in self.runners:
            self.runners[key] = build_runner(self.recipe, key)
        return self.runners[key]

    def run(self, key: str, k: int, job: dict) -> tuple[int, tuple[list, float], bool]:
        """Batch `k` of a method (runner `key`): (k, (values, seconds per example), whether it went into the cache)."""
        from .scoring import predict_batch

        vals, dt = predict_batch(self.runner(key), job)
        if self.cache_dir is None:
            return k, (vals, dt), False
        append_records(Path(self.cache_dir), job["ns"], [{"k": key_, "v": v, "s": round(dt, 5)}
                                                         for key_, v in zip(job["keys"], vals)], self.name)
        return k, (vals, dt), True


def build_runner(recipe: dict, key: str):
    """The runner of `key` ("fused", "arrow", "ties", or "static:<name>" with its weights in the recipe) from the
    driver's `recipe` (see :meth:`GridWorkers.recipe`), warmed up once."""
    from ..library import Library
    from .runners import FusedRunner, PeftRunner, build_arrow_model, build_static_merge, build_ties_model

    r = recipe
    lib = Library.open(r["library"])
    if key == "fused":
        from ..engine import DLPLoRA

        engine = DLPLoRA.from_library(lib.root, model=r["model"], dtype=r["dtype"], device=r["device"],
                                      quantize=r["quantize"], adapters=r["names"])
        runner = FusedRunner(engine)
    elif key == "arrow":
        runner = PeftRunner(*build_arrow_model(lib, model=r["model"], top_k=r["arrow_top_k"], seed=r["seed"],
                                               dtype=r["torch_dtype"], device=r["device"]))
    elif key == "ties":
        runner = PeftRunner(*build_ties_model(lib, model=r["model"], density=r["ties_density"],
                                              dtype=r["torch_dtype"], device=r["device"]))
    else:
        runner = PeftRunner(*build_static_merge(lib, r["static"][key.split(":", 1)[1]], model=r["model"],
                                                dtype=r["torch_dtype"], device=r["device"]))
    runner.generate(["warm up"], [[]], [{}], [2])  # first calls pay one-off costs: not on the first batch's time
    return runner


class GridWorkers:
    """The pool of :class:`GridWorker` actors of one run; :meth:`bind` gives the object
    :func:`dlplora.eval.harness.run_method_items` takes for one method."""

    def __init__(self, address: str, recipe: dict, cache_dir: Path, workers: int | None = None, log=print):
        from ..cluster import check_cpus, join_ray

        if workers is not None and workers < 1:
            raise DLPLoRAError(f"--ray-workers must be at least 1, got {workers}")
        join_ray(address)
        n = workers if workers is not None else int(ray.available_resources().get("CPU", 0))
        if n < 1:
            raise DLPLoRAError(f"the Ray cluster at {address} has no free CPU for an evaluation worker; start it with "
                               f"more (`ray start --head --num-cpus N`)")
        check_cpus(n, f"{n} evaluation worker{'s' if n > 1 else ''} of 1 CPU", address)
        probe = f".ray-probe-{uuid.uuid4().hex}"
        (Path(cache_dir) / probe).write_text("the evaluation's workers look for this file: is the cache shared?\n")
        self.actors = [GridWorker.options(scheduling_strategy="SPREAD").remote(recipe, str(Path(cache_dir).resolve()),
                                                                               probe) for _ in range(n)]
        self.probe = Path(cache_dir) / probe
        try:  # every worker placed and started before the first batch is handed out (none waits on a pending one)
            ray.get([a.__ray_ready__.remote() for a in self.actors], timeout=START_TIMEOUT)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            self.close()
            raise DLPLoRAError(f"the {n} evaluation workers did not all start on the Ray cluster at {address} within "
                               f"{START_TIMEOUT} s ({type(exc).__name__}); are its CPUs held by another job? "
                               f"(`ray status`; or fewer with --ray-workers)") from None
        self.pool = ActorPool(self.actors)
        log(f"evaluating on Ray at {address}: {n} workers of 1 CPU")

    def bind(self, key: str) -> "BoundWorkers":
        return BoundWorkers(self, key)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.probe.unlink(missing_ok=True)


class BoundWorkers:
    """The pool, for the runner `key`: :meth:`run` yields (batch index, (values, seconds per example), recorded) as
    batches finish, each batch to the next free worker."""

    def __init__(self, workers: GridWorkers, key: str):
        self.workers, self.key = workers, key

    def run(self, jobs: list[dict]):
        pool, key = self.workers.pool, self.key
        for k, job in enumerate(jobs):
            pool.submit(lambda actor, kj: actor.run.remote(key, *kj), (k, job))
        while pool.has_next():
            yield pool.get_next_unordered()

