"""Training data checked at compile time: a run never starts on rows it cannot read.

A jsonl file holds one {"input_ids": [...]} object per line. Every problem names the file and the line; the
first few are reported together so one compile shows what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SpecError

MAX_REPORTED = 5


def _row_problem(line: str, vocab_size: int) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if isinstance(row, dict) and "messages" in row and "input_ids" not in row:
        return 'a chat row ("messages"): name the processor folder that reads it in train.processor'
    if not isinstance(row, dict) or "input_ids" not in row:
        return 'expected an object with an "input_ids" list'
    ids = row["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return '"input_ids" must be a list of integer token ids'
    if len(ids) < 2:  # one token predicts nothing: the loss would divide by zero labels
        return f'"input_ids" has {len(ids)} token(s); a row needs at least 2 (a token and the one it predicts)'
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        return f"token id {bad} is outside the vocabulary [0, {vocab_size})"
    return None


def check_jsonl(path: Path, vocab_size: int, source: str) -> None:
    """Raise one SpecError listing the first problems (file:line: what), or for an empty file."""
    where = f"{source}: key 'train.data'"
    problems, rows = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rows += 1
                problem = _row_problem(line, vocab_size)
                if problem:
                    problems.append(f"{path}:{number}: {problem}")
                    if len(problems) == MAX_REPORTED:
                        break
    except UnicodeDecodeError as e:
        raise SpecError(f"{where}: {path} is not UTF-8 text (byte {e.start})") from None
    if problems:
        raise SpecError(f"{where}: {len(problems)}{'+' if len(problems) == MAX_REPORTED else ''} bad row(s):\n  "
                        + "\n  ".join(problems))
    if rows == 0:
        raise SpecError(f"{where}: {path} holds no rows")


def check_shards(folder: Path, vocab_size: int, seq_len: int, global_batch_size: int, source: str) -> None:
    """A token-shard folder (omnigen/shards.py) a run can read: the index and every file it names intact, every
    token id inside the model's vocabulary, and at least one global batch of seq_len windows."""
    from .shards import DataError, read_index, windows

    where = f"{source}: key 'train.data'"
    try:
        index = read_index(folder)
    except DataError as e:
        raise SpecError(f"{where}: {e}") from None
    path = folder / "index.json"
    if index.max_token_id >= vocab_size:
        raise SpecError(f"{where}: {path}: token id {index.max_token_id} (the shards' largest) is outside the model's "
                        f"vocabulary [0, {vocab_size}); tokenized with {index.raw.get('tokenizer')!r}, "
                        f"vocab_size {index.vocab_size}")
    have = windows(index.tokens, seq_len)
    if have < global_batch_size:
        raise SpecError(f"{where}: {path}: {index.tokens} tokens give {have} window(s) of seq_len={seq_len} "
                        f"(+1 token for the last label), fewer than one global batch of {global_batch_size}")
