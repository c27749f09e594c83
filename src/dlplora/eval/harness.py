"""The evaluation harness (`dlp-lora eval`, `dlp-lora reproduce`, `dlp-lora demo`): settings x methods.

Scoring: multiple choice by log-likelihood ranking (BIG-bench multiple_choice_grade, the main figure)
plus exact match of a greedy generated answer; exact-match tasks by greedy generation; generative tasks
by greedy generation then BLEU / ROUGE-1 / ROUGE-L (+ final-answer accuracy for GSM8K); optionally a
clearly labelled teacher-forced variant (argmax at the gold target positions, as the paper's code did).

Every prediction is cached (:mod:`.cache`); a method's "seconds" is the sum of the compute time of its
predictions (recorded with them, so it survives a resume) plus, for dlp, the routing time.

Uncertainty (:mod:`.stats`): every task result carries its per-example scores and the 95% bootstrap interval of
each figure, every method its mean's interval (``mean_ci``), and a setting with both the oracle LoRA and the base
model the paired test of the two on each task (``paired``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..config import check_p
from ..errors import DLPLoRAError
from ..tasks import user_message
from .cache import (PredictionCache, adapters_signature, cache_namespace, content_tag, library_signature,
                    precision_tag, set_tag)
from .metrics import scoring_kind, summarise
from .report import write_outputs
from .runners import (ARROW_IMPL, FusedRunner, PeftRunner, build_arrow_model, build_static_merge, build_ties_model,
                      warm_up)
from .scoring import gen_budget, predict_batch
from .settings import (MT_MCQ_REPLIES, RESULTS_FORMAT, SINGLE_METHODS, TEACHER_FORCED_METHODS, EvalConfig, assistant_reply,
                       build_conversations,
                       build_stream, dlp_variant, fixed_sets, setting_tasks, top_names)
from ..stats import paired_tests, versus


def _chunks(seq, n):
    for s in range(0, len(seq), n):
        yield seq[s:s + n]


def run_method_items(runner, method: str, items: list[dict], sets: list[dict], cache: PredictionCache, sig: str,
                     teacher_forced: bool = False, batch_size: int = 8, progress: bool = True, desc: str = "",
                     choice_gen: bool = True, workers=None) -> list[dict]:
    """Predictions for `items` (in their order, batched as they come): per item {"choice", "gen", "tf"}
    (as applicable), "seconds" (the compute time of answering: choice ranking and generation, from the cache for
    cached predictions) and "tf_seconds" (that of the teacher-forced scoring, kept apart so that a method's time is
    the same with or without it). `choice_gen`: also generate an answer for multiple-choice items (their exact
    match; a conversation's next turn needs it). `workers` (:class:`dlplora.eval.ray_grid.GridWorkers`, bound to
    this method's runner): compute the batches on a Ray cluster."""
    from tqdm.auto import tqdm

    tok = runner.tokenizer
    jobs = []  # (what, item index)
    for i, it in enumerate(items):
        kind = scoring_kind(it["task"], it["ex"])
        if kind == "choice":
            jobs.append(("choice", i))
        if kind != "choice" or choice_gen:
            jobs.append(("gen", i))
        if teacher_forced and kind == "gen" and not it.get("history"):
            jobs.append(("tf", i))
    preds = [{"seconds": 0.0, "tf_seconds": 0.0} for _ in items]
    todo: dict[str, list[int]] = {"choice": [], "gen": [], "tf": []}
    ns = cache_namespace(method)
    keys = [f"{sig}|{ns}|{items[i]['uid']}#{content_tag(items[i])}" for i in range(len(items))]
    for what, i in jobs:
        rec = cache.get(f"{keys[i]}|{what}|{set_tag(sets[i])}")
        if rec is None:
            todo[what].append(i)
        else:
            preds[i][what] = rec["v"]
            preds[i]["tf_seconds" if what == "tf" else "seconds"] += float(rec.get("s", 0.0))
    # Batch like with like: generation by budget then prompt length, scoring by prompt length. A batch decodes until
    # its longest budget and pads to its longest prompt, so a shuffled stream batched as it comes wastes most of its
    # compute on finished rows and padding. The order depends only on the items, so every method gets the same batches.
    plen = {i: len(items[i]["ex"].get("input", "")) + sum(len(h.get("content", "")) for h in items[i].get("history") or [])
            for i in range(len(items))}
    budget = {i: gen_budget(tok, items[i]) for i in todo["gen"]}
    todo["gen"].sort(key=lambda i: (budget[i], plen[i]))
    todo["choice"].sort(key=lambda i: plen[i])
    todo["tf"].sort(key=lambda i: plen[i])
    n_todo = sum(len(v) for v in todo.values())
    bar = tqdm(total=len(jobs), initial=len(jobs) - n_todo, desc=desc or method, unit="pred", disable=not progress,
               leave=False, dynamic_ncols=True)
    batches = [(what, idx) for what in ("choice", "gen", "tf") for idx in _chunks(todo[what], batch_size)]
    work = [{"what": what, "exs": [items[i]["ex"] for i in idx], "sets": [sets[i] for i in idx],
             "hists": [items[i].get("history") or [] for i in idx],
             "budgets": [budget[i] for i in idx] if what == "gen" else None, "batch_size": batch_size,
             "keys": [f"{keys[i]}|{what}|{set_tag(sets[i])}" for i in idx], "ns": ns} for what, idx in batches]
    # one machine: each batch here, in order; a cluster (`workers`, eval/ray_grid.py): the same batches on its workers
    done = workers.run(work) if workers is not None else ((k, predict_batch(runner, job), False)
                                                          for k, job in enumerate(work))
    try:
        for k, (vals, dt), recorded in done:
            (what, idx), job = batches[k], work[k]
            recs = []
            for i, key, v in zip(idx, job["keys"], vals):
                preds[i][what] = v
                preds[i]["tf_seconds" if what == "tf" else "seconds"] += dt
                recs.append({"k": key, "v": v, "s": round(dt, 5)})
            if recorded:  # a worker appended them to the cache directory (shared storage) itself
                cache.remember(recs)
            else:
                cache.put_many(ns, recs)
            bar.update(len(idx))
    finally:
        bar.close()
    return preds


def plugin_summary(library) -> dict | None:
    """The plugin's own record (params, held-out routing accuracy, training time) from its plugin.json."""
    cfg = library.plugin_dir() / "plugin.json"
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return None
    return {"params": d.get("params"), "report": d.get("report"), "default_p": d.get("default_p")}


def run_evaluation(config: EvalConfig | None = None, *, engine=None, arrow=None, log=print, **fields) -> dict:
    """Run the settings x methods grid of `config` (or an EvalConfig of the keyword `fields`); write
    OUT/results.json, OUT/RESULTS.md and OUT/figures/*.png unless ``config.write`` is off. `engine` (a
    DLPLoRA) and `arrow` (a (model, tokenizer) pair) may be given to reuse loaded models. ``config.p_sweep``:
    extra top-p values for `dlp` (each weighting) on the widest composite setting evaluated (results["p_sweep"])."""
    if config is not None and not isinstance(config, EvalConfig):
        raise TypeError(f"run_evaluation takes an EvalConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    run = _Run(config if config is not None else EvalConfig(**fields), engine, arrow, log)
    try:
        c = run.config
        results = {"format": RESULTS_FORMAT, "config": run.config_record(), "settings": {}, "skipped": run.skipped}
        # The widest composite runs first: the narrower settings then reuse its predictions, so every method of every
        # setting is timed on the same shuffled, mixed-task batches (single would otherwise batch base / LoRA by task).
        for setting in sorted(run.settings, key=lambda x: x != "composite-26"):
            results["settings"][setting] = run.setting(setting)
        results["settings"] = {x: results["settings"][x] for x in run.settings}  # report in the order asked
        flagged = run.record_single_scores(results["settings"].get("single"))
        if flagged is not None:
            results["flagged_adapters"] = flagged
        grid = {"predictions": len(run.cache.used), "compute_seconds": round(run.cache.used_seconds(), 1)}
        if run.p_sweep and "dlp" in run.methods and "dlp" not in run.skipped:
            results["p_sweep"] = run.sweep_p()
        results["cache"] = {"dir": str(run.cache.dir), "hits": run.cache.hits, "new_predictions": run.cache.new,
                            "grid": grid}
        results["run_seconds"] = round(time.perf_counter() - t_start, 1)
        if c.note:
            results["note"] = c.note
        if c.write:
            write_outputs(results, c.out, preamble=c.note)
        return results
    finally:
        if run.workers is not None:
            run.workers.close()


class _Run:
    """One evaluation run: the checked configuration, the loaded models, the prediction cache; one method per
    piece of the grid."""

    def __init__(self, config: EvalConfig, engine, arrow, log):
        from ..engine import DLPLoRA
        from ..library import Library
        from ..tasks import load_split

        self.config = c = config
        self.log = log
        self.workers = None
        if c.ray_address:  # no cluster there: one clear line before anything is read or loaded
            from ..cluster import join_ray

            join_ray(c.ray_address)
        self.lib = Library.open(c.library)
        self.data = c.data or self.lib.manifest.get("data_dir")
        self.names = self.lib.names
        self.tasks = self._check(c)
        self.p = check_p(c.p, "--p")
        self.p_sweep = sorted({check_p(x, "--p-sweep values") for x in c.p_sweep or ()} | ({self.p} if c.p_sweep else set()))
        self.settings, self.methods, self.weightings = list(c.settings), list(c.methods), list(c.weightings)
        self.examples = {t: load_split(self.data, t, "test")[:c.limit] if c.limit else load_split(self.data, t, "test")
                         for t in self.tasks}
        self.cache = PredictionCache(c.cache_dir or Path(c.out) / "cache")
        self.engine = engine if engine is not None else DLPLoRA.from_library(self.lib.root, model=c.model, p=self.p,
                                                                             base_threshold=c.base_threshold,
                                                                             dtype=c.dtype, device=c.device,
                                                                             quantize=c.quantize, adapters=self.names)
        self.fused = FusedRunner(self.engine)
        self.precision = precision_tag(self.engine)
        self.sig = library_signature(self.lib) + self.precision
        self.skipped: dict[str, str] = {}
        if "dlp" in self.methods and self.engine.router is None:
            self.skipped["dlp"] = "the library has no plugin (train one with `dlp-lora train-plugin`)"
        self.arrow_runner = None
        if "arrow" in self.methods:
            try:
                if arrow is None:
                    arrow = build_arrow_model(self.lib, model=c.model, top_k=c.arrow_top_k, seed=c.seed,
                                              dtype=self.engine.model.dtype, device=self.engine.model.device)
                self.arrow_runner = PeftRunner(*arrow)
            except (DLPLoRAError, ValueError, RuntimeError, KeyError) as exc:
                self.skipped["arrow"] = f"could not build PEFT's Arrow model: {exc}"
        self.ties_runner = None
        if "ties" in self.methods:
            try:
                self.ties_runner = PeftRunner(*build_ties_model(self.lib, model=c.model, density=c.ties_density,
                                                                dtype=self.engine.model.dtype,
                                                                device=self.engine.model.device))
            except (DLPLoRAError, ValueError, RuntimeError, KeyError) as exc:
                self.skipped["ties"] = f"could not build PEFT's TIES merge: {exc}"
        # merge-all and the multi-task adapters: one static merge each, so they cost what the base model costs
        merges = {"merge-all": {n: 1.0 / len(self.names) for n in self.names}} if "merge-all" in self.methods else {}
        self.multitask = self.lib.multitask_names() if "multitask" in self.methods else []
        if "multitask" in self.methods and not self.multitask:
            self.skipped["multitask"] = ("the library has no multi-task adapter (train one with `dlp-lora "
                                         "train-multitask`)")
        merges.update({n: {n: 1.0} for n in self.multitask})
        self.static = {m: PeftRunner(*build_static_merge(self.lib, w, model=c.model, dtype=self.engine.model.dtype,
                                                         device=self.engine.model.device)) for m, w in merges.items()}
        if c.ray_address:  # the batches on the cluster's workers, which load these models themselves
            from .ray_grid import GridWorkers

            self.workers = GridWorkers(c.ray_address, self.worker_recipe(merges), self.cache.dir, c.ray_workers, log)
        for m, why in self.skipped.items():
            log(f"skipping {m}: {why}")
        warm_up(self.fused, [r for r in (self.arrow_runner, self.ties_runner, *self.static.values()) if r is not None],
                 self.names)

    def _check(self, c: EvalConfig) -> list[str]:
        """The tasks to evaluate, after checking the data, the library and the limit."""
        from ..tasks import parse_tasks

        if not self.data:
            raise DLPLoRAError(f"no test data: pass --data PREPARED_DIR (the library {c.library} records no data_dir)")
        if not Path(self.data).is_dir():
            raise DLPLoRAError(f"prepared data directory {self.data} does not exist; run `dlp-lora data prepare "
                               f"--out {self.data}`")
        if not self.names:
            raise DLPLoRAError(f"the library {c.library} holds no adapters")
        if c.mt_mcq_reply not in MT_MCQ_REPLIES:
            raise DLPLoRAError(f"--mt-mcq-reply must be one of {', '.join(MT_MCQ_REPLIES)}, got {c.mt_mcq_reply!r}")
        tasks = list(self.names)
        if c.tasks:
            wanted = parse_tasks(c.tasks, self.data) if isinstance(c.tasks, str) else list(c.tasks)
            missing = [t for t in wanted if t not in self.names]
            if missing:
                raise DLPLoRAError(f"task(s) {', '.join(missing)} have no adapter in the library {c.library} "
                                   f"(it holds: {', '.join(self.names)})")
            tasks = [t for t in self.names if t in wanted]
        if c.limit is not None and c.limit < 1:
            raise DLPLoRAError(f"--limit must be at least 1, got {c.limit}")
        return tasks

    def worker_recipe(self, merges: dict) -> dict:
        """What a worker on the cluster loads (eval/ray_grid.py): this run's models, at the precision resolved here."""
        c, model = self.config, self.engine.model
        return {"library": str(self.lib.root.resolve()), "model": c.model, "names": self.names, "quantize":
                self.engine.quantize, "dtype": str(model.dtype).replace("torch.", ""), "torch_dtype": model.dtype,
                "device": model.device.type, "arrow_top_k": c.arrow_top_k, "seed": c.seed,
                "ties_density": c.ties_density, "static": merges}

    def _workers(self, method: str, name: str):
        """The cluster's workers, for the runner of `method` (None: compute here)."""
        if self.workers is None:
            return None
        static = {"multitask": f"static:{name}", "merge-all": "static:merge-all"}
        return self.workers.bind(static.get(method) or (method if method in ("arrow", "ties") else "fused"))

    def config_record(self) -> dict:
        c, names, engine = self.config, self.names, self.engine
        return {"library": str(Path(c.library).resolve()), "data": str(Path(self.data).resolve()), "adapters": names,
                "backbone": (engine.info.to_dict() if getattr(engine, "info", None) is not None else None),
                "tasks": self.tasks, "limit": c.limit, "p": self.p, "weightings": self.weightings,
                "methods": self.methods, "settings": self.settings, "teacher_forced": c.teacher_forced,
                "mcq_exact_match": c.mcq_exact_match, "seed": c.seed, "batch_size": c.batch_size, "route_window": c.route_window, "base_threshold": "off" if c.base_threshold == math.inf else c.base_threshold, "turns": c.turns,
                "mt_mcq_reply": c.mt_mcq_reply,
                "arrow": {"top_k": min(c.arrow_top_k, len(names)), "temperature": 1.0,
                          "implementation": "peft ArrowConfig / arrow_router LoRA variant; experts mixed by "
                                            "runners._arrow_mix (equal to PEFT's forward, without its "
                                            "tokens x experts x out intermediate)"},
                "merge_all": f"all {len(names)} adapters at weight 1/{len(names)}, merged into the weights once",
                "multitask": {n: {k: self.lib.entry(n).get(k) for k in ("rank", "top_layers", "steps", "examples_seen",
                                                                         "n_train", "train_seconds")}
                              for n in getattr(self, "multitask", [])},
                "ties": {"density": c.ties_density, "weights": 1.0,
                         "implementation": "peft add_weighted_adapter(combination_type='ties'), merged"},
                "command": c.command, "library_signature": self.sig, "p_sweep": self.p_sweep,
                "plugin": plugin_summary(self.lib)}

    def variants(self, setting: str) -> list[tuple[str, str, str | None]]:
        """(reported name, method, weighting) of every method run in `setting`."""
        out = []
        for m in self.methods:
            if m in self.skipped or (setting == "single" and m not in SINGLE_METHODS):
                continue
            if m == "dlp":
                out += [(dlp_variant(w), "dlp", w) for w in self.weightings]
            elif m == "multitask":
                out += [(n, "multitask", None) for n in self.multitask]
            else:
                out.append((m, m, None))
        return out

    def _dlp_sets(self, texts: list[str], p: float, weighting: str) -> list[dict]:
        """The router's sets for `texts` at top-p `p` with `weighting` (top-p selection: no top-k)."""
        return self.engine.route(texts, routing=self.engine.routing.replace(p=p, weighting=weighting, top_k=None))

    def _runner_and_sig(self, method: str, name: str):
        if method == "multitask":
            return self.static[name], f"{adapters_signature(self.lib, [name])}{self.precision}-static"
        if method == "merge-all":
            return self.static[method], f"{self.sig}-static"
        if method == "arrow":
            return self.arrow_runner, (f"{self.sig}-k{min(self.config.arrow_top_k, len(self.names))}s{self.config.seed}"
                                       f"-{ARROW_IMPL}")
        if method == "ties":
            return self.ties_runner, f"{self.sig}-d{self.config.ties_density:g}"
        return self.fused, self.sig

    def setting(self, setting: str) -> dict:
        """Every method of one setting."""
        c, examples = self.config, self.examples
        s_tasks = setting_tasks(setting, examples)
        if not s_tasks:
            self.log(f"== {setting}: no task of this group in the library; skipped")
            return {"tasks": [], "skipped": "no task of this group in the library"}
        s_res: dict = {"tasks": s_tasks, "n": {t: len(examples[t]) for t in s_tasks}, "methods": {}}
        if setting == "multiturn":
            convs = build_conversations(examples, s_tasks, turns=c.turns, seed=c.seed, limit=c.conversations)
            s_res.update({"conversations": len(convs), "turns": c.turns, "route_window": c.route_window})
            if not convs:
                s_res["skipped"] = "needs at least 2 tasks"
                return s_res
            self.log(f"== {setting}: {', '.join(s_tasks)} ({len(convs)} conversations of {c.turns} turns)")
        else:
            stream = build_stream(examples, s_tasks, seed=c.seed) if setting != "single" else \
                [{"uid": f"{t}/{ex.get('id', i)}", "task": t, "ex": ex, "history": []}
                 for t in s_tasks for i, ex in enumerate(examples[t])]
            self.log(f"== {setting}: {', '.join(s_tasks)} ({len(stream)} prompts)")
        for name, method, weighting in self.variants(setting):
            if setting == "multiturn":
                entry = self.multiturn(name, method, weighting, convs, s_tasks, f"{setting} {name}")
            else:
                entry = self.stream(name, method, weighting, stream, s_tasks, f"{setting} {name}")
            s_res["methods"][name] = entry
            extra = ""
            if "router_accuracy" in entry:
                extra = (f"; router picked the true task {entry['router_accuracy']:.0f}%, "
                         f"{entry['mean_adapters']:.2f} adapters")
            self.log(f"  {name:>10}: mean {entry['mean']:.2f} in {entry['seconds']:.1f}s{extra}")
        ms = s_res["methods"]
        if "lora" in ms and "base" in ms:  # the same examples in the same order: paired example by example
            s_res["paired"] = paired_tests(ms["lora"]["tasks"], ms["base"]["tasks"])
            better = sum(r["better"] for r in s_res["paired"].values())
            self.log(f"  LoRA significantly better than base (paired test, 95%) on {better} of "
                     f"{len(s_res['paired'])} tasks")
        for mt in (n for n in self.multitask if n in ms):  # DLP-LoRA and the oracle against each multi-task adapter
            s_res.setdefault("versus_multitask", {})[mt] = {m: versus(ms[m], ms[mt]) for m in ("dlp", "lora") if m in ms}
            for m, v in s_res["versus_multitask"][mt].items():
                self.log(f"  {m} - {mt}: {v['diff']:+.2f} (paired 95% interval {v['ci']})")
        return s_res

    def stream(self, name, method, weighting, stream, tasks, desc) -> dict:
        """One method over a stream of single-turn items."""
        c = self.config
        runner, sig = self._runner_and_sig(method, name)
        t0 = time.perf_counter()
        route_log = None
        if method == "dlp":
            sets = self._dlp_sets([user_message(it["ex"]) for it in stream], self.p, weighting)  # the prompt text only
            route_log = top_names(sets)
        else:
            sets = fixed_sets(method, stream, self.names)
        route_s = time.perf_counter() - t0
        teacher_forced = c.teacher_forced and method in TEACHER_FORCED_METHODS
        preds = run_method_items(runner, name, stream, sets, self.cache, sig, teacher_forced=teacher_forced,
                                 batch_size=c.batch_size, progress=c.progress, desc=desc,
                                 choice_gen=c.mcq_exact_match, workers=self._workers(method, name))
        entry = summarise(tasks, stream, preds, sets, route_s, route_log)
        if method == "dlp":
            entry.update({"weighting": weighting, "p": self.p, "routing_seconds": round(route_s, 4)})
        return entry

    def multiturn(self, name, method, weighting, convs, tasks, desc) -> dict:
        """Turn by turn over all conversations: each turn's history is the earlier turns with this method's own
        answers; the router reads engine.routing_text(turn, history, route_window)."""
        c, engine = self.config, self.engine
        runner, sig = self._runner_and_sig(method, name)
        all_items, all_preds, all_sets, route_log = [], [], [], []
        histories = [[] for _ in convs]
        route_s = 0.0
        turns = len(convs[0])
        for t in range(turns):
            items = []
            for k, conv in enumerate(convs):
                step = conv[t]
                uid = "mt-w%d|%s" % (c.route_window, ">".join(x["uid"] for x in conv[: t + 1]))
                items.append({"uid": uid, "task": step["task"], "ex": step["ex"], "history": list(histories[k]),
                              "turn": t})
            t0 = time.perf_counter()
            if method == "dlp":
                texts = [engine.routing_text(user_message(it["ex"]), it["history"], window=c.route_window)
                         for it in items]
                sets = self._dlp_sets(texts, self.p, weighting)
                route_log += top_names(sets)
            else:
                sets = fixed_sets(method, items, self.names)
            route_s += time.perf_counter() - t0
            # the last turn's reply goes into no history: a multiple-choice turn then needs no generation
            choice_gen = c.mcq_exact_match or (c.mt_mcq_reply == "generated" and t < turns - 1)
            preds = run_method_items(runner, name, items, sets, self.cache, sig, teacher_forced=False,
                                     batch_size=c.batch_size, progress=c.progress, desc=f"{desc} turn {t + 1}",
                                     choice_gen=choice_gen, workers=self._workers(method, name))
            for k, (it, pr) in enumerate(zip(items, preds)):
                histories[k] = histories[k] + [{"role": "user", "content": user_message(it["ex"])},
                                               {"role": "assistant", "content": assistant_reply(it, pr, c.mt_mcq_reply)}]
            all_items += items
            all_preds += preds
            all_sets += sets
        entry = summarise(tasks, all_items, all_preds, all_sets, route_s, route_log if method == "dlp" else None)
        per_turn = []
        for t in range(turns):
            idx = [i for i, it in enumerate(all_items) if it["turn"] == t]
            sub = summarise(tasks, [all_items[i] for i in idx], [all_preds[i] for i in idx],
                            [all_sets[i] for i in idx], 0.0, [route_log[i] for i in idx] if method == "dlp" else None)
            per_turn.append({k: v for k, v in sub.items()
                             if k in ("mean", "mean_ci", "router_accuracy", "mean_adapters", "items")})
        entry["per_turn"] = per_turn
        if method == "dlp":
            entry.update({"weighting": weighting, "p": self.p, "routing_seconds": round(route_s, 4)})
        return entry

    def record_single_scores(self, single: dict | None) -> list[str] | None:
        """The single setting's adapter vs base scores, written to the library's manifest; returns the adapters
        that do not beat the base model (None when the setting did not run base and lora)."""
        methods = (single or {}).get("methods") or {}
        if "base" not in methods or "lora" not in methods:
            return None
        pairs = {t: (r, methods["base"]["tasks"][t]) for t, r in methods["lora"]["tasks"].items()
                 if "main" in r and "main" in methods["base"]["tasks"].get(t, {})}
        flagged = self.lib.record_scores(pairs, source=f"dlp-lora eval --setting single "
                                                       f"(limit {self.config.limit or 'all'})")
        self.log(f"recorded adapter vs base scores of {len(pairs)} adapters in {self.lib.root / 'library.json'}")
        for t in flagged:
            a, b = pairs[t]
            self.log(f"  [FLAG] {t}: adapter {a['main']:.1f} does not beat base {b['main']:.1f} ({a['metric']})")
        return flagged

    def sweep_p(self) -> dict:
        """`dlp` at each top-p value (and weighting) on the widest composite setting evaluated, against the oracle
        LoRA on the same stream. Teacher-forced scoring is skipped here (generation and choice ranking only)."""
        c, log = self.config, self.log
        order = ["composite-26", "composite-17", "composite-9"]
        setting = next((s for s in order if s in self.settings), "composite-26")
        s_tasks = setting_tasks(setting, self.examples)
        stream = build_stream(self.examples, s_tasks, seed=c.seed)
        texts = [user_message(it["ex"]) for it in stream]
        log(f"== p sweep on {setting}: p in {', '.join(f'{x:g}' for x in self.p_sweep)}")
        lora_sets = fixed_sets("lora", stream, self.names)
        preds = run_method_items(self.fused, "lora", stream, lora_sets, self.cache, self.sig, batch_size=c.batch_size,
                                 progress=c.progress, desc="p sweep lora", choice_gen=c.mcq_exact_match,
                                 workers=self._workers("lora", "lora"))
        lora = summarise(s_tasks, stream, preds, lora_sets, 0.0)
        rows = []
        for weighting in self.weightings:
            name = dlp_variant(weighting)
            for pv in self.p_sweep:
                t0 = time.perf_counter()
                sets = self._dlp_sets(texts, pv, weighting)
                route_s = time.perf_counter() - t0
                preds = run_method_items(self.fused, name, stream, sets, self.cache, self.sig, batch_size=c.batch_size,
                                         progress=c.progress, desc=f"p sweep {name} p={pv:g}",
                                         choice_gen=c.mcq_exact_match, workers=self._workers("dlp", name))
                e = summarise(s_tasks, stream, preds, sets, route_s, top_names(sets))
                top_w = [max(s.values()) for s in sets if s]
                row = {"p": pv, "weighting": weighting, "method": name, "mean": e["mean"], "mean_ci": e.get("mean_ci"),
                       "seconds": e["seconds"],
                       "router_accuracy": e["router_accuracy"], "mean_adapters": e["mean_adapters"],
                       "max_adapters": max((len(s) for s in sets), default=0),
                       "single_adapter_share": 100 * sum(len(s) == 1 for s in sets) / max(1, len(sets)),
                       "mean_top_weight": sum(top_w) / max(1, len(top_w)),
                       "gap_to_lora": e["mean"] - lora["mean"],
                       "tasks": {t: r.get("main") for t, r in e["tasks"].items()}}
                rows.append(row)
                log(f"  {name:>10} p={pv:<4g}: mean {e['mean']:.2f} (LoRA {lora['mean']:.2f}), "
                    f"{e['mean_adapters']:.2f} adapters, top weight {row['mean_top_weight']:.2f}")
        return {"setting": setting, "tasks": s_tasks, "lora_mean": lora["mean"], "lora_mean_ci": lora.get("mean_ci"),
                "lora_seconds": lora["seconds"], "rows": rows}
