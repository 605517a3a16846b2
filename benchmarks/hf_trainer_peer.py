"""The HF Trainer peer: the reference notebook's recipe, built once for every benchmark that runs it.

The base model loaded as summ loads it (`summ.model.load_base_model`; callers pass
model.fused_ops=false for transformers' own modules), then what the recipe adds: peft's
`prepare_model_for_kbit_training` (frozen non-4-bit weights in fp32), LoRA from the run's config,
gradient checkpointing, and transformers' `Trainer`. The rows are our encoded rows, taken in the
order the caller gives (`train_sampling_strategy="sequential"`), so the rows of each optimizer step
are known: `bench_train.py` times the peer on them, `loss_curves.py` compares its per-step losses
with our loop's on the rows of our own plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def peer_model(cfg, device, dtype, adapter_seed: int | None = None):
    """4-bit base + `prepare_model_for_kbit_training` + LoRA. With `adapter_seed`, the LoRA matrices
    are drawn as `summ.model.build_model` draws them (the same seed just before `get_peft_model`)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from summ.model import load_base_model, peft_lora_config

    base = load_base_model(cfg, device, dtype)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    return get_peft_model(base, peft_lora_config(cfg, base.config.model_type))


def padded_collator(pad_id: int, pad_to: int) -> Callable[[list[dict]], dict]:
    """Micro-batches as `summ.data.collate` builds them, padded to a multiple of `pad_to` tokens."""
    from summ.data import Example, collate

    def collator(rows: list[dict]) -> dict:
        return collate([Example(r["input_ids"], r["labels"]) for r in rows], pad_id, pad_to_multiple_of=pad_to)

    return collator


def train_peer(model, examples: Sequence, order: Sequence[int], *, output_dir: str, batch: int, accumulation: int,
               steps: int, dtype, collator: Callable[[list[dict]], dict], trainer_class=None, callbacks=(),
               **training_args):
    """Runs `steps` optimizer steps of `batch` x `accumulation` rows, the rows `examples[i]` for i in
    `order`, in that order; returns the trainer. `training_args` are the recipe's own
    TrainingArguments (learning rate, schedule, optimizer, seed, ...)."""
    import torch
    from transformers import Trainer, TrainingArguments

    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, fp16=on_gpu and dtype == torch.float16, bf16=on_gpu and dtype == torch.bfloat16,
        use_cpu=not on_gpu, gradient_checkpointing=True, train_sampling_strategy="sequential",
        logging_steps=10**6, save_strategy="no", report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, **training_args)
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
    trainer = (trainer_class or Trainer)(model=model, args=args, train_dataset=rows, callbacks=list(callbacks),
                                         data_collator=collator)
    trainer.train()
    return trainer
