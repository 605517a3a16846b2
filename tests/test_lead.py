"""The LEAD-k baseline: exact leads of a hand-written article, k per dataset, and the files it writes."""

import json
from dataclasses import replace

import pytest

from summ.lead import evaluate_lead, lead_k_for, lead_summary
from summ.published import dataset_family
from summ.rouge import ROUGE_KEYS, aggregate, score_pairs
from tests.conftest import tiny_config

# Six sentences; the splitter must keep "£3.5m", "Mr. Smith" and "the U.S. next" whole.
ARTICLE = ("The council approved the £3.5m plan on Monday. Mr. Smith, its leader, said it was overdue.\n"
           "Work starts in the U.S. next year. Residents objected! Will it help? Nobody knows.")


def test_lead_summary_is_the_first_k_sentences_one_per_line():
    assert lead_summary(ARTICLE, 1) == "The council approved the £3.5m plan on Monday."
    assert lead_summary(ARTICLE, 3) == ("The council approved the £3.5m plan on Monday.\n"
                                        "Mr. Smith, its leader, said it was overdue.\n"
                                        "Work starts in the U.S. next year.")
    assert lead_summary(ARTICLE, 5) == lead_summary(ARTICLE, 3) + "\nResidents objected!\nWill it help?"
    assert lead_summary(ARTICLE, 50).split("\n")[-1] == "Nobody knows."  # fewer sentences than k: all of them
    assert lead_summary(ARTICLE, 50).count("\n") == 5
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        lead_summary(ARTICLE, 0)


@pytest.mark.parametrize("dataset, summary_field, family, k", [
    ("EdinburghNLP/xsum", "summary", "xsum", 1),
    ("/data/XSUM/", "summary", "xsum", 1),
    ("abisee/cnn_dailymail", "highlights", "cnn_dailymail", 3),
    ("runs/news", "highlights", "cnn_dailymail", 3),  # named otherwise, but CNN/DM's own summary field
    ("knkarthick/samsum", "summary", None, 3),  # unknown: the multi-sentence default
])
def test_lead_k_by_dataset(tmp_path, dataset, summary_field, family, k):
    assert dataset_family(dataset, summary_field) == family
    cfg = tiny_config(tmp_path)
    cfg = replace(cfg, data=replace(cfg.data, dataset=dataset, summary_field=summary_field))
    assert lead_k_for(cfg) == k


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("arch, k, rows", [("phi", 1, 6), ("llama", 3, 4)])
def test_evaluate_lead_writes_predictions_and_metrics(tmp_path, arch, k, rows):
    cfg = tiny_config(tmp_path / "run", arch=arch, eval={"bootstrap_resamples": 200})
    source = [json.loads(line) for line in open(f"{cfg.data.dataset}/validation.jsonl")]
    metrics = evaluate_lead(cfg, tmp_path / "run")

    predictions = read_jsonl(tmp_path / "run" / "lead" / "predictions.jsonl")
    assert [p["id"] for p in predictions] == [r["id"] for r in source]
    assert len(predictions) == rows
    assert [p["prediction"] for p in predictions] == [lead_summary(r[cfg.data.article_field].strip(), k)
                                                      for r in source]
    assert [p["reference"] for p in predictions] == [r[cfg.data.summary_field].strip() for r in source]
    scores = score_pairs([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
    assert [{key: p[key] for key in ROUGE_KEYS} for p in predictions] == scores
    assert set(predictions[0]) == {"id", "reference", "prediction", *ROUGE_KEYS}

    assert metrics == {"baseline": f"lead-{k}", "k": k, "split": "validation", "generated_rows": rows,
                       "rows_skipped": {}, "rouge": aggregate(scores, n_resamples=200, seed=cfg.train.seed)}
    assert json.loads((tmp_path / "run" / "lead" / "eval_metrics.json").read_text()) == metrics
    # .summ.lock: LEAD holds its subfolder while it writes (evaluations beside it write their own)
    assert sorted(p.name for p in (tmp_path / "run" / "lead").iterdir()) == [".summ.lock", "eval_metrics.json",
                                                                            "predictions.jsonl"]


def test_evaluate_lead_honours_generate_rows_and_k(tmp_path):
    cfg = tiny_config(tmp_path, eval={"generate_rows": 2, "bootstrap_resamples": 50})
    metrics = evaluate_lead(cfg, tmp_path, k=2)
    predictions = read_jsonl(tmp_path / "lead" / "predictions.jsonl")
    assert len(predictions) == 2 and metrics["generated_rows"] == 2
    assert metrics["baseline"] == "lead-2"
    assert all(p["prediction"].count("\n") == 1 for p in predictions)  # two sentences each
    scores = score_pairs([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
    assert metrics["rouge"] == aggregate(scores, n_resamples=50, seed=0)


def test_lead_imports_no_model_code():
    import subprocess
    import sys

    code = "import sys, summ.lead; print(sorted(m for m in ('summ.training', 'summ.model') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
