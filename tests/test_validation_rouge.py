"""ROUGE at each validation during training (eval.validation_rouge_rows) and the best state kept by it
(train.keep_best with train.best_metric)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from summ.config import ConfigError
from summ.evaluation import evaluate_run
from summ.rouge import ROUGE_KEYS
from summ.training import TrainState, train
from tests.conftest import tiny_config


def logged_validations(run) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "val/loss" in r}


def test_validation_rouge_scores_the_summaries_the_evaluation_writes(tmp_path, monkeypatch):
    """The last validation (the final state) writes, for its 3 articles, the summaries `run.py eval`
    writes for the adapter with the same decoding (adapter unmerged, fp32), and scores them as it does;
    every validation logs all four ROUGE keys."""
    import summ.training as tr

    scored, score_pairs = [], tr.score_pairs

    def score_and_keep(predictions, references):
        scored.append(list(predictions))
        return score_pairs(predictions, references)

    monkeypatch.setattr(tr, "score_pairs", score_and_keep)
    run = tmp_path / "run"
    cfg = tiny_config(run, eval={"eval_every": 1, "at_start": True, "validation_rouge_rows": 3,
                                 "generate_rows": 3, "max_new_tokens": 8, "merge_adapter": False})
    train(cfg)
    validations = logged_validations(run)
    assert sorted(validations) == [0, 1, 2, 3] and len(scored) == 4
    assert all(f"val/{k}" in validations[s] for s in validations for k in ROUGE_KEYS)
    evaluated = evaluate_run(cfg, run)
    predictions = [json.loads(line)["prediction"] for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert scored[-1] == predictions and len(set(predictions)) == 3 and all(predictions)
    assert scored[0] != scored[-1]  # training changed what the model writes
    for key in ROUGE_KEYS:
        assert validations[3][f"val/{key}"] == pytest.approx(evaluated["rouge"][key]["mean"], abs=1e-9)


def test_keep_best_by_rouge_leaves_the_highest_rouge_state_in_adapter(tmp_path, monkeypatch):
    """train.best_metric val/rougeLsum: ROUGE-Lsum 10, 30, 20, 30 at steps 0-3 (validation loss falling
    throughout); adapter/ is step 1's state (the tie at step 3 keeps the earlier), as metrics.json says."""
    import summ.training as tr

    lsum = iter([10.0, 30.0, 20.0, 30.0])
    losses = iter([3.0, 2.9, 2.8, 2.7])
    monkeypatch.setattr(tr, "evaluate_loss", lambda *args, **kwargs: next(losses))
    monkeypatch.setattr(tr, "score_pairs", lambda predictions, references: [
        {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": value} for value in [next(lsum)] * len(predictions)])
    run = tmp_path / "run"
    cfg = tiny_config(run, train={"save_every": 1, "keep_last": 5, "keep_best": True, "best_metric": "val/rougeLsum"},
                      eval={"eval_every": 1, "at_start": True, "generate": False, "validation_rouge_rows": 2,
                            "max_new_tokens": 4})
    result = train(cfg)
    assert result.steps == 3
    assert result.metrics["adapter_step"] == 1
    assert result.metrics["best_validation"] == {"step": 1, "metric": "val/rougeLsum", "value": 30.0}
    assert [logged_validations(run)[s]["val/rougeLsum"] for s in range(4)] == [10.0, 30.0, 20.0, 30.0]
    assert ("| this adapter | the state of step 1, the best `val/rougeLsum` of the run's validations (30.0000; "
            "`train.keep_best`) |") in (run / "adapter" / "README.md").read_text().splitlines()
    best = load_file(run / "adapter" / "adapter_model.safetensors")
    for step, same in ((1, True), (3, False)):
        saved = load_file(run / "checkpoints" / f"step-{step:07d}" / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(best[k], saved[k]) for k in best) is same


def test_a_rouge_best_metric_without_validation_summaries_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^tiny: 'train.best_metric' must be 'val/loss' unless "
                                          r"eval.validation_rouge_rows > 0 \(ROUGE needs the summaries validation "
                                          r"generates\), got 'val/rouge2'$"):
        tiny_config(tmp_path, train={"keep_best": True, "best_metric": "val/rouge2"})


def test_a_checkpoint_from_before_best_metric_resumes_with_its_best_validation_loss():
    state = TrainState.from_dict({"step": 7, "best": {"step": 4, "val/loss": 2.5}})
    assert state.best == {"step": 4, "metric": "val/loss", "value": 2.5}
