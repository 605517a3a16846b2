"""summ from Python (a notebook, a script): the steps of run.py as four functions.

    import summ

    cfg = summ.load_config("configs/demo.json", {"train.max_steps": 8, "log.output_dir": "runs/nb"})
    run = summ.train(cfg)                          # the run folder, adapter/ inside
    metrics = summ.evaluate(run)                   # run/eval/: validation loss, ROUGE, the report
    summ.summarize(run, "An article ...")          # a summary; a list of articles gives a list

Errors are the command line's: a ConfigError or DataError naming the key, file or row.
"""

from __future__ import annotations

import json
from pathlib import Path

from summ.config import ConfigError, RunConfig, config_from_dict
from summ.config import load_config as _load_file
from summ.data import DataError


def load_config(source: str | Path | dict | RunConfig, overrides: dict | list[str] | tuple = ()) -> RunConfig:
    """A checked config from a JSON file, a dict of sections or a config, with `overrides` as
    {"section.key": value} or run.py's "section.key=value" strings."""
    if isinstance(overrides, dict):
        raw = _load_file(source).to_dict() if isinstance(source, (str, Path)) else \
            source.to_dict() if isinstance(source, RunConfig) else source
        if not isinstance(raw, dict):
            raise ConfigError(f"load_config: expected a config file path, a dict of sections or a RunConfig, "
                              f"got {type(source).__name__}")
        raw = json.loads(json.dumps(raw))
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key or not isinstance(raw.get(section, {}), dict):
                raise ConfigError(f"overrides: {dotted!r}: expected 'section.key'")
            raw.setdefault(section, {})[key] = value
        label = str(source) if isinstance(source, (str, Path)) else "<dict>"
        return config_from_dict(raw, f"{label} with overrides {overrides}" if overrides else label)
    if isinstance(source, (str, Path)):
        return _load_file(source, list(overrides))
    if isinstance(source, RunConfig):
        source = source.to_dict()
    if not isinstance(source, dict):
        raise ConfigError(f"load_config: expected a config file path, a dict of sections or a RunConfig, "
                          f"got {type(source).__name__}")
    return config_from_dict(source, "<dict>", list(overrides))


def train(cfg: RunConfig, *, resume: bool | str = False) -> Path:
    """Fine-tune as `run.py train` does (without its evaluation: call `evaluate`); returns the run folder."""
    from summ.training import train as train_run

    return Path(train_run(_checked(cfg), resume=resume).run_dir)


def evaluate(run: str | Path, *, zero_shot: bool = False, name: str | None = None,
             overrides: dict | list[str] | tuple = (), trust_remote_code: bool = False) -> dict:
    """Score the run's adapter (or the base, `zero_shot`) as `run.py eval` does, into run/eval (or
    run/zero_shot, or run/`name`, e.g. for another decoding in `overrides`); returns eval_metrics.json's
    figures."""
    from summ.evaluation import evaluate_run
    from summ.model import require_adapter

    cfg = _run_config(run, overrides, trust_remote_code)
    if not zero_shot:
        require_adapter(Path(run) / "adapter", "train first, or pass zero_shot=True to score the base model")
    return evaluate_run(cfg, run, zero_shot=zero_shot, name=name)


def summarize(run: str | Path, articles: str | list[str], *, overrides: dict | list[str] | tuple = (),
              trust_remote_code: bool = False) -> str | list[str]:
    """`run.py predict`'s summary of one article (a string) or of each of a list; the model loads at
    each call, so pass many articles at once."""
    from summ.predict import summarize as generate

    one = isinstance(articles, str)
    texts = [articles] if one else articles
    if not isinstance(texts, (list, tuple)) or not texts or \
            not all(isinstance(a, str) and a.strip() for a in texts):
        raise DataError("articles: expected a non-empty string or a non-empty list of non-empty strings")
    cfg = _run_config(run, overrides, trust_remote_code)
    summaries = [g.text for g in generate(cfg, run, [a.strip() for a in texts])]
    return summaries[0] if one else summaries


def _checked(cfg) -> RunConfig:
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"expected a RunConfig from summ.load_config, got {type(cfg).__name__}")
    return cfg


def _run_config(run: str | Path, overrides, trust_remote_code: bool) -> RunConfig:
    config = Path(run) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{run}: not a run folder (no config.json); pass the log.output_dir of a training run")
    cfg = load_config(config, overrides)
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise ConfigError(f"{config}: model.trust_remote_code is true, which runs code from the model's repository; "
                          f"pass trust_remote_code=True to allow it")
    return cfg
