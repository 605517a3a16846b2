"""The search: a bad space fails before Ray starts; a 2-trial search on a tiny model runs the real
loop, ASHA stops the trial that trails, best.json trains as is, and a finished search restores."""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from summ.config import ConfigError, load_config
from summ.tune import MissingExtra, SearchConfig, load_search, run_search
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def base_raw(out_dir) -> dict:
    raw = tiny_config(out_dir).to_dict()
    raw["data"].update(max_train_rows=16, max_eval_rows=4)
    raw["eval"]["generate"] = False
    return raw


@pytest.mark.parametrize("search, base", [("search_demo", "demo"), ("search_xsum_smollm2", "demo"),
                                          ("search_cnn_smollm2", "smollm2_cnn_dailymail")])
def test_shipped_searches_fit_their_configs(search, base):
    """Each shipped search file loads, and every value of its space gives a valid config of the base
    its command line uses (a search that would fail a trial fails here first)."""
    from summ.tune import check_space

    path = REPO / "configs" / f"{search}.json"
    loaded = load_search(json.loads(path.read_text()), str(path))
    assert loaded.metric in ("val_loss", "rougeLsum")
    check_space(json.loads((REPO / "configs" / f"{base}.json").read_text()), loaded, str(path))


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"normal": [0, 1]}}, "'search.space.train.lr': expected one of {\"loguniform\": [low, high]}, "
                                       "{\"uniform\": [low, high]}, {\"choice\": [values]}, {\"grid\": [values]}; "
                                       "got {\"normal\": [0, 1]}"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "'search.space.train.lr': loguniform needs low > 0, got 0"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}},
     "'search.space.train.lr': uniform needs [low, high] numbers with low < high, got [0.001, 0.0001]"),
    ({"lora.dropout": {"choice": [0.1, 1.5]}},
     "'search.space.lora.dropout': the value 1.5 gives an invalid config ('lora.dropout' must be in [0, 1), got 1.5)"),
    ({"train.lrr": {"choice": [1]}},
     "'search.space.train.lrr': the value 1 gives an invalid config (unknown key 'train.lrr'; expected one of"),
    ({"train.max_steps": {"grid": [1, 2]}},
     "'search.space.train.max_steps': set by the search itself (max_steps, eval_every), not searchable"),
    ({"model.checkpointed_layers": {"choice": [None, -1]}},
     "'search.space.model.checkpointed_layers': the value -1 gives an invalid config "
     "('model.checkpointed_layers' must be >= 0 or null (all layers), got -1)"),
])
def test_a_bad_search_space_fails_before_ray_starts(tmp_path, space, message):
    import ray

    with pytest.raises(ConfigError, match="^" + re.escape(f"cfg.json: {message}")):
        run_search(base_raw(tmp_path / "out"), SearchConfig(space=space), "cfg.json")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_search_section_fields_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("cfg.json: 'search.metric' must be one of ['val_loss', "
                                                    "'rougeLsum'], got 'bleu'")):
        load_search({"search": {"space": {"train.lr": {"choice": [1e-3]}}, "metric": "bleu"}}, "cfg.json")
    with pytest.raises(ConfigError, match=re.escape("cfg.json: no \"search\" section; add one or pass --search FILE")):
        load_search({}, "cfg.json")
    # The config file may carry the section: training ignores it.
    path = tmp_path / "with_search.json"
    path.write_text(json.dumps({**base_raw(tmp_path / "o"), "search": {"space": {}}}))
    assert load_config(path).train.lr == 1e-3


def test_without_ray_the_command_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtra, match=re.escape("run.py tune needs Ray Tune: pip install -e '.[tune]'")):
        run_search(base_raw(tmp_path / "out"), SearchConfig(space={"train.lr": {"choice": [1e-3]}}), "cfg.json")


def test_an_unreachable_cluster_is_one_line_with_exit_status_3(tmp_path, monkeypatch, capsys):
    import ray

    def unreachable(**kwargs):
        raise ConnectionError(f"Could not find any running Ray instance at {kwargs['address']}.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**base_raw(tmp_path / "out"), "search": {"space": {"train.lr": {"choice": [1e-3]}}}}))
    sys.path.insert(0, str(REPO))
    import run as cli

    assert cli.main(["tune", "--config", str(config), "--address", "10.0.0.9:6379"]) == 3
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: could not join the Ray cluster at 10.0.0.9:6379: Could not find any running Ray instance at "
        "10.0.0.9:6379.; check that `ray start --head` runs there and the address and port are reachable")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # Ray and four short trainings: ~25 s; CI runs it with make test-slow
def test_two_trials_asha_stops_the_trailing_one_and_best_trains(tmp_path, ray_local):
    from summ.training import train

    out = tmp_path / "search"
    # One trial at a time, the better learning rate first: ASHA keeps it and stops the other at its
    # first rung, where its validation loss trails.
    search = SearchConfig(space={"train.lr": {"grid": [3e-3, 1e-6]}}, trials=1, max_steps=2, eval_every=1,
                          grace_period=1, reduction_factor=2, max_concurrent=1, cpus_per_trial=1)
    result = run_search(base_raw(out), search, "cfg.json")
    rows = {r["train.lr"]: r for r in result["trials"]}
    assert (rows[3e-3]["status"], rows[3e-3]["steps"]) == ("completed", 2)
    assert (rows[1e-6]["status"], rows[1e-6]["steps"]) == ("stopped early", 1)
    assert rows[3e-3]["best_val_loss"] < rows[1e-6]["best_val_loss"]
    assert result["best"] is rows[3e-3]
    header = (out / "trials.csv").read_text().splitlines()[0]
    assert header == "trial_id,train.lr,status,steps,best_val_loss,last_val_loss,rougeLsum,wall_s,peak_gib,run_dir"
    assert len((out / "trials.csv").read_text().splitlines()) == 3
    assert (out / "trials" / rows[3e-3]["trial_id"] / "adapter" / "adapter_config.json").is_file()

    assert [line.split(",")[-1] for line in (out / "trials.csv").read_text().splitlines()[1:]] == \
        [f"trials/{r['trial_id']}" for r in result["trials"]]
    assert json.loads((out / "search.json").read_text())["best_trial"] == f"trials/{rows[3e-3]['trial_id']}"
    best = json.loads((out / "best.json").read_text())
    assert best["train"]["lr"] == 3e-3 and best["log"]["output_dir"] == "best" and best["paths_relative_to_file"]

    # A finished search restores without running its trials again.
    again = run_search(base_raw(out), search, "cfg.json", resume=True)
    assert [(r["trial_id"], r["status"]) for r in again["trials"]] == \
        [(r["trial_id"], r["status"]) for r in result["trials"]]

    # Moved to another parent, the folder reports, and best.json trains into the moved folder.
    sys.path.insert(0, str(REPO))
    import run as cli

    moved = tmp_path / "elsewhere" / "kept"
    moved.parent.mkdir()
    from summ import run_lock

    for held in [path for path in run_lock._held if path.startswith(str(out))]:
        run_lock._held.pop(held)[0].close()  # what the search's process ending does: its folders are free
    shutil.move(out, moved)
    restored = run_search(base_raw(moved), search, "cfg.json", resume=True)
    assert [(r["trial_id"], r["status"], r["steps"]) for r in restored["trials"]] == \
        [(r["trial_id"], r["status"], r["steps"]) for r in result["trials"]]
    assert str(out) not in (moved / "trials.csv").read_text() + (moved / "search.json").read_text()
    assert cli.main(["report", str(moved), "--out", str(moved / "report")]) == 0
    lines = (moved / "report" / "report.md").read_text().splitlines()
    assert any(line.startswith(f"| {rows[1e-6]['trial_id']} | stopped early | 1e-06 | 1 |") for line in lines)
    cfg = load_config(moved / "best.json", ["train.max_steps=1"])
    assert cfg.log.output_dir == str(moved / "best")
    assert train(cfg).steps == 1
    assert (moved / "best" / "metrics.json").is_file() and not out.exists()


@pytest.mark.slow
def test_a_trial_whose_process_is_killed_resumes_from_its_checkpoint_and_completes(tmp_path, ray_local):
    """kill -9 of the worker running a trial: Ray starts the trial again (search.max_failures), the
    trial resumes from the checkpoint of its last validation, and the search completes."""
    import os
    import signal
    import threading
    import time

    import psutil

    out = tmp_path / "search"
    search = SearchConfig(space={"train.lr": {"choice": [1e-3]}}, trials=1, max_steps=36, eval_every=1,
                          scheduler="fifo", cpus_per_trial=1, max_failures=1)
    raw = base_raw(out)
    raw["train"]["epochs"] = 12  # 12 x 3 steps: time to kill the trial mid-way
    outcome = {}
    search_thread = threading.Thread(target=lambda: outcome.update(run_search(raw, search, "cfg.json")))
    search_thread.start()

    deadline = time.monotonic() + 120
    while not list((out / "trials").glob("*/checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (trial_dir,) = (out / "trials").iterdir()
    workers = [p for p in psutil.process_iter(["cmdline"])
               if any("ImplicitFunc" in part for part in (p.info["cmdline"] or []))]
    assert len(workers) == 1, [p.info["cmdline"] for p in workers]
    killed_at = max(int(c.name.split("-")[1]) for c in (trial_dir / "checkpoints").glob("step-*"))
    assert killed_at < 36
    os.kill(workers[0].pid, signal.SIGKILL)
    search_thread.join(timeout=300)

    (row,) = outcome["trials"]
    assert (row["status"], row["steps"]) == ("completed", 36)
    resumes = [json.loads(x) for x in (trial_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["step"] >= killed_at
    assert (trial_dir / "adapter" / "adapter_config.json").is_file()


def test_a_trial_on_a_share_of_a_gpu_is_capped_to_that_share(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from summ.tune import keep_to_gpu_share

    cfg = tiny_config(tmp_path)
    fractions = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, *a: fractions.append(f))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    assert keep_to_gpu_share(cfg, 1.0) is cfg and fractions == []
    shared = keep_to_gpu_share(cfg, 0.25)
    assert fractions == [0.25] and shared.eval.generate_memory_gib == 5.0
    assert shared.train == cfg.train and shared.model == cfg.model
    # A budget the config sets is kept.
    given = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, generate_memory_gib=2.0))
    assert keep_to_gpu_share(given, 0.5).eval.generate_memory_gib == 2.0 and fractions == [0.25, 0.5]
