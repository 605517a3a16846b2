"""How a training step runs fast; none of it changes what is computed.

- `layers`: fused elementwise ops (`model.fused_ops`), Liger-Kernel (`model.liger_kernel`), compiled
  decoder layers (`model.compile_layers`), recomputed layers (`model.checkpointed_layers`);
- `micro_batch`: a step's rows as micro-batches of a token budget, and the probe that finds the
  largest budget that fits (`train.auto_micro_batch`, `train.micro_batch_tokens`);
- `graphs`: a micro-batch's forward, loss and backward recorded once as a CUDA graph and replayed
  (`train.cuda_graphs`);
- `step`: the entry point the loop calls, which runs one optimizer step's forward and backward
  through whichever of these the config turns on (and packs rows with `train.packing`).

Imports flow config -> data -> speed.layers -> model -> speed.micro_batch / graphs / step -> training:
`summ.model` applies the layer levers as it loads a model, the rest acts on a loaded one.
"""
