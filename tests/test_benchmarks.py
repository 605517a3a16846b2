"""The benchmark scripts run at tiny size on CPU so they keep working; speeds are not checked, the
loss-curve equality is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def test_bench_train_runs_all_runners_tiny(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--tiny", "--steps", "2", "--warmup", "1",
           "--rows", "12", "--tokens", "256", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench_train.json").read_text())
    for model in ("phi2", "tinyllama"):
        runs = results["models"][model]
        assert set(runs) == {"reference", "tuned", "ours"}
        for r in runs.values():
            assert r["measured_steps"] == 2 and r["non_pad_tokens_per_s"] > 0
    table = (tmp_path / "bench_train.md").read_text()
    assert "| phi2 | reference |" in table and "| tinyllama | ours |" in table


def test_profile_vram_runs_tiny(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_vram.py"), "--tiny", "--rows", "12", "--tokens", "256",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "vram_breakdown.json").read_text())
    parts = result["bytes"]
    assert parts["LoRA parameters"] > 0 and parts["optimizer state"] > 0
    assert parts["other frozen weights (embeddings, lm_head, norms)"] > parts["LoRA parameters"]
    assert "| LoRA parameters |" in (tmp_path / "vram_breakdown.md").read_text()


def test_bench_generate_forces_the_token_count_tiny(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--tiny", "--rows", "6", "--new-tokens", "5",
           "--batch-size", "4", "--reference-rows", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runners = json.loads((tmp_path / "bench_generate.json").read_text())["runners"]
    assert runners["ours"]["articles"] == runners["reference"]["articles"] == 6
    assert runners["reference"]["timed_articles"] == 2
    assert runners["ours"]["generated_tokens_per_s"] == 6 * 5 / runners["ours"]["seconds"]


def test_profile_kernels_runs_tiny():
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_kernels.py"), "--tiny", "--rows", "12", "--tokens", "256",
           "--warmup", "1", "--steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("SUMMARY "))[len("SUMMARY "):])
    assert summary["kernels_per_step"] > 0 and summary["ms_per_step_by_kind"]["matmul"] > 0


def test_loss_curves_of_our_loop_equal_the_hf_trainer_on_equal_data_tiny(tmp_path):
    # Same rows in the same order, same weights and adapter init, no dropout: our loop's per-step
    # losses (levers on and off) must be the HF Trainer recipe's.
    cmd = [sys.executable, str(REPO / "benchmarks" / "loss_curves.py"), "--tiny", "--steps", "4", "--warmup", "1",
           "--no-dropout", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "loss_curves_no_dropout.json").read_text())
    trainer = results["losses"]["hf_trainer"]
    assert len(trainer) == 4 and trainer[-1] < trainer[0]
    for runner in ("ours", "ours_hf_numerics"):
        assert results["losses"][runner] == pytest.approx(trainer, abs=1e-4)
    assert (tmp_path / "loss_curves_no_dropout.png").stat().st_size > 0


def test_tune_microbatch_recomputes_the_layers_it_reports_tiny(tmp_path):
    # Recompute only happens in train mode; a tuner left in eval mode measured "0 layers" everywhere.
    cmd = [sys.executable, str(REPO / "benchmarks" / "tune_microbatch.py"), "--tiny", "--rows", "12",
           "--budgets", "128", "256", "--layers", "1", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tune_phi2.json").read_text())
    assert result["layers"] == 2
    # On a CPU every point fits, so each budget stops at the fewest layers tried: 1 of 2.
    assert [(p["budget"], p["recomputed_layers"], p["layers_recomputing"]) for p in result["points"]] == \
        [(128, 1, 1), (256, 1, 1)]
    best = result["best"]
    assert best[0] in ("train.micro_batch_tokens=128", "train.micro_batch_tokens=256")
    assert best[1] == "model.checkpointed_layers=1"
    assert (tmp_path / "best_sets.txt").read_text().split() == best
