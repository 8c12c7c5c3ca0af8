"""A hand-written plain PyTorch FSDP2 training loop: the baseline the generated script is measured against.

torchrun --nproc-per-node 2 benchmarks/fsdp_baseline.py CONFIG_DIR --seq-len 256 --global-batch 8 --steps 20
Prints one JSON line per step on rank 0, like the generated script.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config_dir")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(args.config_dir)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    accum = args.global_batch // world
    g = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(3, config.vocab_size, (1, args.seq_len), generator=g)
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss.detach())
        elapsed = time.perf_counter() - start
        if rank == 0:
            tokens = args.global_batch * args.seq_len
            print(json.dumps({"step": step, "step_time_s": elapsed, "tokens_per_s": tokens / elapsed}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
