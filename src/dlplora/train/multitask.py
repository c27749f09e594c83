"""The multi-task LoRA baseline (issue 28, `dlp-lora train-multitask`): one adapter trained on the union of the
library's tasks' training examples, kept in the library as a special adapter (``"special": "multitask"`` in
library.json): served when a request names it (``"model": "multitask"``), never routed to, and outside merge-all,
TIES and Arrow (:attr:`dlplora.library.Library.names` leaves it out). `dlp-lora eval --methods multitask` scores
it in every setting.

The union leaves out each task's validation slice (the one ``train-loras --recipe select`` holds out), so the
baseline never trains on examples the task adapters did not see. Resumable: the run's state is saved at every tenth
of its steps in LIB/.multitask/<name>/state.pt and a rerun continues from there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import DLPLoRAError
from ..library import MULTITASK, SPECIAL, Library, check_adapter_name
from .select import VAL_SIZE, loss_summary, run_with_checkpoints, validation_split

DEFAULT_EXAMPLES_PER_TASK = 450  # the select recipe's longest checkpoint: the same examples as the task adapters


def library_top_layers(lib: Library):
    """The task adapters' top-layers setting when they all record the same one, else the library default (10)."""
    values = {lib.manifest["adapters"][n].get("top_layers", 10) for n in lib.names}
    return values.pop() if len(values) == 1 else 10


def union_examples(tasks, data_dir, val_size: int, seed: int) -> list[dict]:
    """Every task's training examples but its validation slice, in one list."""
    from ..tasks import load_split

    out = []
    for t in tasks:
        train = load_split(data_dir, t, "train")
        out += validation_split(train, val_size, seed)[0] if val_size else train
    return out


def train_multitask(library, data_dir=None, cfg=None, name: str = MULTITASK, tasks=None, examples: int | None = None,
                    val_size: int = VAL_SIZE, model=None, force: bool = False, log=print) -> dict:
    """Train the multi-task adapter `name` on the union of `tasks` (default: the library's task adapters), for
    `examples` examples seen in all (default 450 per task), and record it in the library. Returns its entry."""
    import dataclasses
    import shutil

    from ..backbone import load_backbone
    from ..tasks import prepared_format
    from .library_builder import adapter_entry, save_adapter
    from .lora import TrainConfig, bottom_cache, check_targets, make_peft_model

    check_adapter_name(name)
    lib = Library.open(library)
    data_dir = data_dir or lib.manifest.get("data_dir")
    if not data_dir or not Path(data_dir).is_dir():
        raise DLPLoRAError(f"no prepared data: pass --data (the library {lib.root} records {data_dir!r})")
    tasks = list(tasks or lib.names)
    if not tasks:
        raise DLPLoRAError(f"the library {lib.root} holds no task adapters to take the tasks from; pass --tasks")
    if name in lib.names:
        raise DLPLoRAError(f"{name!r} is a task adapter of {lib.root}; give the multi-task adapter another --name")
    cfg = cfg or TrainConfig(top_layers=library_top_layers(lib))
    cfg.validate()
    work = lib.root / ".multitask" / name
    if name in lib.special_names and not force and (lib.adapter_dir(name) / "adapter_config.json").is_file():
        log(f"skip {name}: already in the library (use --force to retrain)")
        return lib.entry(name)
    if force:
        shutil.rmtree(work, ignore_errors=True)
    train = union_examples(tasks, data_dir, val_size, cfg.seed)
    total = examples or DEFAULT_EXAMPLES_PER_TASK * len(tasks)
    if total <= 0:
        raise DLPLoRAError(f"--examples must be positive, got {total}")
    steps = max(1, math.ceil(total / cfg.batch_size))
    cfg = dataclasses.replace(cfg, steps=steps)
    points = sorted({max(1, round(steps * k / 10)) for k in range(1, 11)})
    net, tok, info = load_backbone(lib.base_model_dir(model))
    lib.check_base(info.to_dict())
    check_targets(net, cfg.targets)
    log(f"{name}: {len(tasks)} tasks, {len(train)} training examples, {steps} steps of {cfg.batch_size} "
        f"(rank {cfg.rank}, top {cfg.top_layers or 'all'} layers, lr {cfg.lr:g})")
    pm = make_peft_model(net, cfg)
    last = {}
    try:
        def on_point(step, st):
            last.update(st, step=step)
            log(f"{name}: step {step} of {steps}, {st['train_seconds']:.0f} s, loss {st['losses'][-1]:.3f}")

        run_with_checkpoints(pm, tok, train, cfg, points, on_point, state_path=work / "state.pt",
                             prefix=bottom_cache(pm, cfg), desc=name, log=log)
        save_adapter(pm, lib.root, name, {"task": name, "base_model": lib.base_model, "train": cfg.to_dict(),
                                          SPECIAL: MULTITASK, "tasks": tasks})
    finally:
        pm.unload()
    first, final = loss_summary(last.get("losses", []))
    entry = adapter_entry(name, lib.base_model, cfg, n_train=len(train), examples_seen=last.get("seen"),
                          steps=steps, tokens=last.get("tokens", 0), first_loss=first, final_loss=final,
                          train_seconds=last.get("train_seconds", 0.0), tasks=tasks,
                          data_formats={t: prepared_format(data_dir, t) for t in tasks}, validation_held_out=val_size)
    entry.update({SPECIAL: MULTITASK, "wall_seconds": entry["train_seconds"], "routable": False})
    lib = Library.open(lib.root)  # re-read: another process may have added adapters meanwhile
    lib.set_entry(name, entry)
    (work / "state.pt").unlink(missing_ok=True)
    log(f"{name}: trained in {entry['train_seconds']:.0f} s; recorded in {os.path.join(lib.root, 'library.json')} "
        f"as a special adapter (served when named, never routed to)")
    return entry
