"""Forward, loss and backward of a training micro-batch, recorded once as a CUDA graph and replayed.

A QLoRA step of a small model on a fast GPU is bound by the host, not the GPU: Python, autograd,
peft and the 4-bit layers issue thousands of kernels per step (Phi-2 at 8 rows: about 3,900
compiled, 6,300 not), and the GPU waits for each to be issued. A CUDA graph replays the recorded
kernels with one launch, so the step costs only its GPU time.

A graph has fixed shapes and must not read GPU values on the host while it is recorded, so:
- every micro-batch runs as `rows` x `length` tokens, short rows and missing rows padded (padding
  carries no label and, under a causal mask, is never seen by a real token);
- the LM head runs on the positions that carry a label in some row (as `summ.loss` does), their
  count rounded up to a multiple of POSITION_BUCKET; one graph per rounded count, all sharing one
  memory pool;
- the loss is a cross-entropy summed over every kept position, unlabelled ones ignored, and the
  step's normaliser (world size / label tokens) is a GPU scalar the graph reads.

The gradients accumulate in place into `.grad` tensors that exist before recording, so the loop
zeroes them without freeing them. The first recording runs the micro-batch a few times first
(kernels load, compiled layers compile); those runs change neither the gradients nor the random
state, so a resumed run replays exactly what the uninterrupted one did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from summ.config import ConfigError
from summ.data import IGNORE_INDEX, padded_length
from summ.loss import labelled_positions

log = logging.getLogger(__name__)

# Label positions per graph are rounded up to a multiple of this: a few graphs per run instead of one
# per distinct count, at most this many extra head positions per micro-batch.
POSITION_BUCKET = 64
# Runs of a micro-batch before it is recorded: the first loads kernels and compiles, the second runs
# what the recording will see.
WARMUP_RUNS = 2
# Compiling cannot happen while recording, so a layer whose compiled code does not apply is recorded
# as its eager kernels instead (set "fail_on_recompile" to see why it does not apply).
CAPTURE_STANCE = "eager_on_recompile"


def check_graph_launch(accelerator) -> None:
    """Graphs record one process's kernels on a CUDA GPU: refuse anything else before a model loads."""
    if accelerator.device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs: needs a CUDA GPU (this run is on {accelerator.device.type}); "
                          f"set it to false")
    if accelerator.num_processes > 1:
        # DDP's gradient all-reduce would have to be recorded inside the graph too.
        raise ConfigError(f"train.cuda_graphs: runs on one process (this launch has {accelerator.num_processes}); "
                          f"set it to false for data-parallel training")


@dataclass
class StaticInputs:
    """One micro-batch at the graph's fixed shapes (host tensors)."""
    input_ids: torch.Tensor  # rows x length, padded with the pad token
    positions: torch.Tensor  # the head's positions: those with a label in some row, then filler
    targets: torch.Tensor  # rows x positions: the next token at each kept position, or IGNORE_INDEX


def static_inputs(batch: dict[str, torch.Tensor], rows: int, length: int, pad_id: int,
                  bucket: int = POSITION_BUCKET) -> StaticInputs:
    """`batch` (right-padded rows, as `summ.data.collate` builds) at `rows` x `length`, its label
    positions padded to a multiple of `bucket` (at most length - 1)."""
    ids, labels = batch["input_ids"], batch["labels"]
    n, width = ids.shape
    if n > rows or width > length:
        raise ValueError(f"a micro-batch of {n} rows x {width} tokens does not fit the graph's {rows} x {length}")
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    input_ids[:n, :width] = ids
    shifted = torch.full((rows, length - 1), IGNORE_INDEX, dtype=torch.long)
    shifted[:n, :width - 1] = labels[:, 1:]
    labelled = labelled_positions(shifted)
    padded_count = min(max(padded_length(labelled.numel(), bucket), bucket), length - 1)
    positions = torch.zeros(padded_count, dtype=torch.long)  # filler: position 0, its targets ignored
    positions[:labelled.numel()] = labelled
    targets = torch.full((rows, padded_count), IGNORE_INDEX, dtype=torch.long)
    targets[:, :labelled.numel()] = shifted[:, labelled]
    return StaticInputs(input_ids, positions, targets)


def graph_mask(model, length: int, device) -> torch.Tensor | None:
    """The mask every graphed run passes: with SDPA attention, transformers skips building the causal
    mask (SDPA's is_causal does it) except while a CUDA graph records, so compiled layers would meet a
    mask they were not compiled for and run eagerly inside the graph; a prepared mask keeps the runs
    alike (4D, True where a query may attend, broadcast over rows and heads, as transformers takes a
    prepared one). The other attention implementations build the same mask either way: None."""
    if model.config._attn_implementation != "sdpa":
        return None
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def static_summed_loss(model, inputs: StaticInputs, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The summed next-token loss of `inputs` (on the model's device): the computation a graph records.
    `mask`: a prepared causal mask (`graph_mask`), or None to let the model build its own."""
    logits = model(input_ids=inputs.input_ids, attention_mask=mask, logits_to_keep=inputs.positions).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), inputs.targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


class GraphedMicroSteps:
    """Runs micro-batches of at most `rows` x `length` tokens through recorded CUDA graphs.

    `step(batch, loss_scale)` adds the gradient of loss_scale x (the batch's summed loss) to the
    trainable parameters' `.grad` and returns the summed loss (a GPU scalar the caller owns).
    """

    def __init__(self, model, accelerator, rows: int, length: int, pad_id: int):
        self.model, self.accelerator = model, accelerator
        self.rows, self.length, self.pad_id = rows, length, pad_id
        self.device = accelerator.device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.input_ids = torch.full((rows, length), pad_id, dtype=torch.long, device=self.device)
        self.mask = graph_mask(model, length, self.device)
        self.loss_scale = torch.zeros((), device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def step(self, batch: dict[str, torch.Tensor], loss_scale: float) -> torch.Tensor:
        inputs = static_inputs(batch, self.rows, self.length, self.pad_id)
        count = inputs.positions.numel()
        if count not in self.graphs:
            self.graphs[count] = self._record(inputs)
        graph, positions, targets, summed = self.graphs[count]
        self.input_ids.copy_(inputs.input_ids.pin_memory(), non_blocking=True)
        positions.copy_(inputs.positions.pin_memory(), non_blocking=True)
        targets.copy_(inputs.targets.pin_memory(), non_blocking=True)
        self.loss_scale.fill_(loss_scale)
        graph.replay()
        return summed.clone()  # the next replay overwrites it

    def _forward_backward(self, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        on_device = StaticInputs(self.input_ids, positions, targets)
        summed = static_summed_loss(self.model, on_device, self.mask)
        self.accelerator.backward(summed * self.loss_scale)  # with fp16: scaled by the loss scaler
        return summed.detach()

    def _record(self, inputs: StaticInputs):
        positions = inputs.positions.to(self.device)
        targets = inputs.targets.to(self.device)
        self.input_ids.copy_(inputs.input_ids)
        self.loss_scale.fill_(1.0)
        for p in self.params:
            if p.grad is None:  # backward inside the graph must add into a tensor that outlives it
                p.grad = torch.zeros_like(p)
        saved_grads = [p.grad.clone() for p in self.params]
        with torch.random.fork_rng(devices=[self.device]):
            if not self.graphs:
                # Kernels load and compiled layers compile on the first runs. Only the first graph
                # needs them: a later one would run them outside the shared pool, on top of it.
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        self._forward_backward(positions, targets)
                torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.compiler.set_stance(CAPTURE_STANCE), torch.cuda.graph(graph, pool=self.pool):
                summed = self._forward_backward(positions, targets)
        for p, grad in zip(self.params, saved_grads):
            p.grad.copy_(grad)
        self.pool = graph.pool()
        log.info("recorded a CUDA graph for %d x %d tokens, %d head positions (%d graphs)", self.rows, self.length,
                 positions.numel(), len(self.graphs) + 1)
        return graph, positions, targets, summed
