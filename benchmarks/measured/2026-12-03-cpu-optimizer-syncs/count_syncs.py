"""How many times bitsandbytes' 8-bit AdamW synchronizes the device in one step, for as many
parameter tensors as the Phi-2 recipe's LoRA trains (r=16 on q_proj, k_proj, v_proj and dense in 32
layers: 128 modules x A and B = 256 tensors). Counts the optimizer's calls of `sync_gpu`, which is
`torch.cuda.synchronize()` for CUDA tensors; runs on a CPU (where the call does nothing).

    python benchmarks/measured/2026-12-03-cpu-optimizer-syncs/count_syncs.py
"""
import torch
import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as optimizer_module

calls = []
sync_gpu = optimizer_module.sync_gpu
optimizer_module.sync_gpu = lambda t: calls.append(t.device.type) or sync_gpu(t)
params = [torch.nn.Parameter(torch.randn(16 * 2560)) for _ in range(256)]
for p in params:
    p.grad = torch.randn_like(p)
print("bitsandbytes", bnb.__version__, "torch", torch.__version__)
for cls in (bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit):
    optimizer = cls(params, lr=1e-3)
    for step in (1, 2):
        calls.clear()
        optimizer.step()
        print(f"{cls.__name__}, step {step}: {len(calls)} sync_gpu calls for {len(params)} parameter tensors")
