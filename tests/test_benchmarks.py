"""The benchmark scripts run at tiny size on CPU so they keep working; speeds are not checked, what
they compute is (loss-curve equality, the micro-batches a step runs, the forced token count).

Each script's `main()` runs in this process, with the command line a user would type: starting a
Python process that imports torch, transformers, peft and bitsandbytes costs more than a tiny run
itself. The drivers (bench_train, bench_generate, loss_curves) start one child process per runner,
`[sys.executable, <script>, *argv, "--child", ...]`, and read its `RESULT ` line; `_child` takes
the place of `subprocess.run` inside them and runs that same command line in this process.
"""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
BENCH = REPO / "benchmarks"


def _script(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # as each script does for its sibling `bench_train`
    return importlib.import_module(name)


def _call(name: str, argv: list[str]) -> tuple[int, str, str]:
    """`python benchmarks/<name>.py ARGV` in this process: (exit status, stdout, stderr)."""
    module = _script(name)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_subprocess = sys.argv, getattr(module, "subprocess", None)
    sys.argv = [str(BENCH / f"{name}.py"), *argv]
    if saved_subprocess is not None:
        module.subprocess = types.SimpleNamespace(run=_child)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = module.main()
    except SystemExit as exit_:  # argparse errors, sys.exit()
        rc = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except Exception:  # noqa: BLE001 - a crashed child process: its traceback on stderr, status 1
        err.write(traceback.format_exc())
        rc = 1
    finally:
        sys.argv = saved_argv
        if saved_subprocess is not None:
            module.subprocess = saved_subprocess
    return rc, out.getvalue(), err.getvalue()


def _child(cmd, **_):
    assert cmd[0] == sys.executable and Path(cmd[1]).parent == BENCH, cmd
    rc, out, err = _call(Path(cmd[1]).stem, [str(x) for x in cmd[2:]])
    return subprocess.CompletedProcess(cmd, rc, out, err)


def run_script(name: str, *argv) -> str:
    rc, out, err = _call(name, [str(x) for x in argv])
    assert rc == 0, (out + err)[-4000:]
    return out


@pytest.fixture(autouse=True, scope="module")
def _in_process():
    # The tiny models' ops take microseconds: on 2 cores, intra-op threads cost more than they save
    # and stall whenever the other core is busy. What the scripts change in this process (threads,
    # sys.path, environment variables) is put back for the other test files.
    import torch
    import transformers  # noqa: F401 - the imports every script makes, timed here once, not in a test
    import peft  # noqa: F401

    threads, path, environ = torch.get_num_threads(), list(sys.path), dict(os.environ)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    sys.path[:] = path
    os.environ.clear()
    os.environ.update(environ)


def test_bench_train_runs_each_runner_tiny(tmp_path):
    # The peers share run_trainer_peer (reference and tuned differ in batch, padding and dtype), recipe
    # and ours share run_ours (the config as shipped against bench_train's settings); Phi-2 runs our
    # loop in test_profile_kernels_runs_tiny, its HF Trainer recipe in the loss curves.
    run_script("bench_train", "--tiny", "--models", "tinyllama", "--runners", "reference", "tuned", "tuned_liger_packed",
               "recipe", "ours", "--steps", "2", "--warmup", "1", "--rows", "8", "--tokens", "128",
               "--variant", "recipe:no_recompute", "model.gradient_checkpointing=false", "--out", tmp_path)
    results = json.loads((tmp_path / "bench_train.json").read_text())
    runs = results["models"]["tinyllama"]
    assert list(results["models"]) == ["tinyllama"] and list(runs) == ["reference", "tuned", "tuned_liger_packed",
                                                                       "recipe", "ours", "recipe:no_recompute"]
    for r in runs.values():
        assert r["measured_steps"] == 2 and r["non_pad_tokens_per_s"] > 0 and r["rows_per_step"] == 2
    assert (runs["reference"]["micro_batch"], runs["reference"]["accumulation"]) == ("1 rows padded to 128", 2)
    assert (runs["tuned"]["micro_batch"], runs["tuned"]["accumulation"]) == ("2 rows (dynamic padding)", 1)
    # Liger needs a GPU: on a CPU the stronger peer runs padding-free packing alone.
    assert runs["tuned_liger_packed"]["micro_batch"] == "2 rows packed (padding-free)"
    # The recipe keeps the config's batch 1 and, on a CPU, runs each step's rows as one micro-batch
    # (--tokens is ours); ours runs its 2 rows in micro-batches of --tokens, without recompute as MODELS has it.
    assert (runs["recipe"]["micro_batch_tokens"], runs["recipe"]["recompute"]) == (256, True)
    assert runs["recipe"]["micro_batch"] == ("2 rows per step (1 x2 accumulation), length-grouped, run as "
                                             "micro-batches of up to 256 tokens (whole step), recomputing every layer")
    assert (runs["ours"]["micro_batch_tokens"], runs["ours"]["recompute"]) == (128, False)
    assert runs["ours"]["micro_batch"] == ("2 rows per step, length-grouped, run as micro-batches of up to 128 "
                                           "tokens (set), no recompute")
    # A variant named BASE:NAME is the BASE runner (here the recipe as shipped) with its overrides on top.
    assert runs["recipe:no_recompute"]["micro_batch"] == ("2 rows per step (1 x2 accumulation), length-grouped, run as "
                                                          "micro-batches of up to 256 tokens (whole step), no recompute")
    table = (tmp_path / "bench_train.md").read_text().splitlines()
    # Both peers ran, so each row ends with its ratios to them; the reference is 1.00x itself.
    ratio = runs["reference"]["non_pad_tokens_per_s"] / runs["tuned"]["non_pad_tokens_per_s"]
    reference_row = next(x for x in table if x.startswith("| tinyllama | reference |"))
    assert reference_row.startswith("| tinyllama | reference | float32 | 2 | 1 rows padded to 128 |")
    assert reference_row.endswith(f"| 1.00x | {ratio:.2f}x |")
    assert sum(x.startswith("| tinyllama | ours | no | 2 | 2 rows per step, length-grouped, run as micro-batches "
                            "of up to 128 tokens") for x in table) == 1


def test_profile_vram_runs_tiny(tmp_path):
    run_script("profile_vram", "--tiny", "--rows", "6", "--tokens", "128", "--set", "train.grad_accum_steps=2",
               "--out", tmp_path)
    result = json.loads((tmp_path / "vram_breakdown.json").read_text())
    # The measured step is the first step's 2 rows, regrouped as the loop does by the budget: rows of
    # up to 128 tokens, one per micro-batch.
    assert (result["rows_per_step"], result["micro_batch_tokens"]) == (2, 128)
    assert len(result["micro_batches"]) == 2 and all(rows == 1 for rows, _ in result["micro_batches"])
    parts = result["bytes"]
    assert parts["LoRA parameters"] > 0 and parts["optimizer state"] > 0
    assert parts["other frozen weights (embeddings, lm_head, norms)"] > parts["LoRA parameters"]
    table = (tmp_path / "vram_breakdown.md").read_text()
    assert "| LoRA parameters |" in table and "| optimizer state |" in table


def test_bench_generate_compares_plain_and_fast_on_the_same_articles_tiny(tmp_path):
    run_script("bench_generate", "--tiny", "--pairs", "smollm2:xsum", "phi2:xsum", "--variants", "plain", "fast",
               "--xsum-rows", "5", "--batch-size", "2", "--out", tmp_path)
    runs = json.loads((tmp_path / "bench_generate.json").read_text())["runs"]
    # The configs ship a no-repeat rule; a variant not named for it decodes without.
    assert [(r["model"], r["variant"], r["four_bit"], r["engine"], r["no_repeat_ngram_size"]) for r in runs] == [
        ("smollm2", "plain", False, "hf", 0), ("smollm2", "fast", False, "fast", 0),
        ("phi2", "plain", True, "hf", 0), ("phi2", "fast", True, "fast", 0)]
    # fp32 on a CPU: the fast engine writes the plain path's summaries exactly.
    assert runs[0]["texts"] == runs[1]["texts"] and runs[2]["texts"] == runs[3]["texts"]
    assert all(r["articles"] == 5 and r["warm"]["generated_tokens"] == r["cold"]["generated_tokens"] > 0 for r in runs)
    table = (tmp_path / "bench_generate.md").read_text()
    assert "| smollm2 | xsum | fast | 2 | 5 |" in table and "| 5/5 | 5/5 |" in table


def test_profile_kernels_runs_tiny():
    # A --set of the token budget wins over --tokens, and is reported;
    # a step holds the rows that fill it at max_length (2 of 128 tokens).
    out = run_script("profile_kernels", "--tiny", "--rows", "8", "--tokens", "512", "--warmup", "1", "--steps", "1",
                     "--set", "train.micro_batch_tokens=256")
    summary = json.loads(next(x for x in out.splitlines() if x.startswith("SUMMARY "))[len("SUMMARY "):])
    assert summary["model"] == "phi2" and (summary["tokens"], summary["rows_per_step"]) == (256, 2)
    assert summary["kernels_per_step"] > 0 and summary["ms_per_step_by_kind"]["matmul"] > 0


def test_loss_curves_of_our_loop_equal_the_hf_trainer_on_equal_data_tiny(tmp_path):
    # Same rows in the same order (our loop's shuffled plan, handed to the HF Trainer in that order),
    # same weights and adapter init, no dropout: our loop's per-step losses (fused ops on and off) must
    # be the HF Trainer recipe's, with gradient accumulation.
    run_script("loss_curves", "--tiny", "--steps", "3", "--warmup", "1", "--accumulation", "2", "--no-dropout",
               "--seed", "3", "--out", tmp_path)
    results = json.loads((tmp_path / "loss_curves_no_dropout.json").read_text())
    assert results["errors"] == {} and results["rows_per_step"] == 2
    # Seed 3 shuffles the 6 rows into steps other than file order's: equal losses need the plan's order.
    assert results["row_order"] == [2, 1, 4, 3, 5, 0]
    trainer = results["losses"]["hf_trainer"]
    assert len(trainer) == 3 and trainer[-1] < trainer[0]
    for runner in ("ours", "ours_stock_modules"):
        assert results["losses"][runner] == pytest.approx(trainer, abs=1e-4)
    assert (tmp_path / "loss_curves_no_dropout.png").stat().st_size > 0


def test_bench_train_refuses_a_variant_on_a_runner_that_is_not_ours():
    with pytest.raises(SystemExit, match=r"^--variant tuned:x: the part before ':' must be one of recipe, recipe_t4, "
                                         r"ours, ours_t4$"):
        _script("bench_train").variant_row("tuned:x")


def test_profile_kernels_host_split_runs_tiny():
    # The phases partition the step: they sum to its wall time ("other" is the remainder).
    out = run_script("profile_kernels", "--tiny", "--host", "--rows", "8", "--tokens", "256", "--warmup", "1",
                     "--steps", "2")
    summary = json.loads(next(x for x in out.splitlines() if x.startswith("SUMMARY "))[len("SUMMARY "):])
    phases = summary["host_ms_per_step"]
    assert list(phases) == ["batches", "forward", "backward", "queue window", "clip", "optimizer", "wait for GPU",
                            "other"]
    assert summary["rows_per_step"] == 2 and summary["graph_breaks"] == 0
    assert all(phases[p] > 0 for p in ("forward", "backward", "queue window", "optimizer", "wait for GPU"))
    assert abs(sum(phases.values()) - 1e3 * summary["wall_s_per_step"]) < 1e-6


def test_bench_train_repeats_runners_in_turn_and_keeps_the_median_run(tmp_path, monkeypatch):
    bench = _script("bench_train")
    order = []
    speeds = {"tuned": iter([300.0, 100.0, 200.0]), "recipe": iter([5.0, 7.0, 6.0])}

    def fake_child(args, model, runner):
        order.append(runner)
        return {"non_pad_tokens_per_s": next(speeds[runner]), "dtype": "x", "rows_per_step": 1, "micro_batch": "m",
                "steps_per_s": 1.0, "s_per_step_median": 1.0, "s_per_step_min": 1.0, "s_per_step_max": 1.0,
                "peak_allocated_gib": None, "peak_reserved_gib": None}

    monkeypatch.setattr(bench, "run_child", fake_child)
    run_script("bench_train", "--tiny", "--models", "phi2", "--runners", "tuned", "recipe", "--repeat", "3",
               "--out", tmp_path)
    assert order == ["tuned", "recipe"] * 3
    runs = json.loads((tmp_path / "bench_train.json").read_text())["models"]["phi2"]
    assert (runs["tuned"]["non_pad_tokens_per_s"], runs["tuned"]["repeats"]) == (200.0, [300.0, 100.0, 200.0])
    assert (runs["recipe"]["non_pad_tokens_per_s"], runs["recipe"]["repeats"]) == (6.0, [5.0, 7.0, 6.0])
    row = next(x for x in (tmp_path / "bench_train.md").read_text().splitlines() if x.startswith("| phi2 | recipe |"))
    assert "| 6 (5-7 over 3 runs) |" in row and row.endswith("| n/a |  | 0.03x |")


def test_bench_train_median_run_reports_a_failure_and_the_lower_middle():
    median_run = _script("bench_train").median_run
    assert median_run([{"non_pad_tokens_per_s": 2.0}, {"error": "exit code -11: x"}]) == {"error": "exit code -11: x"}
    assert median_run([{"non_pad_tokens_per_s": 4.0}, {"non_pad_tokens_per_s": 2.0}]) == {
        "non_pad_tokens_per_s": 2.0, "repeats": [4.0, 2.0]}
    assert median_run([{"non_pad_tokens_per_s": 4.0}]) == {"non_pad_tokens_per_s": 4.0}


def test_graph_shapes_counts_the_padding_of_graphed_steps(tmp_path):
    # 40 rows, 8 per step: every combination trains the same rows; graphs of fewer rows, each as long
    # as its longest row (rounded up to 64 tokens, at most max_length), pad less.
    run_script("graph_shapes", "--rows", "40", "--steps-of", "recipe", "8", "--graph-rows", "8", "2",
               "--length-multiple", "64", "16", "--out", tmp_path)
    counted = json.loads((tmp_path / "graph_shapes.json").read_text())["results"]
    results = {(r["steps_of"], r["graph_rows"]): r for r in counted if r["length_multiple"] == 64}
    finer = {(r["steps_of"], r["graph_rows"]): r for r in counted if r["length_multiple"] == 16}
    assert sorted(results) == [("8", 2), ("8", 8), ("recipe", 2), ("recipe", 8)]
    assert len({r["real_tokens"] for r in results.values()}) == 1
    assert {key: (r["steps"], r["replays_per_step"]) for key, r in results.items()} == \
        {("8", 2): (5, 4.0), ("8", 8): (5, 1.0), ("recipe", 2): (5, 4.0), ("recipe", 8): (5, 1.0)}
    for steps_of in ("recipe", "8"):
        assert results[(steps_of, 2)]["real_share"] > results[(steps_of, 8)]["real_share"]
    for r in results.values():
        assert r["real_tokens"] < r["graph_tokens"] and r["graph_length"] == 512
        assert all(length % 64 == 0 and length <= 512 for length in r["graph_lengths"])
    # Lengths rounded up to 16 tokens instead of 64: the same rows, less padding, more graph lengths.
    assert sorted(finer) == sorted(results)
    for key, r in finer.items():
        assert r["real_tokens"] == results[key]["real_tokens"] and all(n % 16 == 0 for n in r["graph_lengths"])
    # The recipe's random 8-row steps each hold a row of 505+ tokens: one graph of 512 at either multiple.
    assert {key: r["graph_tokens"] < results[key]["graph_tokens"] for key, r in finer.items()} == \
        {("8", 2): True, ("8", 8): True, ("recipe", 2): True, ("recipe", 8): False}


def _bench_json(folder: Path, command: str, speeds: dict) -> None:
    folder.mkdir(parents=True)
    env = {"device": "cpu", "torch": "t", "transformers": "tf", "peft": "p", "accelerate": "a", "bitsandbytes": "b",
           "date": "d"}
    runs = {runner: ({"error": "exit code 1"} if tps is None else {"non_pad_tokens_per_s": tps})
            for runner, tps in speeds.items()}
    (folder / "bench_train.json").write_text(json.dumps({"environment": env, "command": command,
                                                         "models": {"phi2": runs}}))


def test_before_after_table_shows_every_run_and_the_ratio_of_medians(tmp_path):
    for i, (recipe, graphs) in enumerate([(100.0, 300.0), (120.0, None), (110.0, 330.0)], start=1):
        _bench_json(tmp_path / f"before-{i}", "old cmd", {"recipe": recipe, "ours:graphs": graphs})
    for i, recipe in enumerate([90.0, 80.0, 100.0], start=1):
        _bench_json(tmp_path / f"after-{i}", "new cmd", {"recipe": recipe, "ours:graphs": 330.0})
    table = _script("before_after_table").table(tmp_path)
    assert table.splitlines()[1:] == [
        "Before: `old cmd`", "After: `new cmd`", "",
        "| model | runner | before tok/s, each run | after tok/s, each run | after / before (medians) |",
        "|---|---|---|---|---|",
        "| phi2 | recipe | 100, 120, 110 | 90, 80, 100 | 0.818 |",  # 90 / 110
        "| phi2 | ours:graphs | 300, failed, 330 | 330, 330, 330 | 1.048 |"]  # 330 / median(300, 330)


@pytest.mark.slow
def test_before_after_runs_both_trees_in_turn_tiny(tmp_path):
    """The script a refactor's speed check runs: an archive of the committed tree as "before"."""
    archive = tmp_path / "before.tgz"
    subprocess.run(["git", "archive", "--format=tar.gz", "-o", str(archive), "HEAD"], cwd=REPO, check=True)
    out = tmp_path / "out"
    env = {**os.environ, "REPEAT": "2", "PYTHON": sys.executable, "BEFORE_EXTRA": "model.gradient_checkpointing=false"}
    done = subprocess.run(["bash", str(BENCH / "before_after.sh"), str(archive), str(out), "--", "--tiny", "--models",
                           "tinyllama", "--runners", "recipe", "--steps", "1", "--warmup", "1", "--rows", "8",
                           "--variant", "recipe:plain"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.splitlines()[:4] == ["before-1 rc=0", "after-1 rc=0", "before-2 rc=0", "after-2 rc=0"]
    before = json.loads((out / "before-1" / "bench_train.json").read_text())
    assert before["command"].endswith("--variant recipe:plain model.gradient_checkpointing=false --out "
                                      f"{out / 'before-1'}")
    rows = [line for line in (out / "before_after.md").read_text().splitlines() if line.startswith("| tinyllama")]
    assert [row.split(" | ")[1] for row in rows] == ["recipe", "recipe:plain"]
