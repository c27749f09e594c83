"""The adapter library: one standard PEFT LoRA per task, plus a manifest.

Layout of a library directory::

    LIB/library.json                      manifest (see below)
    LIB/adapters/<name>/adapter_config.json
    LIB/adapters/<name>/adapter_model.safetensors
    LIB/plugin/                           the router (written by `dlp-lora train-plugin`)

``library.json``::

    {"format": 1,
     "base_model": {"name": ..., "path": ..., "fingerprint": ...},
     "adapters": {"<name>": {"task": ..., "path": "adapters/<name>", "rank": 8, "alpha": 16,
                             "targets": ["q_proj", "v_proj"], ...training and score fields...}}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DLPLoRAError
from .paths import atomic_write_text, read_json

MANIFEST = "library.json"
FORMAT = 1


@dataclass
class Library:
    root: Path
    manifest: dict = field(default_factory=dict)

    # ------------------------------------------------------------ open / create
    @classmethod
    def open(cls, root: str | os.PathLike) -> "Library":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DLPLoRAError(f"{root} is not an adapter library: {MANIFEST} is missing "
                               f"(create one with `dlp-lora train-loras --out {root}` or `dlp-lora library add`)")
        manifest = read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("adapters"), dict):
            raise DLPLoRAError(f"{path} is not a dlp-lora manifest (no 'adapters' object)")
        return cls(root, manifest)

    @classmethod
    def open_or_create(cls, root: str | os.PathLike, base_model: dict | None = None) -> "Library":
        root = Path(root)
        if (root / MANIFEST).is_file():
            lib = cls.open(root)
            if base_model is not None:
                lib.check_base(base_model)
            return lib
        return cls(root, {"format": FORMAT, "base_model": base_model or {}, "adapters": {}})

    # ------------------------------------------------------------ reading
    @property
    def names(self) -> list[str]:
        return list(self.manifest["adapters"])

    @property
    def base_model(self) -> dict:
        return self.manifest.get("base_model") or {}

    def entry(self, name: str) -> dict:
        try:
            return self.manifest["adapters"][name]
        except KeyError:
            raise DLPLoRAError(f"unknown adapter {name!r}; the library {self.root} holds: {', '.join(self.names) or '(none)'}") from None

    def adapter_dir(self, name: str) -> Path:
        return self.root / self.entry(name)["path"]

    def plugin_dir(self) -> Path:
        return self.root / "plugin"

    def check_base(self, base_model: dict) -> None:
        mine = self.base_model.get("fingerprint")
        theirs = base_model.get("fingerprint")
        if mine and theirs and mine != theirs:
            raise DLPLoRAError(
                f"the library {self.root} was built for base model {self.base_model.get('name')} "
                f"(fingerprint {mine}), not {base_model.get('name')} (fingerprint {theirs}); "
                f"use another --out directory or the matching --model")

    # ------------------------------------------------------------ writing
    def set_entry(self, name: str, entry: dict) -> None:
        self.manifest["adapters"][name] = entry
        self.save()

    def record_scores(self, results: dict[str, tuple[dict, dict]], source: str) -> list[str]:
        """Record per adapter its score on its own task against the base model: `results` maps a task to its
        (adapter result, base result). Saves the manifest; returns the adapters that do not beat the base model."""
        for name, (adapter, base) in results.items():
            if name in self.manifest["adapters"]:
                self.manifest["adapters"][name] = {**self.manifest["adapters"][name],
                                                   **score_record(adapter, base, source)}
        self.save()
        return [n for n in results if n in self.manifest["adapters"] and not self.manifest["adapters"][n]["beats_base"]]

    def save(self) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------- building a library by training

ADAPTER_META = "dlp_adapter.json"


def base_record(info) -> dict:
    return {"name": info.name, "path": info.path, "fingerprint": info.fingerprint, "architecture": info.architecture}


def _adapter_complete(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def _base_scores_path(root: Path) -> Path:
    return root / "base_scores.json"


def train_one(model, tokenizer, task: str, data_dir: str | os.PathLike, cfg, lib_root: Path, base: dict,
              eval_limit: int = 100, progress: bool = True, base_score: dict | None = None) -> tuple[dict, dict | None]:
    """Train, save (atomically) and score one task's adapter. Returns (manifest entry, base score used)."""
    import shutil
    import time

    from .evaluation import score_task
    from .tasks import load_split
    from .training import make_peft_model, train_adapter

    t0 = time.time()
    train = load_split(data_dir, task, "train")
    pm = make_peft_model(model, cfg)
    try:
        res = train_adapter(pm, tokenizer, train, cfg, desc=f"{task}", progress=progress)
        final = lib_root / "adapters" / task
        tmp = final.with_name(f".{task}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pm.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps({"task": task, "base_model": base, "train": cfg.to_dict()}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        entry = {"task": task, "path": f"adapters/{task}", "base_model": {"name": base.get("name"), "fingerprint": base.get("fingerprint")},
                 "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets), "n_train": len(train),
                 "examples_seen": res.examples, "steps": res.steps, "tokens": res.tokens, "first_loss": res.first_loss,
                 "final_loss": res.final_loss, "train_seconds": res.wall_seconds,
                 "tokens_per_second": round(res.tokens / max(res.wall_seconds, 1e-9), 1)}
        if eval_limit > 0:
            test = load_split(data_dir, task, "test")[:eval_limit]
            adapter_score = score_task(pm, tokenizer, task, test)
            if base_score is None:
                with pm.disable_adapter():
                    base_score = score_task(pm, tokenizer, task, test)
            entry.update(score_record(adapter_score, base_score, source=f"train-loras (first {len(test)} test examples)"))
        entry["wall_seconds"] = round(time.time() - t0, 1)
    finally:
        pm.unload()  # restore the plain backbone for the next task
    return entry, base_score


def score_record(adapter: dict, base: dict, source: str) -> dict:
    """The manifest fields for an adapter scored on its own task against the base model: `adapter` and `base` are
    task results (metric, n, main and every metric)."""
    def rounded(score):
        return {k: round(v, 2) for k, v in score.items() if isinstance(v, (int, float))}

    return {"score": {"metric": adapter["metric"], "n": adapter["n"], "adapter": round(adapter["main"], 2),
                      "base": round(base["main"], 2), "adapter_all": rounded(adapter), "base_all": rounded(base),
                      "source": source},
            "beats_base": adapter["main"] > base["main"]}


def _ray_train_task(model_path, task, data_dir, cfg_dict, lib_root, base, eval_limit, base_score):
    """Runs inside a Ray worker: load the backbone, train one adapter into the (shared) library directory."""
    from .backbone import load_backbone
    from .training import TrainConfig

    cfg_dict = dict(cfg_dict, targets=tuple(cfg_dict["targets"]))
    model, tok, _ = load_backbone(model_path)
    return train_one(model, tok, task, data_dir, TrainConfig(**cfg_dict), Path(lib_root), base, eval_limit,
                     progress=False, base_score=base_score)


def train_library(tasks, data_dir: str | os.PathLike, out: str | os.PathLike, model=None, cfg=None,
                  force: bool = False, eval_limit: int = 100, ray_address: str | None = None, log=print) -> Library:
    """Train one adapter per task into the library at `out` (resumable: finished adapters are skipped)."""
    from .backbone import load_backbone, resolve_model
    from .tasks import load_split, parse_tasks
    from .training import TrainConfig, check_targets

    cfg = cfg or TrainConfig()
    cfg.validate()
    names = parse_tasks(tasks, data_dir)
    for n in names:  # fail before any training if data is missing
        load_split(data_dir, n, "train")
        if eval_limit > 0:
            load_split(data_dir, n, "test")
    where = resolve_model(model)
    net, tok, info = load_backbone(where)
    check_targets(net, cfg.targets)
    base = base_record(info)
    lib = Library.open_or_create(out, base)
    lib.manifest["base_model"] = lib.manifest.get("base_model") or base
    lib.manifest["data_dir"] = str(Path(data_dir).resolve())
    root = Path(out)
    todo = [n for n in names if force or n not in lib.manifest["adapters"] or not _adapter_complete(root / "adapters" / n)]
    for n in names:
        if n not in todo:
            log(f"skip {n}: already in the library (use --force to retrain)")
    lib.save()
    base_cache = json.loads(_base_scores_path(root).read_text()) if _base_scores_path(root).is_file() else {}

    def cached_base(task):
        key = f"{base['fingerprint']}:{task}:{eval_limit}"
        return key, base_cache.get(key)

    def record(task, entry, bscore):
        key, _ = cached_base(task)
        if bscore is not None:
            base_cache[key] = bscore
            atomic_write_text(_base_scores_path(root), json.dumps(base_cache, indent=2))
        lib.set_entry(task, entry)
        sc = entry.get("score")
        msg = f"{task}: loss {entry['first_loss']:.3f} -> {entry['final_loss']:.3f} in {entry['train_seconds']:.0f}s"
        if sc:
            msg += f"; {sc['metric']} adapter {sc['adapter']:.1f} vs base {sc['base']:.1f}"
            if not entry["beats_base"]:
                msg += "  [FLAG: does not beat the base model]"
        log(msg)

    if ray_address and todo:
        import ray

        host = ray_address.rsplit(":", 1)[0]
        local = {"_node_ip_address": host} if host in ("127.0.0.1", "localhost") else {}
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False, **local)
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)(_ray_train_task)
        futures = {remote.remote(str(info.path), n, str(Path(data_dir).resolve()), cfg.to_dict(), str(root.resolve()),
                                 base, eval_limit, cached_base(n)[1]): n for n in todo}
        log(f"training {len(todo)} adapters on Ray at {ray_address} ({'GPU' if use_gpu else 'CPU'} workers)")
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                entry, bscore = ray.get(done[0])
            except Exception as exc:
                raise DLPLoRAError(f"training {futures[done[0]]} on Ray failed: {exc}") from exc
            record(futures[done[0]], entry, bscore)
    else:
        for i, n in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] training {n}")
            entry, bscore = train_one(net, tok, n, data_dir, cfg, root, base, eval_limit, base_score=cached_base(n)[1])
            record(n, entry, bscore)
    return lib


# ---------------------------------------------------------------- adding an adapter trained elsewhere

def _read_adapter(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    cfg_path = path / "adapter_config.json"
    if not path.is_dir():
        raise DLPLoRAError(f"{path}: no such adapter directory")
    if not cfg_path.is_file():
        raise DLPLoRAError(f"{path}: adapter_config.json is missing, so this is not a PEFT adapter directory")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise DLPLoRAError(f"{cfg_path} is corrupt: {exc}") from exc
    if acfg.get("peft_type") != "LORA":
        raise DLPLoRAError(f"{path}: peft_type is {acfg.get('peft_type')!r}; only LoRA adapters can be fused")
    r = acfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise DLPLoRAError(f"{path}: rank r={r!r} in adapter_config.json; it must be a positive integer")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise DLPLoRAError(f"{path}: adapter_model.safetensors is missing")
    shapes = {}
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    except Exception as exc:
        raise DLPLoRAError(f"{weights} is unreadable or corrupt: {exc}") from exc
    if not any(".lora_A." in k for k in shapes):
        raise DLPLoRAError(f"{weights} holds no lora_A tensors")
    return acfg, shapes


def validate_adapter(path: str | os.PathLike, model=None, base: dict | None = None) -> dict:
    """Check that a PEFT LoRA fits the base model: same base (when recorded), targets present,
    A [r, in] and B [out, r] shapes that match the model's layers and the configured rank."""
    import torch

    from .backbone import load_config

    path = Path(path)
    acfg, shapes = _read_adapter(path)
    meta = path / ADAPTER_META
    if base and meta.is_file():
        theirs = json.loads(meta.read_text()).get("base_model", {})
        if theirs.get("fingerprint") and base.get("fingerprint") and theirs["fingerprint"] != base["fingerprint"]:
            raise DLPLoRAError(f"{path} was trained on base model {theirs.get('name')} ({theirs['fingerprint']}), "
                               f"but the library's base is {base.get('name')} ({base['fingerprint']})")
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    modules = dict(net.named_modules())
    rank_pattern = acfg.get("rank_pattern") or {}
    targets = set()
    for key, shape in shapes.items():
        if ".lora_A." not in key:
            continue
        mod_path = key.split(".lora_A.")[0]
        for prefix in ("base_model.model.", ""):
            if mod_path.startswith(prefix) and mod_path[len(prefix):] in modules:
                mod_name = mod_path[len(prefix):]
                break
        else:
            raise DLPLoRAError(f"{path}: the adapter targets {mod_path}, which the base model {config.model_type} "
                               f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers) does not have")
        layer = modules[mod_name]
        if not isinstance(layer, torch.nn.Linear):
            raise DLPLoRAError(f"{path}: {mod_name} is not a linear layer")
        r = next((v for k, v in rank_pattern.items() if mod_name.endswith(k)), acfg["r"])
        b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if b_shape is None:
            raise DLPLoRAError(f"{path}: {mod_name} has lora_A but no lora_B")
        if shape != (r, layer.in_features) or b_shape != (layer.out_features, r):
            raise DLPLoRAError(f"{path}: shape mismatch at {mod_name}: A {list(shape)}, B {list(b_shape)}; the base "
                               f"layer is {layer.in_features}->{layer.out_features} and the rank is {r}, so A must be "
                               f"[{r}, {layer.in_features}] and B [{layer.out_features}, {r}]")
        targets.add(mod_name.rsplit(".", 1)[-1])
    return {"rank": acfg["r"], "alpha": acfg.get("lora_alpha", acfg["r"]), "targets": sorted(targets),
            "use_rslora": bool(acfg.get("use_rslora"))}


def add_adapter(library: str | os.PathLike, name: str, path: str | os.PathLike, model=None, force: bool = False) -> dict:
    """Copy a PEFT LoRA into the library after validating it against the library's base model.
    Creates the library (for `model`, default the embedded backbone) if it does not exist yet."""
    import re
    import shutil

    from .backbone import fingerprint, model_name, resolve_model

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise DLPLoRAError(f"adapter name {name!r}: use letters, digits, '_', '-' and '.' only")
    root = Path(library)
    if (root / MANIFEST).is_file():
        lib = Library.open(root)
        base = lib.base_model
        where = base.get("path") if model is None else resolve_model(model)
        if model is not None:
            lib.check_base({"name": model_name(where), "fingerprint": fingerprint(where)})
    else:
        where = resolve_model(model)
        base = {"name": model_name(where), "path": str(Path(where).resolve()), "fingerprint": fingerprint(where)}
        lib = Library.open_or_create(root, base)
    if name in lib.manifest["adapters"] and not force:
        raise DLPLoRAError(f"the library already has an adapter named {name!r}; pick another name or pass --force")
    info = validate_adapter(path, where, base)
    final = root / "adapters" / name
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(path, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    entry = {"task": name, "path": f"adapters/{name}", "source": str(Path(path).resolve()), **info}
    lib.set_entry(name, entry)
    return entry
