"""Spec loading: strict keys, typed values, --set overrides, clear messages, exit code 2 from the CLI."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from omnigen.cli import main
from omnigen.errors import SpecError
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "specs" / "models" / "llama_tiny"


def write_spec(tmp_path, body: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def base(**sections) -> dict:
    return {"name": "t", "model": {"config": str(LLAMA)}, **sections}


def error_of(tmp_path, body, sets=()) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, body), sets)
    return str(e.value)


def test_defaults_and_relative_paths(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((LLAMA / "config.json").read_text())
    spec = load_spec(write_spec(tmp_path, {"name": "t", "model": {"config": "m"}}))
    assert spec.config_path() == tmp_path / "m" / "config.json"
    assert spec.cluster.world_size == 2 and spec.parallel.sp == "auto" and spec.train.precision == "fp32"


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    msg = error_of(tmp_path, base(train={"seq_lenn": 64}))
    assert "spec.yaml" in msg and "'train.seq_lenn'" in msg and "did you mean 'seq_len'" in msg


def test_unknown_top_level_section(tmp_path):
    assert "did you mean 'parallel'" in error_of(tmp_path, base(paralel={"sp": 2}))


def test_wrong_types_say_what_is_allowed(tmp_path):
    msg = error_of(tmp_path, base(train={"precision": "fp16"}, parallel={"dp_shard": "many"}))
    assert "'train.precision'" in msg and "'fp32' or 'bf16'" in msg
    assert "'parallel.dp_shard'" in msg and "'auto'" in msg


def test_missing_config_file(tmp_path):
    msg = error_of(tmp_path, {"name": "t", "model": {"config": "nowhere"}})
    assert "'model.config'" in msg and "nowhere" in msg


def test_set_overrides_are_typed(tmp_path):
    path = write_spec(tmp_path, base())
    spec = load_spec(path, ["train.seq_len=256", "parallel.sp=auto", "cluster.procs_per_node=4"])
    assert spec.train.seq_len == 256 and spec.parallel.sp == "auto" and spec.cluster.world_size == 4
    assert "'train.steps'" in error_of(tmp_path, base(), ["train.steps=-1"])


def test_global_batch_must_be_a_multiple_of_micro_batch(tmp_path):
    msg = error_of(tmp_path, base(train={"micro_batch_size": 3, "global_batch_size": 4}))
    assert "'train.global_batch_size'" in msg


def test_cli_bad_input_exits_2_without_traceback_or_output(tmp_path):
    path = write_spec(tmp_path, base(train={"seq_lenn": 64}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "did you mean 'seq_len'" in result.output
    assert not out.exists()


def test_cli_unknown_model_class(tmp_path):
    path = write_spec(tmp_path, {"name": "t", "model": {"config": str(LLAMA), "class": "LlamaForCasualLM"}})
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and "'model.class'" in result.output and "LlamaForCausalLM" in result.output


def test_cli_sizes_that_do_not_multiply_to_the_world(tmp_path):
    path = write_spec(tmp_path, base(cluster={"procs_per_node": 4}, parallel={"dp_replicate": 3}))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and "world size 4" in result.output and "Traceback" not in result.output


def test_set_inside_a_sub_config_keeps_its_other_keys():
    """--set model.overrides.text_config.X=... arrives as {"text_config": {"X": ...}}: it sets X inside the
    sub-config; replacing it whole dropped every other key to the class default (8 experts became 128)."""
    from omnigen.hf import load_config

    spec = load_spec(ROOT / "specs" / "qwen3_omni_moe_tiny_sp2_ep2.yaml",
                     ["model.overrides.text_config.hidden_size=128",
                      "model.overrides.text_config.rope_parameters={rope_type: default, rope_theta: 10.0}"])
    text = load_config(spec).text_config
    assert text.hidden_size == 128 and text.num_experts == 8 and text.moe_intermediate_size == 64
    assert text.rope_parameters["rope_theta"] == 10.0 and "mrope_section" not in text.rope_parameters  # a value: replaced
