"""Token shards: `omnigen data tokenize`, the shard format, compile-time checks, and generated scripts reading
shards through memory maps (same data in every layout, resumable at the step count)."""

import array
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from omnigen import runner
from omnigen.cli import main
from omnigen.shards import read_index, write_random
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "specs" / "models" / "llama_tiny"
VOCAB = json.loads((LLAMA / "config.json").read_text())["vocab_size"]
WORDS = "the a cat dog sat ran on under mat log red blue quick slow fox jumps over lazy river bank".split()


def corpus(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(3, 40, (1,), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)) + ".")
    return docs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE trained here on generated text, saved as a PreTrainedTokenizerFast folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(200, seed=1), trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def tokenize(*args):
    return CliRunner().invoke(main, ["data", "tokenize", *map(str, args)])


def stream(folder):
    index = json.loads((folder / "index.json").read_text())
    tokens = array.array({"uint16": "H", "uint32": "I"}[index["dtype"]])
    for shard in index["shards"]:
        tokens.frombytes((folder / shard["file"]).read_bytes())
    starts = array.array("q", (folder / index["document_starts"]).read_bytes())
    return index, list(tokens), list(starts)


def test_tokenize_round_trip(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer
    docs = corpus(120)
    a, b = write_jsonl(tmp_path / "a.jsonl", docs[:70]), write_jsonl(tmp_path / "b.jsonl", docs[70:])
    result = tokenize(a, b, "-o", tmp_path / "shards", "--tokenizer", tokenizer_dir, "--shard-tokens", 500)
    assert result.exit_code == 0, result.output
    index, tokens, starts = stream(tmp_path / "shards")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tok.eos_token_id
    assert index["dtype"] == "uint16" and index["vocab_size"] == len(tok) and index["eos_token_id"] == eos
    assert index["tokens"] == len(tokens) and index["documents"] == len(docs) == len(starts) and starts[0] == 0
    assert len(index["shards"]) == -(-len(tokens) // 500) and all(s["tokens"] == 500 for s in index["shards"][:-1])
    assert index["max_token_id"] == max(tokens)
    assert tok.decode(tokens) == "".join(d + tok.eos_token for d in docs)  # decode(shards) == the text + EOS
    for d, (s, e) in enumerate(zip(starts, starts[1:] + [len(tokens)])):  # every document at its offset, EOS-ended
        assert tokens[e - 1] == eos and tok.decode(tokens[s:e - 1]) == docs[d]
    assert not list((tmp_path / "shards").glob("*.tmp"))
    read_index(tmp_path / "shards")  # what compile checks


@pytest.mark.parametrize("case, words", [
    ("missing_key", ["a.jsonl:2", "no 'text' key", "--text-key"]),
    ("bad_json", ["a.jsonl:3", "not valid JSON"]),
    ("not_a_string", ["a.jsonl:1", "must be a string"]),
    ("no_tokenizer", ["nowhere", "tokenizer folder"]),
    ("parquet_without_pyarrow", ["a.parquet", "pyarrow"]),
])
def test_tokenize_refuses_bad_input(tmp_path, tokenizer_dir, case, words):
    src, tok_dir = tmp_path / "a.jsonl", tokenizer_dir
    lines = ['{"text": "fine"}', '{"text": "fine"}', '{"text": "fine"}']
    if case == "missing_key":
        lines[1] = '{"body": "x"}'
    if case == "bad_json":
        lines[2] = '{"text": "x"'
    if case == "not_a_string":
        lines[0] = '{"text": 5}'
    if case == "no_tokenizer":
        tok_dir = tmp_path / "nowhere"
    src.write_text("\n".join(lines) + "\n")
    if case == "parquet_without_pyarrow":
        try:
            import pyarrow  # noqa: F401
            pytest.skip("pyarrow is installed: parquet is read")
        except ImportError:
            src = tmp_path / "a.parquet"
            src.write_bytes(b"PAR1")
    result = tokenize(src, "-o", tmp_path / "out", "--tokenizer", tok_dir)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not (tmp_path / "out" / "index.json").exists() and not list((tmp_path / "out").glob("tokens_*"))
    assert not list((tmp_path / "out").glob("*.tmp"))


def shard_spec(tmp_path, data, **train):
    body = {"name": "shards", "model": {"config": str(LLAMA)}, "cluster": {"procs_per_node": 2},
            "train": {"seq_len": 64, "micro_batch_size": 1, "global_batch_size": 4, "steps": 4, "data": str(data),
                      **train},
            "parallel": {"dp_shard": 2}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def compile_refused(tmp_path, data, *words, **train):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(shard_spec(tmp_path, data, **train)), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not out.exists()


def test_compile_checks_the_shards(tmp_path):
    good = tmp_path / "good"
    write_random(good, tokens=1000, vocab_size=VOCAB, document_length=100, shard_tokens=400)
    result = CliRunner().invoke(main, ["compile", str(shard_spec(tmp_path, good)), "-o", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    assert "class TokenShards" in (tmp_path / "ok" / "train.py").read_text()

    too_big = tmp_path / "vocab"  # ids from a tokenizer larger than the model's vocabulary
    write_random(too_big, tokens=1000, vocab_size=VOCAB + 100)
    compile_refused(tmp_path, too_big, "index.json", f"token id {VOCAB + 99}", f"[0, {VOCAB})")

    compile_refused(tmp_path, good, "index.json", "fewer than one global batch", seq_len=512)  # 1 window of 512

    truncated = tmp_path / "truncated"
    write_random(truncated, tokens=1000, vocab_size=VOCAB, shard_tokens=400)
    shard = truncated / "tokens_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    compile_refused(tmp_path, truncated, "tokens_00001.bin", "794 bytes", "400 uint16 tokens")

    missing = tmp_path / "missing"
    write_random(missing, tokens=1000, vocab_size=VOCAB, shard_tokens=400)
    (missing / "tokens_00002.bin").unlink()
    compile_refused(tmp_path, missing, "tokens_00002.bin", "missing")

    garbled = tmp_path / "garbled"
    write_random(garbled, tokens=1000, vocab_size=VOCAB)
    (garbled / "index.json").write_text("{not json")
    compile_refused(tmp_path, garbled, "garbled/index.json", "cannot read the index")

    empty = tmp_path / "empty"
    empty.mkdir()
    compile_refused(tmp_path, empty, "empty/index.json", "no such file")


def token_shards_class(tmp_path, data, name, **train):
    """The generated script's TokenShards, compiled for a spec reading `data`."""
    out = tmp_path / name
    result = CliRunner().invoke(main, ["compile", str(shard_spec(tmp_path, data, **train)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    namespace = {"__name__": "train_module", "__file__": str(out / "train.py")}
    exec(compile((out / "train.py").read_text(), str(out / "train.py"), "exec"), namespace)
    return namespace["TokenShards"]


def test_samples_are_windows_of_the_stream(tmp_path):
    """Sample i is a seq_len + 1 window at a multiple of seq_len, each window once per epoch, every epoch
    shuffled differently; a window crossing a shard file reads both; remapping the files changes nothing."""
    data = tmp_path / "data"
    write_random(data, tokens=64 * 50 + 1, vocab_size=VOCAB, document_length=37, shard_tokens=1000)
    shards = token_shards_class(tmp_path, data, "plain")(str(data))
    _, tokens, doc_starts = stream(data)
    assert shards.windows == 50
    starts = [shards.window_start(i) for i in range(600)]
    assert sorted(starts[:50]) == sorted(starts[50:100]) == list(range(0, 64 * 50, 64)) and starts[:50] != starts[50:100]
    for i in range(600):  # past REMAP_EVERY reads, so the maps are dropped and made again on the way
        s = shards.sample(i)
        w = tokens[starts[i]: starts[i] + 65]
        assert s["input_ids"].tolist() == w[:-1] and s["shift_labels"].tolist() == w[1:]
        assert "document_ids" not in s  # not packed: plain causal over the window
    assert shards.reads == 600 and len(shards.maps) <= 4

    wide = tmp_path / "wide"  # a vocabulary past 65,536 ids is stored as uint32 and read back the same
    write_random(wide, tokens=3000, vocab_size=70_000, shard_tokens=1000)
    index, wide_tokens, _ = stream(wide)
    assert index["dtype"] == "uint32" and max(wide_tokens) > 65_535
    assert shards.__class__(str(wide)).tokens(900, 1200).tolist() == wide_tokens[900:2100]

    packed = token_shards_class(tmp_path, data, "packed", pack_documents=2)(str(data))
    for i in range(60):  # documents from documents.bin: ids, positions restarting, a document's EOS predicts nothing
        s, start = packed.sample(i), starts[i]
        doc = [max(d for d, b in enumerate(doc_starts) if b <= start + t) for t in range(65)]
        first = [max(doc_starts[d], start) for d in doc]
        assert s["document_ids"].tolist() == [d - doc[0] for d in doc[:-1]]
        assert s["position_ids"].tolist() == [start + t - first[t] for t in range(64)]
        w = tokens[start: start + 65]
        assert s["shift_labels"].tolist() == [-100 if doc[t + 1] != doc[t] else w[t + 1] for t in range(64)]


@pytest.mark.distributed
def test_shards_verify_and_resume(tmp_path, tokenizer_dir):
    """One batch of torchrun launches: dp_shard=2 on tokenized shards equals the single process; packed documents
    too; and 2 steps + a DCP checkpoint + 2 resumed steps equal 4 straight steps bit for bit."""
    docs = corpus(400, seed=3)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert tokenize(src, "-o", tmp_path / "shards", "--tokenizer", tokenizer_dir, "--shard-tokens", 3000).exit_code == 0
    spec = load_spec(shard_spec(tmp_path, tmp_path / "shards"))
    assert runner.verify(spec, steps=3, workdir=str(tmp_path / "verify")) == 0

    packed = load_spec(shard_spec(tmp_path, tmp_path / "shards", pack_documents=2))
    assert runner.verify(packed, steps=2, workdir=str(tmp_path / "verify_packed")) == 0
    text = (tmp_path / "verify_packed" / "parallel" / "train.py").read_text()
    assert "document_ids" in text and "def documents(" in text

    par = tmp_path / "verify" / "parallel"  # compiled by verify above

    def run(name, *args):
        args = [*args, "--metrics", str(par / f"{name}.jsonl")]
        assert runner.launch(spec, par / "train.py", args) == 0
        return runner.read_metrics(par / f"{name}.jsonl")

    straight = run("straight", "--steps", "4")
    first = run("first", "--steps", "2", "--checkpoint-dir", str(tmp_path / "ckpt"))
    resumed = run("resumed", "--steps", "4", "--resume", str(tmp_path / "ckpt"))
    assert [m["step"] for m in first + resumed] == [0, 1, 2, 3]
    for key in ("loss", "grad_norm", "label_tokens"):
        assert [m[key] for m in first + resumed] == [m[key] for m in straight], key  # bit for bit
