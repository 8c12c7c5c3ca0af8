"""Expert parallelism (templates/ep.py.j2) is proven equal to one process.

ep.py.j2 is rendered once per case into a small module (tests/ep_harness/ep_module.py.j2 adds the lines of train.py
it relies on), and tests/ep_harness/run_checks.py runs every case in ONE torchrun launch (2 ranks, gloo, ep=2):
Qwen3-MoE, Qwen2-MoE (shared expert), DeepSeek-V3 (first layer dense) and the Qwen3-Omni thinker (experts read the
text sub-config) against a single-process reference, then one MoE block with a crafted router for exact byte counts.
The router aux loss of generated scripts is checked against transformers' own aux_loss on one process.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "ep_harness"
MODELS = ROOT / "specs" / "models"
pytestmark = pytest.mark.distributed

EP = 2
TOL = 1e-5
ELEM_BYTES = 4  # fp32


def experts_paths(prefix, layers):
    return [f"{prefix}.{i}.mlp.experts" for i in layers]


# name -> (model folder, ep context, checks); "block" cases run one Qwen3-MoE block with a crafted router.
PLAIN = {"kind": "model", "checkpointing": False, "fsdp": False}
CASES = {
    "qwen3_moe": ("qwen3_moe_tiny", experts_paths("model.layers", [0, 1]), 8, PLAIN),
    "qwen3_moe_fsdp": ("qwen3_moe_tiny", experts_paths("model.layers", [0, 1]), 8, {**PLAIN, "fsdp": True}),
    "qwen2_moe": ("qwen2_moe_tiny", experts_paths("model.layers", [0, 1]), 4, {**PLAIN, "checkpointing": True}),
    "deepseek_v3": ("deepseek_v3_tiny", experts_paths("model.layers", [1, 2]), 8, PLAIN),
    "qwen3_omni_thinker": ("qwen3_omni_moe_thinker_tiny", experts_paths("model.language_model.layers", [0, 1]), 8,
                           PLAIN),
    "balanced": ("qwen3_moe_tiny", ["experts"], 8, {"kind": "block", "patterns": ["balanced", "balanced"]}),
    "rank1_keeps_its_tokens": ("qwen3_moe_tiny", ["experts"], 8, {"kind": "block", "patterns": ["balanced", "to_rank1"]}),
    "all_to_rank1": ("qwen3_moe_tiny", ["experts"], 8, {"kind": "block", "patterns": ["to_rank1", "to_rank1"]}),
}
MODEL_CASES = [name for name, case in CASES.items() if case[3]["kind"] == "model"]


def template_env():
    return jinja2.Environment(loader=jinja2.FileSystemLoader([str(ROOT / "templates"), str(HARNESS)]),
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def render_ep_module(modules, num_experts, top_k=2):
    ep = {"degree": EP, "modules": modules, "num_experts": num_experts, "top_k": top_k}
    return template_env().get_template("ep_module.py.j2").render(ep=ep)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Render every case's module and run all checks in one torchrun launch; {"rank0": {...}, "rank1": {...}}."""
    work = tmp_path_factory.mktemp("ep")
    cases = {}
    for name, (model, modules, num_experts, checks) in CASES.items():
        (work / f"ep_{name}.py").write_text(render_ep_module(modules, num_experts))
        cases[name] = {"module": f"ep_{name}", "model_dir": str(MODELS / model), **checks}
    (work / "cases.json").write_text(json.dumps(cases, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(EP),
                           str(HARNESS / "run_checks.py"), "--cases", str(work / "cases.json"), "--out", str(work)],
                          env=env, capture_output=True, text=True, timeout=300)
    worker_lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[rank")]
    assert proc.returncode == 0, "\n".join(worker_lines[-60:]) or proc.stderr[-4000:]
    out = {f"rank{r}": json.loads((work / f"rank{r}.json").read_text()) for r in range(EP)}
    print(f"\nEP harness: {time.perf_counter() - start:.1f} s in all; per case (rank 0):",
          {name: r["seconds"] for name, r in out["rank0"].items()})
    return out


def test_rendered_section_is_plain_python():
    text = render_ep_module(experts_paths("model.layers", [0, 1]), 8)
    compile(text, "ep.py", "exec")
    assert "{{" not in text and "{%" not in text
    assert '    "model.layers.1.mlp.experts",\n]' in text
    assert "EXPERTS_PER_RANK = 4" in text
    assert text == render_ep_module(experts_paths("model.layers", [0, 1]), 8)  # deterministic bytes


@pytest.mark.parametrize("name", MODEL_CASES)
def test_loss_and_every_gradient_match_one_process(results, name):
    for rank in range(EP):
        r = results[f"rank{rank}"][name]
        assert r["loss_err"] < TOL
        assert r["dense_grad_err"] < TOL and r["expert_grad_err"] < TOL, r
        assert r["param_value_err"] == 0.0
        assert r["missing_grads"] == []
        assert r["local_numel"] == r["expected_local_numel"]  # only this rank's experts are parameters
        assert r["implementation"] == "omnigen_ep"


@pytest.mark.parametrize("name", MODEL_CASES)
def test_comm_bytes_and_load_stats_match_the_routing(results, name):
    """qwen2_moe runs with activation checkpointing: the recomputed forward sends its bytes again, but the
    load statistics count each routing decision once."""
    for rank in range(EP):
        r = results[f"rank{rank}"][name]
        assert r["bytes"] == r["expected_bytes"] > 0
        assert r["load"]["tokens_per_expert"] == r["expected_load"]["tokens_per_expert"]
        assert r["load"]["imbalance"] == pytest.approx(r["expected_load"]["imbalance"], abs=1e-4)
        assert sum(r["load_after_reset"]) == 0


@pytest.mark.parametrize("name", ["balanced", "rank1_keeps_its_tokens", "all_to_rank1"])
def test_block_matches_one_process_for_any_routing(results, name):
    for rank in range(EP):
        r = results[f"rank{rank}"][name]
        assert r["output_err"] < TOL and r["input_grad_err"] < TOL, r
        assert r["router_grad_err"] < TOL and r["expert_grad_err"] < TOL, r
        assert r["load"] == r["expected_load"]


def balanced_bytes(tokens, top_k, hidden, elem_bytes, ep, num_experts):
    """The planner's formula (ep.py.j2): bytes one rank sends per MoE layer per micro-batch, balanced router."""
    rows = tokens * top_k * (ep - 1) // ep
    return 4 * rows * hidden * elem_bytes + 8 * num_experts * (ep - 1) // ep


def test_balanced_router_sends_exactly_the_formula(results):
    for rank in range(EP):
        r = results[f"rank{rank}"]["balanced"]
        assert r["bytes"] == balanced_bytes(r["tokens"], r["top_k"], r["hidden"], ELEM_BYTES, EP, 8)
        assert r["load"]["imbalance"] == 1.0


def test_skewed_router_bytes_are_exact_and_bounded(results):
    """Rank 1 routes none of its tokens to rank 0; with all_to_rank1, rank 0's experts get no token at all (their
    gradient is zero, not missing) and every row rank 0 holds crosses the link twice each way."""
    counts_bytes = 8 * 8 * (EP - 1) // EP
    for name in ["rank1_keeps_its_tokens", "all_to_rank1"]:
        per_rank = [results[f"rank{rank}"][name] for rank in range(EP)]
        for r in per_rank:
            rows_bytes = r["tokens"] * r["top_k"] * r["hidden"] * ELEM_BYTES
            assert r["bytes"] == r["expected_bytes"]
            assert r["bytes"] <= 2 * EP * rows_bytes + counts_bytes
        assert sum(r["bytes"] for r in per_rank) <= 4 * EP * rows_bytes + EP * counts_bytes
    lopsided = [results[f"rank{rank}"]["all_to_rank1"] for rank in range(EP)]
    rows_bytes = lopsided[0]["tokens"] * lopsided[0]["top_k"] * lopsided[0]["hidden"] * ELEM_BYTES
    assert [r["bytes"] for r in lopsided] == [2 * rows_bytes + counts_bytes] * 2
    assert lopsided[0]["local_expert_grad_norm"] == 0.0 and lopsided[1]["local_expert_grad_norm"] > 0
    assert lopsided[0]["load"]["imbalance"] == 2.0  # 4 of 8 experts take all the tokens


@pytest.mark.parametrize("spec_name", ["qwen3_moe_tiny_ep2", "qwen2_moe_tiny_ep2"])
def test_router_aux_loss_is_transformers_aux_loss(spec_name, tmp_path):
    """The generated script's router aux loss (hooks on the routers, our own pooling) equals the aux_loss transformers
    returns for the same single-process forward, padding included."""
    import ast

    import torch
    import torch.nn.functional as F
    import transformers

    from omnigen import runner
    from omnigen.spec import load_spec

    spec = runner.reference_spec(load_spec(ROOT / "specs" / f"{spec_name}.yaml"))
    runner.compile_to(spec, tmp_path)
    tree = ast.parse((tmp_path / "train.py").read_text())
    wanted = [n for n in tree.body if getattr(n, "name", None) in ("RouterLogits", "router_aux_loss")]
    script = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "train.py", "exec"), script)

    config = transformers.AutoConfig.from_pretrained(tmp_path)
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.float32)
    input_ids = torch.randint(3, 1000, (2, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 29:] = 0  # a padded row: transformers leaves padding out of the loss, and so must we
    hf = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    router_logits = script["RouterLogits"](model)  # from here on the model's output carries our aux_loss
    ours = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert ours.router_logits is None, "the hooks turn transformers' own router-logit pooling off"
    assert len(router_logits.logits) == config.num_hidden_layers
    assert ours.aux_loss.item() == pytest.approx(hf.aux_loss.item(), rel=1e-6)
