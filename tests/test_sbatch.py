"""sbatch.sh: the SLURM job omnigen writes beside launch.sh, run through stand-ins for srun and scontrol that
start one torchrun agent per node of the plan on this machine (c10d rendezvous on localhost, as `omnigen run`
emulates several nodes)."""

import os
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from omnigen.cli import main

ROOT = Path(__file__).resolve().parent.parent

SRUN = """#!/usr/bin/env bash
# stand-in for srun --ntasks-per-node=1 CMD: one copy of CMD per node of the job, all on this machine
shift
for _ in $(seq "$SLURM_JOB_NUM_NODES"); do "$@" & done
status=0; for job in $(jobs -p); do wait "$job" || status=$?; done; exit $status
"""
SCONTROL = """#!/usr/bin/env bash
echo 127.0.0.1
"""


def test_sbatch_header_follows_the_plan(tmp_path):
    result = CliRunner().invoke(main, ["compile", str(ROOT / "specs" / "llama_tiny_2node.yaml"), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "sbatch.sh").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "--nproc-per-node 1" in text
    assert "--gpus-per-node" not in text  # a CPU plan asks for no GPUs
    assert subprocess.run(["bash", "-n", str(tmp_path / "sbatch.sh")]).returncode == 0


@pytest.mark.distributed
def test_sbatch_runs_the_job_across_emulated_nodes(tmp_path):
    out = tmp_path / "job"
    CliRunner().invoke(main, ["compile", str(ROOT / "specs" / "llama_tiny_2node.yaml"), "-o", str(out)])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(out),
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(out / "sbatch.sh"), "--steps", "1"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count('"step": 0') == 1  # rank 0 of the 2-node world logged the step
