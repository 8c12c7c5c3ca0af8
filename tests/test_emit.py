"""The emitter: generated/ is up to date, output is deterministic, scripts are standalone, template bugs are caught."""

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

from omnigen import emit
from omnigen.cli import main
from omnigen.errors import OmnigenError
from omnigen.pipeline import plan, render
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_generated_folder_is_up_to_date(spec_path):
    result = CliRunner().invoke(main, ["compile", str(spec_path), "--check"])
    assert result.exit_code == 0, result.output


def test_output_is_deterministic_and_standalone(tmp_path):
    spec = load_spec(ROOT / "specs" / "qwen25_omni_tiny.yaml")
    first, second = render(plan(spec), tmp_path), render(plan(spec), tmp_path)
    assert first == second
    tree = ast.parse(first["train.py"])
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"argparse", "functools", "json", "math", "os", "re", "resource", "shutil", "signal", "sys", "time", "torch", "transformers",
                        "safetensors"}
    header = first["train.py"].split('"""')[1]
    assert "omnigen 0.1.0" in header and "spec+plan hash" in header and "mesh:" in header and "predicted:" in header


def test_check_reports_a_diff_and_writes_nothing(tmp_path):
    spec_path = ROOT / "specs" / "llama_tiny.yaml"
    CliRunner().invoke(main, ["compile", str(spec_path), "-o", str(tmp_path)])
    before = (tmp_path / "train.py").read_text()
    result = CliRunner().invoke(main, ["compile", str(spec_path), "-o", str(tmp_path), "--check",
                                       "--set", "train.steps=5"])
    assert result.exit_code == 1 and "-STEPS = 4" in result.output and "+STEPS = 5" in result.output
    assert (tmp_path / "train.py").read_text() == before


def test_template_bug_is_an_omnigen_error_not_a_broken_file(tmp_path, monkeypatch):
    spec = load_spec(ROOT / "specs" / "llama_tiny.yaml")
    compiled = plan(spec)
    original = emit.environment

    def broken_environment():
        env = original()
        env.globals["mesh_dims"] = lambda dims: "(("  # renders unbalanced parentheses
        return env

    monkeypatch.setattr(emit, "environment", broken_environment)
    with pytest.raises(OmnigenError, match="invalid Python"):
        render(compiled, tmp_path)
    assert not any(tmp_path.iterdir())
