"""Sliding-window, chunked and per-layer attention (config.layer_types) under omnigen's own attention (Ulysses SP,
packed documents): read from the config at compile time, refused when it cannot be reproduced, and computed exactly
as transformers' own model computes it."""

import runpy
from pathlib import Path

import pytest
import torch
import transformers

import local_attention_models as M
from omnigen import pipeline
from omnigen.errors import OmnigenError, PlanError
from omnigen.spec import spec_from_dict


def compile_to(tmp_path, config, **spec_kw):
    folder = M.write(config, tmp_path / "model")
    compiled = pipeline.plan(spec_from_dict(M.spec_dict("t", folder, **spec_kw), "spec.yaml", str(tmp_path)))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    for name, text in pipeline.render(compiled, out).items():
        (out / name).write_text(text)
    return compiled, out


@pytest.mark.parametrize("make,layers,spans", [
    (M.gemma3, ["sliding_window", "causal"], {"sliding_window": 16}),
    (M.llama4, ["chunked", "causal"], {"chunked": 32}),
    (M.mistral, ["sliding_window", "sliding_window"], {"sliding_window": 16}),
    (M.qwen2, ["causal", "sliding_window"], {"sliding_window": 16}),
])
def test_the_plan_carries_each_layers_attention(make, layers, spans, tmp_path):
    from omnigen.plan import format_explain
    compiled, _ = compile_to(tmp_path, make())
    assert compiled.plan.sequence_parallel["local_attention"] == {"layers": layers, "spans": spans}
    assert "LLM attention by layer: " in format_explain(compiled.plan)


def test_plain_causal_models_keep_no_local_attention(tmp_path):
    compiled, out = compile_to(tmp_path, M.gemma3(layer_types=["full_attention", "full_attention"]))
    assert compiled.plan.sequence_parallel["local_attention"] == {}
    assert "banded_attention" not in (out / "train.py").read_text()


def gemma2(**kw):
    return transformers.Gemma2Config(**M.COMMON, num_hidden_layers=2, head_dim=16, sliding_window=16,
                                     architectures=["Gemma2ForCausalLM"], **kw)


def gpt_oss():
    return transformers.GptOssConfig(**{**M.COMMON, "intermediate_size": 64}, num_hidden_layers=2, head_dim=16,
                                     sliding_window=16, num_local_experts=4, num_experts_per_tok=2,
                                     architectures=["GptOssForCausalLM"])


@pytest.mark.parametrize("make,reason", [(gemma2, "attn_logit_softcapping=50.0"), (gpt_oss, "attention sinks")])
@pytest.mark.parametrize("sp,pack", [(2, 1), (1, 3)])
def test_what_sdpa_cannot_compute_is_refused_at_compile(make, reason, sp, pack, tmp_path):
    with pytest.raises(PlanError, match=reason) as e:
        compile_to(tmp_path, make(), sp=sp, pack=pack)
    assert "model.layers" in str(e.value)  # names the module


def test_softcapping_without_omnigens_attention_compiles(tmp_path):
    """Without SP or packing the model's own attention runs: nothing to refuse."""
    compiled, _ = compile_to(tmp_path, gemma2(), sp=1)
    assert compiled.plan.sequence_parallel is None


def test_sp_auto_avoids_ulysses_when_it_would_change_the_model(tmp_path):
    spec = M.spec_dict("t", M.write(gemma2(), tmp_path / "m"), sp=2)
    spec["parallel"] = {"sp": "auto"}
    compiled = pipeline.plan(spec_from_dict(spec, "spec.yaml", str(tmp_path)))
    assert compiled.plan.mesh["sp"] == 1 and list(compiled.plan.max_seq_len_by_sp) == ["1"]


def test_llama4_nope_query_scaling_is_redone_for_whole_sequence_positions(tmp_path):
    compiled, out = compile_to(tmp_path, M.llama4(floor_scale=16), seq_len=128)
    assert compiled.plan.sequence_parallel["query_position_scaling"] == {"layers": [1], "floor_scale": 16.0,
                                                                         "attn_scale": 0.1}
    assert "rescale_query_positions(query" in (out / "train.py").read_text()
    compiled, _ = compile_to(tmp_path, M.llama4(), seq_len=128, sp=1, pack=3)  # one process sees the whole row
    assert compiled.plan.sequence_parallel["query_position_scaling"] == {}


def documents(seq_len, lengths):
    document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
    return document_ids[None], (torch.arange(seq_len) - starts[document_ids])[None]


@pytest.mark.parametrize("make", [M.gemma3, M.llama4, M.mistral, M.qwen2])
def test_omnigen_attention_equals_transformers_own(make, tmp_path):
    """The generated attention (no-SP packed build: the same functions Ulysses calls on the whole sequence) against
    transformers' eager attention with the model's own masks, on one process, with and without packed documents
    (transformers detects the packing from position ids). The old attention (plain causal on every layer) fails."""
    seq_len = 128
    config = make()
    _, out = compile_to(tmp_path, config, sp=1, pack=3, seq_len=seq_len)
    script = runpy.run_path(str(out / "train.py"), run_name="omnigen_script")
    ours = script["build_model"]()
    script["apply_sequence_parallel"](ours)
    reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(out),
                                                               attn_implementation="eager", dtype=torch.float32)
    reference.load_state_dict(ours.state_dict())
    reference.config.use_cache = False
    ids = torch.randint(3, 1024, (2, seq_len), generator=torch.Generator().manual_seed(0))  # 2 rows: masks broadcast
    layers = ours.get_submodule(script["DECODER_STACK"]).layers
    for lengths in ([seq_len], [50, 7, 71]):
        document_ids, positions = documents(seq_len, lengths)
        kw = {} if len(lengths) == 1 else {"document_ids": document_ids}
        want = reference(input_ids=ids, position_ids=positions).logits
        got = ours(input_ids=ids, position_ids=positions, **kw).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), lengths
        patterns = [layer.self_attn.attention_pattern for layer in layers]
        names = script["document_attention"].__globals__
        check, names["check_attention_kwargs"] = names["check_attention_kwargs"], lambda module, kwargs: None
        for layer in layers:  # what the script did before: causal everywhere, the window dropped
            layer.self_attn.attention_pattern = "causal"
        old = ours(input_ids=ids, position_ids=positions, **kw).logits
        for layer, pattern in zip(layers, patterns):
            layer.self_attn.attention_pattern = pattern
        names["check_attention_kwargs"] = check
        assert (old - want).abs().max() > 1e-3 * want.abs().max(), lengths


def test_banded_masks_equal_transformers_masks(tmp_path):
    """Index arithmetic against masking_utils' dense masks, packed rows included, for spans that do and do not
    divide the sequence."""
    from transformers import masking_utils
    for make, create in ((lambda s: M.gemma3(window=s), masking_utils.create_sliding_window_causal_mask),
                         (lambda s: M.llama4(chunk=s), masking_utils.create_chunked_causal_mask)):
        for span in (5, 16):
            config = make(span)
            _, out = compile_to(tmp_path, config, sp=1, pack=3, seq_len=60)
            script = runpy.run_path(str(out / "train.py"), run_name="omnigen_script")
            config._attn_implementation = "eager"
            for lengths in ([60], [20, 3, 37]):
                document_ids, positions = documents(60, lengths)
                dense = create(config=config, inputs_embeds=torch.zeros(1, 60, 8), attention_mask=None,
                               past_key_values=None, position_ids=positions)
                want = dense[0, 0] == 0  # eager masks are additive: 0 where attention is allowed
                (pattern, mask), = script["banded_masks"](None if len(lengths) == 1 else document_ids, 60,
                                                          torch.device("cpu")).items()
                blocks = mask.shape[1]
                got = torch.zeros(60, 60, dtype=torch.bool)
                for b in range(blocks):
                    for r in range(span):
                        q = b * span + r
                        for c in range(2 * span):
                            k = b * span - span + c
                            if q < 60 and 0 <= k < 60 and mask[0, b, 0, r, c]:
                                got[q, k] = True
                assert torch.equal(got, want), (pattern, span, lengths)


@pytest.mark.distributed
@pytest.mark.parametrize("make,pack", [(M.gemma3, 1), (lambda: M.llama4(floor_scale=16), 1), (M.mistral, 1),
                                       (M.gemma3, 3), (lambda: M.llama4(floor_scale=16), 3)],
                         ids=["gemma3", "llama4_chunked", "mistral", "gemma3_packed", "llama4_chunked_packed"])
def test_ulysses_verifies_with_local_attention(make, pack, tmp_path):
    """sp=2 at seq 128, longer than the window (16) and the chunk (32): before, these trained another attention
    (Gemma3 deviated 3.4e-2, Llama4 1.1e-1 from the single-process reference). Llama4's floor_scale of 16 makes its
    NoPE layer's query scale change along the sequence, so each rank must count positions from the row's start."""
    from omnigen import runner
    folder = M.write(make(), tmp_path / "model")
    spec = spec_from_dict(M.spec_dict("t", folder, seq_len=128, sp=2, pack=pack), "spec.yaml", str(tmp_path))
    assert runner.verify(spec, steps=3, workdir=str(tmp_path / "run")) == 0


def test_cost_prices_windowed_layers_by_their_window():
    """4 layers, 3 sliding (window 16) and 1 causal, seq 128, a calibrated profile (attention at 0.25e12, causal
    key blocks of 64: 3/4 of the causal matrix). Under Ulysses banded_attention scores 2 x 16 keys per query on the
    sliding layers; without Ulysses or packing transformers' SDPA runs them with a dense mask over all 128."""
    from dataclasses import replace
    from test_cost import FOUNDATION, SHAPE, hw, model
    from omnigen import cost
    from omnigen.cost import GroupChoice, Mesh
    spans = (("sliding_window", 16),) * 3 + (("causal", 0),)
    g = replace(FOUNDATION, attention_spans=spans)
    profile = replace(hw(), attention_efficiency={"fp32": 0.25, "bf16": 0.1}, causal_block=64)
    per_key = 4 * 256  # attn_flops_per_token_per_seq of the test group
    for mesh, sliding in ((Mesh(sp=2), 32), (Mesh(), 128)):
        tokens = 2 * 128 / mesh.sp
        flops = cost.group_attention_flops(g, SHAPE, mesh)
        assert flops == pytest.approx(tokens * per_key * (3 * sliding + 128) / 4)
        want_s = 4 * tokens * per_key * (3 * sliding + 128 * 3 / 4) / 4 / 0.25e12
        assert cost.attention_s(g, 4 * flops, SHAPE, profile, mesh) == pytest.approx(want_s)
    # a window as wide as the sequence is plain causal attention
    wide = replace(FOUNDATION, attention_spans=(("sliding_window", 128),) * 4)
    assert cost.attention_keys(wide, SHAPE, Mesh(sp=2)) == [(128, True)] * 4
    # and the whole step gets cheaper with the window than with full attention
    full = cost.estimate(model(FOUNDATION), Mesh(sp=2), {"model.layers": GroupChoice()}, SHAPE, profile, 2)
    local = cost.estimate(model(g), Mesh(sp=2), {"model.layers": GroupChoice()}, SHAPE, profile, 2)
    assert local.compute_s < full.compute_s


def test_gemma3_at_128k_plans_sp8_for_memory_and_prices_the_windows(tmp_path):
    """Gemma3-4B's text shape (34 layers, 5 of 6 sliding over 1,024 tokens) at 128K on 8 x H100: still sp=8,
    because below it the loss's vocab-wide fp32 tensors (262K vocab) do not fit, but the step is priced ~3x
    cheaper than the same model with full attention on every layer."""
    shape = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                 max_position_embeddings=131072, architectures=["Gemma3ForCausalLM"])
    steps = {}
    for name, extra in (("local", {}), ("full", {"layer_types": ["full_attention"] * 34})):
        folder = M.write(transformers.Gemma3TextConfig(**shape, **extra), tmp_path / name)
        spec = spec_from_dict({"name": name, "model": {"config": str(folder)},
                               "cluster": {"nodes": 1, "procs_per_node": 8, "device": "cuda", "hardware": "h100"},
                               "train": {"seq_len": 131072, "micro_batch_size": 1, "global_batch_size": 8,
                                         "steps": 1, "precision": "bf16"}}, "spec.yaml", str(tmp_path))
        plan = pipeline.plan(spec).plan
        assert plan.mesh["sp"] == 8 and plan.max_seq_len_by_sp["4"] < 131072
        steps[name] = plan.predicted["step_time_s"]
    assert steps["local"] < steps["full"] / 2.5


def test_token_type_ids_keep_the_models_own_masks_under_ulysses(tmp_path):
    """transformers' Gemma3 lets the tokens of one image attend both ways when fed token_type_ids: under sp > 1 the
    script keeps the masks the model built on the whole sequence (tests/test_token_types.py verifies it)."""
    from omnigen import plan as P
    compiled, _ = compile_to(tmp_path, M.gemma3())
    mesh = P.Mesh(**{k: v for k, v in compiled.plan.mesh.items()})
    section = P.sequence_parallel_section(compiled.spec, compiled.graph, mesh, compiled.plan.groups,
                                          {"model_kwargs": ["input_ids", "token_type_ids"], "token_types": {}})
    assert section["model_masks"] and not compiled.plan.sequence_parallel["model_masks"]


def test_the_models_dense_masks_bound_the_context_it_plans(tmp_path):
    """Gemma3-4B as a VLM (its class defaults): token_type_ids make transformers build a dense [S, S] boolean mask per
    attention pattern (sliding and full), which every Ulysses rank holds whole. The longest context the plan reports
    per sp degree leaves room for both masks: without them it reported 263,043 tokens at sp=1 (129 GiB of masks)."""
    config = transformers.Gemma3Config()
    config.vision_config.image_size = 896  # the released 4B's; the class default 224 has 14 x 14 patches for 16 x 16 tokens
    config.architectures = ["Gemma3ForConditionalGeneration"]
    folder = M.write(config, tmp_path / "gemma3")
    spec = spec_from_dict({"name": "g3", "model": {"config": str(folder)},
                           "cluster": {"nodes": 1, "procs_per_node": 8, "device": "cuda", "hardware": "h100"},
                           "train": {"seq_len": 32768, "micro_batch_size": 1, "global_batch_size": 8,
                                     "steps": 1, "precision": "bf16"}}, "spec.yaml", str(tmp_path))
    for sp, longest in pipeline.plan(spec).plan.max_seq_len_by_sp.items():
        assert 2 * longest ** 2 < 80 * 2**30, (sp, longest)  # an H100 holds 80 GiB
