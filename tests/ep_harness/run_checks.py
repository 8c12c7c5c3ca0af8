"""Expert-parallel checks, run once under torchrun (2 ranks, gloo) by tests/test_ep_dispatch.py.

Every case builds the same model twice from one seed: a single-process reference that sees every rank's tokens,
and an EP model (apply_expert_parallel from the rendered ep.py.j2) that sees only this rank's. Each rank sums the
loss over its own tokens, so:
  - summed over ranks, the EP loss and every dense (replicated) gradient equal the reference's;
  - an expert gradient is already complete on the rank holding the expert (all ranks' tokens came to it): it equals
    the reference's rows for those experts, with no reduction.
Each rank writes what it measured to OUT/rank<r>.json; the pytest side judges it.
"""

import argparse
import functools
import importlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

SEED = 0
BATCH, SEQ = 2, 32  # sequences per rank, tokens per sequence


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def all_reduce_sum(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def build_model(model_dir):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    cls = getattr(transformers, config.architectures[0])
    return cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def capture_routing(model, experts_paths):
    """The router's top-k expert ids of every MoE layer, in layer order, recorded by a hook on each layer's gate."""
    routing = []
    for path in experts_paths:
        gate = model.get_submodule(path.removesuffix("experts") + "gate")
        gate.register_forward_hook(lambda module, args, output: routing.append(output[2].detach().clone()))
    return routing


def loss_sum(model, input_ids):
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")


def enable_checkpointing(model):
    """Per-layer non-reentrant activation checkpointing, the way train.py's apply_activation_checkpointing does it."""
    for module in model.modules():
        if isinstance(module, transformers.modeling_layers.GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def expected_bytes(routing, rank, world, tokens_per_rank, experts_per_rank, hidden, elem_bytes, forwards):
    """COMM_BYTES["ep_all_to_all"] this rank should count: per MoE layer, rows it sends off-rank (S) and rows other
    ranks send it (R, which it sends back in the combine); forward S+R rows, backward S+R again, plus the counts."""
    total = 0
    for ids in routing:
        dest = ids // experts_per_rank  # [world*T, K]: the EP rank of each choice
        source = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids) // tokens_per_rank
        sent = int(((source == rank) & (dest != rank)).sum())
        received = int(((source != rank) & (dest == rank)).sum())
        rows_bytes = (sent + received) * hidden * elem_bytes
        counts_bytes = (world - 1) * experts_per_rank * 8
        total += (forwards + 1) * rows_bytes + forwards * counts_bytes
    return total


def expected_load(routing, num_experts):
    counts = torch.stack([torch.bincount(ids.flatten(), minlength=num_experts) for ids in routing])
    imbalance = (counts.max(dim=1).values / counts.double().mean(dim=1)).max().item()
    return {"tokens_per_expert": counts.sum(dim=0).tolist(), "imbalance": round(imbalance, 4)}


def local_tensor(t):
    """An FSDP parameter or gradient is a DTensor: its full value (an expert one is complete on its EP rank)."""
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def compare_grads(ep_model, reference, ep, fsdp):
    """Worst relative error of the gradients, dense ones summed over ranks (by FSDP's reduce-scatter, or here),
    expert ones slice-wise; also the parameter values (the EP model's expert slices must be the reference's rows)
    and the parameter counts."""
    ref_params = dict(reference.named_parameters())
    expert_names = {f"{path}.{name}" for path in ep.EP_MODULES for name in ("gate_up_proj", "down_proj")}
    first = dist.get_rank() * ep.EXPERTS_PER_RANK
    dense_err = expert_err = value_err = 0.0
    missing_grads = []
    local_numel = 0
    for name, param in ep_model.named_parameters():
        ref = ref_params[name]
        grad, param = param.grad, local_tensor(param.detach())
        local_numel += param.numel()
        if grad is None:  # fine where the reference has none either (e.g. an encoder a text batch skips)
            if ref.grad is not None:
                missing_grads.append(name)
            continue
        if name in expert_names:
            rows = slice(first, first + ep.EXPERTS_PER_RANK)
            expert_err = max(expert_err, rel_err(local_tensor(grad), ref.grad[rows]))
            value_err = max(value_err, rel_err(param, ref.detach()[rows]))
        else:
            grad = local_tensor(grad) if fsdp else all_reduce_sum(grad)
            dense_err = max(dense_err, rel_err(grad, ref.grad))
            value_err = max(value_err, rel_err(param, ref.detach()))
    expert_numel = sum(ref_params[n].numel() for n in expert_names)
    ref_numel = sum(p.numel() for p in reference.parameters())
    return {"dense_grad_err": dense_err, "expert_grad_err": expert_err, "param_value_err": value_err,
            "missing_grads": missing_grads, "local_numel": local_numel,
            "expected_local_numel": ref_numel - expert_numel + expert_numel // ep.EP_DEGREE}


def apply_ep_and_fsdp(model, ep):
    """The order train.py needs: EP slicing first, then the experts sharded over their own replicas (ep_fsdp, size 1
    here), so that the layer's FSDP over all ranks leaves them out, then the layers, then the root. Sharding the
    experts over dp_shard would mix different ranks' experts into one "full" tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    world = dist.get_world_size()
    ep_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ep_fsdp", "ep"))
    dp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    ep.apply_expert_parallel(model, ep_mesh["ep"].get_group())
    for path in ep.EP_MODULES:
        fully_shard(model.get_submodule(path), mesh=ep_mesh["ep_fsdp"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def check_model(case, group):
    """A whole model: loss, every gradient, COMM_BYTES and the load statistics against the reference."""
    ep = importlib.import_module(case["module"])
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(3, 1000, (world * BATCH, SEQ), generator=torch.Generator().manual_seed(1234))

    reference = build_model(case["model_dir"])
    reference.config._experts_implementation = "eager"
    routing = capture_routing(reference, ep.EP_MODULES)
    ref_loss = loss_sum(reference, ids)
    ref_loss.backward()

    model = build_model(case["model_dir"])
    if case["checkpointing"]:
        enable_checkpointing(model)
    if case["fsdp"]:
        apply_ep_and_fsdp(model, ep)
    else:
        ep.apply_expert_parallel(model, group)
    ep.COMM_BYTES.clear()
    loss = loss_sum(model, ids[rank * BATCH:(rank + 1) * BATCH])
    loss.backward()
    sent = ep.COMM_BYTES["ep_all_to_all"]
    load = ep.expert_load_stats(model)

    hidden = model.get_submodule(ep.EP_MODULES[0]).hidden_dim
    forwards = 2 if case["checkpointing"] else 1
    return {"loss_err": rel_err(all_reduce_sum(loss), ref_loss.detach()),
            **compare_grads(model, reference, ep, case["fsdp"]),
            "bytes": sent,
            "expected_bytes": expected_bytes(routing, rank, world, BATCH * SEQ, ep.EXPERTS_PER_RANK, hidden, 4, forwards),
            "load": load, "expected_load": expected_load(routing, ep.NUM_EXPERTS),
            "load_after_reset": ep.expert_load_stats(model)["tokens_per_expert"],
            "implementation": model.get_submodule(ep.EP_MODULES[0]).config._experts_implementation}


# ----------------------------------------------------------------------------------------------------------------
# One MoE block with a crafted router: routing is exact, so the bytes can be checked against the closed formula.
# ----------------------------------------------------------------------------------------------------------------

TOKENS = 16  # per rank


def crafted_block(model_dir):
    """A Qwen3-MoE block (8 experts, top-2) whose router reads only input dims 0-7: dim j < 4 routes a token to
    experts j and j+4 (one per EP rank: balanced), dim 4+j to experts 4+j and 4+(j+1)%4 (both on rank 1)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    block = Qwen3MoeSparseMoeBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.05)
    router = torch.zeros_like(block.gate.weight)
    for j in range(4):
        router[j, j] = router[j + 4, j] = 8.0
        router[4 + j, 4 + j], router[4 + (j + 1) % 4, 4 + j] = 8.0, 6.0
    block.gate.weight.data.copy_(router)
    return block


def crafted_tokens(pattern, rank, hidden):
    """Token t sets routing dim t%4 ("balanced") or 4+t%4 ("to_rank1"); dims 8+ carry noise the router ignores."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, hidden, generator=g)
    x[:, :8] = 0.0
    offset = 0 if pattern == "balanced" else 4
    x[torch.arange(TOKENS), offset + torch.arange(TOKENS) % 4] = 1.0
    return x


def check_block(case, group):
    ep = importlib.import_module(case["module"])
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = crafted_block(case["model_dir"])
    reference.experts.config._experts_implementation = "eager"
    block = crafted_block(case["model_dir"])
    ep.apply_expert_parallel(block, group)
    hidden = block.experts.hidden_dim

    inputs = [crafted_tokens(pattern, r, hidden) for r, pattern in enumerate(case["patterns"])]
    probe = torch.randn(world, TOKENS, hidden, generator=torch.Generator().manual_seed(7))
    ref_in = torch.stack(inputs).requires_grad_()
    routing = capture_routing(reference, ["experts"])
    ref_out = reference(ref_in)
    (ref_out * probe).sum().backward()

    ep.COMM_BYTES.clear()
    x = inputs[rank].unsqueeze(0).requires_grad_()
    out = block(x)
    (out * probe[rank]).sum().backward()
    sent = ep.COMM_BYTES["ep_all_to_all"]
    load = ep.expert_load_stats(block)

    first = rank * ep.EXPERTS_PER_RANK
    rows = slice(first, first + ep.EXPERTS_PER_RANK)
    return {"output_err": rel_err(out.detach()[0], ref_out.detach()[rank]),
            "input_grad_err": rel_err(x.grad[0], ref_in.grad[rank]),
            "router_grad_err": rel_err(all_reduce_sum(block.gate.weight.grad), reference.gate.weight.grad),
            "expert_grad_err": max(rel_err(block.experts.gate_up_proj.grad, reference.experts.gate_up_proj.grad[rows]),
                                   rel_err(block.experts.down_proj.grad, reference.experts.down_proj.grad[rows])),
            "local_expert_grad_norm": block.experts.gate_up_proj.grad.norm().item(),
            "bytes": sent,
            "expected_bytes": expected_bytes(routing, rank, world, TOKENS, ep.EXPERTS_PER_RANK, hidden, 4, 1),
            "tokens": TOKENS, "top_k": block.gate.top_k, "hidden": hidden,
            "load": load, "expected_load": expected_load(routing, ep.NUM_EXPERTS)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help="cases.json written by the test")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))  # the EP group: all ranks here
    with open(args.cases) as f:
        cases = json.load(f)
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.cases)))  # the rendered ep modules
    results = {}
    for name, case in cases.items():
        start = time.perf_counter()
        results[name] = check_block(case, group) if case["kind"] == "block" else check_model(case, group)
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
