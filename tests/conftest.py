"""Tiny models built from the real Phi-2 and TinyLlama configs, with the real tokenizers, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from summ.config import config_from_dict  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

TINY = {
    "phi": {
        "model": str(FIXTURES / "phi-2"),
        "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_key_value_heads": 4,
                      "resid_pdrop": 0.0},  # Phi-2 trains with residual dropout 0.1; tests compare exactly
        "data": str(FIXTURES / "xsum_tiny"), "article": "document", "summary": "summary",
        "template": "### Instruction: Summarize the following news article in a concise and abstractive way.\n"
                    "### Article: {article}\n### Summary: {summary}",
    },
    "llama": {
        "model": str(FIXTURES / "tinyllama"),
        "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
        "data": str(FIXTURES / "cnn_tiny"), "article": "article", "summary": "highlights",
        "template": "Summarize: {article}\n\nSummary: {summary}",
    },
}


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    os.environ["SUMM_CACHE"] = str(tmp_path_factory.mktemp("summ-cache"))


def tiny_config(output_dir, arch: str = "phi", quant: bool = False, **sections):
    """A RunConfig for a 2-layer random model of the real architecture; `sections` update it."""
    spec = TINY[arch]
    raw = {
        "model": {"name_or_path": spec["model"], "init": "random", "config_overrides": spec["overrides"],
                  "gradient_checkpointing": False, "attn_implementation": "eager"},
        "quant": {"enabled": quant, "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"dataset": spec["data"], "article_field": spec["article"], "summary_field": spec["summary"],
                 "template": spec["template"], "max_length": 128, "min_article_tokens": 16},
        "train": {"seed": 0, "epochs": 1, "micro_batch_size": 2, "grad_accum_steps": 2, "optimizer": "adamw",
                  "lr": 1e-3, "warmup_steps": 0, "mixed_precision": "no", "save_every": 1000},
        "eval": {"eval_every": 0, "batch_size": 4, "at_start": False, "at_end": True},
        "log": {"output_dir": str(output_dir), "log_every": 1, "trackers": [], "progress_bar": False},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw, "tiny")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test builds its own Accelerator; accelerate otherwise keeps process-wide state."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# Deselected by `make test` (-m "not gpu"); a plain `pytest` on a CPU machine skips them with the reason.
def gpu(test):
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")
    return pytest.mark.gpu(needs_cuda(test))
