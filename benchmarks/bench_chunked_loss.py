"""Peak memory of the loss with and without chunks of tokens, measured on CPU at a long sequence on a tiny model.

python benchmarks/bench_chunked_loss.py [--seq-len 16384] [--vocab 16384] [--chunk 1024]   (~1 min on 2 cores)
    → one table: peak RSS of the generated train.py (one process, one step) with train.loss_chunk_tokens 0 (the whole
      sequence at once) and N, side by side, with the cost model's logits term for each and the step time.

Then, in bf16 (what FSDP's bf16 parameters give the LM head), the head's weight gradient against fp64, whole and in
chunks: each chunk's product is rounded to bf16 before it is summed (as fused linear + cross-entropy kernels also do),
so the error grows with the number of chunks; the hidden states' gradient does not change.

The model is llama_tiny (hidden 64, 2 layers) with its vocabulary widened to --vocab: at --seq-len tokens the loss's
[tokens x vocab] fp32 tensors dwarf everything else, which is what a long context does to a real model's loss. Each
variant is compiled with `omnigen compile -o <tmp> --set ...` and its train.py run once as a plain process for one
step (its JSON metric line carries peak_memory_bytes: the process's RSS high-water mark from getrusage, so it includes
the Python + torch baseline of a few hundred MiB, the same in both columns).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "llama_tiny.yaml"
MIB = 2**20


def compile_and_run(folder: Path, seq_len: int, vocab: int, chunk: int) -> dict:
    sets = {"train.seq_len": seq_len, "train.global_batch_size": 1, "train.steps": 1, "train.loss_chunk_tokens": chunk,
            "cluster.procs_per_node": 1, "parallel": "auto", "model.overrides.vocab_size": vocab,
            "model.overrides.max_position_embeddings": seq_len}
    args = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    subprocess.run([sys.executable, "-m", "omnigen.cli", "compile", str(SPEC), "-o", str(folder), *args], check=True,
                   stdout=subprocess.DEVNULL)
    plan = json.loads((folder / "plan.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, str(folder / "train.py"), "--steps", "1"], cwd=folder, env=env, check=True,
                         capture_output=True, text=True).stdout
    record = next(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    return {"measured": record["peak_memory_bytes"], "predicted": plan["predicted"]["peak_memory_bytes"],
            "activations": plan["predicted"]["memory"]["activations"], "step_s": record["step_time_s"],
            "loss": record["loss"], "chunk": plan["train"]["loss_chunk_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    a = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="omnigen-chunked-loss-") as tmp:
        for label, chunk in (("whole sequence", 0), (f"chunks of {a.chunk}", a.chunk)):
            rows[label] = compile_and_run(Path(tmp) / str(chunk), a.seq_len, a.vocab, chunk)
    whole, chunked = rows.values()
    print(f"tiny Llama (hidden 64, 2 layers), vocab {a.vocab:,}, seq_len {a.seq_len:,}, one CPU process, one step")
    print(f"  {'loss':<18} {'peak RSS MiB':>13} {'predicted MiB':>14} {'activations MiB':>16} {'step s':>8} {'loss':>9}")
    for label, r in rows.items():
        print(f"  {label:<18} {r['measured'] / MIB:13.0f} {r['predicted'] / MIB:14.0f} {r['activations'] / MIB:16.0f} "
              f"{r['step_s']:8.2f} {r['loss']:9.5f}")
    drop, predicted_drop = whole["measured"] - chunked["measured"], whole["predicted"] - chunked["predicted"]
    print(f"  peak memory drop: {drop / MIB:.0f} MiB measured ({whole['measured'] / chunked['measured']:.2f}x less), "
          f"{predicted_drop / MIB:.0f} MiB predicted; loss difference {abs(whole['loss'] - chunked['loss']):.2e}")
    bf16_gradient_errors()


def bf16_gradient_errors(tokens: int = 16384, hidden: int = 256, vocab: int = 4096) -> None:
    """The LM head's and the hidden states' gradients of the summed cross entropy, bf16 against fp64."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    states, weight = torch.randn(tokens, hidden, generator=g), 0.02 * torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)

    def grads(chunk, dtype):
        w, h = weight.to(dtype).requires_grad_(), states.to(dtype).requires_grad_()

        def loss(part, part_labels):
            return F.cross_entropy(F.linear(part, w).float(), part_labels, reduction="sum")

        pieces = zip(h.split(chunk or tokens), labels.split(chunk or tokens))
        sum(torch.utils.checkpoint.checkpoint(loss, *p, use_reentrant=False) if chunk else loss(*p)
            for p in pieces).backward()
        return w.grad.double(), h.grad.double()

    exact = grads(0, torch.float64)
    print(f"bf16 LM head, {tokens:,} tokens, hidden {hidden}, vocab {vocab:,}: gradient error against fp64")
    for chunk in (0, 1024, 128):
        w, h = grads(chunk, torch.bfloat16)
        label = "whole sequence" if not chunk else f"{tokens // chunk} chunks of {chunk}"
        print(f"  {label:<18} weight {float((w - exact[0]).norm() / exact[0].norm()):.2e}   "
              f"hidden states {float((h - exact[1]).norm() / exact[1].norm()):.2e}")


if __name__ == "__main__":
    main()
