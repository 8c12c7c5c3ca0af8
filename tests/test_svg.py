"""`omnigen plan --svg`: a well-formed, deterministic picture naming the mesh dims, groups and cost terms."""

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from omnigen import svg
from omnigen.cli import main
from omnigen.pipeline import plan as make_plan
from omnigen.plan import MESH_DIMS
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "specs" / "llama_tiny.yaml"
NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def compiled():
    """sp=2 x ep=2 with audio, vision and MoE groups: every kind of band and table cell."""
    return make_plan(load_spec(ROOT / "specs" / "qwen3_omni_moe_tiny_sp2_ep2.yaml"))


def texts(doc: str) -> list[str]:
    root = ET.fromstring(doc)
    assert root.tag == f"{NS}svg"
    return [t.text or "" for t in root.iter(f"{NS}text")]


def test_names_mesh_dims_groups_and_breakdown_terms(compiled):
    plan = compiled.plan
    doc = svg.render_svg(plan, compiled.hardware.memory_bytes)
    words = texts(doc)
    joined = "\n".join(words)
    for d in MESH_DIMS:
        assert f"{d}={plan.mesh[d]}" in joined
    for g in plan.groups:
        assert g.name in words
    legend = [w.split(" ")[0] for w in words]
    for key in [*plan.predicted["breakdown"], *plan.predicted["memory"]]:
        assert key in legend or f"{key} " in joined, key
    assert "SP 0: ranks 0-1" in words and "EP 0: ranks 0-1" in words
    assert "Ulysses" in joined and "experts /2" in words
    assert "device capacity 8 GiB (off this axis)" in words


def test_bytes_are_deterministic(compiled):
    assert svg.render_svg(compiled.plan, 123).encode() == svg.render_svg(compiled.plan, 123).encode()


def test_new_cost_terms_are_drawn_too(compiled):
    p = compiled.plan.predicted
    plan = replace(compiled.plan, predicted={**p, "breakdown": {**p["breakdown"], "pipeline_bubble_s": 0.01},
                                             "memory": {**p["memory"], "kv_cache": 1 << 20}})
    words = texts(svg.render_svg(plan))
    assert any(w.startswith("pipeline_bubble_s 10 ms") for w in words)
    assert any(w.startswith("kv_cache 1 MiB") for w in words)


def test_rank_coordinates_follow_the_row_major_mesh():
    mesh = {"dp_replicate": 2, "dp_shard": 2, "sp": 2, "ep": 4}
    grid = torch.arange(8).reshape(2, 2, 2)        # what init_device_mesh lays out
    experts = torch.arange(8).reshape(2, 1, 4)     # (dp_replicate, ep_fsdp, ep)
    for r, s, q in torch.cartesian_prod(*(torch.arange(n) for n in (2, 2, 2))).tolist():
        c = svg.rank_coords(mesh, int(grid[r, s, q]))
        assert (c["dp_replicate"], c["dp_shard"], c["sp"]) == (r, s, q)
    for r, f, e in torch.cartesian_prod(torch.arange(2), torch.arange(1), torch.arange(4)).tolist():
        c = svg.rank_coords(mesh, int(experts[r, f, e]))
        assert (c["dp_replicate"], c["ep_fsdp"], c["ep"]) == (r, f, e)


def test_64_ranks_stay_legible(compiled):
    """8 nodes x 8: one row per node, boxes capped, every rank labelled, bands split at node boundaries."""
    plan = replace(compiled.plan, cluster={**compiled.plan.cluster, "nodes": 8, "procs_per_node": 8, "world_size": 64},
                   mesh={"dp_replicate": 2, "dp_shard": 16, "sp": 2, "ep": 4})
    doc = svg.render_svg(plan)
    root = ET.fromstring(doc)
    assert int(root.get("width")) <= 1400
    words = texts(doc)
    assert all(str(r) in words for r in range(64)) and "node 7" in words
    assert "FSDP 1: ranks 32-63" in words and "SP 31: ranks 62-63" in words and "EP 15: ranks 60-63" in words


def test_cli_writes_the_file_atomically_and_keeps_json_clean(tmp_path):
    out = tmp_path / "plan.svg"
    result = CliRunner().invoke(main, ["plan", str(LLAMA), "--json", "--svg", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.lstrip().startswith("{") and "wrote" not in result.stdout
    assert ET.parse(out).getroot().tag == f"{NS}svg"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.svg"]  # no temporary file left behind


def test_cli_unwritable_svg_path_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["plan", str(LLAMA), "--svg", str(blocker / "x.svg")])
    assert result.exit_code == 2
    assert "omnigen: error: --svg" in result.output and "Traceback" not in result.output
