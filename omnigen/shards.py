"""Token shards: a tokenized text corpus as flat token files a training script memory-maps.

Layout of a shard folder (what `omnigen data tokenize` writes and a generated train.py reads):

    index.json          written last, so a folder with an index.json is complete:
                        {"format": "omnigen-token-shards", "version": 1,
                         "dtype": "uint16" | "uint32",            # uint16 when the vocabulary fits (<= 65,536 ids)
                         "tokens": N,                             # tokens in the whole stream
                         "documents": D, "document_starts": "documents.bin",
                         "vocab_size": V, "max_token_id": M, "eos_token_id": E,
                         "tokenizer": {"path": ..., "class": ..., "name_or_path": ...},
                         "shards": [{"file": "tokens_00000.bin", "tokens": n0}, ...]}
    tokens_00000.bin    the token stream, little-endian `dtype`, no header; the shards concatenated in the
    tokens_00001.bin    order of "shards" are one stream of N tokens (a document may continue in the next shard)
    documents.bin       int64 little-endian: the stream offset where each document starts (D entries, the first 0)

Every document ends with the tokenizer's EOS token. A shard file is written under a temporary name and renamed
when complete; the index is renamed into place after every shard, so readers never see a half-written set.
"""

from __future__ import annotations

import array
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import OmnigenError

FORMAT = "omnigen-token-shards"
VERSION = 1
INDEX = "index.json"
DOCUMENT_STARTS = "documents.bin"
DTYPES = {"uint16": ("H", 2), "uint32": ("I", 4)}  # array typecode, bytes per token
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard


class DataError(OmnigenError):
    """Input text or a shard folder that cannot be used (names the file, and the line where there is one)."""


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / INDEX).is_file()


# --- reading (compile-time validation) ---------------------------------------------------------------------

@dataclass(frozen=True)
class ShardIndex:
    folder: Path
    dtype: str
    tokens: int
    documents: int
    vocab_size: int
    max_token_id: int
    eos_token_id: int
    shards: tuple[tuple[str, int], ...]
    raw: dict


def read_index(folder: Path) -> ShardIndex:
    """The index, with every file it names checked to exist at the size it says; DataError otherwise."""
    path = folder / INDEX
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (a shard folder holds the index.json `omnigen data tokenize` writes)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the index: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{path}: not an omnigen token-shard index (expected \"format\": \"{FORMAT}\")")
    if raw.get("version") != VERSION:
        raise DataError(f"{path}: index version {raw.get('version')!r}; this omnigen reads version {VERSION}")
    ints = ("tokens", "documents", "vocab_size", "max_token_id", "eos_token_id")
    for key in ints:
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 0:
            raise DataError(f"{path}: key {key!r} must be a non-negative integer, got {raw.get(key)!r}")
    if raw.get("dtype") not in DTYPES:
        raise DataError(f"{path}: key 'dtype' must be one of {sorted(DTYPES)}, got {raw.get('dtype')!r}")
    shards = raw.get("shards")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int) for s in shards):
        raise DataError(f"{path}: key 'shards' must be a non-empty list of {{\"file\": ..., \"tokens\": ...}}")
    itemsize = DTYPES[raw["dtype"]][1]
    for s in shards:
        f = folder / s["file"]
        if Path(s["file"]).name != s["file"]:
            raise DataError(f"{path}: shard file {s['file']!r} must be a plain file name inside the folder")
        if not f.is_file():
            raise DataError(f"{f}: missing (listed in {path})")
        if f.stat().st_size != s["tokens"] * itemsize:
            raise DataError(f"{f}: {f.stat().st_size} bytes, but {path} says {s['tokens']} {raw['dtype']} tokens "
                            f"= {s['tokens'] * itemsize} bytes (a truncated or foreign file?)")
    if sum(s["tokens"] for s in shards) != raw["tokens"]:
        raise DataError(f"{path}: the shards hold {sum(s['tokens'] for s in shards)} tokens, 'tokens' says {raw['tokens']}")
    docs = folder / str(raw.get("document_starts", DOCUMENT_STARTS))
    if not docs.is_file() or docs.stat().st_size != 8 * raw["documents"]:
        size = docs.stat().st_size if docs.is_file() else "missing"
        raise DataError(f"{docs}: expected {raw['documents']} int64 document offsets = {8 * raw['documents']} bytes, "
                        f"found {size}")
    return ShardIndex(folder, raw["dtype"], raw["tokens"], raw["documents"], raw["vocab_size"], raw["max_token_id"],
                      raw["eos_token_id"], tuple((s["file"], s["tokens"]) for s in shards), raw)


def windows(tokens: int, seq_len: int) -> int:
    """Non-overlapping training windows in a stream: each reads seq_len + 1 tokens (inputs and their next token)."""
    return max(0, (tokens - 1) // seq_len)


# --- writing (`omnigen data tokenize`) ---------------------------------------------------------------------

def _texts_jsonl(path: Path, key: str) -> Iterator[tuple[int, str]]:
    """(bytes of the line, text) per row; DataError naming file:line for a row that cannot be read."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        number = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number + 1}: not UTF-8 text (byte {e.start} of the read block)") from None
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or key not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{number}: no {key!r} key (found {keys}); choose the key with --text-key")
            if not isinstance(row[key], str):
                raise DataError(f"{path}:{number}: {key!r} must be a string, got {type(row[key]).__name__}")
            yield len(line.encode("utf-8")), row[key]


def _texts_parquet(path: Path, key: str) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow, which is not installed (pip install pyarrow), "
                        "or convert the file to jsonl") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a bad file)
        raise DataError(f"{path}: cannot read as parquet: {e}") from None
    if key not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {key!r} (columns: {pf.schema_arrow.names}); choose one with --text-key")
    number = 0
    for batch in pf.iter_batches(columns=[key]):
        for value in batch.column(0).to_pylist():
            number += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {number}: {key!r} must be a string, got {type(value).__name__}")
            yield 0, value  # progress counts a parquet file whole when it is done


def texts(path: Path, key: str) -> Iterator[tuple[int, str]]:
    if path.suffix == ".parquet":
        return _texts_parquet(path, key)
    return _texts_jsonl(path, key)


def load_tokenizer(folder: Path):
    if not folder.is_dir():
        raise DataError(f"{folder}: no such tokenizer folder (give a folder saved with save_pretrained)")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a broken folder)
        raise DataError(f"{folder}: cannot load a tokenizer: {type(e).__name__}: {e}") from None
    if tok.eos_token_id is None:
        raise DataError(f"{folder}: the tokenizer has no EOS token; documents are separated by EOS")
    return tok


class _ShardWriter:
    """Appends tokens to the stream, cutting a shard file every shard_tokens; each file renamed into place whole."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.buffer = array.array(DTYPES[dtype][0])
        self.shards: list[tuple[str, int]] = []
        self.written: list[Path] = []
        self.tokens = 0

    def append(self, ids) -> None:
        self.buffer.extend(ids)
        self.tokens += len(ids)
        while len(self.buffer) >= self.shard_tokens:
            self._flush(self.buffer[: self.shard_tokens])
            del self.buffer[: self.shard_tokens]

    def close(self) -> None:
        if self.buffer:
            self._flush(self.buffer)
            self.buffer = array.array(DTYPES[self.dtype][0])

    def _flush(self, tokens: array.array) -> None:
        name = f"tokens_{len(self.shards):05d}.bin"
        write_atomic(self.out / name, tokens)
        self.shards.append((name, len(tokens)))
        self.written.append(self.out / name)


def write_atomic(path: Path, values: array.array | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if isinstance(values, array.array):
            if sys.byteorder != "little":
                values = array.array(values.typecode, values)
                values.byteswap()
            values.tofile(f)
        else:
            f.write(values)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tokenize(inputs: list[Path], out: Path, tokenizer_folder: Path, text_key: str = "text",
             shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_size: int = 1000, progress: bool = True) -> dict:
    """Tokenize every document of `inputs` (jsonl rows or parquet rows, the text under text_key) into a shard
    folder; returns the index. Raises DataError naming the file and line on bad input; nothing usable is left
    behind then (no index.json)."""
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    for path in inputs:
        if not path.is_file():
            raise DataError(f"{path}: no such input file")
        if path.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"{path}: expected a .jsonl or .parquet file")
    tok = load_tokenizer(tokenizer_folder)
    vocab_size, eos = len(tok), tok.eos_token_id
    dtype = dtype_for(vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # the folder is incomplete until the new index lands
    writer = _ShardWriter(out, dtype, shard_tokens)
    starts, documents = array.array("q"), 0  # document offsets go to disk as they come: memory stays flat
    starts_tmp = out / (DOCUMENT_STARTS + ".tmp")
    starts_file = open(starts_tmp, "wb")
    max_id = 0
    from tqdm import tqdm
    bar = tqdm(total=sum(p.stat().st_size for p in inputs), unit="B", unit_scale=True, desc="tokenize",
               disable=not progress, file=sys.stderr)
    try:
        for path in inputs:
            done, counted = 0, 0
            batch: list[str] = []

            def flush_batch():
                nonlocal max_id, documents
                for ids in tok(batch, add_special_tokens=False)["input_ids"]:
                    ids = list(ids) + [eos]
                    starts.append(writer.tokens)
                    writer.append(ids)
                    max_id = max(max_id, max(ids))
                batch.clear()
                documents += len(starts)
                if sys.byteorder != "little":
                    starts.byteswap()
                starts.tofile(starts_file)
                del starts[:]

            for nbytes, text in texts(path, text_key):
                batch.append(text)
                done += nbytes
                if len(batch) == batch_size:
                    flush_batch()
                    bar.update(done)
                    counted, done = counted + done, 0
            if batch:
                flush_batch()
            bar.update(path.stat().st_size - counted)
        writer.close()
        if not writer.tokens:
            raise DataError(f"{', '.join(map(str, inputs))}: no documents to tokenize")
        starts_file.flush()
        os.fsync(starts_file.fileno())
        starts_file.close()
        os.replace(starts_tmp, out / DOCUMENT_STARTS)
        index = {
            "format": FORMAT, "version": VERSION, "dtype": dtype, "tokens": writer.tokens, "documents": documents,
            "document_starts": DOCUMENT_STARTS, "vocab_size": vocab_size, "max_token_id": max_id, "eos_token_id": eos,
            "tokenizer": {"path": str(tokenizer_folder.resolve()), "class": type(tok).__name__,
                          "name_or_path": getattr(tok, "name_or_path", None)},
            "text_key": text_key, "sources": [str(p) for p in inputs],
            "shards": [{"file": name, "tokens": n} for name, n in writer.shards],
        }
        write_atomic(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())
        return index
    except BaseException:
        starts_file.close()
        for f in [*writer.written, starts_tmp]:
            f.unlink(missing_ok=True)
        raise
    finally:
        bar.close()


def write_random(out: Path, tokens: int, vocab_size: int, document_length: int = 1000, seed: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, eos_token_id: int | None = None) -> dict:
    """A shard folder of random tokens (benchmarks, tests): documents of document_length tokens ending in EOS.
    Written in chunks from a seeded generator, so a 1 GB set costs seconds and little memory."""
    import torch
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    dtype = dtype_for(vocab_size)
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = {"uint16": torch.int32, "uint32": torch.int64}[dtype]
    shards, written, chunk = [], 0, 10_000_000
    while written < tokens:
        n = min(shard_tokens, tokens - written)
        name = f"tokens_{len(shards):05d}.bin"
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            for at in range(0, n, chunk):
                m = min(chunk, n - at)
                ids = torch.randint(0, vocab_size - 1, (m,), generator=gen, dtype=torch_dtype)
                pos = torch.arange(written + at, written + at + m)
                ids[pos % document_length == document_length - 1] = eos
                f.write(ids.numpy().astype(f"<u{DTYPES[dtype][1]}").tobytes())
        os.replace(tmp, out / name)
        shards.append({"file": name, "tokens": n})
        written += n
    starts = array.array("q", range(0, tokens, document_length))
    write_atomic(out / DOCUMENT_STARTS, starts)
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype, "tokens": tokens, "documents": len(starts),
             "document_starts": DOCUMENT_STARTS, "vocab_size": vocab_size, "max_token_id": max(vocab_size - 2, eos),
             "eos_token_id": eos, "tokenizer": None, "text_key": None, "sources": ["random"], "shards": shards}
    write_atomic(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return index

