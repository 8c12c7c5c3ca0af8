"""Runs that last weeks: periodic checkpoints in atomic step folders, a rank killed mid-run and resumed bit for bit,
SIGTERM saving and leaving, the non-finite guard, the learning-rate schedule, and the script's up-front checks.

Every case runs the generated tiny-Llama script for real (torchrun, 2 gloo ranks) or as one plain process."""

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnigen import runner
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed
STEPS = 6


def compiled(tmp_path, *sets):
    """The tiny Llama with attention dropout, so an exact resume needs the random draws of each step too."""
    out = tmp_path / "script"
    sets = ["train.steps=6", "model.overrides.attention_dropout=0.2", *sets]
    runner.compile_to(load_spec(ROOT / "specs" / "llama_tiny.yaml", sets), out)
    return out / "train.py"


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def losses(path):
    return {m["step"]: m["loss"] for m in runner.read_metrics(path)}


def workers(proc):
    """The PIDs of torchrun's worker processes (its children)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def wait_for(predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The whole run, never stopped: the losses every interrupted run must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("whole")
    script = compiled(tmp, "train.checkpoint_every=2")
    code, out = finish(torchrun(script, "--metrics", str(tmp / "m.jsonl"), "--checkpoint-dir", str(tmp / "ckpt")))
    assert code == 0, out[-3000:]
    assert sorted(os.listdir(tmp / "ckpt")) == ["step_00000002", "step_00000004", "step_00000006"]
    assert "step 6/6  loss" in out  # the line for people beside the JSON lines
    return losses(tmp / "m.jsonl")


def test_a_rank_killed_mid_run_resumes_bit_for_bit(uninterrupted, tmp_path):
    script, ckpt = compiled(tmp_path, "train.checkpoint_every=2"), tmp_path / "ckpt"
    proc = torchrun(script, "--metrics", str(tmp_path / "first.jsonl"), "--checkpoint-dir", str(ckpt))
    wait_for(lambda: (ckpt / "step_00000002").is_dir())
    os.kill(workers(proc)[-1], signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0
    done = sorted(n for n in os.listdir(ckpt) if not n.endswith(".partial"))
    assert done and all((ckpt / n / ".metadata").is_file() for n in done), done  # complete, or not there at all
    code, out = finish(torchrun(script, "--metrics", str(tmp_path / "resumed.jsonl"), "--resume", str(ckpt),
                                "--checkpoint-dir", str(ckpt)))
    assert code == 0, out[-3000:]
    resumed = losses(tmp_path / "resumed.jsonl")
    first_resumed = int(done[-1].split("_")[1])
    assert sorted(resumed) == list(range(first_resumed, STEPS))
    assert resumed == {s: uninterrupted[s] for s in resumed}  # bit for bit


def test_sigterm_finishes_the_step_saves_and_leaves(uninterrupted, tmp_path):
    script, ckpt = compiled(tmp_path), tmp_path / "ckpt"  # no periodic saves: only the one SIGTERM asks for
    metrics = tmp_path / "first.jsonl"
    proc = torchrun(script, "--metrics", str(metrics), "--checkpoint-dir", str(ckpt))
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does to the job
    code, out = finish(proc)
    assert "stopped by signal 15" in out and f"resume with --resume {ckpt}" in out, out[-3000:]
    saved = sorted(os.listdir(ckpt))
    assert len(saved) == 1 and (ckpt / saved[0] / ".metadata").is_file()
    steps_done = int(saved[0].split("_")[1])
    assert steps_done == len(losses(metrics)) < STEPS
    code, out = finish(torchrun(script, "--metrics", str(tmp_path / "resumed.jsonl"), "--resume", str(ckpt)))
    assert code == 0, out[-3000:]
    assert losses(tmp_path / "resumed.jsonl") == {s: uninterrupted[s] for s in range(steps_done, STEPS)}


def test_resuming_past_the_end_saves_the_steps_actually_done(tmp_path):
    script, ckpt = compiled(tmp_path), tmp_path / "ckpt"
    assert finish(torchrun(script, "--steps", "3", "--checkpoint-dir", str(ckpt)))[0] == 0
    code, out = finish(torchrun(script, "--steps", "2", "--resume", str(ckpt / "step_00000003"),
                                "--checkpoint-dir", str(tmp_path / "again")))
    assert code == 0, out[-3000:]
    assert os.listdir(tmp_path / "again") == ["step_00000003"]  # 3 steps done, not --steps 2


def test_a_non_finite_loss_stops_before_the_update(tmp_path):
    script, ckpt = compiled(tmp_path, "train.lr=1.0e+30", "train.checkpoint_every=1"), tmp_path / "ckpt"
    code, out = finish(torchrun(script, "--checkpoint-dir", str(ckpt)))
    assert code != 0, out[-3000:]  # the ranks exit 3; torchrun reports a failed job as 1
    assert "step 1: non-finite loss or gradient norm" in out and "rank(s) 0, 1" in out, out[-3000:]
    assert sorted(os.listdir(ckpt)) == ["step_00000001"]  # the last good state stays the newest


def test_up_front_checks_say_one_line_before_anything_is_built(tmp_path):
    script = compiled(tmp_path)
    (tmp_path / "a_file").write_text("")

    def plain(*args):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr

    code, err = plain()
    assert code == 2 and "planned for 2 rank(s); run it with launch.sh" in err and "Traceback" not in err
    for args, words in [(["--checkpoint-dir", str(tmp_path / "a_file")], "is a file"),
                        (["--resume", str(tmp_path / "missing")], "no complete checkpoint"),
                        (["--steps", "-3"], "--steps must be 0 or more")]:
        env = {**os.environ, "WORLD_SIZE": "2"}  # past the world-size check, still before any process group
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_learning_rate_schedule(schedule, tmp_path):
    script = compiled(tmp_path, f"train.lr_schedule={schedule}", "train.warmup_steps=2", "train.min_lr=1.0e-4",
                      "train.betas=[0.9, 0.95]", "train.eps=1.0e-6")
    text = script.read_text()
    assert "BETAS = (0.9, 0.95)" in text and "EPS = 1e-06" in text and "betas=BETAS, eps=EPS" in text
    tree = ast.parse(text)
    wanted = [n for n in tree.body if getattr(n, "name", None) == "lr_at" or isinstance(n, ast.Assign) and any(
        getattr(t, "id", "") in ("LR", "STEPS", "WARMUP_STEPS", "MIN_LR") for t in n.targets)]
    scope = {"math": math}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "train.py", "exec"), scope)
    lr_at = scope["lr_at"]
    assert [lr_at(0), lr_at(1)] == [0.5e-3, 1e-3]  # linear warmup over 2 steps
    assert lr_at(STEPS) == pytest.approx(1e-4) and lr_at(100) == pytest.approx(1e-4)  # decayed to min_lr, then held
    middle = lr_at(4)  # half-way through the decay
    assert middle == pytest.approx((1e-3 + 1e-4) / 2)
    assert all(lr_at(s) >= lr_at(s + 1) for s in range(1, STEPS))
