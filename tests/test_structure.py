"""What a module is, asked of transformers rather than guessed from names (issue 13, items 3 and 6).

Every model here is its transformers config class's defaults with fewer layers, built on the meta device: what the
analyzer reads (module classes, parameter shapes, the decorators transformers applied) is the real model's.
- attention: modules whose forward calls transformers' attention interface (flops.calls_attention_interface);
- experts: modules on transformers' experts interface (use_experts_implementation), or stacked over num_experts;
- EP: only experts the generated dispatch can serve; anything else is refused at compile, exit 2, naming the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from torch import nn

from omnigen import flops as F
from omnigen import hf
from omnigen.analyze import analyze_model
from omnigen.cli import main
from omnigen.errors import SpecError
from omnigen.pipeline import plan
from omnigen.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "specs" / "models"


def _default(model_type: str, layers: int = 2, **sub_layers: int):
    """The config class's defaults, with `layers` layers in every sub-config that counts them."""
    config = transformers.CONFIG_MAPPING[model_type]()
    for node in [config] + [getattr(config, k) for k in ("text_config", "vision_config", "audio_config")
                            if getattr(config, k, None) is not None]:
        if getattr(node, "num_hidden_layers", None):
            node.num_hidden_layers = layers
    for dotted, value in sub_layers.items():
        owner, _, attr = dotted.rpartition("__")
        setattr(getattr(config, owner) if owner else config, attr, value)
    return config


def _meta_graph(config, class_name: str):
    cls = getattr(transformers, class_name)
    model = hf.build_meta_model(cls, config)
    return model, analyze_model(model, config, class_name)


# --- attention: the module that calls the attention interface ----------------------------------------------

def test_pixtral_attention_is_the_inner_module_not_the_layer():
    model, graph = _meta_graph(_default("mistral3"), "Mistral3ForConditionalGeneration")
    layer = model.get_submodule("model.vision_tower.transformer.layers.0")
    assert type(layer).__name__ == "PixtralAttentionLayer" and not F.is_attention(layer)  # "Attention" in its name
    assert F.is_attention(layer.attention) and type(layer.attention).__name__ == "PixtralAttention"
    vision = next(g for g in graph.groups if g.role == "encoder:vision")
    assert vision.name == "model.vision_tower.transformer.layers" and vision.count == 2
    assert (vision.heads, vision.head_dim) == (16, 64)  # Pixtral-12B's ViT: 16 heads of 64
    attention = {b.name for b in graph.blocks if b.kind == "attention"}
    assert "model.vision_tower.transformer.layers.0.attention" in attention
    assert "model.vision_tower.transformer.layers.0" not in attention


def test_attention_test_reads_the_forward_not_the_class_name():
    class Attention(nn.Module):  # named like attention, attends with nothing transformers dispatches
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    class Mixer(nn.Module):  # no "Attention" in its name, but its forward asks the interface
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            return ALL_ATTENTION_FUNCTIONS, self.proj(x)

    assert not F.is_attention(Attention()) and F.is_attention(Mixer())


def test_layers_attending_outside_the_interface_are_refused_by_name():
    with pytest.raises(SpecError, match=r"GotOcr2VisionAttention \('model.vision_tower.layers.0.attn'\), whose forward "
                                        "does not call transformers' attention interface"):
        _meta_graph(_default("got_ocr2"), "GotOcr2ForConditionalGeneration")


def test_hybrid_stacks_are_refused_not_priced_as_softmax_attention():
    # GLM-5-Next interleaves linear-attention layers (no attention interface) with MLA ones in one layer list.
    with pytest.raises(SpecError, match=r"hybrid stack: .* 'model.language_model.layers.0'"):
        _meta_graph(_default("glm5_next", layers=4), "Glm5NextForConditionalGeneration")


# --- experts: the experts interface, not "any 3-D parameter" --------------------------------------------------

def test_phi4_multimodal_conformer_convs_are_not_experts():
    config = _default("phi4_multimodal", audio_config__num_blocks=2)
    model, graph = _meta_graph(config, "Phi4MultimodalForCausalLM")
    glu = model.get_submodule("model.embed_tokens_extend.audio_embed.encoder.encoders.0.conv.glu")
    assert any(p.ndim == 3 for p in glu.parameters(recurse=False))  # what the old test took for experts
    assert not F.is_experts(glu)
    assert not any(F.is_experts(m) for m in model.modules())
    assert {g.role for g in graph.groups} == {"foundation", "encoder:vision", "encoder:audio"}
    assert all(g.experts == 0 for g in graph.groups)


def test_class_tokens_and_position_tables_are_not_experts():
    model, graph = _meta_graph(_default("internvl"), "InternVLForConditionalGeneration")
    embeddings = model.get_submodule("model.vision_tower.embeddings")
    assert any(p.ndim == 3 for p in embeddings.parameters(recurse=False)) and not F.is_experts(embeddings)
    assert all(g.experts == 0 for g in graph.groups)


def test_experts_on_the_interface_are_found_and_servable():
    model, graph = _meta_graph(_default("qwen3_vl_moe"), "Qwen3VLMoeForConditionalGeneration")
    experts = model.get_submodule("model.language_model.layers.0.mlp.experts")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert F.experts_interface(experts) is ALL_EXPERTS_FUNCTIONS and F.ep_refusal(experts) == ""
    llm = next(g for g in graph.groups if g.role == "foundation")
    assert (llm.experts, llm.ep_refusal) == (60, "")
    moe = next(b for b in graph.blocks if b.kind == "moe")
    assert moe.experts_module == "model.language_model.layers.0.mlp.experts"


def test_experts_outside_the_interface_are_experts_ep_cannot_serve():
    model, graph = _meta_graph(transformers.Llama4TextConfig(num_hidden_layers=2), "Llama4ForCausalLM")
    experts = model.get_submodule("model.layers.0.feed_forward.experts")
    assert F.experts_interface(experts) is None and F.is_experts(experts)  # Llama4TextExperts: num_experts x 3-D
    llm = graph.groups[0]
    assert llm.experts == 16 and llm.top_k == 1
    assert llm.ep_refusal.startswith("model.layers.0.feed_forward.experts: Llama4TextExperts is not on transformers' "
                                     "experts interface")
    # FLOPs count the one active expert of the transposed [E, H, 2I] / [E, I, H] weights, not all 16.
    h, i = 5120, 8192
    assert F.experts_flops(experts, 1) == 2 * (h * 2 * i + i * h)


def test_interface_experts_with_a_layout_the_dispatch_lacks_are_refused():
    with torch.device("meta"):
        gpt_oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(num_hidden_layers=1))
    reason = F.ep_refusal(gpt_oss.model.layers[0].mlp.experts)
    assert "expert biases" in reason and "transposed expert weights" in reason and "interleaved" in reason


# --- a wrapper's own parameters -------------------------------------------------------------------------------

def test_image_newline_joins_the_root_unit():
    model, graph = _meta_graph(_default("llava_onevision"), "LlavaOnevisionForConditionalGeneration")
    root = next(b for b in graph.blocks if b.name == "model")
    assert root.role == "root" and root.params == model.model.image_newline.numel() == 4096
    assert "root" not in graph.towers
    assert sum(b.params for b in graph.blocks if b.parent is None) == graph.total_params


def test_an_orphan_is_quoted_with_its_own_parameter_count():
    spec = spec_from_dict({"name": "t", "model": {"config": str(MODELS / "llama_tiny" / "config.json")}})
    config = hf.load_config(spec)
    model = hf.build_meta_model(hf.model_class(spec, config), config)
    model.adapter = nn.Linear(3, 4)  # 16 parameters, named like nothing the analyzer knows
    total = sum(p.numel() for p in model.parameters())
    with pytest.raises(SpecError, match=r"cannot classify module 'adapter' \(Linear, 16 parameters\)") as err:
        analyze_model(model, config, "LlamaForCausalLM")
    assert f"{total:,}" not in str(err.value)


# --- EP only where the generated dispatch serves the experts --------------------------------------------------

def _llama4_text_spec(tmp_path: Path, **parallel) -> Path:
    config = transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, num_local_experts=4, vocab_size=1000, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.architectures = ["Llama4ForCausalLM"]
    (tmp_path / "config.json").write_text(config.to_json_string())
    spec = {"name": "llama4_tiny", "model": {"config": "config.json"},
            "cluster": {"nodes": 1, "procs_per_node": 4}, "train": {"seq_len": 64, "global_batch_size": 4},
            "parallel": parallel or {}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_llama4_experts_are_refused_for_ep_at_compile(tmp_path):
    spec_path = _llama4_text_spec(tmp_path, ep=2)
    result = CliRunner().invoke(main, ["compile", str(spec_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "parallel.ep=2" in result.output and "model.layers.0.feed_forward.experts" in result.output
    assert "Llama4TextExperts is not on transformers' experts interface" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_ep_auto_never_picks_experts_it_cannot_serve(tmp_path):
    compiled = plan(load_spec(_llama4_text_spec(tmp_path)))
    assert compiled.plan.mesh["ep"] == 1 and compiled.plan.expert_parallel is None
    assert all("ep=" not in a.get("label", "") for a in compiled.plan.alternatives)


def test_experts_on_the_interface_still_get_ep():
    compiled = plan(load_spec(ROOT / "specs" / "qwen3_moe_tiny_ep2.yaml"))
    ep = compiled.plan.expert_parallel
    assert compiled.plan.mesh["ep"] == 2 and ep["modules"][0] == "model.layers.0.mlp.experts"


# --- configs transformers saved load again ---------------------------------------------------------------------

def test_non_finite_floats_transformers_wrote_load_back(tmp_path):
    config = transformers.CONFIG_MAPPING["nemotron_h"]()
    assert '"__float__": "Infinity"' in config.to_json_string()
    (tmp_path / "config.json").write_text(config.to_json_string())
    loaded = hf.load_config(spec_from_dict({"name": "t", "model": {"config": str(tmp_path / "config.json")}}))
    assert loaded.time_step_limit[1] == float("inf")


def test_an_invalid_config_value_is_a_spec_error(tmp_path):
    raw = json.loads(transformers.CONFIG_MAPPING["nemotron_h"]().to_json_string())
    raw["time_step_limit"] = [0.0, "lots"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SpecError, match="transformers rejects this NemotronHConfig"):
        hf.load_config(spec_from_dict({"name": "t", "model": {"config": str(tmp_path / "config.json")}}))


def test_moe_layers_with_different_expert_counts_get_no_ep():
    from omnigen.model_graph import Block, Group, ModelGraph
    from omnigen.plan import ep_refusal

    def moe(i, experts):
        return Block(f"model.layers.{i}.mlp", "foundation", "moe", f"model.layers.{i}", "model.layers", 10, 40, 0.0,
                     experts=experts, top_k=2, experts_module=f"model.layers.{i}.mlp.experts")

    group = Group("model.layers", "model.layers.*", "foundation", "Layer", ("model.layers.0", "model.layers.1"),
                  10, 40, 0.0, 0.0, 0.0, experts=8, top_k=2)
    graph = ModelGraph("X", "x", (moe(0, 8), moe(1, 4)), (group,), 20, 80)
    assert ep_refusal(graph).startswith("model.layers.1.mlp.experts: 4 experts where model.layers.0.mlp.experts has 8")
    same = ModelGraph("X", "x", (moe(0, 8), moe(1, 8)), (group,), 20, 80)
    assert ep_refusal(same) == ""
