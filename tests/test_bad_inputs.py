"""Hostile inputs against the CLI: each gets one message naming the file and key, exit code 2, no traceback, and
nothing written. One test per case a tester found ending in a traceback or wrongly accepted."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from omnigen.cli import main

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "specs" / "models" / "llama_tiny"
VOCAB = json.loads((LLAMA / "config.json").read_text())["vocab_size"]


def spec_body(**sections) -> dict:
    body = {"name": "t", "model": {"config": str(LLAMA)}, "cluster": {"procs_per_node": 2},
            "parallel": {"dp_shard": 2}}
    for key, value in sections.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) and isinstance(value, dict) else value
    return body


def write(tmp_path: Path, body) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def refused(tmp_path: Path, spec: Path, *words: str, command: str = "compile", extra=()) -> str:
    """Compile (or another command) must exit 2 with every word in its message, no traceback, nothing written."""
    out = tmp_path / "out"
    args = [command, str(spec), *(["-o", str(out)] if command in ("compile", "run") else []), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    for word in words:
        assert word in result.output, (word, result.output)
    assert not out.exists()
    return result.output


def test_spec_that_is_not_utf8(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(yaml.safe_dump(spec_body()).encode() + b"# caf\xe9\n")
    refused(tmp_path, path, "spec.yaml", "UTF-8")


def test_duplicate_yaml_key(tmp_path):
    text = yaml.safe_dump(spec_body()) + "name: other\n"
    refused(tmp_path, write(tmp_path, text), "spec.yaml", "'name' appears twice")


def test_config_json_holding_a_list(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    refused(tmp_path, write(tmp_path, spec_body(model={"config": str(tmp_path / "m")})), "'model.config'", "list")


def test_override_transformers_rejects(tmp_path):
    body = spec_body(model={"config": str(LLAMA), "overrides": {"num_attention_heads": 3}})
    refused(tmp_path, write(tmp_path, body), "'model.overrides'", "not a multiple of the number of attention heads")


def test_typo_inside_overrides(tmp_path):
    body = spec_body(model={"config": str(LLAMA), "overrides": {"num_hiden_layers": 1}})
    refused(tmp_path, write(tmp_path, body), "'model.overrides.num_hiden_layers'", "did you mean 'num_hidden_layers'")


def test_malformed_hardware_profile_file(tmp_path):
    (tmp_path / "hw.yaml").write_text("peak_flops: [1, 2\n")
    refused(tmp_path, write(tmp_path, spec_body(cluster={"hardware": "hw.yaml"})), "'cluster.hardware'", "hw.yaml")


def test_hardware_figure_that_is_not_a_number(tmp_path):
    body = spec_body(cluster={"hardware": {"profile": "h100", "memory_gib": "lots"}})
    refused(tmp_path, write(tmp_path, body), "'cluster.hardware.memory_gib'", "'lots'")
    body = spec_body(cluster={"hardware": {"profile": "cpu", "measured_on": 2}})
    refused(tmp_path, write(tmp_path, body), "'cluster.hardware.measured_on' must be text", "2")


def test_set_value_that_is_not_yaml(tmp_path):
    refused(tmp_path, write(tmp_path, spec_body()), "--set", "train.lr=[1,", extra=["--set", "train.lr=[1,"])


def test_output_below_a_file(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(main, ["compile", str(write(tmp_path, spec_body())), "-o",
                                       str(tmp_path / "a_file" / "out")])
    assert result.exit_code == 2 and "cannot write the output folder" in result.output
    assert (tmp_path / "a_file").read_text() == ""


def test_output_in_a_read_only_place(tmp_path):
    # /proc refuses new folders even to root (a chmod'ed folder would not stop root, which CI runs as)
    result = CliRunner().invoke(main, ["compile", str(write(tmp_path, spec_body())), "-o", "/proc/omnigen-out"])
    assert result.exit_code == 2 and "cannot write the output folder /proc/omnigen-out" in result.output


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "x" * 101])
def test_output_names_are_plain_folder_names(tmp_path, name):
    refused(tmp_path, write(tmp_path, spec_body(name=name)), "'name'", "plain folder name")


@pytest.mark.parametrize("key, value, words", [
    ("lr", float("inf"), ("'train.lr'", "finite")),
    ("lr", float("nan"), ("'train.lr'", "finite")),
    ("micro_batch_size", True, ("'train.micro_batch_size'", "integer")),
    ("seq_len", "128", ("'train.seq_len'", "integer")),
    ("seed", 2**70, ("'train.seed'", "less than or equal to")),
])
def test_train_values_refused(tmp_path, key, value, words):
    refused(tmp_path, write(tmp_path, spec_body(train={key: value})), *words)


def test_parallel_auto_is_accepted(tmp_path):
    result = CliRunner().invoke(main, ["plan", str(write(tmp_path, spec_body(parallel="auto")))])
    assert result.exit_code == 0, result.output


def test_class_without_logits(tmp_path):
    body = spec_body(model={"config": str(LLAMA), "class": "LlamaModel"})
    refused(tmp_path, write(tmp_path, body), "'model.class'", "LlamaModel", "logits")


def test_junk_safetensors(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"not a safetensors file")
    body = spec_body(model={"config": str(LLAMA), "weights": str(tmp_path / "w")})
    refused(tmp_path, write(tmp_path, body), "'model.weights'", "model.safetensors")


def test_safetensors_of_another_shape(tmp_path):
    (tmp_path / "w").mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(tmp_path / "w" / "model.safetensors"))
    body = spec_body(model={"config": str(LLAMA), "weights": str(tmp_path / "w")})
    refused(tmp_path, write(tmp_path, body), "'model.weights'", "model.embed_tokens.weight has shape [3, 3]",
            "missing model.layers.0")


@pytest.mark.parametrize("command, steps", [("run", "-3"), ("verify", "0")])
def test_steps_below_one(tmp_path, command, steps):
    refused(tmp_path, write(tmp_path, spec_body()), "--steps", command=command, extra=["--steps", steps])


@pytest.mark.parametrize("rows, words", [
    (['{"input_ids": [1, 2, 3]}', '{"input_ids": [1, 2'], ("data.jsonl:2:", "not valid JSON")),
    ([], ("holds no rows",)),
    (['{"text": "hello"}'], ("data.jsonl:1:", '"input_ids"')),
    (['{"input_ids": [1, 2]}', f'{{"input_ids": [1, {VOCAB}]}}'], ("data.jsonl:2:", f"token id {VOCAB}")),
    (['{"input_ids": [1.5, 2]}'], ("data.jsonl:1:", "integer token ids")),
    (['{"input_ids": []}'], ("data.jsonl:1:", "at least 2")),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, rows, words):
    (tmp_path / "data.jsonl").write_text("".join(r + "\n" for r in rows))
    refused(tmp_path, write(tmp_path, spec_body(train={"data": str(tmp_path / "data.jsonl")})), "'train.data'", *words)
