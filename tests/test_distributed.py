"""Data-parallel training on a CPU (2 processes, gloo) gives the run one process gives with the same
rows per optimizer step: the same rows in each step, the same per-step losses, validation loss and
greedy predictions, and one copy of every file.

`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate runs several CPU processes
only through mpirun, huggingface/accelerate#2741), and torchrun or `--multi_gpu` on a machine without
GPUs starts two processes that each build a single-process Accelerator unless ACCELERATE_USE_CPU is
set. So the data-parallel run here is `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1 (torchrun
underneath, MULTI_CPU / gloo), and two further tests require `run.py` to refuse the two silent
single-process launches instead of training.

Both runs are subprocesses of `run.py`, started once for the module (about half a minute on a
2-core CPU); each test reads one aspect of the two run folders. The module is marked slow.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from summ.training import setup_data
from tests.conftest import tiny_config

# Every test here starts processes (half a minute for the two runs, seconds per refused launch):
# `make test-slow` and CI run them, `make test` does not.
pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 120  # a rank waiting on a collective the other never joins hangs until killed
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]

# 1 process x 2 rows x 2 micro-batches = 2 processes x 2 rows x 1 micro-batch = 4 rows per step.
SINGLE = {"micro_batch_size": 2, "grad_accum_steps": 2}
DATA_PARALLEL = {"micro_batch_size": 2, "grad_accum_steps": 1}


def write_config(path: Path, out_dir: Path, train: dict) -> Path:
    raw = tiny_config(out_dir, arch="phi").to_dict()
    raw["data"].update(max_train_rows=16, max_eval_rows=4)
    raw["train"].update(max_steps=3, **train)
    raw["eval"].update(generate=True, generate_rows=4, max_new_tokens=8)
    raw["log"].update(trackers=[], log_every=1)
    assert raw["lora"]["dropout"] == 0.0 and raw["model"]["config_overrides"]["resid_pdrop"] == 0.0
    path.write_text(json.dumps(raw, indent=1))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(cmd: list[str], timeout: float, **env_vars: str) -> types.SimpleNamespace:
    """Run `cmd` on the CPU in its own process group, output to a file. On timeout the launcher gets
    SIGTERM (torchrun passes it on to its ranks, which run in sessions of their own), then the group SIGKILL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_SIZE", "RANK"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO), **env_vars)
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        output = out.read()
    return types.SimpleNamespace(cmd=cmd, returncode=proc.returncode, output=output, timed_out=timed_out,
                                 seconds=time.perf_counter() - started)


def describe(result) -> str:
    state = "timed out" if result.timed_out else f"exit {result.returncode}"
    return f"{' '.join(result.cmd)}: {state} after {result.seconds:.0f} s\n{result.output[-4000:]}"


def read_log(run_dir: Path) -> list[dict]:
    file = run_dir / "log.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def read_jsonl(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _model_cache):
    root = tmp_path_factory.mktemp("distributed")
    one_dir, two_dir = root / "one", root / "two"
    one_cfg = write_config(root / "one.json", one_dir, SINGLE)
    two_cfg = write_config(root / "two.json", two_dir, DATA_PARALLEL)
    one = run_cli([sys.executable, "run.py", "--config", str(one_cfg)], timeout=LAUNCH_TIMEOUT_S)
    two = run_cli([*LAUNCH, "--multi_gpu", "--main_process_port", str(free_port()), "run.py", "--config", str(two_cfg)],
                  timeout=LAUNCH_TIMEOUT_S, ACCELERATE_USE_CPU="1")
    return types.SimpleNamespace(one=one, two=two, one_dir=one_dir, two_dir=two_dir, one_cfg=one_cfg,
                                 two_cfg=two_cfg)


def test_both_runs_finish(runs):
    assert runs.one.returncode == 0 and not runs.one.timed_out, describe(runs.one)
    assert runs.two.returncode == 0 and not runs.two.timed_out, describe(runs.two)


def test_each_step_sees_the_same_rows_on_one_or_two_processes(runs):
    """Ranks take every world-th micro-batch of the same plan, so with the accumulation divided by the
    number of processes, step k of both runs trains on the same rows (no model or process needed)."""
    from summ.config import load_config

    def windows(cfg_file: Path, world: int) -> list[list[set[int]]]:
        cfg = load_config(cfg_file)
        per_rank = []
        for rank in range(world):
            fake = types.SimpleNamespace(num_processes=world, process_index=rank, print=lambda *a, **k: None)
            data = setup_data(cfg, fake)
            per_rank.append([{i for batch in window for i in batch} for window in data.plan.windows(0)])
        total = min(data.total_steps, len(per_rank[0]))
        return [set().union(*(rank_windows[step] for rank_windows in per_rank)) for step in range(total)]

    one, two = windows(runs.one_cfg, 1), windows(runs.two_cfg, 2)
    assert len(one) == len(two) == 3
    assert all(len(rows) == 4 for rows in one)
    assert one == two


def test_per_step_train_losses_match(runs):
    def per_step(run_dir):
        return {x["step"]: x for x in read_log(run_dir) if "train/loss" in x}

    one, two = per_step(runs.one_dir), per_step(runs.two_dir)
    assert list(one) == [1, 2, 3], describe(runs.one)
    assert list(two) == [1, 2, 3], describe(runs.two)
    for step in one:
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], abs=TOLERANCE), step
        # The gradient is the all-reduced one: its norm (after clipping's unscale) is the same too.
        assert two[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=TOLERANCE), step
        # Non-pad tokens of the step, summed over the ranks.
        assert two[step]["train/tokens"] == one[step]["train/tokens"], step


def test_validation_losses_match(runs):
    def val(run_dir):
        return {x["step"]: x["val/loss"] for x in read_log(run_dir) if "val/loss" in x}

    one, two = val(runs.one_dir), val(runs.two_dir)
    assert list(one) == [3], describe(runs.one)
    assert list(two) == [3], describe(runs.two)
    assert two[3] == pytest.approx(one[3], abs=TOLERANCE)
    metrics_one = json.loads((runs.one_dir / "metrics.json").read_text())
    metrics_two = json.loads((runs.two_dir / "metrics.json").read_text())
    assert metrics_two["final_val_loss"] == pytest.approx(metrics_one["final_val_loss"], abs=TOLERANCE)
    assert metrics_two["tokens_seen"] == metrics_one["tokens_seen"]


def test_final_evaluation_matches(runs):
    """The evaluation after training runs under both launches and writes each prediction once, in input order."""
    one_eval, two_eval = runs.one_dir / "eval", runs.two_dir / "eval"
    assert (one_eval / "eval_metrics.json").is_file(), describe(runs.one)
    assert (two_eval / "eval_metrics.json").is_file(), describe(runs.two)
    one_metrics = json.loads((one_eval / "eval_metrics.json").read_text())
    two_metrics = json.loads((two_eval / "eval_metrics.json").read_text())
    assert two_metrics["val_loss"] == pytest.approx(one_metrics["val_loss"], abs=TOLERANCE)
    assert two_metrics["generated_rows"] == one_metrics["generated_rows"] == 4

    one_pred, two_pred = read_jsonl(one_eval / "predictions.jsonl"), read_jsonl(two_eval / "predictions.jsonl")
    assert len(one_pred) == 4
    assert [p["id"] for p in two_pred] == [p["id"] for p in one_pred]  # neither duplicated nor a shard
    assert [p["prediction"] for p in two_pred] == [p["prediction"] for p in one_pred]
    assert [p["new_tokens"] for p in two_pred] == [p["new_tokens"] for p in one_pred]
    assert len(read_jsonl(two_eval / "errors.jsonl")) == 4


@pytest.mark.parametrize("which, world", [("one", 1), ("two", 2)])
def test_one_copy_of_each_file(runs, which, world):
    run_dir = getattr(runs, f"{which}_dir")
    checkpoints = run_dir / "checkpoints"
    assert checkpoints.is_dir(), describe(getattr(runs, which))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003"]  # no .tmp-* left by a rank
    files = sorted(p.name for p in (checkpoints / "step-0000003").iterdir())
    assert files == sorted(["adapter", "optimizer.pt", "scheduler.pt", "resume_record.json", "train_state.json",
                            *(f"rng-{rank}.pt" for rank in range(world))])
    record = json.loads((checkpoints / "step-0000003" / "resume_record.json").read_text())
    assert record["world_size"] == world
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp")]
    assert not list(run_dir.glob("log.before-*"))  # one log, not one per rank
    steps = [x["step"] for x in read_log(run_dir) if "train/loss" in x]
    assert steps == sorted(set(steps))  # each step logged once


def test_resume_with_another_process_count_is_refused(runs):
    """The two-process checkpoint's ranks each read half the batches; one process cannot continue it exactly."""
    assert (runs.two_dir / "checkpoints" / "step-0000003").is_dir(), describe(runs.two)
    resumed = run_cli([sys.executable, "run.py", "--config", str(runs.two_cfg), "--resume"], timeout=120)
    assert resumed.returncode == 2, describe(resumed)
    assert "processes: 2 -> 1" in resumed.output


def test_accelerate_cpu_launch_is_refused_not_run_as_one_process(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs one process with half the rows per step; the
    run must stop before training, saying how to start two."""
    cfg = write_config(tmp_path / "cfg.json", tmp_path / "run", DATA_PARALLEL)
    result = run_cli([*LAUNCH, "--cpu", "--main_process_port", str(free_port()), "run.py", "--config", str(cfg)],
                     timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode != 0 and not result.timed_out, describe(result)
    assert "ACCELERATE_USE_CPU" in result.output, describe(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ranks_that_each_build_a_single_process_accelerator_are_refused(tmp_path):
    """torchrun (or `accelerate launch --multi_gpu`) on a machine without GPUs and without
    ACCELERATE_USE_CPU: two processes that each think they are the only one, writing one folder."""
    cfg = write_config(tmp_path / "cfg.json", tmp_path / "run", DATA_PARALLEL)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "run.py", "--config", str(cfg)], timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode != 0 and not result.timed_out, describe(result)
    assert "ACCELERATE_USE_CPU" in result.output, describe(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_scaling_benchmark_runs_one_and_two_processes_on_the_same_global_batch(tmp_path):
    """benchmarks/bench_scaling.py on 2 gloo processes: both process counts run, report their speed
    against one process, one memory figure per rank, and per-step losses equal to one process's."""
    out = tmp_path / "out"
    result = run_cli([sys.executable, "benchmarks/bench_scaling.py", "--tiny", "--models", "phi2", "--processes", "1",
                      "2", "--rows", "16", "--steps", "2", "--warmup", "1", "--no-dropout", "--out", str(out)],
                     timeout=2 * LAUNCH_TIMEOUT_S, ACCELERATE_USE_CPU="1")
    assert result.returncode == 0 and not result.timed_out, describe(result)
    runs = json.loads((out / "bench_scaling.json").read_text())["models"]["phi2"]
    one, two = runs["1"], runs["2"]
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], abs=TOLERANCE)
    assert two["max_abs_loss_diff"] == max(abs(a - b) for a, b in zip(two["losses"], one["losses"]))
    assert two["speedup"] == pytest.approx(two["non_pad_tokens_per_s"] / one["non_pad_tokens_per_s"], rel=1e-12)
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2, rel=1e-12)
    assert (len(one["peak_allocated_gib"]), len(two["peak_allocated_gib"])) == (1, 2)
    assert "x2 accumulation" in one["micro_batch"] and "accumulation" not in two["micro_batch"]
    table = (out / "bench_scaling.md").read_text().splitlines()
    assert [line.split(" | ")[1] for line in table if line.startswith("| phi2 |")] == ["1", "2"]
    from matplotlib.image import imread

    image = imread(out / "loss_curves_phi2.png")
    assert image.shape[:2] == (480, 840) and image.std() > 0
