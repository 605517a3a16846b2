"""Hyperparameter search over a recipe with Ray Tune. Each trial is the real training loop
(`summ.training.train`) with its overrides; it reports validation loss at every evaluation, ASHA
stops the trials that fall behind, and the survivors can be scored by ROUGE-Lsum at the end.

    python run.py tune --config configs/demo.json [--search search.json] [--address ADDR] [--resume]

The search space is the config file's "search" section (or a file of its own):

    "search": {"space": {"train.lr": {"loguniform": [1e-4, 1e-3]},
                         "train.grad_accum_steps": {"choice": [1, 2, 4]},
                         "train.weight_decay": {"uniform": [0.0, 0.1]},
                         "lora.r": {"grid": [8, 16]}},
               "trials": 8, "max_steps": 40, "eval_every": 10, "metric": "val_loss"}

Writes into log.output_dir: trials/<trial>/ (each trial's run folder), ray/ (Ray's results, what
`--resume` restores), trials.csv, trials.md, search.json and best.json (a complete config that
`run.py --config best.json` trains from as is). Paths in these files inside the search folder are
written relative to it, so the folder keeps working after a move or in a copy of the clone.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from summ.config import (PATHS_RELATIVE_TO_FILE, SEARCH_SECTION, ConfigError, RunConfig, build_section,
                         config_from_dict, looks_like_local_path)
from summ.files import write_atomic, write_json
from summ.run_lock import hold_run_folder

log = logging.getLogger(__name__)

FORMS = ("loguniform", "uniform", "choice", "grid")
METRICS = {"val_loss": "min", "rougeLsum": "max"}
# What a trial's budget and cadence decide; searching them would compare trials of unequal length.
NOT_SEARCHABLE = {"train.max_steps", "eval.eval_every", "log.output_dir", "train.save_every"}
INSTALL_HINT = "run.py tune needs Ray Tune: pip install -e '.[tune]' (or pip install 'ray[tune]')"


@dataclass(frozen=True)
class SearchConfig:
    # "section.key" -> {"loguniform": [low, high]} | {"uniform": [low, high]} | {"choice": [...]} | {"grid": [...]}
    space: dict = field(default_factory=dict)
    # Samples of the space (with "grid" keys: samples of each grid point).
    trials: int = 8
    # Optimizer steps per trial (train.max_steps); null: the config's epochs.
    max_steps: Optional[int] = None
    # A validation, and a report to the scheduler, every this many steps.
    eval_every: int = 20
    # Validation rows of each trial (data.max_eval_rows); null: the config's.
    eval_rows: Optional[int] = None
    # What picks the best trial: "val_loss" (last validation loss) or "rougeLsum" (summaries of
    # generate_rows validation articles, written at the end of each trial the scheduler kept).
    metric: str = "val_loss"
    generate_rows: int = 100
    # "asha" stops trials whose validation loss trails at a rung; "fifo" runs every trial to the end.
    scheduler: str = "asha"
    # Validations before ASHA may stop a trial, and the share it keeps at each rung (1/reduction_factor).
    grace_period: int = 2
    reduction_factor: float = 2.0
    max_concurrent: Optional[int] = None
    seed: int = 0
    # Resources of one trial; fractions share a GPU. Trials run concurrently on whatever the Ray
    # cluster (or this machine) has.
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 1.0
    # Ray's results folder: on a cluster, a path every node can reach (a shared file system or s3://).
    storage_path: Optional[str] = None
    # Times a trial whose process dies (a killed worker, a lost node) is started again; it resumes
    # from its last checkpoint, written at every validation.
    max_failures: int = 2


class ClusterUnreachable(RuntimeError):
    """Ray could not start, or the cluster named by --address / RAY_ADDRESS did not answer."""


class MissingExtra(ConfigError):
    """An optional dependency the command needs is not installed."""


def load_search(raw_config: dict, source: str, search_file: str | None = None) -> SearchConfig:
    """The search section of the config file, or of `search_file` (a JSON object of its fields),
    checked field by field."""
    if search_file is not None:
        path = Path(search_file)
        if not path.is_file():
            raise ConfigError(f"{path}: search file not found")
        try:
            raw, source = json.loads(path.read_text(encoding="utf-8-sig")), str(path)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        raw = raw.get(SEARCH_SECTION, raw) if isinstance(raw, dict) else raw
    else:
        raw = raw_config.get(SEARCH_SECTION)
        if raw is None:
            raise ConfigError(f"{source}: no \"{SEARCH_SECTION}\" section; add one or pass --search FILE")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{SEARCH_SECTION}' must be an object")
    search = build_section(SearchConfig, SEARCH_SECTION, raw, source)
    where = f"{source}: '{SEARCH_SECTION}."
    if search.metric not in METRICS:
        raise ConfigError(f"{where}metric' must be one of {list(METRICS)}, got {search.metric!r}")
    if search.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"{where}scheduler' must be one of ['asha', 'fifo'], got {search.scheduler!r}")
    for key in ("trials", "eval_every", "grace_period", "generate_rows"):
        if getattr(search, key) <= 0:
            raise ConfigError(f"{where}{key}' must be > 0, got {getattr(search, key)}")
    for key in ("max_steps", "eval_rows", "max_concurrent"):
        if getattr(search, key) is not None and getattr(search, key) <= 0:
            raise ConfigError(f"{where}{key}' must be > 0 or null, got {getattr(search, key)}")
    if search.max_failures < 0:
        raise ConfigError(f"{where}max_failures' must be >= 0, got {search.max_failures}")
    if search.reduction_factor <= 1:
        raise ConfigError(f"{where}reduction_factor' must be > 1, got {search.reduction_factor}")
    if search.cpus_per_trial <= 0 or search.gpus_per_trial < 0:
        raise ConfigError(f"{where}cpus_per_trial' must be > 0 and '{SEARCH_SECTION}.gpus_per_trial' >= 0")
    if not search.space:
        raise ConfigError(f"{where}space' must name at least one config key to search")
    return search


def check_space(base: dict, search: SearchConfig, source: str) -> None:
    """Every searched key names a config value, every form is well made, and the config stays
    valid at each end of every range and at every listed value: a bad space fails before Ray starts."""
    for key, spec in search.space.items():
        where = f"{source}: '{SEARCH_SECTION}.space.{key}'"
        section, _, name = key.partition(".")
        if key in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: set by the search itself (max_steps, eval_every), not searchable")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in FORMS:
            raise ConfigError(f"{where}: expected one of {{\"loguniform\": [low, high]}}, {{\"uniform\": [low, high]}}, "
                              f"{{\"choice\": [values]}}, {{\"grid\": [values]}}; got {json.dumps(spec)}")
        form, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {form} needs a non-empty list, got {json.dumps(values)}")
        if form in ("loguniform", "uniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    or not values[0] < values[1]:
                raise ConfigError(f"{where}: {form} needs [low, high] numbers with low < high, got {json.dumps(values)}")
            if form == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {values[0]}")
        for value in values:
            trial = json.loads(json.dumps(base))
            trial.setdefault(section, {})[name] = value
            try:
                config_from_dict(trial, "search")
            except ConfigError as e:
                raise ConfigError(f"{where}: the value {json.dumps(value)} gives an invalid config "
                                  f"({str(e).removeprefix('search: ')})") from None


def absolute_paths(raw: dict) -> dict:
    """Ray runs each trial in a folder of its own: relative paths in the config must not depend on it."""
    raw = json.loads(json.dumps(raw))
    for section, key in (("model", "name_or_path"), ("model", "tokenizer"), ("data", "dataset"),
                         ("log", "output_dir")):
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and (key == "output_dir" or (looks_like_local_path(value) and Path(value).exists())):
            raw[section][key] = str(Path(value).expanduser().resolve())
    return raw


def trial_config(base: dict, params: dict, search: SearchConfig, run_dir: Path) -> RunConfig:
    """The run config of one trial: the base with the sampled values, the search's budget and
    cadence, and a checkpoint at every evaluation (a restored search resumes its trials exactly)."""
    raw = json.loads(json.dumps(base))
    for key, value in params.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    raw.setdefault("train", {}).update(save_every=search.eval_every, keep_last=1)
    if search.max_steps is not None:
        raw["train"]["max_steps"] = search.max_steps
        raw["train"]["warmup_steps"] = min(raw["train"].get("warmup_steps", 0), search.max_steps)
    raw.setdefault("eval", {}).update(eval_every=search.eval_every, at_start=False, at_end=True,
                                      generate_rows=search.generate_rows)
    if search.eval_rows is not None:
        raw.setdefault("data", {})["max_eval_rows"] = search.eval_rows
    raw.setdefault("log", {}).update(output_dir=str(run_dir), progress_bar=False)
    return config_from_dict(raw, f"trial {run_dir.name}")


def run_trial(params: dict, base: dict, search_dict: dict, out_dir: str) -> None:
    """One Ray Tune trial: train with the sampled values, report every validation, and (for the
    rougeLsum objective) summarize at the end. Module-level and fed plain dicts, so Ray ships no
    large objects with it; the data and model load inside the trial."""
    from ray import tune

    from summ.checkpoint import latest_checkpoint
    from summ.training import train

    search = SearchConfig(**search_dict)
    run_dir = Path(out_dir) / "trials" / tune.get_context().get_trial_id()
    cfg = trial_config(base, params, search, run_dir)
    cfg = keep_to_gpu_share(cfg, search.gpus_per_trial)
    last = {}

    def report(step: int, record: dict) -> None:
        last.update(val_loss=record["val/loss"], val_perplexity=record["val/perplexity"], step=step)
        tune.report(dict(last))

    result = train(cfg, resume=latest_checkpoint(run_dir) is not None, on_validation=report)
    if search.metric == "rougeLsum":
        from summ.evaluation import evaluate_run

        metrics = evaluate_run(cfg, result.run_dir)
        tune.report({**last, "rougeLsum": metrics["rouge"]["rougeLsum"]["mean"],
                     "rouge1": metrics["rouge"]["rouge1"]["mean"]})


def keep_to_gpu_share(cfg: RunConfig, share: float) -> RunConfig:
    """A trial on a share of a GPU (gpus_per_trial < 1) is capped to that share of its memory, so its
    micro-batch probe and generation batches size themselves for the share, not for whatever the
    trials beside it have left free at that moment."""
    import torch

    if not (0 < share < 1 and torch.cuda.is_available()):
        return cfg
    torch.cuda.set_per_process_memory_fraction(share)
    if cfg.eval.generate_memory_gib is not None:
        return cfg
    # A quarter of the share: the trial's model and what training left cached take the rest.
    total = torch.cuda.get_device_properties(0).total_memory
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, generate_memory_gib=share * total / 2**30 / 4))


def run_search(cfg_raw: dict, search: SearchConfig, source: str, *, address: str | None = None,
               resume: bool = False) -> dict:
    """Run (or, with `resume`, restore) the search and write its tables and best.json."""
    base = absolute_paths({k: v for k, v in cfg_raw.items() if k != SEARCH_SECTION})
    check_space(base, search, source)
    base_cfg = config_from_dict(base, source)
    out_dir = Path(base_cfg.log.output_dir)
    storage = Path(search.storage_path).expanduser().resolve() if search.storage_path else out_dir
    experiment = storage / "ray"
    if not resume and (out_dir / "trials").exists():
        raise FileExistsError(f"{out_dir}: holds an earlier search; pass --resume to continue it, "
                              f"or set log.output_dir to a new folder")
    try:
        import ray
        from ray import tune
    except ImportError:
        raise MissingExtra(INSTALL_HINT) from None
    if resume and not tune.Tuner.can_restore(str(experiment)):
        raise FileNotFoundError(f"--resume: no search to restore at {experiment}")

    hold_run_folder(out_dir, "search")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": max(int(search.cpus_per_trial), os.cpu_count() or 1)}))
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
            advice = ("check that `ray start --head` runs there and the address and port are reachable"
                      if address else "see `ray status` and the logs of Ray's latest session")
            raise ClusterUnreachable(f"could not {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                                     f"{advice}") from None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, search_dict=dataclasses.asdict(search), out_dir=str(out_dir)),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial if _gpus_available() else 0})
    started = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(search), tune_config=_tune_config(search),
                           run_config=tune.RunConfig(name="ray", storage_path=str(storage), verbose=0,
                                                     failure_config=tune.FailureConfig(
                                                         max_failures=search.max_failures)))
    grid = tuner.fit()
    rows = trial_rows(grid, search, out_dir)
    best = best_trial(rows, search)
    write_search_outputs(out_dir, base, search, rows, best)
    log.info("search: %d trials in %.0f s; best %s (%s %s)", len(rows), time.perf_counter() - started,
             best["trial_id"] if best else "none", search.metric, best.get(search.metric) if best else "-")
    return {"out_dir": out_dir, "trials": rows, "best": best}


def _gpus_available() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _param_space(search: SearchConfig) -> dict:
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[form](values) for key, spec in search.space.items() for form, values in spec.items()}


def _tune_config(search: SearchConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=search.grace_period,
                              reduction_factor=search.reduction_factor) if search.scheduler == "asha" else FIFOScheduler()
    # The scheduler compares validation loss (it exists at every report); the objective that picks
    # the best trial may be ROUGE, measured only at the end.
    return tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, num_samples=search.trials,
                           search_alg=BasicVariantGenerator(random_state=search.seed,
                                                            max_concurrent=search.max_concurrent or 0))


TRIAL_COLUMNS = ("trial_id", "status", "steps", "best_val_loss", "last_val_loss", "rougeLsum", "wall_s", "peak_gib",
                 "run_dir")


def trial_rows(grid, search: SearchConfig, out_dir: Path) -> list[dict]:
    """One row per trial: its sampled values, how it ended, its losses, ROUGE, time and memory."""
    rows = []
    for result in grid:
        trial_id = result.metrics.get("trial_id") or Path(result.path).name  # no report: Ray's folder name
        history = result.metrics_dataframe
        losses = [] if history is None or "val_loss" not in history else [x for x in history["val_loss"] if x == x]
        run_dir = out_dir / "trials" / trial_id
        metrics_file = run_dir / "metrics.json"
        final = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        steps = final["steps"] if final else int(result.metrics.get("step", 0) or 0)
        if result.error is not None:
            status = "error"
        elif final and final["steps"] >= final["total_steps"]:
            status = "completed"
        else:
            status = "stopped early"
        peak = final.get("memory/peak_allocated_gib")
        rows.append({"trial_id": trial_id, **{k: result.config.get(k) for k in search.space}, "status": status,
                     "steps": steps, "best_val_loss": min(losses) if losses else None,
                     "last_val_loss": losses[-1] if losses else None, "rougeLsum": result.metrics.get("rougeLsum"),
                     "wall_s": result.metrics.get("time_total_s"), "peak_gib": peak,
                     "run_dir": relative_inside(run_dir, out_dir)})
    return sorted(rows, key=lambda r: r["trial_id"])


def best_trial(rows: list[dict], search: SearchConfig) -> dict | None:
    """The best completed trial by the objective (the last validation loss, or ROUGE-Lsum)."""
    key = "last_val_loss" if search.metric == "val_loss" else "rougeLsum"
    done = [r for r in rows if r["status"] == "completed" and r[key] is not None]
    if not done:
        return None
    return (min if METRICS[search.metric] == "min" else max)(done, key=lambda r: r[key])


def relative_inside(path: str | Path, folder: Path) -> str:
    """`path` as the search folder's files store it: relative to `folder` when inside it (so a moved
    folder still finds it), else absolute."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def write_search_outputs(out_dir: Path, base: dict, search: SearchConfig, rows: list[dict], best: dict | None) -> None:
    columns = [TRIAL_COLUMNS[0], *search.space, *TRIAL_COLUMNS[1:]]

    def cell(value):
        return f"{value:.6g}" if isinstance(value, float) else "" if value is None else str(value)

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[cell(r.get(c)) for c in columns] for r in rows])
    write_atomic(out_dir / "trials.csv", table.getvalue())
    lines = [f"# Search: {len(rows)} trials, objective {search.metric} ({METRICS[search.metric]})", "",
             "| " + " | ".join(columns[:-1]) + " |", "|" + "---|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(("**" + cell(r[c]) + "**") if best and r is best and c == "trial_id" else cell(r.get(c))
                                for c in columns[:-1]) + " |" for r in rows]
    if best:
        lines += ["", f"Best: trial {best['trial_id']} (" + ", ".join(f"{k}={cell(best[k])}" for k in search.space)
                  + "); `python run.py --config <this folder>/best.json` trains it on the full budget, "
                    "into <this folder>/best/."]
    else:
        lines += ["", "No trial completed its budget: no best config."]
    write_atomic(out_dir / "trials.md", "\n".join(lines) + "\n")
    write_json(out_dir / "search.json", {"metric": search.metric, "mode": METRICS[search.metric],
                                         "best_trial": best["run_dir"] if best else None,
                                         **dataclasses.asdict(search)})
    if best:
        raw = json.loads(json.dumps(base))
        for key in search.space:
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = best[key]
        raw["log"]["output_dir"] = str(out_dir / "best")
        best_cfg = config_from_dict(raw, "best").to_dict()
        # Read back against best.json's own folder (summ.config.load_config): a moved search trains
        # into its own best/, not the folder it was made in.
        best_cfg["log"]["output_dir"] = "best"
        # Paths the recipe wrote relative to the working directory would be read against this folder.
        for section, key in (("model", "name_or_path"), ("model", "tokenizer"), ("data", "dataset")):
            value = best_cfg[section][key]
            if isinstance(value, str) and value.startswith(("./", "../")):
                best_cfg[section][key] = str(Path(value).resolve())
        write_json(out_dir / "best.json", {PATHS_RELATIVE_TO_FILE: True, **best_cfg})
