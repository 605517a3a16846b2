"""`run.py report`: two run folders (copies of a real GPU run), a LEAD baseline and a two-trial search
folder in, report.md / results.csv / PNGs out; unusable folders refused with their exact message."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from summ.compare import write_comparison
from summ.config import load_config
from summ.errors import excerpt
from summ.lead import evaluate_lead
from summ.rouge import rouge_cell
from summ.runs import ReportError, read_input
from tests.conftest import FIXTURES

SMOL = FIXTURES / "smol_run"  # a real SmolLM2 run (one H200), its predictions cut to the first 6 rows
HEADER = ("| run | role | train.lr | train loss (last log window) | val loss | perplexity | val loss rows | ROUGE-1 "
          "| ROUGE-2 | ROUGE-L | ROUGE-Lsum | eval rows | stopped by itself | repeats a trigram | train time | tokens/s "
          "| peak GPU GiB |")
CSV_HEADER = ["name", "role", "kind", "folder", "train.lr", "train_loss", "train_loss_steps", "val_loss", "perplexity",
              "loss_rows",
              "rouge1", "rouge1_low", "rouge1_high", "rouge2", "rouge2_low", "rouge2_high",
              "rougeL", "rougeL_low", "rougeL_high", "rougeLsum", "rougeLsum_low", "rougeLsum_high",
              "eval_rows", "stopped_by_itself_share", "repeats_trigram_share", "train_seconds", "tokens_per_s",
              "peak_gib"]
EXPECTED = ("a run folder (config.json and metrics.json, log.jsonl or an eval/, zero_shot/ or lead/ "
            "eval_metrics.json) or a search folder (trials.csv and search.json)")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def smol_copy(dest: Path, lr: float, val_shift: float = 0.0) -> Path:
    """The real run folder, its data pointed at the XSum fixture (whose 6 rows are the run's first 6
    eval rows) and its predictions cut to those rows; `lr` and `val_shift` make it a different run."""
    shutil.copytree(SMOL, dest, ignore=shutil.ignore_patterns("adapter", "errors.jsonl", "eval_report.md"))
    config = json.loads((dest / "config.json").read_text())
    config["data"]["dataset"] = str(FIXTURES / "xsum_tiny")
    config["train"]["lr"] = lr
    (dest / "config.json").write_text(json.dumps(config))
    for sub in ("eval", "zero_shot"):
        write_jsonl(dest / sub / "predictions.jsonl", read_jsonl(dest / sub / "predictions.jsonl")[:6])
    if val_shift:
        metrics = json.loads((dest / "eval" / "eval_metrics.json").read_text())
        metrics["val_loss"] += val_shift
        (dest / "eval" / "eval_metrics.json").write_text(json.dumps(metrics))
        log = read_jsonl(dest / "log.jsonl")
        write_jsonl(dest / "log.jsonl", [{**r, "val/loss": r["val/loss"] + val_shift} if "val/loss" in r else r
                                         for r in log])
    return dest


def trial_run(dest: Path, lr: float, val_losses: list[float]) -> None:
    """A finished trial as the training loop leaves it: config, log with train and val lines, metrics."""
    dest.mkdir(parents=True)
    config = json.loads((SMOL / "config.json").read_text())
    config["data"]["dataset"] = str(FIXTURES / "xsum_tiny")
    config["train"]["lr"] = lr
    (dest / "config.json").write_text(json.dumps(config))
    log = []
    for i, val in enumerate(val_losses):
        step = 10 * (i + 1)
        log.append({"step": step, "train/loss": val - 0.1, "train/lr": lr, "train/tokens_per_s": 1000.0,
                    "train/tokens": 5000, "train/seconds": 5.0, "train/skipped_steps": 0})
        log.append({"step": step, "val/loss": val, "val/perplexity": float(np.exp(val))})
    write_jsonl(dest / "log.jsonl", log)
    (dest / "metrics.json").write_text(json.dumps({
        "steps": 10 * len(val_losses), "total_steps": 10 * len(val_losses),
        "last_step_train_loss": val_losses[-1] - 0.1, "final_val_loss": val_losses[-1], "final_val_perplexity": float(np.exp(val_losses[-1])),
        "final_val_step": 10 * len(val_losses), "final_val_rows": 6, "data": {"eval": {"used": 6}}}))


def search_folder(dest: Path) -> Path:
    trial_run(dest / "trials" / "0", 1e-4, [3.2, 3.0, 2.9])
    trial_run(dest / "trials" / "1", 1e-3, [3.1, 2.8, 2.85])
    (dest / "search.json").write_text(json.dumps({"metric": "val_loss", "mode": "min",
                                                  "best_trial": str(dest / "trials" / "1"),
                                                  "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    (dest / "best.json").write_text((dest / "trials" / "1" / "config.json").read_text())
    (dest / "trials.csv").write_text(
        "trial_id,status,train.lr,steps,best_val_loss,last_val_loss,rougeLsum,wall_s,peak_gib,run_dir\n"
        "0,completed,0.0001,30,2.9,2.9,,61.5,5.1,trials/0\n"
        f"1,completed,0.001,30,2.8,2.85,,60.2,5.1,{dest / 'trials' / '1'}\n"
        "2,error,0.01,,,,,3.0,,trials/2\n")  # diverged before its first checkpoint: no run folder
    return dest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    smol = smol_copy(root / "smol", 5e-4)
    lead = evaluate_lead(load_config(smol / "config.json"), smol)
    fast = smol_copy(root / "fast", 1e-3, val_shift=0.2)
    shutil.rmtree(fast / "zero_shot")
    return smol, fast, search_folder(root / "lr-sweep"), lead


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_report_of_runs_baselines_and_a_search(inputs, tmp_path):
    smol, fast, search, lead = inputs
    out = smol.parent / "report"  # beside its inputs, as a report kept with the runs it compares
    result = write_comparison([smol, fast, search], out)

    assert sorted(p.name for p in out.iterdir()) == ["loss_curves.png", "report.md", "results.csv", "rouge.png",
                                                     "search_curves.png", "search_objective.png"]
    names = ["smol", "zero-shot smol", "LEAD-1", "fast", "lr-sweep/0", "lr-sweep/1"]
    assert [r["name"] for r in result["rows"]] == names
    # Defaults: baseline = the first run's zero-shot row; best = the lowest val loss (smol's 2.5455).
    assert (result["baseline"], result["best"]) == ("zero-shot smol", "smol")

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
        assert list(rows[0]) == CSV_HEADER
    assert len(rows) == 6
    assert [r["name"] for r in rows] == names
    assert [r["role"] for r in rows] == ["best", "baseline", "", "", "", ""]
    assert [r["train.lr"] for r in rows] == ["0.0005", "", "", "0.001", "0.0001", "0.001"]
    assert [r["kind"] for r in rows] == ["run", "zero-shot", "lead", "run", "run", "run"]
    # Folders relative to the report folder: a report moved with its inputs still finds them.
    assert [r["folder"] for r in rows] == ["../smol", "../smol/zero_shot", "../smol/lead", "../fast",
                                           "../lr-sweep/trials/0", "../lr-sweep/trials/1"]
    assert float(rows[2]["rougeLsum"]) == lead["rouge"]["rougeLsum"]["mean"]
    assert rows[2]["val_loss"] == "" and rows[2]["train_seconds"] == ""
    assert float(rows[3]["val_loss"]) == pytest.approx(2.5455337406295357 + 0.2)
    # Trials: the last logged train loss (the mean of log.log_every = 2 steps), val loss from metrics.json,
    # 3 log windows of 5 s and 5000 tokens.
    assert [float(rows[4][c]) for c in ("train_loss", "train_loss_steps", "val_loss", "train_seconds",
                                        "tokens_per_s")] == pytest.approx([2.8, 2, 2.9, 15.0, 1000.0])
    assert rows[4]["peak_gib"] == "" and rows[4]["rouge1"] == ""

    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert HEADER in lines
    assert ("| smol | best | 0.0005 | 2.5470 | 2.5455 | 12.75 | 500 validation | 27.17 [26.14, 28.20] | "
            "6.53 [5.89, 7.24] | 20.23 [19.45, 21.11] | 20.23 [19.45, 21.11] | 500 | 98.8% | n/a | 35.6 s | 26,300 "
            "| 5.66 |") in lines
    # Its eval_metrics.json predates the rule that an empty summary did not stop by itself; 312 of its 500
    # summaries are empty and 9 ran to max_new_tokens, so its share cannot be told: n/a, not 98.2%.
    assert ("| zero-shot smol | baseline | – | – | 3.2778 | 26.52 | 500 validation | 7.01 [6.07, 8.00] | "
            "1.00 [0.74, 1.27] | 5.11 [4.40, 5.80] | 5.11 [4.42, 5.81] | 500 | n/a | n/a | – | – | – |") in lines
    lead_cells = " | ".join(rouge_cell(lead["rouge"][k]) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert f"| LEAD-1 |  | – | – | – | – | – | {lead_cells} | 6 | – | – | – | – | – |" in lines
    assert ("| lr-sweep/0 |  | 0.0001 | 2.8000 | 2.9000 | 18.17 | 6 validation | n/a | n/a | n/a | n/a | n/a | n/a "
            "| n/a | 15.0 s | 1,000 | n/a |") in lines

    # Published XSum figures, labelled as such.
    assert "| BART-large | 45.14 | 22.27 | 37.25 | fairseq examples/bart/README.md |" in lines
    assert "| PEGASUS-large (HugeNews) | 47.21 | 24.56 | 39.25 | google-research/pegasus README |" in lines
    assert "| LEAD-1 | 16.30 | 1.60 | 11.95 | UniLMv2 paper (arXiv 2002.12804), Table 4 |" in lines
    assert any(line.startswith("XSum: published results on the full test set (11,334 articles)") for line in lines)

    # The sample: the best run's median-ROUGE-Lsum example of the ids both rows share, article from the data.
    best = read_jsonl(smol / "eval" / "predictions.jsonl")
    base = {p["id"]: p for p in read_jsonl(smol / "zero_shot" / "predictions.jsonl")}
    chosen = sorted(best, key=lambda p: p["rougeLsum"])[(len(best) - 1) // 2]
    article = next(json.loads(line)["document"] for line in open(FIXTURES / "xsum_tiny" / "validation.jsonl")
                   if json.loads(line)["id"] == chosen["id"])
    assert f"Example `{chosen['id']}`, at smol's median ROUGE-Lsum." in lines
    assert f"- **Article:** {excerpt(article.strip())}".replace("\n", " ") in lines
    assert f"- **Reference:** {chosen['reference']}" in lines
    assert (f"- **zero-shot smol (baseline):** {base[chosen['id']]['prediction'] or '(empty)'} "
            f"(ROUGE-Lsum {base[chosen['id']]['rougeLsum']:.1f})") in lines
    assert f"- **smol (best):** {chosen['prediction']} (ROUGE-Lsum {chosen['rougeLsum']:.1f})" in lines

    # The best run's error analysis, as the single-run report renders it; smol's analysis predates the
    # repetition flags, so those rows say n/a.
    assert "| numbers or names absent from the article | 204 | 40.8% |" in lines
    assert "| repeats a trigram | n/a | n/a |" in lines
    assert "| degenerate repetition (one trigram 3+ times) | n/a | n/a |" in lines
    # The search's own table, its best trial by best_val_loss (min).
    assert ("| trial | status | train.lr | steps | best_val_loss | last_val_loss | rougeLsum | wall_s | peak_gib "
            "| row above | best |") in lines
    assert "| 0 | completed | 0.0001 | 30 | 2.9 | 2.9 | n/a | 61.5 | 5.1 | lr-sweep/0 |  |" in lines
    assert "| 1 | completed | 0.001 | 30 | 2.8 | 2.85 | n/a | 60.2 | 5.1 | lr-sweep/1 | yes |" in lines
    assert "| 2 | error | 0.01 | n/a | n/a | n/a | n/a | 3 | n/a | none (no run folder) |  |" in lines
    assert ("3 trials; objective val_loss (minimize, column `last_val_loss`); best trial: 1 "
            "(its config: ../lr-sweep/best.json).") in lines
    assert "smol, 500 examples (../smol/eval/errors.jsonl per example)." in lines
    assert "Inputs: `../smol`, `../fast`, `../lr-sweep`." in lines

    expected_sizes = {"rouge.png": [1100, 550], "loss_curves.png": [1000, 550], "search_curves.png": [1000, 550],
                      "search_objective.png": [500, 400]}
    assert result["figures"] == expected_sizes
    for name, (width, height) in expected_sizes.items():
        pixels = png(out / name)
        assert pixels.shape == (height, width, 3)
        assert pixels.var() > 0


def test_baseline_and_best_chosen_by_path(inputs, tmp_path):
    smol, fast, search, _ = inputs
    result = write_comparison([smol, fast, search], tmp_path / "out", baseline=smol / "lead",
                              best=search / "trials" / "1")
    assert (result["baseline"], result["best"]) == ("LEAD-1", "lr-sweep/1")
    assert [r["role"] for r in result["rows"]] == ["", "", "baseline", "", "", "best"]
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    # That trial has no predictions.jsonl, nor an error analysis: said in one line each.
    assert "No sample: no predictions.jsonl for lr-sweep/1." in lines
    assert 'No error analysis: lr-sweep/1 has no "errors" in its eval_metrics.json.' in lines

    with pytest.raises(ReportError) as error:
        write_comparison([smol], tmp_path / "never", best=fast)
    assert str(error.value) == (f"--best {fast}: not a row of this report; expected a run folder given to it, its "
                                f"zero_shot/ or lead/ folder, or one of ['smol', 'zero-shot smol', 'LEAD-1']")
    assert not (tmp_path / "never").exists()


def test_a_trial_also_given_on_its_own_is_one_row(inputs, tmp_path):
    search = inputs[2]
    result = write_comparison([search, search / "trials" / "1"], tmp_path / "out")
    assert [r["name"] for r in result["rows"]] == ["lr-sweep/0", "lr-sweep/1"]
    # No zero-shot or LEAD row to be the baseline; the best is the trial with the lower val loss.
    assert (result["baseline"], result["best"]) == (None, "lr-sweep/1")


def test_best_trial_without_the_search_naming_it(inputs, tmp_path):
    """As `run.py tune` picks: the lowest last validation loss among trials that completed their budget."""
    search = tmp_path / "sweep"
    shutil.copytree(inputs[2], search)
    spec = json.loads((search / "search.json").read_text())
    del spec["best_trial"]
    (search / "search.json").write_text(json.dumps(spec))
    assert read_input(search).best_trial == "1"
    table = (search / "trials.csv").read_text().replace("1,completed,", "1,stopped early,")
    (search / "trials.csv").write_text(table)
    assert read_input(search).best_trial == "0"


def test_an_unreadable_article_costs_one_line(inputs, tmp_path):
    smol = inputs[0]
    run = tmp_path / "smol"
    shutil.copytree(smol, run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["dataset"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    write_comparison([run], tmp_path / "out")
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert (f"- **Article:** (not shown: cannot read the run's data: {run / 'config.json'}: 'data.dataset' must be "
            f"an existing folder or a hub id; {tmp_path / 'gone'} does not exist, got '{tmp_path / 'gone'}')") in lines


CNN_PUBLISHED = [
    "| system | ROUGE-1 | ROUGE-2 | ROUGE-L (= ROUGE-Lsum) | source |",
    "| LEAD-3 | 40.42 | 17.62 | 36.67 | UniLMv2 paper (arXiv 2002.12804), Table 4 |",
    "| BART-large | 44.16 | 21.28 | 40.90 | fairseq examples/bart/README.md |",
    "| PEGASUS-large (HugeNews) | 44.17 | 21.47 | 41.11 | google-research/pegasus README |",
]
UNKNOWN = ["No published figures for data.dataset 'someone/news_digest': they are listed for XSum and "
           "CNN/DailyMail only."]


@pytest.mark.parametrize("dataset, summary_field, expected", [
    ("abisee/cnn_dailymail", "highlights", CNN_PUBLISHED),
    ("someone/news_digest", "summary", UNKNOWN),
])
def test_published_rows_follow_the_dataset(inputs, tmp_path, dataset, summary_field, expected):
    run = tmp_path / "news"
    shutil.copytree(inputs[0], run, ignore=shutil.ignore_patterns("lead"))
    config = json.loads((run / "config.json").read_text())
    config["data"].update(dataset=dataset, summary_field=summary_field)
    (run / "config.json").write_text(json.dumps(config))
    write_comparison([run], tmp_path / "out")
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert all(line in lines for line in expected)
    assert sum("BART-large" in line for line in lines) == (1 if expected is CNN_PUBLISHED else 0)


def test_unusable_folders_are_refused_before_anything_is_written(inputs, tmp_path):
    smol = inputs[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    no_spec = tmp_path / "no_spec"
    no_spec.mkdir()
    (no_spec / "trials.csv").write_text("trial_id,status,run_dir\n")
    bad_csv = tmp_path / "bad_csv"
    bad_csv.mkdir()
    (bad_csv / "trials.csv").write_text("trial_id,status\n0,ok\n")
    (bad_csv / "search.json").write_text(json.dumps({"metric": "val_loss", "mode": "min", "space": {}}))
    cases = [
        (empty, f"{empty}: neither a run folder nor a search folder; expected {EXPECTED}"),
        (tmp_path / "missing", f"{tmp_path / 'missing'}: not found; expected {EXPECTED}"),
        (smol / "config.json", f"{smol / 'config.json'}: not a folder; expected {EXPECTED}"),
        (only_config, f"{only_config}: has config.json but no results; a run folder needs metrics.json, log.jsonl "
                      f"or an eval/, zero_shot/ or lead/ eval_metrics.json"),
        (no_spec, f"{no_spec}: has trials.csv but no search.json; a search folder needs both"),
        (bad_csv, f"{bad_csv / 'trials.csv'}: missing column(s) ['run_dir', 'last_val_loss']; has "
                  f"['trial_id', 'status']"),
    ]
    for path, message in cases:
        with pytest.raises(ReportError) as error:
            write_comparison([smol, path], tmp_path / "out")
        assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_compare_imports_no_torch_or_matplotlib():
    code = ("import sys, summ.compare; print(sorted(m for m in ('torch', 'matplotlib', 'summ.training', 'summ.model',"
            " 'summ.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_damaged_run_is_skipped_and_the_rest_reported(inputs, tmp_path, caplog, capsys):
    smol = inputs[0]
    broken = smol_copy(tmp_path / "broken", 1e-3)
    (broken / "eval" / "eval_metrics.json").write_text("{not json")
    result = write_comparison([smol, broken], tmp_path / "out")
    assert [r["name"] for r in result["rows"]] == ["smol", "zero-shot smol", "LEAD-1"]
    assert f"report: skipped: {broken / 'eval' / 'eval_metrics.json'}: cannot read it as JSON (" in caplog.text

    with pytest.raises(ReportError) as error:
        write_comparison([broken], tmp_path / "never")
    assert str(error.value).startswith(f"nothing to report: every input was skipped "
                                       f"({broken / 'eval' / 'eval_metrics.json'}: cannot read it as JSON (")
    assert not (tmp_path / "never").exists()

    # From the command line: one line and exit status 2, for a damaged run as for an empty folder.
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import run as cli

    (tmp_path / "empty").mkdir()
    for path, start in ((broken, "nothing to report: every input was skipped"),
                        (tmp_path / "empty", f"{tmp_path / 'empty'}: neither a run folder nor a search folder")):
        assert cli.main(["report", str(path), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {start}") and err.count("\n") == 1


def test_a_sampled_learning_rate_reads_short_in_the_report_and_whole_in_the_csv(inputs, tmp_path):
    smol = inputs[0]
    sampled = smol_copy(tmp_path / "sampled", 0.0016500839023012)
    result = write_comparison([smol, sampled], tmp_path / "out")
    assert [r["train.lr"] for r in result["rows"] if r["name"] == "sampled"] == ["0.0016500839023012"]
    rows = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
            if line.startswith("| sampled |")]
    assert len(rows) == 1 and rows[0].startswith("| sampled |  | 0.00165 | ")


def test_a_trial_stopped_early_shows_its_last_validation(tmp_path):
    """ASHA stops a trial before it writes metrics.json; its log holds the validations it ran."""
    trial_run(tmp_path / "stopped", 1e-4, [3.1, 2.9])
    (tmp_path / "stopped" / "metrics.json").unlink()
    result = write_comparison([tmp_path / "stopped"], tmp_path / "out")
    [row] = result["rows"]
    assert float(row["val_loss"]) == 2.9 and float(row["perplexity"]) == pytest.approx(np.exp(2.9))


def test_a_moved_search_folder_reports_and_its_best_json_trains_into_itself(tmp_path, capsys):
    """The search's files hold paths relative to the folder: after a move to another parent, the report
    reads every trial and best.json trains into the moved folder, not where the search ran."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import run as cli
    from summ.tune import SearchConfig, relative_inside, write_search_outputs

    made = tmp_path / "made" / "sweep"
    trial_run(made / "trials" / "0", 1e-4, [3.2, 3.0, 2.9])
    trial_run(made / "trials" / "1", 1e-3, [3.1, 2.8, 2.85])
    base = json.loads((made / "trials" / "0" / "config.json").read_text())
    base["log"]["output_dir"] = str(made)
    rows = [{"trial_id": t, "train.lr": lr, "status": "completed", "steps": 30, "best_val_loss": best,
             "last_val_loss": last, "rougeLsum": None, "wall_s": 60.0, "peak_gib": None,
             "run_dir": relative_inside(made / "trials" / t, made)}  # as trial_rows writes them
            for t, lr, best, last in (("0", 1e-4, 2.9, 2.9), ("1", 1e-3, 2.8, 2.85))]
    write_search_outputs(made, base, SearchConfig(space={"train.lr": {"loguniform": [1e-4, 1e-2]}}), rows, rows[1])

    moved = tmp_path / "elsewhere" / "kept"
    moved.parent.mkdir()
    shutil.move(made, moved)
    with open(moved / "trials.csv", newline="") as f:
        assert [r["run_dir"] for r in csv.DictReader(f)] == ["trials/0", "trials/1"]
    assert json.loads((moved / "search.json").read_text())["best_trial"] == "trials/1"
    best = json.loads((moved / "best.json").read_text())
    assert (best["paths_relative_to_file"], best["log"]["output_dir"]) == (True, "best")
    assert best["data"]["dataset"] == str(FIXTURES / "xsum_tiny")  # outside the folder: absolute
    # `run.py train --config moved/best.json` trains into the moved folder, from any working directory.
    assert cli.run_config(cli.parse(["train", "--config", str(moved / "best.json")])).log.output_dir == \
        str(moved / "best")
    assert load_config(moved / "best.json", ["log.output_dir=runs/x"]).log.output_dir == "runs/x"

    assert cli.main(["report", str(moved), "--out", str(moved / "report")]) == 0
    lines = (moved / "report" / "report.md").read_text().splitlines()
    assert "2 trials; objective val_loss (minimize, column `last_val_loss`); best trial: 1 " \
           "(its config: ../best.json)." in lines
    assert "| 1 | completed | 0.001 | 30 | 2.8 | 2.85 | n/a | 60 | n/a | kept/1 | yes |" in lines
    assert not made.exists()


def test_best_json_keeps_a_recipe_path_relative_to_the_working_directory_readable(tmp_path, monkeypatch):
    """A recipe's `./data/...` means the working directory, not the search folder best.json lives in."""
    from summ.tune import SearchConfig, relative_inside, write_search_outputs

    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "xsum_tiny", tmp_path / "data")
    made = tmp_path / "runs" / "sweep"
    trial_run(made / "trials" / "0", 1e-4, [3.2, 3.0, 2.9])
    base = json.loads((made / "trials" / "0" / "config.json").read_text())
    base["data"]["dataset"], base["log"]["output_dir"] = "./data", str(made)
    row = {"trial_id": "0", "train.lr": 1e-4, "status": "completed", "steps": 30, "best_val_loss": 2.9,
           "last_val_loss": 2.9, "rougeLsum": None, "wall_s": 60.0, "peak_gib": None,
           "run_dir": relative_inside(made / "trials" / "0", made)}
    write_search_outputs(made, base, SearchConfig(space={"train.lr": {"loguniform": [1e-4, 1e-2]}}), [row], row)
    assert json.loads((made / "best.json").read_text())["data"]["dataset"] == str(tmp_path / "data")
    assert load_config(made / "best.json").data.dataset == str(tmp_path / "data")


def test_an_older_search_folder_with_absolute_paths_still_reads_after_a_move(inputs, tmp_path):
    old = search_folder(tmp_path / "old" / "sweep")  # trial 1 and best_trial written absolute
    moved = tmp_path / "moved"
    shutil.move(old, moved)
    search = read_input(moved)
    assert sorted(search.runs) == ["0", "1"] and search.best_trial == "1"
    assert search.runs["1"].path == moved / "trials" / "1"


def test_the_default_baseline_is_scored_on_the_best_runs_rows(tmp_path, capsys):
    """A zero-shot row of other rows (a search trial's 16, against the best run's 500) is not taken as
    the baseline; named with --baseline it is kept, with the difference said in one line."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import run as cli

    demo = smol_copy(tmp_path / "demo", 4e-4)
    shutil.rmtree(demo / "zero_shot")
    trial = smol_copy(tmp_path / "trial", 1e-3, val_shift=0.2)
    metrics = json.loads((trial / "zero_shot" / "eval_metrics.json").read_text())
    metrics.update(generated_rows=16, loss_rows=16)
    (trial / "zero_shot" / "eval_metrics.json").write_text(json.dumps(metrics))

    result = write_comparison([demo, trial], tmp_path / "out")
    assert (result["baseline"], result["best"]) == (None, "demo")
    note = ("No baseline: no zero-shot or LEAD row was scored on the rows of demo (500 validation rows; "
            "zero-shot trial: 16 validation rows); evaluate one on those rows or name one with --baseline.")
    assert result["baseline_note"] == note
    assert note in (tmp_path / "out" / "report.md").read_text().splitlines()

    named = write_comparison([demo, trial], tmp_path / "named", baseline=trial / "zero_shot")
    assert (named["baseline"], named["best"]) == ("zero-shot trial", "demo")
    warning = ("zero-shot trial (16 validation rows) and demo (500 validation rows) were not scored on the same "
               "rows: their ROUGE is not directly comparable.")
    assert named["baseline_note"] == warning
    assert cli.main(["report", str(demo), str(trial), "--out", str(tmp_path / "cli"),
                     "--baseline", str(trial / "zero_shot")]) == 0
    assert capsys.readouterr().err == f"warning: {warning}\n"

    # The same rows in another run's folder are a baseline (its own run's zero-shot first, had it one).
    metrics.update(generated_rows=500, loss_rows=500)
    (trial / "zero_shot" / "eval_metrics.json").write_text(json.dumps(metrics))
    again = write_comparison([demo, trial], tmp_path / "again")
    assert (again["baseline"], again["best"], again["baseline_note"]) == ("zero-shot trial", "demo", "")


def test_stopped_by_itself_counts_summaries_with_text_only(tmp_path):
    """A zero-shot model that opens with the stop string wrote an empty summary: it did not stop by itself."""
    from summ.errors import stopped_by_itself, stopped_by_itself_count

    run = smol_copy(tmp_path / "smol", 5e-4)
    predictions = read_jsonl(run / "zero_shot" / "predictions.jsonl")
    assert [(p["stop_reason"], bool(p["prediction"])) for p in predictions] == \
        [("stop_string", True), ("stop_string", True), ("stop_string", False), ("stop_string", False),
         ("stop_string", True), ("stop_string", True)]
    metrics = json.loads((run / "zero_shot" / "eval_metrics.json").read_text())
    metrics.update(generated_rows=6)  # the 6 rows its predictions.jsonl keeps
    (run / "zero_shot" / "eval_metrics.json").write_text(json.dumps(metrics))
    result = write_comparison([run], tmp_path / "out")
    assert [r["stopped_by_itself_share"] for r in result["rows"] if r["kind"] == "zero-shot"] == [4 / 6]

    assert (stopped_by_itself("eos", "A summary."), stopped_by_itself("stop_string", "  "),
            stopped_by_itself("max_new_tokens", "A summary that ran on")) == (True, False, False)
    # Written by an evaluation now: the count itself.
    assert stopped_by_itself_count({"stopped_by_itself": 11, "generated_rows": 16}) == 11
    # An older eval_metrics.json: exact from its stop reasons when nothing was empty, or nothing ran on.
    older = {"generated_rows": 16, "stop_reasons": {"eos": 0, "stop_string": 15, "max_new_tokens": 1},
             "errors": {"empty": 0}}
    assert stopped_by_itself_count(older) == 15
    older["errors"]["empty"] = 5
    assert stopped_by_itself_count(older) is None  # was the run-on summary one of the 5 empty ones?
    older["stop_reasons"].update(stop_string=16, max_new_tokens=0)
    assert stopped_by_itself_count(older) == 11


def test_the_objective_plot_shows_every_trial_and_listed_values_as_categories(tmp_path):
    """A choice of [1, 2] is two ticks (not an axis from 1.9 to 2.1); a trial the scheduler stopped before
    ROUGE is drawn below the scored ones; a sampled range is drawn whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from summ.comparison_plots import _objective_panel

    search = tmp_path / "search-demo"
    for trial, lr, losses in (("a", 3e-4, [3.0, 2.8]), ("b", 7e-4, [2.9, 2.6]), ("c", 1.2e-4, [3.1])):
        trial_run(search / "trials" / trial, lr, losses)
    (search / "search.json").write_text(json.dumps({
        "metric": "rougeLsum", "mode": "max", "best_trial": "trials/b",
        "space": {"train.grad_accum_steps": {"choice": [1, 2]}, "train.weight_decay": {"uniform": [0.0, 0.1]}}}))
    (search / "trials.csv").write_text(
        "trial_id,train.grad_accum_steps,train.weight_decay,status,steps,best_val_loss,last_val_loss,rougeLsum,"
        "wall_s,peak_gib,run_dir\n"
        "a,2,0.0412,completed,6,2.8,2.8,17.1,60,,trials/a\n"
        "b,2,0.0466,completed,6,2.6,2.6,18.3,61,,trials/b\n"
        "c,1,0.0439,stopped early,2,3.1,3.1,,20,,trials/c\n")
    read = read_input(search)
    fig, (choice, uniform) = plt.subplots(1, 2)
    _objective_panel(choice, read, "train.grad_accum_steps")
    _objective_panel(uniform, read, "train.weight_decay")
    assert [t.get_text() for t in choice.get_xticklabels()] == ["1", "2"]
    assert choice.get_xlim() == (-0.5, 1.5)
    points = [tuple(c.get_offsets()[0]) for c in choice.collections]
    assert points == [(1.0, 17.1), (1.0, 18.3), (1.0, 18.3), (0.0, 17.1 - 0.15 * (18.3 - 17.1))]
    assert choice.get_legend_handles_labels()[1] == ["ran its budget", "best", "no rougeLsum (stopped early)"]
    low, high = uniform.get_xlim()
    assert low < 0.0 and high > 0.1
    plt.close(fig)
