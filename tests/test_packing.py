"""Packing real data (train.packing, train.micro_batch_tokens) and the seeded per-epoch shuffle: documents stay
apart in packed rows, rows keep to the token budget, every layout reads the single process's rows, and a resumed
run reads the batch the uninterrupted one would have."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from chat_fixtures import fast_tokenizer, word_tokenizer, write_manifest
from omnigen import pipeline, runner
from omnigen.cli import main
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "specs" / "models" / "llama_tiny"
IGNORE = -100


def write_rows(path, n=40, seed=0, longest=80):
    """n jsonl rows of 3..longest random token ids (longer than seq_len 64 too: cut when packed)."""
    rng = random.Random(seed)
    rows = [[rng.randrange(5, 1000) for _ in range(rng.randint(3, longest))] for _ in range(n)]
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path, rows


def spec_file(tmp_path, data, name="pack", parallel=None, **train):
    body = {"name": name, "model": {"config": str(LLAMA)}, "cluster": {"procs_per_node": 2},
            "train": {"seq_len": 64, "global_batch_size": 8, "steps": 3, "data": str(data), "packing": True,
                      "micro_batch_tokens": 128, **train},
            "parallel": parallel or {"dp_shard": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def script(tmp_path, data, name="pack", **train):
    """The generated train.py for a packed jsonl spec, executed as a module: its namespace, and its data source."""
    out = tmp_path / name
    result = CliRunner().invoke(main, ["compile", str(spec_file(tmp_path, data, name, **train)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    ns = {"__name__": "train_module", "__file__": str(out / "train.py")}
    exec(compile((out / "train.py").read_text(), str(out / "train.py"), "exec"), ns)
    return ns, ns["open_data"]()


def documents_of(row):
    """(start, end) of each run of one document id in a [S] row."""
    ids, bounds, start = row.tolist(), [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            bounds.append((start, t))
            start = t
    return bounds


def test_packed_rows_keep_documents_apart(tmp_path):
    """Each row: whole samples (ids as the jsonl row has them, cut to seq_len), positions restarting at 0, a
    document id of their own, labels only inside a document (its last token predicts nothing), attention only
    inside a document; the padding after them is a document of its own without labels; no row over the budget."""
    data_file, rows = write_rows(tmp_path / "rows.jsonl")
    ns, data = script(tmp_path, data_file)
    assert ns["PACKED_ROW_TOKENS"] == 128 and ns["GRAD_ACCUM"] == 2  # at most ceil(8 / (128 // 64)) = 4 rows, 2 a rank
    seen_rows = 0
    for step in range(6):
        indices, packing = ns["step_rows"](step, data)
        lengths = [data.length(i) for i in indices]
        assert sorted(p for row in packing for p in row) == list(range(8))  # every sample once
        assert all(sum(lengths[p] for p in row) <= 128 for row in packing) and len(packing) <= 4
        for row, batch in zip(packing, ns["step_batches"](step, data, 0, 1, torch.device("cpu"))):
            assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (1, 128) for k in batch}
            docs = documents_of(batch["document_ids"][0])
            assert len(docs) == len(row) + (sum(lengths[p] for p in row) < 128)  # + the padding
            for (a, b), p in zip(docs, row):
                ids = data.row(indices[p])["input_ids"][:64]
                assert batch["input_ids"][0, a:b].tolist() == ids and b - a == lengths[p]
                assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
                assert batch["shift_labels"][0, a:b].tolist() == ids[1:] + [IGNORE]
            a, b = docs[-1]
            if len(docs) > len(row):
                assert (batch["shift_labels"][0, a:b] == IGNORE).all() and batch["position_ids"][0, a] == 0
            assert len(set(batch["document_ids"][0].tolist())) == len(docs)  # ids distinct per document
            mask = ns["document_causal_mask"](batch["document_ids"])[0, 0]
            same = batch["document_ids"][0][:, None] == batch["document_ids"][0][None, :]
            assert torch.equal(mask, same & torch.ones(128, 128, dtype=torch.bool).tril())
            seen_rows += 1
    assert seen_rows >= 12


def test_rows_dealt_alike_in_every_layout(tmp_path):
    """Ranks run as many micro-batches each (an empty one, no labels, where a rank is short); dealt back in order
    they are the single process's rows; the global label count is the same; and the packing is a pure function of
    (SEED, step): a second reader agrees, another seed differs."""
    data_file, _ = write_rows(tmp_path / "rows.jsonl")
    ns, data = script(tmp_path, data_file)
    _, again = script(tmp_path, data_file, name="again")
    _, other_seed = script(tmp_path, data_file, name="seed1", seed=1)
    cpu = torch.device("cpu")
    short = 0
    for step in range(8):
        single = ns["step_batches"](step, data, 0, 1, cpu)
        ranks = [ns["step_batches"](step, data, r, 2, cpu) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == -(-len(single) // 2)
        dealt = [ranks[m % 2][m // 2] for m in range(2 * len(ranks[0]))]
        for mine, theirs in zip(dealt, single):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        for empty in dealt[len(single):]:
            short += 1
            assert (empty["shift_labels"] == IGNORE).all()
        labels = lambda batches: sum(int((b["shift_labels"] != IGNORE).sum()) for b in batches)
        assert labels(single) == labels(ranks[0]) + labels(ranks[1])
        assert all(torch.equal(x[k], y[k]) for x, y in zip(single, ns["step_batches"](step, again, 0, 1, cpu))
                   for k in x)
    assert short > 0  # some step packed into an odd number of rows
    other = ns["step_rows"](0, other_seed)[0]
    assert [other_seed.row(i) for i in other] != [data.row(i) for i in other]


def test_jsonl_rows_shuffled_per_epoch(tmp_path):
    """Sample i reads row epoch_order(i, rows): every row once per epoch, a different order each epoch."""
    data_file, rows = write_rows(tmp_path / "rows.jsonl", n=30)
    ns, data = script(tmp_path, data_file)
    epochs = [[data.row(i)["input_ids"] for i in range(e * 30, (e + 1) * 30)] for e in range(3)]
    assert all(sorted(map(tuple, e)) == sorted(map(tuple, rows)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != rows
    assert [ns["epoch_order"](i, 30) for i in range(30)] != list(range(30))


def test_chat_rows_pack(tmp_path):
    """A text-only chat manifest (pre-training rows, a tokenizer folder as the processor) packs: unpadded samples
    are the rows as sample() encodes them, without the padding; rows visit in a seeded order."""
    words = ["the red square is a circle", "hello world", "what colour is this ?", "a high tone",
             "the blue circle is a square and the green triangle is red", "describe the picture"]
    tok = word_tokenizer({"<pad>": 0, "<s>": 1, "</s>": 2}, 1024)
    fast_tokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(tmp_path / "tok")
    manifest = write_manifest(tmp_path / "chat.jsonl",
                              [{"messages": [{"content": [{"type": "text", "text": w}]}]} for w in words])
    ns, data = script(tmp_path, manifest, processor=str(tmp_path / "tok"), global_batch_size=6)
    assert type(data).__name__ == "ChatManifest"
    firsts = []
    for i in range(6):
        padded, unpadded = data.sample(i), data.unpadded(i)
        n = int(padded["attention_mask"].sum())
        assert data.length(i) == n == len(unpadded["input_ids"])
        assert torch.equal(unpadded["input_ids"], padded["input_ids"][:n])
        assert torch.equal(unpadded["shift_labels"], padded["shift_labels"][:n])
        firsts.append(tuple(unpadded["input_ids"].tolist()))
    assert len(set(firsts)) == 6  # one epoch: every row once
    batches = ns["step_batches"](0, data, 0, 1, torch.device("cpu"))
    assert sum(int((b["shift_labels"] != IGNORE).sum()) for b in batches) == sum(len(f) - 1 for f in firsts)


@pytest.mark.parametrize("sets, words", [
    (["train.micro_batch_tokens=256"], ["micro_batch_tokens", "packing: true"]),
    (["train.packing=true", "train.micro_batch_tokens=32"], ["micro_batch_tokens (32)", "seq_len (128)"]),
])
def test_spec_refuses_token_budgets_that_cannot_work(sets, words):
    result = CliRunner().invoke(main, ["plan", str(ROOT / "specs" / "llama_tiny.yaml"), *[a for s in sets
                                                                                          for a in ("--set", s)]])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert all(w in result.output for w in words), result.output


@pytest.mark.parametrize("spec, words", [
    ("qwen2_vl_tiny.yaml", ["train.packing", "Qwen2VLForConditionalGeneration", "M-RoPE", "packing: false"]),
    ("siglip_qwen3_moe_tiny_parts.yaml", ["train.packing", "the foundation's config", "router load-balancing"]),
    ("qwen3_moe_tiny_ep2.yaml", ["train.packing", "router load-balancing loss"]),
])
def test_packing_refused_where_not_built(spec, words):
    result = CliRunner().invoke(main, ["plan", str(ROOT / "specs" / spec), "--set", "train.packing=true"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert all(w in result.output for w in words), result.output


def test_planner_counts_packed_rows(tmp_path):
    """The cost model sees one packed row per micro-batch and the most rows a rank can run; sp rounds the row up."""
    data_file, _ = write_rows(tmp_path / "rows.jsonl")
    plan = pipeline.plan(load_spec(spec_file(tmp_path, data_file, micro_batch_tokens=200))).plan
    assert plan.train["packed_row_tokens"] == 200 and plan.train["grad_accum"] == 2  # >= 3 samples a row: 3 rows
    plan = pipeline.plan(load_spec(spec_file(tmp_path, data_file, micro_batch_tokens=100))).plan
    assert plan.train["grad_accum"] == 4  # >= 1 sample a row: 8 rows, 4 a rank
    sp = pipeline.plan(load_spec(spec_file(tmp_path, data_file, "sp", parallel={"dp_shard": 1, "sp": 2},
                                           micro_batch_tokens=127))).plan
    assert sp.train["packed_row_tokens"] == 128 and sp.train["grad_accum"] == 4 and sp.sequence_parallel["packed"]


@pytest.mark.distributed
def test_packed_verify_and_resume(tmp_path):
    """Few torchrun launches: packing + token budgets at dp_shard=2 and at sp=2 (a 127-token budget, rounded to 128)
    equal the single process; 2 steps + a checkpoint + 2 resumed steps equal 4 straight steps bit for bit."""
    data_file, _ = write_rows(tmp_path / "rows.jsonl")
    spec = load_spec(spec_file(tmp_path, data_file))
    assert runner.verify(spec, steps=2, workdir=str(tmp_path / "verify")) == 0
    sp = load_spec(spec_file(tmp_path, data_file, "sp", parallel={"dp_shard": 1, "sp": 2}, micro_batch_tokens=127))
    assert runner.verify(sp, steps=2, workdir=str(tmp_path / "verify_sp")) == 0

    par = tmp_path / "verify" / "parallel"

    def run(name, *args):
        args = [*args, "--metrics", str(par / f"{name}.jsonl")]
        assert runner.launch(spec, par / "train.py", args) == 0
        return runner.read_metrics(par / f"{name}.jsonl")

    straight = run("straight", "--steps", "4")
    first = run("first", "--steps", "2", "--checkpoint-dir", str(tmp_path / "ckpt"))
    resumed = run("resumed", "--steps", "4", "--resume", str(tmp_path / "ckpt"))
    assert [m["step"] for m in first + resumed] == [0, 1, 2, 3]
    for key in ("loss", "grad_norm", "label_tokens", "tokens", "packed_rows"):
        assert [m[key] for m in first + resumed] == [m[key] for m in straight], key  # bit for bit
