"""The model-graph analyzer: exact parameter counts, roles and groups, FLOPs against FlopCounterMode."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from omnigen import hf
from omnigen.analyze import analyze, analyze_model, format_graph
from omnigen.errors import SpecError
from omnigen.flops import register_missing_flop_formulas
from omnigen.model_graph import ModelGraph
from omnigen.spec import spec_from_dict

MODELS = Path(__file__).resolve().parent.parent / "specs" / "models"
TINY = ["llama_tiny", "qwen3_moe_tiny", "qwen2_moe_tiny", "deepseek_v3_tiny", "qwen2_vl_tiny",
        "qwen25_omni_thinker_tiny", "qwen3_omni_moe_thinker_tiny"]
FULL = ["llama3_8b", "qwen2_vl_72b", "qwen3_omni_30b_a3b_thinker"]


def _spec(name: str, **overrides):
    return spec_from_dict({"name": "t", "model": {"config": str(MODELS / name / "config.json"),
                                                  "overrides": overrides}})


def _meta(name: str, **overrides):
    spec = _spec(name, **overrides)
    config = hf.load_config(spec)
    cls = hf.model_class(spec, config)
    return hf.build_meta_model(cls, config), config, cls.__name__


def _real(name: str, experts: str | None = None):
    """A randomly initialised CPU model with SDPA attention (and the given experts kernel)."""
    spec = _spec(name)
    config = hf.load_config(spec)
    for c in [config] + [getattr(config, k) for k in ("text_config", "vision_config", "audio_config")
                         if hasattr(config, k)]:
        c._attn_implementation = "sdpa"
        if experts:
            c._experts_implementation = experts
    torch.manual_seed(0)
    model = hf.model_class(spec, config)._from_config(config).eval()
    return model, config


def _tops(graph: ModelGraph):
    return [b for b in graph.blocks if b.parent is None]


# --- parameters --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY + FULL)
def test_parameters_are_owned_exactly_once(name):
    model, config, cls = _meta(name)
    graph = analyze_model(model, config, cls)
    expected = sum(p.numel() for p in model.parameters())
    assert graph.total_params == expected
    assert sum(b.params for b in _tops(graph)) == expected
    assert graph.total_param_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(b.tensors for b in _tops(graph)) == len(list(model.parameters()))  # the optimizer's per-tensor work
    # A layer's parts cover the layer.
    for layer in (b for b in graph.blocks if b.kind == "layer"):
        parts = [b for b in graph.blocks if b.parent == layer.name]
        assert sum(b.params for b in parts) == layer.params, layer.name
    # Groups are per member; homogeneous groups plus the other blocks add up exactly.
    if name != "deepseek_v3_tiny":  # dense and MoE layers share one list there: per-member means
        rest = sum(b.params for b in _tops(graph) if b.group is None)
        assert rest + sum(g.params * g.count for g in graph.groups) == expected
        assert all(g.tensors == b.tensors for g in graph.groups for b in _tops(graph) if b.group == g.name)


def test_analyze_uses_fp32_master_weights_like_the_generated_script():
    graph = analyze(_spec("llama3_8b"))  # the config says bfloat16
    assert graph.total_param_bytes == 4 * graph.total_params
    layer = graph.group("model.layers")
    assert layer.param_bytes == 4 * layer.params


def test_tied_embeddings_count_once_but_the_head_still_computes():
    model, config, cls = _meta("llama_tiny", tie_word_embeddings=True)
    graph = analyze_model(model, config, cls)
    assert graph.total_params == sum(p.numel() for p in model.parameters())
    head = next(b for b in graph.blocks if b.name == "lm_head")
    assert head.params == 0 and head.role == "head" and head.flops_per_token == 2 * 64 * 1024


# --- roles, groups, shapes ---------------------------------------------------------------------------------

def test_qwen2_vl_roles_and_groups():
    graph = analyze(_spec("qwen2_vl_tiny"))
    groups = {g.name: g for g in graph.groups}
    assert {n: g.role for n, g in groups.items()} == {"model.visual.blocks": "encoder:vision",
                                                      "model.language_model.layers": "foundation"}
    text = groups["model.language_model.layers"]
    assert text.pattern == "model.language_model.layers.*" and text.count == 2
    assert text.layer_class == "Qwen2VLDecoderLayer"
    assert (text.heads, text.kv_heads, text.head_dim, text.hidden) == (4, 2, 16, 64)
    assert text.attn_flops_per_token_per_seq == 4 * 4 * 16
    roles = {b.name: (b.role, b.kind) for b in _tops(graph) if b.group is None}
    assert roles == {"model.visual.patch_embed": ("encoder:vision", "embedding"),
                     "model.visual.merger": ("projector", "other"),
                     "model.language_model.embed_tokens": ("foundation", "embedding"),
                     "model.language_model.norm": ("foundation", "norm"),
                     "lm_head": ("head", "head")}
    assert graph.towers == {"encoder:vision": "model.visual", "foundation": "model.language_model",
                            "projector": "model.visual.merger", "head": "lm_head"}
    assert graph.vocab_size == 1024
    kinds = {b.name.rpartition(".")[2]: b.kind for b in graph.blocks if b.parent == "model.language_model.layers.0"}
    assert kinds == {"self_attn": "attention", "mlp": "mlp", "input_layernorm": "norm",
                     "post_attention_layernorm": "norm"}


def test_omni_thinkers_have_audio_vision_and_foundation():
    g25 = analyze(_spec("qwen25_omni_thinker_tiny"))
    assert {g.name: g.role for g in g25.groups} == {"model.audio_tower.layers": "encoder:audio",
                                                    "model.visual.blocks": "encoder:vision",
                                                    "model.language_model.layers": "foundation"}
    roles = {b.name: b.role for b in _tops(g25)}
    assert roles["model.audio_tower.proj"] == "projector" and roles["model.audio_tower.conv1"] == "encoder:audio"
    audio_parts = {b.name.rpartition(".")[2]: b.kind for b in g25.blocks if b.parent == "model.audio_tower.layers.0"}
    assert audio_parts == {"self_attn": "attention", "self_attn_layer_norm": "norm", "fc1": "mlp", "fc2": "mlp",
                           "final_layer_norm": "norm"}

    g3 = analyze(_spec("qwen3_omni_moe_thinker_tiny"))
    text = g3.group("model.language_model.layers")
    assert (text.experts, text.top_k) == (8, 2)
    assert text.expert_params == 8 * (128 * 64 + 64 * 64)
    roles = {b.name: b.role for b in _tops(g3)}
    assert roles["model.visual.merger_list"] == roles["model.audio_tower.proj2"] == "projector"
    assert g3.towers["encoder:audio"] == "model.audio_tower"


def test_moe_layers():
    qwen3 = analyze(_spec("qwen3_moe_tiny"))
    moe = next(b for b in qwen3.blocks if b.name == "model.layers.0.mlp")
    assert (moe.kind, moe.experts, moe.top_k, moe.shared_experts) == ("moe", 8, 2, 0)
    # Two active experts (gate_up 64->128, down 64->64) plus the router (64->8).
    assert moe.flops_per_token == 2 * (2 * (128 * 64 + 64 * 64) + 8 * 64)

    qwen2 = analyze(_spec("qwen2_moe_tiny"))
    assert next(b for b in qwen2.blocks if b.name == "model.layers.0.mlp").shared_experts == 1

    ds = analyze(_spec("deepseek_v3_tiny"))
    kinds = [b.kind for b in ds.blocks if b.name.startswith("model.layers.") and b.name.endswith(".mlp")]
    assert kinds == ["mlp", "moe", "moe"]  # first_k_dense_replace=1
    group = ds.group("model.layers")
    assert group.count == 3 and (group.experts, group.top_k) == (8, 2)
    layers = [b for b in ds.blocks if b.kind == "layer"]
    assert group.flops_per_token == pytest.approx(sum(b.flops_per_token for b in layers) / 3)
    # MLA: scores use the nope+rope query/key width, values their own.
    attn = next(b for b in ds.blocks if b.name == "model.layers.1.self_attn")
    assert (attn.heads, attn.head_dim) == (4, 24)
    assert attn.attn_flops_per_token_per_seq == 2 * 4 * (24 + 16)
    assert next(b for b in ds.blocks if b.name == "model.layers.1.mlp").shared_experts == 1
    # the router load-balancing loss the configs turn on (top level, or a thinker's text config); its all-reduces
    # cost step time
    assert qwen3.router_aux_loss and qwen2.router_aux_loss and not ds.router_aux_loss
    assert analyze(_spec("qwen3_omni_moe_thinker_tiny")).router_aux_loss


# --- FLOPs against FlopCounterMode ---------------------------------------------------------------------------

def _predicted(graph: ModelGraph, tokens: int, seq: int, prefix: str = "") -> float:
    return sum(b.flops_per_token * tokens + b.attn_flops_per_token_per_seq * tokens * seq
               for b in _tops(graph) if b.name.startswith(prefix))


@pytest.mark.parametrize("name,experts", [("llama_tiny", None), ("qwen3_moe_tiny", "grouped_mm"),
                                          ("qwen3_moe_tiny", "eager"), ("qwen2_moe_tiny", "grouped_mm"),
                                          ("deepseek_v3_tiny", "grouped_mm")])
def test_text_flops_match_flop_counter(name, experts):
    """Forward FLOPs of a real CPU run. FlopCounterMode learns aten._grouped_mm and CPU flash SDPA from
    register_missing_flop_formulas(); without them it would count 0 for the experts and attention."""
    register_missing_flop_formulas()
    model, config = _real(name, experts)
    graph = analyze_model(model, config, type(model).__name__)
    for batch, seq in [(2, 64), (1, 128)]:
        ids = torch.randint(0, config.get_text_config().vocab_size, (batch, seq))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=ids)
        measured = counter.get_total_flops()
        assert _predicted(graph, batch * seq, seq) == pytest.approx(measured, rel=0.05), (batch, seq)


def test_vision_tower_flops_per_patch_and_emitted_token():
    """Encoder layers count per patch token, the merger per token it emits (4 patches each here)."""
    register_missing_flop_formulas()
    model, config = _real("qwen2_vl_tiny")
    graph = analyze_model(model, config, type(model).__name__)
    vc = config.vision_config
    grid = torch.tensor([[1, 8, 8]])
    patches = int(grid.prod())
    pixels = torch.randn(patches, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(pixels, grid_thw=grid)
    merged = patches // vc.spatial_merge_size ** 2
    merger = "model.visual.merger"
    predicted = (_predicted(graph, patches, patches, "model.visual.") - _predicted(graph, patches, 0, merger)
                 + _predicted(graph, merged, 0, merger))
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_audio_tower_flops_include_the_conv_stem():
    """Qwen2.5-Omni audio: conv1 (stride 1) runs twice per encoder token, conv2 (stride 2) once; attention
    is within chunks of n_window tokens; proj runs per pooled (emitted) token."""
    register_missing_flop_formulas()
    model, config = _real("qwen25_omni_thinker_tiny")
    graph = analyze_model(model, config, type(model).__name__)
    ac = config.audio_config
    frames = 200
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.audio_tower(torch.randn(ac.num_mel_bins, frames), feature_lens=torch.tensor([frames]))
    tokens, chunk = frames // 2, ac.n_window
    tower = sum(b.flops_per_token * tokens + b.attn_flops_per_token_per_seq * tokens * chunk
                for b in _tops(graph) if b.role == "encoder:audio")
    proj = next(b for b in _tops(graph) if b.name == "model.audio_tower.proj").flops_per_token * tokens / 2
    assert tower + proj == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_register_missing_flop_formulas_is_idempotent():
    register_missing_flop_formulas()
    register_missing_flop_formulas()


# --- unknown shapes fail loudly --------------------------------------------------------------------------------

def test_bert_is_not_a_known_shape():
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    with torch.device("meta"):
        model = transformers.BertModel(config)
    with pytest.raises(SpecError, match=r"BertModel.*'encoder\.layer'"):
        analyze_model(model, config, "BertModel")


def test_unknown_tower_and_unknown_module_are_named():
    model, config, cls = _meta("llama_tiny")
    layer_cls = type(model.model.layers[0])
    with torch.device("meta"):
        model.model.mystery_tower = nn.Module()
        model.model.mystery_tower.layers = nn.ModuleList([layer_cls(config, 0), layer_cls(config, 1)])
    with pytest.raises(SpecError, match=r"LlamaForCausalLM.*'model\.mystery_tower\.layers'"):
        analyze_model(model, config, cls)

    model, config, cls = _meta("llama_tiny")
    with torch.device("meta"):
        model.gizmo = nn.Linear(64, 64)
    with pytest.raises(SpecError, match=r"LlamaForCausalLM.*'gizmo'"):
        analyze_model(model, config, cls)


def test_no_layers_at_all():
    with pytest.raises(SpecError, match="Tiny.*no repeated transformer layers"):
        analyze_model(nn.Sequential(nn.Linear(4, 4)), transformers.PretrainedConfig(), "Tiny")


# --- scale and output --------------------------------------------------------------------------------------------

def test_72b_analysis_is_fast():
    start = time.perf_counter()
    graph = analyze(_spec("qwen2_vl_72b"))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed
    assert graph.group("model.language_model.layers").count == 80
    assert graph.group("model.visual.blocks").role == "encoder:vision"
    assert graph.total_params > 70e9


def test_graph_round_trips_and_formats():
    graph = analyze(_spec("qwen25_omni_thinker_tiny"))
    assert ModelGraph.from_dict(graph.to_dict()) == graph
    nx_graph = graph.graph()
    assert nx_graph.edges["model.language_model.layers.0", "model.language_model.layers.0.self_attn"][
        "relation"] == "contains"
    text = format_graph(graph)
    for needle in ("model.audio_tower.layers.*", "encoder:audio", "model.visual.merger [other]", "total foundation"):
        assert needle in text
