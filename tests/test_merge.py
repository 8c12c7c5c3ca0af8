"""Edits survive recompiling: compile merges the user's edits to generated files three ways, per top-level unit."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from omnigen.cli import main
from omnigen.merge import merge_file, units

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "specs" / "llama_tiny.yaml")

USER_FUNCTION = '''

# Mine: rank 0's memory in MiB, for my dashboard.
def peak_memory_mib(device):
    return peak_memory_bytes(device)  /  2**20   # odd spacing on purpose: kept byte for byte
'''


def compile_(out: Path, *args: str) -> "click.testing.Result":
    return CliRunner().invoke(main, ["compile", SPEC, "-o", str(out), *args])


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def edited(tmp_path):
    """A compiled llama_tiny whose train.py the user edited: a changed function, a new import and a new function."""
    assert compile_(tmp_path).exit_code == 0
    script = tmp_path / "train.py"
    edit(script, "    if device.type == \"cuda\":\n        return torch.cuda.max_memory_allocated(device)",
         "    if device.type == \"cuda\":  # my comment\n        return torch.cuda.max_memory_reserved(device)")
    edit(script, "import time\n", "import time\nimport socket  # mine\n")
    edit(script, "\n\ndef train(args):", USER_FUNCTION + "\n\ndef train(args):")
    return tmp_path


def test_edits_survive_a_recompile_that_changes_the_spec(edited):
    before = (edited / "train.py").read_text()
    result = compile_(edited, "--set", "train.steps=7", "--set", "train.lr=0.002")
    assert result.exit_code == 0, result.output
    after = (edited / "train.py").read_text()
    assert "STEPS = 7" in after and "LR = 0.002" in after  # omnigen's changes applied
    assert "max_memory_reserved(device)" in after and "# my comment" in after  # the user's edit kept
    assert "import socket  # mine\n" in after
    assert USER_FUNCTION + "\n\ndef train(args):" in after  # new function kept in place, byte for byte
    assert "kept your edit: train.py: peak_memory_bytes" in result.output
    # nothing else moved: the only differences from the edited file are omnigen's constants (and its header hash)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert {a.split(" = ")[0] for a, _ in changed if " = " in a} == {"STEPS", "LR"}
    assert len(before.splitlines()) == len(after.splitlines())


def test_an_edited_but_current_script_passes_check(edited):
    result = compile_(edited, "--check")
    assert result.exit_code == 0 and "edit(s) of yours kept" in result.output
    stale = compile_(edited, "--check", "--set", "train.steps=9")
    assert stale.exit_code == 1 and "+STEPS = 9" in stale.output


def test_conflicting_edits_write_nothing_until_decided(edited):
    script = edited / "train.py"
    edit(script, "STEPS = 4\n", "STEPS = 5  # mine\n")
    files = {p: p.read_bytes() for p in edited.rglob("*") if p.is_file()}
    result = compile_(edited, "--set", "train.steps=7")
    assert result.exit_code == 2
    assert "train.py: STEPS" in result.output and "-STEPS = 5  # mine" in result.output and "+STEPS = 7" in result.output
    assert "--ours" in result.output and "Traceback" not in result.output
    assert files == {p: p.read_bytes() for p in edited.rglob("*") if p.is_file()}  # nothing written, base included
    assert compile_(edited, "--set", "train.steps=7", "--check").exit_code == 1

    assert compile_(edited, "--set", "train.steps=7", "--theirs", "STEPS").exit_code == 0
    assert "STEPS = 7\n" in script.read_text() and "max_memory_reserved" in script.read_text()


def test_ours_all_keeps_every_conflicting_unit_of_the_user(edited):
    edit(edited / "train.py", "STEPS = 4\n", "STEPS = 5  # mine\n")
    assert compile_(edited, "--set", "train.steps=7", "--ours", "all").exit_code == 0
    assert "STEPS = 5  # mine\n" in (edited / "train.py").read_text()
    assert "STEPS = 7" in (edited / ".omnigen" / "train.py").read_text()  # the base records omnigen's output


def test_a_unit_the_user_deleted_stays_deleted(edited):
    script = edited / "train.py"
    text = script.read_text()
    start = text.index("\n\ndef full(tensor):")
    script.write_text(text[:start] + text[text.index("\n\ndef", start + 3):])
    assert compile_(edited, "--set", "train.steps=7").exit_code == 0
    assert "def full(tensor)" not in script.read_text()


def test_units_round_trip_byte_for_byte():
    code = (ROOT / "generated" / "qwen25_omni_tiny" / "train.py").read_text()
    found = units(code)
    assert "".join(u.code for u in found) == code
    keys = [u.key for u in found]
    assert len(keys) == len(set(keys)) and {"__doc__", "SEQ_LEN", "train", "IdleTowers", "import torch"} <= set(keys)


def test_user_units_keep_their_place_and_new_omnigen_units_arrive():
    base = "import os\n\nA = 1\n\n\ndef f():\n    return A\n"
    ours = "import os\n\nA = 1\n\n\ndef mine():\n    pass\n\n\ndef f():\n    return A\n"
    theirs = "import os\n\nA = 2\nB = 3\n\n\ndef f():\n    return A + B\n"
    merged, conflicts, kept = merge_file("train.py", base, ours, theirs, {})
    assert not conflicts and kept == ["mine"]
    assert merged == "import os\n\nA = 2\nB = 3\n\n\ndef mine():\n    pass\n\n\ndef f():\n    return A + B\n"


def test_no_record_of_the_last_output_makes_every_difference_a_conflict():
    merged, conflicts, _ = merge_file("train.py", None, "A = 1\n", "A = 2\n", {})
    assert merged is None and [c.key for c in conflicts] == ["A"]


def test_diff_tells_the_plan_changes_in_words_and_why():
    spec = str(ROOT / "specs" / "qwen3_omni_30b_h100x128.yaml")
    result = CliRunner().invoke(main, ["diff", spec, "--set", "train.seq_len=131072"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "input: train.seq_len 32768 -> 131072" in out
    assert "mesh dp_replicate=2 x dp_shard=16 x sp=4 x ep=4 -> " in out
    assert "model.language_model.layers: activation checkpointing selective -> full" in out
    assert "why: the previous layout does not fit now: needs" in out
    fewer = CliRunner().invoke(main, ["diff", spec, "--set", "cluster.nodes=8"]).output
    assert "does not span the world (128 ranks; the cluster now has 64)" in fewer
    assert "-mesh:    dp_replicate=2 x dp_shard=16 x sp=4 x ep=4 (world size 128)" in fewer  # the code diff follows


def test_check_failure_prints_the_plan_changes(tmp_path):
    assert compile_(tmp_path).exit_code == 0
    result = compile_(tmp_path, "--check", "--set", "cluster.procs_per_node=4", "--set", "parallel.dp_shard=4")
    assert result.exit_code == 1
    assert "input: cluster.procs_per_node 2 -> 4" in result.output and "mesh dp_shard=2 -> dp_shard=4" in result.output
    assert "why: the previous layout does not span the world" in result.output


def test_diff_against_a_git_ref():
    result = CliRunner().invoke(main, ["diff", SPEC, "--against", "HEAD"])
    assert result.exit_code == 0 and "plan: unchanged" in result.output
    bad = CliRunner().invoke(main, ["diff", SPEC, "--against", "no-such-ref"])
    assert bad.exit_code == 2 and "not a commit" in bad.output
