"""Does compiled code apply while a CUDA graph records? argv[1]: 'internal' (torch.cuda.graph's own
stream) or 'same' (warm-up and capture on one side stream); argv[2]: arch phi|llama."""
import sys, tempfile, traceback
from pathlib import Path
import torch
from accelerate import Accelerator
sys.path.insert(0, ".")
from tests.conftest import tiny_config
from tests.test_train import examples_for
from summ.data import collate
from summ.graphed_step import static_inputs, static_summed_loss
from summ.model import build_model

mode, arch = sys.argv[1], sys.argv[2]
cfg = tiny_config(Path(tempfile.mkdtemp()), arch, quant=True, model={"attn_implementation": "sdpa", "compile_layers": True})
tok, ex = examples_for(cfg, 3)
acc = Accelerator()
model = build_model(cfg, acc.device, torch.float32); model.train()
inp = static_inputs(collate(ex, tok.pad_token_id), 3, 128, tok.pad_token_id)
inp = type(inp)(inp.input_ids.cuda(), inp.positions.cuda(), inp.targets.cuda())
for p in model.parameters():
    if p.requires_grad: p.grad = torch.zeros_like(p)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(2):
        acc.backward(static_summed_loss(model, inp))
torch.cuda.current_stream().wait_stream(side)
g = torch.cuda.CUDAGraph()
kw = {"stream": side} if mode == "same" else {}
try:
    with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(g, **kw):
        acc.backward(static_summed_loss(model, inp))
    print(f"DIAG {arch} {mode}: captured with compiled code, no recompile")
except Exception as e:
    print(f"DIAG {arch} {mode}: FAILED {type(e).__name__}: {str(e)[:1500]}")
