"""summ: fine-tune small causal LMs into news summarizers with QLoRA on a readable training loop.

From Python (summ/api.py): summ.load_config, summ.train, summ.evaluate, summ.summarize. The training
loop and the evaluation live in summ/training.py and summ/evaluation.py.
"""

API = ("load_config", "train", "evaluate", "summarize")


def __getattr__(name):
    # Loaded on first use: `import summ` (or summ.config) stays free of torch and transformers.
    if name in API:
        from summ import api

        return getattr(api, name)
    raise AttributeError(f"module 'summ' has no attribute {name!r}")
