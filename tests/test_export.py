"""`omnigen export`: a real generated script's DCP checkpoint becomes a folder transformers' from_pretrained loads,
holding exactly the parameters the script ended with.

Two torchrun launches (2 CPU ranks, 2 steps each), shared by every test here: a tiny dense Llama with its output
embedding tied to the input one, and a tiny Qwen3-MoE with its experts split over ep=2 (the checkpoint holds them
whole). Each writes --checkpoint-dir and --dump-params (the full final state dict, gathered on rank 0).
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from omnigen import runner
from omnigen.cli import main
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed

CASES = {  # name: (spec, --set overrides)
    "dense_tied": ("llama_tiny", ("model.overrides.tie_word_embeddings=true",)),
    "moe_ep2": ("qwen3_moe_tiny_ep2", ()),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (compiled folder, checkpoint folder, the run's final params)}. Each run saves step_00000002 into its
    --checkpoint-dir; the dense run's gets a newer step folder whose save never finished (no .metadata) beside it."""
    root = tmp_path_factory.mktemp("export_runs")
    found = {}
    for case, (name, sets) in CASES.items():
        spec = load_spec(ROOT / "specs" / f"{name}.yaml", sets)
        compiled, final = root / case, root / f"{case}_final.pt"
        runner.compile_to(spec, compiled)
        checkpoint = root / f"{case}_run" / "step_00000002"
        args = ["--steps", "2", "--checkpoint-dir", str(checkpoint.parent), "--dump-params", str(final)]
        assert runner.launch(spec, compiled / "train.py", args) == 0
        found[case] = compiled, checkpoint, torch.load(final, weights_only=True)
    (root / "dense_tied_run" / "step_00000003").mkdir()  # a save interrupted before .metadata
    return found


def export(*args):
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), result.exception
    return result


def model_class(compiled: Path):
    return getattr(transformers, json.loads((compiled / "plan.json").read_text())["model_class"])


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_gives_exactly_the_trained_parameters(case, runs, tmp_path):
    compiled, checkpoint, final = runs[case]
    # the run folder (its newest complete step) for one case, the DCP step folder itself for the other
    named = checkpoint.parent if case == "dense_tied" else checkpoint
    result = export(named, tmp_path / "hf", "--from", compiled)
    assert result.exit_code == 0, result.output
    assert f"read {checkpoint}" in result.output and "2 steps done" in result.output
    if case == "dense_tied":
        assert "newest of 1 complete step folder(s)" in result.output

    (tmp_path / "plain").mkdir()
    assert (tmp_path / "hf").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not a temp folder's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "plain"]  # nothing staged left behind

    cls = model_class(compiled)
    model = cls.from_pretrained(tmp_path / "hf")
    state = model.state_dict()
    assert set(state) == set(final)
    for key, value in final.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key
    fresh = cls._from_config(transformers.AutoConfig.from_pretrained(compiled))
    for name, buffer in fresh.named_buffers():  # not in the checkpoint (rotary inv_freq): made by transformers
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    if case == "dense_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        experts = state["model.layers.0.mlp.experts.gate_up_proj"]
        assert experts.shape[0] == json.loads((compiled / "plan.json").read_text())["expert_parallel"]["num_experts"]


def test_bfloat16_export_from_the_spec(runs, tmp_path):
    compiled, checkpoint, final = runs["dense_tied"]
    result = export(checkpoint, tmp_path / "hf", "--from", ROOT / "specs" / "llama_tiny.yaml",
                    "--set", CASES["dense_tied"][1][0], "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    model = model_class(compiled).from_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, final[key].to(torch.bfloat16)), key


def refused(tmp_path, checkpoint, compiled, *words, out=None):
    """exit 2, every word in the message, no traceback, nothing written."""
    out = out or tmp_path / "hf"
    before = sorted(p.name for p in out.parent.iterdir())
    result = export(checkpoint, out, "--from", compiled)
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no output, no staged leftovers


def test_bad_inputs_are_refused(runs, tmp_path):
    dense, dense_checkpoint, _ = runs["dense_tied"]
    moe, moe_checkpoint, _ = runs["moe_ep2"]
    refused(tmp_path, tmp_path / "missing", dense, "missing: no such file or folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path, tmp_path / "empty", dense, "no complete checkpoint")
    refused(tmp_path, dense, dense, "no complete checkpoint")  # a compiled folder, not a checkpoint
    refused(tmp_path, dense_checkpoint.parent / "step_00000003", dense, "incomplete step folder")
    refused(tmp_path, dense / "train.py", dense, "not a DCP checkpoint folder")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / ".metadata").write_text("not a checkpoint")
    refused(tmp_path, tmp_path / "junk", dense, "is not a DCP checkpoint's")
    refused(tmp_path, moe_checkpoint, dense, "do not match LlamaForCausalLM", "unexpected",
            "model.layers.0.mlp.experts.gate_up_proj")
    refused(tmp_path, dense_checkpoint, tmp_path / "empty", "no plan.json")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    refused(tmp_path, dense_checkpoint, dense, "exists and is not empty", out=tmp_path / "taken")


def test_a_model_composed_from_parts_exports_part_by_part(tmp_path):
    """A composed model (a frozen SigLIP encoder, a Qwen3-MoE foundation with ep=2, a text head and a 4-codebook
    audio-codec head) trained 2 steps on 2 ranks: `omnigen export` of its DCP checkpoint writes what the script's
    own --export-hf writes, one from_pretrained folder per part plus projectors.pt and decoders.pt, holding exactly
    the parameters the run ended with."""
    import yaml

    spec_raw = yaml.safe_load((ROOT / "specs" / "siglip_qwen3_moe_tiny_parts_ep2.yaml").read_text())
    spec_raw["model"]["parts"]["decoders"] = [
        {"modality": "text"}, {"modality": "audio_codec", "codebook_size": 64, "codebooks": 4,
                               "placeholder_token_id": 1003, "tokens_per_item": 6}]
    for part in (*spec_raw["model"]["parts"]["encoders"], spec_raw["model"]["parts"]["foundation"]):
        part["config"] = str(ROOT / "specs" / part["config"])
    (tmp_path / "parts.yaml").write_text(yaml.safe_dump(spec_raw))
    spec = load_spec(tmp_path / "parts.yaml")
    compiled, final, own = tmp_path / "compiled", tmp_path / "final.pt", tmp_path / "own_export"
    runner.compile_to(spec, compiled)
    args = ["--steps", "2", "--checkpoint-dir", str(tmp_path / "run"), "--dump-params", str(final),
            "--export-hf", str(own)]
    assert runner.launch(spec, compiled / "train.py", args) == 0
    final = torch.load(final, weights_only=True)

    result = export(tmp_path / "run", tmp_path / "hf", "--from", compiled)
    assert result.exit_code == 0, result.output
    assert "one from_pretrained folder per part" in result.output
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == sorted(p.name for p in own.iterdir()) == \
        ["decoders.pt", "encoders.image", "foundation", "projectors.pt"]
    loaded = {"foundation": transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf" / "foundation"),
              "encoders.image": transformers.SiglipVisionModel.from_pretrained(tmp_path / "hf" / "encoders.image")}
    state = {f"{path}.{k}": v for path, model in loaded.items() for k, v in model.state_dict().items()}
    for file in ("projectors.pt", "decoders.pt"):
        mine, script = (torch.load(folder / file, weights_only=True) for folder in (tmp_path / "hf", own))
        assert set(mine) == set(script) and all(torch.equal(mine[k], script[k]) for k in mine), file
        state.update(mine)
    assert set(final) <= set(state)
    for key, value in final.items():
        assert torch.equal(state[key], value), key
    assert state["decoders.audio_codec.head.weight"].shape == (4 * 64, 64)
