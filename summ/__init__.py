"""summ: fine-tune small causal LMs into news summarizers with QLoRA on a readable training loop.

From Python (summ/api.py): summ.load_config, summ.train, summ.evaluate, summ.summarize.
"""

import importlib
import sys
import types

# API functions that share their name with a module of the package (summ/train.py, summ/evaluate.py).
_CALLABLE_MODULES = ("train", "evaluate")


class _CallableModule(types.ModuleType):
    """summ.train and summ.evaluate are the package's modules and the API's functions at once:
    `summ.train(cfg)` calls summ.api.train, while `summ.train.train` and `import summ.train as tr` keep
    reaching the module, as the tests and benchmarks do."""

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module("summ.api"), self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds each submodule onto its package once it has loaded.
        if name in _CALLABLE_MODULES and isinstance(value, types.ModuleType):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


def __getattr__(name):
    # Loaded on first use: `import summ` (or summ.config) stays free of torch and transformers.
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("load_config", "summarize"):
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
