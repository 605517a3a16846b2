"""Forward, loss and backward of a training micro-batch, recorded once as a CUDA graph and replayed.

A QLoRA step of a small model on a fast GPU is bound by the host, not the GPU: Python, autograd,
peft and the 4-bit layers issue thousands of kernels per step (Phi-2 at 8 rows: about 3,900
compiled, 6,300 not), and the GPU waits for each to be issued. A CUDA graph replays the recorded
kernels with one launch, so the step costs only its GPU time.

A graph has fixed shapes and must not read GPU values on the host while it is recorded, so:
- every micro-batch runs as `rows` x `length` tokens, short rows and missing rows padded (padding
  carries no label and, under a causal mask, is never seen by a real token); `length` is the
  micro-batch's longest row rounded up to a multiple of LENGTH_MULTIPLE, so length-grouped
  micro-batches of short rows run short graphs instead of padding to `data.max_length`;
- attention is SDPA's causal kernel with no mask (`graph_attention`): right padding needs none, and
  it is the flash kernel where one exists (a model whose sliding window is shorter than the rows
  keeps its masked attention);
- the LM head runs on the positions that carry a label in some row (as `summ.loss` does), their
  count rounded up to a multiple of POSITION_BUCKET; one graph per (length, rounded count), all
  sharing one memory pool;
- the loss is a cross-entropy summed over every kept position, unlabelled ones ignored, and the
  step's normaliser (world size / label tokens) is a GPU scalar the graph reads.

The gradients accumulate in place into `.grad` tensors that exist before recording, so the loop
zeroes them without freeing them. Each length runs outside a graph before its first recording
(kernels load, compiled layers compile); those runs change neither the gradients nor the random
state, so a resumed run replays exactly what the uninterrupted one did. The loop records every graph
a run needs before its first step (`record_ahead`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from summ.config import ConfigError
from summ.data import IGNORE_INDEX, padded_length
from summ.loss import labelled_positions

log = logging.getLogger(__name__)

# Graph lengths are multiples of this many tokens: Phi-2 at 32 length-grouped rows per step pads 1.6%
# at 16 (27 graphs an epoch), 4.9% at 64 (8 graphs), for 1% more tokens/s at 16.
LENGTH_MULTIPLE = 16
# Label positions per graph are rounded up to a multiple of this: a few graphs per run instead of one
# per distinct count, at most this many extra head positions per micro-batch.
POSITION_BUCKET = 64
# Runs of the first micro-batch before it is recorded: the first loads kernels and compiles, the
# second runs what the recording will see. A later new length runs once.
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


def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with `is_causal` and no mask: what transformers' SDPA path does for unpadded rows."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


# While a CUDA graph records, some transformers versions (5.17 among them) build a 4D causal mask
# that they otherwise leave to SDPA's is_causal (they count stream capture as tracing), and a mask
# rules out the flash kernel. An attention implementation of its own has no mask to build
# (transformers builds masks only for the implementations it knows), so graphs record the same
# kernels they were warmed up with.
GRAPH_ATTENTION = "summ_causal_sdpa"
AttentionInterface.register(GRAPH_ATTENTION, causal_sdpa)


@contextmanager
def graph_attention(model, length: int):
    """Runs a model with SDPA attention as `causal_sdpa` on rows of `length` tokens. Left as they are:
    other implementations (they build the same mask whether or not a graph records), and a sliding
    window shorter than the rows (only a mask carries it)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if config._attn_implementation != "sdpa" or (window is not None and window < length):
        yield
        return
    config._attn_implementation = GRAPH_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def static_summed_loss(model, inputs: StaticInputs) -> torch.Tensor:
    """The summed next-token loss of `inputs` (on the model's device): the computation a graph records
    (under `graph_attention`)."""
    logits = model(input_ids=inputs.input_ids, logits_to_keep=inputs.positions).logits
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
        # Per graph length: rows x length, read by its graphs; a length has one once it has been run.
        self.input_ids: dict[int, torch.Tensor] = {}
        self.loss_scale = torch.zeros((), device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.warmup_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.record_seconds = 0.0  # spent recording the graphs, warm-up runs included

    def length_for(self, batch: dict[str, torch.Tensor]) -> int:
        """The graph length a micro-batch runs at: its width rounded up to LENGTH_MULTIPLE, at most `length`."""
        return min(padded_length(batch["input_ids"].shape[1], LENGTH_MULTIPLE), self.length)

    def inputs_for(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[int, int], StaticInputs]:
        """A micro-batch at its graph's shapes, and the graph's key: (length, head positions)."""
        length = self.length_for(batch)
        inputs = static_inputs(batch, self.rows, length, self.pad_id)
        return (length, inputs.positions.numel()), inputs

    def record_ahead(self, batches: Iterable[dict[str, torch.Tensor]]) -> int:
        """Records the graph of every micro-batch among `batches` that has none yet, so no training
        step waits for a recording; returns how many it recorded."""
        pending: dict[tuple[int, int], StaticInputs] = {}
        for batch in batches:
            key, inputs = self.inputs_for(batch)
            if key not in self.graphs:
                pending.setdefault(key, inputs)
        self._record(pending)
        return len(pending)

    def step(self, batch: dict[str, torch.Tensor], loss_scale: float) -> torch.Tensor:
        key, inputs = self.inputs_for(batch)
        if key not in self.graphs:
            self._record({key: inputs})
        graph, positions, targets, summed = self.graphs[key]
        self.input_ids[key[0]].copy_(inputs.input_ids.pin_memory(), non_blocking=True)
        positions.copy_(inputs.positions.pin_memory(), non_blocking=True)
        targets.copy_(inputs.targets.pin_memory(), non_blocking=True)
        self.loss_scale.fill_(loss_scale)
        graph.replay()
        return summed.clone()  # the next replay overwrites it

    def _record(self, pending: dict[tuple[int, int], StaticInputs]) -> None:
        """Records one graph per key of `pending`, longest first, each length not run before warmed up
        first. The gradients and the random state are left as they were, so a resumed run replays
        exactly what the uninterrupted one did."""
        if not pending:
            return
        started = time.perf_counter()
        for p in self.params:
            if p.grad is None:  # backward inside the graph must add into a tensor that outlives it
                p.grad = torch.zeros_like(p)
        saved_grads = [p.grad.clone() for p in self.params]
        self.model.train()  # dropout is recorded into the graph
        keys = sorted(pending, reverse=True)
        staged = {key: StaticInputs(pending[key].input_ids, pending[key].positions.to(self.device),
                                    pending[key].targets.to(self.device)) for key in keys}
        new_lengths: dict[int, StaticInputs] = {}  # the longest-first micro-batch of each length not run before
        for key in keys:
            if key[0] not in self.input_ids:
                new_lengths.setdefault(key[0], staged[key])
        first_ever = not self.input_ids
        for length in new_lengths:  # one buffer per length, read by all its graphs
            self.input_ids[length] = torch.full((self.rows, length), self.pad_id, dtype=torch.long,
                                                device=self.device)
        try:
            with torch.random.fork_rng(devices=[self.device]):
                self._warm_up(list(new_lengths.values()), first_ever)
                for key in keys:
                    self._stage(staged[key].input_ids)  # outside the recording: a graph would replay these copies
                    graph = torch.cuda.CUDAGraph()
                    with torch.compiler.set_stance(CAPTURE_STANCE), torch.cuda.graph(graph, pool=self.pool):
                        summed = self._run(staged[key])
                    self.pool = graph.pool()
                    self.graphs[key] = (graph, staged[key].positions, staged[key].targets, summed)
                    log.info("recorded a CUDA graph for %d x %d tokens, %d head positions (%d graphs)", self.rows,
                             key[0], key[1], len(self.graphs))
        finally:
            for p, grad in zip(self.params, saved_grads):
                p.grad.copy_(grad)
        torch.cuda.synchronize(self.device)
        self.record_seconds += time.perf_counter() - started

    def _warm_up(self, micro_batches: list[StaticInputs], first_ever: bool) -> None:
        """Runs each of `micro_batches` (one per new length) outside any graph, all of them before the
        first recording: kernels load, and compiled layers compile for the shapes they meet (a
        recording cannot compile, and torch may tie a dynamic length to an equal dimension of the
        model, so one length's compiled code need not serve another). Their memory is freed before
        the pool grows."""
        if not micro_batches:
            return
        current = torch.cuda.current_stream(self.device)
        self.warmup_stream.wait_stream(current)
        with torch.cuda.stream(self.warmup_stream):
            for i, inputs in enumerate(micro_batches):
                for _ in range(WARMUP_RUNS if first_ever and i == 0 else 1):
                    self._stage(inputs.input_ids)
                    self._run(inputs)
        current.wait_stream(self.warmup_stream)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' memory, for the pool to use

    def _stage(self, host_ids: torch.Tensor) -> None:
        """A micro-batch's input ids into its length's buffer, at 1 x its loss."""
        self.input_ids[host_ids.shape[1]].copy_(host_ids)
        self.loss_scale.fill_(1.0)

    def _run(self, staged: StaticInputs) -> torch.Tensor:
        """Forward and backward of a staged micro-batch (its ids already in their buffer): what a graph
        records. Returns the summed loss."""
        length = staged.input_ids.shape[1]
        with graph_attention(self.model, length):
            on_device = StaticInputs(self.input_ids[length], staged.positions, staged.targets)
            summed = static_summed_loss(self.model, on_device)
            self.accelerator.backward(summed * self.loss_scale)  # with fp16: scaled by the loss scaler
        return summed.detach()
