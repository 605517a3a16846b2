"""The benchmark scripts are run at tiny size on CPU so they keep working; their numbers are not checked."""

import json
import subprocess
import sys
from pathlib import Path

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
