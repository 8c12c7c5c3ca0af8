"""`omnigen bench`: medians, splits and ratios on synthetic metrics; one real run checks the report."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from omnigen import bench
from omnigen.cli import main
from omnigen.errors import OmnigenError

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "specs" / "llama_tiny.yaml"

PREDICTED = {"step_time_s": 0.05, "tokens_per_s_per_device": 5000.0, "peak_memory_bytes": 400 * 2**20, "mfu": 0.4,
             "breakdown": {"compute_s": 0.03, "recompute_s": 0.005, "host_s": 0.004, "comm_s": 0.02,
                           "exposed_comm_s": 0.001, "optimizer_s": 0.01},
             "memory": {"parameters": 1 << 20, "overhead": 300 << 20}}


def record(step, step_time, optimizer, peak, tps=None):
    return {"step": step, "loss": 7.0, "step_time_s": step_time, "optimizer_s": optimizer,
            "tokens_per_s_per_device": tps or round(256 / step_time, 2), "peak_memory_bytes": peak}


RECORDS = [record(0, 0.9, 0.5, 100), record(1, 0.06, 0.01, 200), record(2, 0.04, 0.02, 300),
           record(3, 0.05, 0.012, 300), record(4, 0.07, 0.011, 310)]


def test_medians_leave_out_warmup_and_peak_is_the_high_water_mark():
    m = bench.measured_summary(RECORDS, warmup=1)
    assert m["steps_measured"] == 4
    assert m["step_time_s"] == pytest.approx(0.055)                 # median of 0.06, 0.04, 0.05, 0.07
    assert m["optimizer_s"] == pytest.approx(0.0115)                # median of 0.01, 0.02, 0.012, 0.011
    assert m["forward_backward_s"] == pytest.approx((0.038 + 0.05) / 2)  # per step 0.05, 0.02, 0.038, 0.059
    assert m["tokens_per_s_per_device"] == pytest.approx((256 / 0.06 + 256 / 0.05) / 2, rel=1e-4)
    assert m["peak_memory_bytes"] == 310                            # warm-up steps count for the peak
    with pytest.raises(ValueError):
        bench.measured_summary(RECORDS[:1], warmup=1)


def test_predicted_split_mirrors_the_measured_one():
    p = bench.predicted_summary(PREDICTED)
    assert p["forward_backward_s"] == pytest.approx(0.04) and p["optimizer_s"] == 0.01
    # comm_s is the total of which exposed_comm_s is on the critical path: not a term of the step
    assert p["forward_backward_terms"] == {"compute_s": 0.03, "recompute_s": 0.005, "host_s": 0.004,
                                           "exposed_comm_s": 0.001}
    without = bench.predicted_summary({**PREDICTED, "breakdown": {"compute_s": 0.05}})
    assert without["optimizer_s"] == 0.0 and without["forward_backward_s"] == 0.05


def test_ratios_are_measured_over_predicted():
    rows = {r["key"]: r for r in bench.compare(bench.predicted_summary(PREDICTED),
                                               bench.measured_summary(RECORDS, warmup=1))}
    assert rows["step_time_s"]["ratio"] == pytest.approx(0.055 / 0.05, abs=1e-4)
    assert rows["peak_memory_bytes"]["ratio"] == pytest.approx(310 / (400 * 2**20), abs=1e-4)
    zero = bench.compare(bench.predicted_summary({**PREDICTED, "breakdown": {"optimizer_s": 0.0}}), {"optimizer_s": 1})
    assert next(r for r in zero if r["key"] == "optimizer_s")["ratio"] is None  # nothing to scale: n/a


def test_table_names_every_figure():
    predicted = bench.predicted_summary(PREDICTED)
    text = bench.format_comparison(bench.compare(predicted, bench.measured_summary(RECORDS, 1)), predicted)
    for label in ("step time", "forward+backward", "optimizer", "tokens/s/device", "peak memory/device",
                  "compute_s 30 ms", "predicted memory/device: parameters 1 MiB, overhead 300 MiB"):
        assert label in text


def test_steps_must_leave_something_to_measure():
    with pytest.raises(OmnigenError):
        bench.check_steps(2, 2)
    result = CliRunner().invoke(main, ["bench", str(LLAMA), "--steps", "2", "--warmup", "3"])
    assert result.exit_code == 2 and "need 0 <= warmup < steps" in result.output


@pytest.mark.distributed
def test_bench_llama_tiny_end_to_end(tmp_path):
    report_path = tmp_path / "report.json"
    args = ["--steps", "3", "--warmup", "1", "-o", str(tmp_path / "out"), "--report", str(report_path)]
    result = CliRunner().invoke(main, ["bench", str(LLAMA), *args])
    assert result.exit_code == 0, result.output
    assert "measured/predicted" in result.output and "forward+backward" in result.output
    report = json.loads(report_path.read_text())
    assert report["spec"] == "llama_tiny" and report["world_size"] == 2
    # the placeholder `cpu` compiled the script; a fit of this machine, where omnigen has one, priced it
    assert report.get("compiled_hardware", report["hardware"]) == "cpu"
    assert f"predicted with the cost profile {report['hardware']}: " in result.output
    assert report["mesh"]["dp_shard"] == 2
    assert (report["steps"], report["warmup"], report["steps_measured"]) == (3, 1, 2)
    assert len(report["per_step"]) == 3 and set(report["ratios"]) == {k for _, k, _ in bench.METRICS}
    m = report["measured"]
    assert m["step_time_s"] > 0 and 0 < m["optimizer_s"] < m["step_time_s"] and m["peak_memory_bytes"] > 2**20
    assert report["ratios"]["step_time_s"] == pytest.approx(m["step_time_s"] / report["predicted"]["step_time_s"],
                                                            rel=1e-3)
