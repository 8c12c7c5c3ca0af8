"""This machine's CPU fit: found by CPU model, cores and ranks; prices the compiled layout in `plan`, `run` and `bench`
and never changes what compiling writes."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from omnigen import machine
from omnigen.cli import main
from omnigen.pipeline import plan as compile_plan, render
from omnigen.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "specs" / "qwen25_omni_tiny.yaml"


@pytest.fixture
def vm(monkeypatch, tmp_path):
    """This machine posing as the 2-core cloud VM omnigen ships fits of, with an empty cache."""
    monkeypatch.setattr(machine, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(machine, "cpu_cores", lambda: 2)
    monkeypatch.setenv("OMNIGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_key_names_cpu_cores_and_ranks(vm, monkeypatch):
    assert machine.machine_key(2) == "amd-epyc_2cores_2ranks"
    monkeypatch.setattr(machine, "cpu_name", lambda: "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz")
    assert machine.machine_key(4) == "intel-r-xeon-r-gold-6148-cpu-2-40ghz_2cores_4ranks"
    assert machine.cached_profile_path(4) == vm / "profiles" / "intel-r-xeon-r-gold-6148-cpu-2-40ghz_2cores_4ranks.yaml"


def test_shipped_fits_are_the_benchmark_profiles():
    """The fits omnigen ships are `omnigen calibrate`'s output on the 2-core VM, as kept in benchmarks/profiles/."""
    for ranks in (2, 4):
        shipped = ROOT / "omnigen" / "profiles" / "machines" / f"amd-epyc_2cores_{ranks}ranks.yaml"
        assert shipped.read_text() == (ROOT / "benchmarks" / "profiles" / f"cpu_{ranks}ranks.yaml").read_text()


def test_cache_comes_before_the_shipped_fit(vm):
    assert machine.fitted_profile_path(2).name == "amd-epyc_2cores_2ranks.yaml"   # shipped
    assert machine.fitted_profile_path(3) is None
    cached = machine.cached_profile_path(2)
    cached.parent.mkdir(parents=True)
    cached.write_text((ROOT / "benchmarks" / "profiles" / "cpu_4ranks.yaml").read_text())
    assert machine.fitted_profile_path(2) == cached


def test_priced_here_keeps_the_layout_and_reprices_it(vm):
    spec = load_spec(DEMO, [])
    compiled = compile_plan(spec)
    here = machine.priced_here(spec, compiled.graph, compiled.plan)
    assert here.plan.mesh == compiled.plan.mesh and here.plan.groups == compiled.plan.groups
    assert here.plan.cluster["hardware"] == "cpu_2ranks"
    assert here.plan.cluster["hardware_measured_on"] == "AMD EPYC, 2 cores, 2 CPU ranks"
    assert here.plan.predicted["step_time_s"] > 2 * compiled.plan.predicted["step_time_s"]   # the placeholder's 2.6x
    text = machine.describe(spec, here)
    assert text.startswith(f"on this machine: step {here.plan.predicted['step_time_s']:.4g} s")
    assert "cost profile cpu_2ranks: fitted by `omnigen calibrate` on AMD EPYC, 2 cores, 2 CPU ranks" in text


def test_only_the_bare_placeholder_is_repriced(vm):
    demo = load_spec(DEMO, [])
    for cluster in ({"hardware": "h100", "device": "cuda"}, {"hardware": {"profile": "cpu", "memory_gib": 4}}):
        raw = demo.to_dict()
        spec = spec_from_dict({**raw, "cluster": {**raw["cluster"], **cluster}}, demo.source, demo.base_dir)
        compiled = compile_plan(spec)
        assert machine.priced_here(spec, compiled.graph, compiled.plan) is None
        assert machine.describe(spec, None) == ""


def test_no_fit_says_how_to_make_one(vm, monkeypatch):
    monkeypatch.setattr(machine, "cpu_cores", lambda: 16)
    spec = load_spec(DEMO, [])
    compiled = compile_plan(spec)
    assert machine.priced_here(spec, compiled.graph, compiled.plan) is None
    assert machine.describe(spec, None) == ("on this machine: no fit of amd-epyc_16cores_2ranks; `omnigen calibrate "
                                            "--ranks 2 --cache` (a few minutes; --quick about one) fits it for "
                                            "`omnigen plan`, `run` and `bench`")


def test_plan_command_prints_both_and_compiling_ignores_the_machine(vm, tmp_path):
    spec = load_spec(DEMO, [])
    before = render(compile_plan(spec), tmp_path)
    result = CliRunner().invoke(main, ["plan", str(DEMO)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("  cost profile cpu: uncalibrated, not measured on any machine")
    assert lines[2].startswith("on this machine: step ") and "cost profile cpu_2ranks" in lines[3]
    assert render(compile_plan(spec), tmp_path) == before
    assert '"hardware_measured_on": ""' in before["plan.json"]
