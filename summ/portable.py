"""What an adapter or merged folder carries so that plain transformers + peft, or a server such as vLLM
or TGI, runs the model as `run.py predict` does: where the base weights come from, the decoding, and
the prompt format it was trained on.

    adapter_config.json      base_model_name_or_path: the hub id or path the config named (the local
                             rebuild only for GGUF, random or packaged weights, which have no other name)
    base_model.json          what the base is and, where summ built it, how to build it again
    generation_config.json   EOS, padding, new-token limits, beams or sampling, stop strings
    chat_template.jinja      the trained prompt around the last user message (the article); the base
                             model's own template is kept as base_chat_template.jinja
    prompt.json              the same prompt as text, with the article's token-level cut
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

from summ.config import RunConfig
from summ.data import Encoder, prompt_template
from summ.files import write_atomic, write_json
from summ.sources import PYPI_PREFIX

log = logging.getLogger(__name__)

# How to build the base again where summ made it (a GGUF rebuild, random weights, a package's folder).
REBUILD_BASE = "python run.py export --run RUN --out BASE_DIR --base-only"


def base_model_record(cfg: RunConfig, loaded_from: str) -> dict:
    """The base as a PEFT user names it. A hub id or a folder the config gave is kept as written;
    weights that only summ builds (GGUF rebuild, random init) or finds (a pip package) are named by
    the folder they were loaded from here, with what rebuilds them elsewhere."""
    m = cfg.model
    built = m.init == "random" or m.gguf_file is not None or m.name_or_path.startswith(PYPI_PREFIX)
    record = {"base_model_name_or_path": loaded_from if built else m.name_or_path, "revision": m.revision,
              "name_or_path": m.name_or_path, "gguf_file": m.gguf_file, "init": m.init,
              "local_folder_only": built, "rebuild": REBUILD_BASE if built else None}
    if m.name_or_path.startswith(PYPI_PREFIX):
        record["package"] = _distribution(m.name_or_path[len(PYPI_PREFIX):])
    if m.gguf_file is not None:
        # summ's rebuild: bf16 safetensors, EOS / BOS / padding ids from the GGUF metadata (summ.sources).
        record["built_by"] = "summ: the GGUF file rebuilt into bfloat16 safetensors, special token ids from its metadata"
    if m.init == "random":
        record["built_by"] = f"summ: random weights of the {m.name_or_path} architecture, seed {cfg.train.seed}"
        record["config_overrides"] = m.config_overrides
    return record


def _distribution(package: str) -> dict:
    names = metadata.packages_distributions().get(package, [])
    if not names:
        return {"module": package, "distribution": None, "version": None}
    return {"module": package, "distribution": names[0], "version": metadata.version(names[0])}


def eos_token_ids(tokenizer, model_generation_config) -> list[int]:
    """Every id that ends a summary: the tokenizer's EOS and the base model's generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model_generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def generation_config(cfg: RunConfig, tokenizer, model_generation_config=None):
    """The run's decoding as transformers' GenerationConfig. summ's summary-only repetition rules
    (eval.repetition_scope "summary") have no field here: transformers' own fields would ban the
    article's n-grams too, so they are left out and the model card carries the rule as code."""
    from transformers import GenerationConfig

    ev = cfg.eval
    eos = eos_token_ids(tokenizer, model_generation_config)
    values = dict(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, max_new_tokens=ev.max_new_tokens,
                  min_new_tokens=ev.min_new_tokens, num_beams=ev.num_beams, do_sample=ev.do_sample,
                  stop_strings=list(ev.stop_strings) or None)
    if ev.num_beams > 1:
        values["length_penalty"] = ev.length_penalty
    if ev.do_sample:
        values.update(temperature=ev.temperature, top_p=ev.top_p, top_k=0)
    if ev.repetition_scope == "sequence":
        values.update(no_repeat_ngram_size=ev.no_repeat_ngram_size, repetition_penalty=ev.repetition_penalty)
    return GenerationConfig(**values)


def summary_only_rules(cfg: RunConfig) -> dict | None:
    """summ's repetition rules that generation_config.json cannot hold, or None."""
    ev = cfg.eval
    if ev.repetition_scope != "summary" or (ev.no_repeat_ngram_size == 0 and ev.repetition_penalty == 1.0):
        return None
    return {"no_repeat_ngram_size": ev.no_repeat_ngram_size, "repetition_penalty": ev.repetition_penalty,
            "no_repeat_ignore_case": ev.no_repeat_ignore_case}


def leading_special_tokens(tokenizer) -> str:
    """The special tokens the tokenizer puts before a text (Llama's `<s>`), as text."""
    enc = tokenizer("x", add_special_tokens=True, return_offsets_mapping=True)
    lead = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if start != end:
            break
        lead.append(token_id)
    return "".join(tokenizer.convert_ids_to_tokens(lead))


def _jinja_text(text: str) -> str:
    # A Jinja string literal reads Python escapes, which JSON's are; non-ASCII stays as written.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


# An article to check the rendered template against summ's own prompt ids.
_PROBE_ARTICLE = "The council approved the budget on Tuesday, 4 votes to 3."


def prompt_chat_template(cfg: RunConfig, tokenizer) -> str | None:
    """A chat template that renders the prompt training used, the last user message as the article.
    For a server that builds prompts from messages: rendered and tokenized without special tokens (as
    vLLM does), it gives the ids summ generates from, as long as the article needs no cut
    (prompt.json has the cut)."""
    template = prompt_template(cfg.data, tokenizer)
    heads = [template.head]
    if cfg.data.prompt_format == "raw":
        lead = leading_special_tokens(tokenizer)
        # A SentencePiece tokenizer marks the start of a text with a space of its own; after a BOS
        # written out as text it no longer sees a start, so the rendered prompt has to carry the space.
        heads = [lead + template.head, lead + " " + template.head]
    expected = Encoder(tokenizer, cfg.data).encode_prompt(_PROBE_ARTICLE)
    for head in heads:
        text = head + _PROBE_ARTICLE + template.prompt_tail
        if tokenizer(text, add_special_tokens=False)["input_ids"] == expected:
            break
    else:
        # Not an error: training is over when this runs, and prompt.json still holds the prompt.
        log.warning("no chat template renders the trained prompt's tokens for %s; the saved tokenizer has "
                    "none, serve the model with prompt.json's prompt", tokenizer.name_or_path)
        return None
    return ("{#- The prompt this model was fine-tuned on (summ); the last user message is the article. #}"
            + _jinja_text(head) + "{{ messages[-1]['content'] | trim }}" + _jinja_text(template.prompt_tail))


def save_tokenizer_with_prompt(tokenizer, cfg: RunConfig, folder: Path) -> None:
    """The tokenizer, its chat template replaced by the trained prompt format; the base model's own
    template is kept beside it as base_chat_template.jinja."""
    base_template = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = prompt_chat_template(cfg, tokenizer)
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = base_template
    if isinstance(base_template, str):
        write_atomic(Path(folder) / "base_chat_template.jinja", base_template)


def set_base_model(folder: Path, base: dict) -> None:
    """adapter_config.json names the base as `base_model_record` does, and base_model.json says more."""
    path = Path(folder) / "adapter_config.json"
    adapter_config = json.loads(path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = base["base_model_name_or_path"]
    if base["revision"] is not None:
        adapter_config["revision"] = base["revision"]
    write_json(path, adapter_config)
    write_json(Path(folder) / "base_model.json", base)


def prompt_record(cfg: RunConfig, tokenizer) -> dict:
    """The prompt exactly as training built it: the whitespace after the prompt belongs to the completion,
    so a server that rebuilds the prompt from this file sees the tokens the model was trained on."""
    template = prompt_template(cfg.data, tokenizer)
    return {"template": template.text, "prompt_format": cfg.data.prompt_format,
            "prompt": template.head + "{article}" + template.prompt_tail,
            "completion": template.completion_prefix + "{summary}" + (tokenizer.eos_token or ""),
            "eos_token": tokenizer.eos_token, "max_length": cfg.data.max_length,
            "article_is_truncated_to_fit": True,
            # How summ.data.Encoder.encode_prompt builds generation prompts, for a reader without summ.
            "add_special_tokens": cfg.data.prompt_format == "raw",
            "truncation": "tokenize prompt with the (whitespace-stripped) article in place, add_special_tokens "
                          "as given; keep the template's tokens and the first max_length - 1 - (template "
                          "tokens) article tokens, a token crossing the article's edge counting as article",
            "stop_strings": list(cfg.eval.stop_strings)}


def write_portable_files(folder: Path, cfg: RunConfig, tokenizer, model_generation_config=None) -> None:
    """The tokenizer with the trained prompt as its chat template, generation_config.json and
    prompt.json, into `folder` (an adapter or a merged model)."""
    save_tokenizer_with_prompt(tokenizer, cfg, folder)
    generation_config(cfg, tokenizer, model_generation_config).save_pretrained(folder)
    write_json(Path(folder) / "prompt.json", prompt_record(cfg, tokenizer))
