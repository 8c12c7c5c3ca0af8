"""Chat manifests checked at compile time by the generated script's own reader.

A chat manifest (train.data: a .jsonl, train.processor: a folder AutoProcessor loads) is read in the generated
script by templates/chat_data.py.j2. The check renders that same reader for the model's input recipe, runs it on
every row (the processor, the decoders, the labels, the fit into seq_len) and reports each row it refuses by file
and line: what the check accepts is exactly what the run can read.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import torch

from .errors import SpecError

MAX_REPORTED = 5
PRELUDE = "import json\nimport os\nimport re\n\nimport torch\nimport transformers\n\nIGNORE_INDEX = -100\nSEQ_LEN = {seq_len}\nSEED = 0\n"


def reader_source(inputs: dict[str, Any], long_samples: str, processor_path: str) -> str:
    """The data section the generated script holds for a chat manifest (data.py.j2, shuffle.py.j2, then chat_data.py.j2)."""
    from .emit import environment

    env = environment()
    context = {"inputs": inputs, "plan": {"train": {"long_samples": long_samples}}, "processor_path": repr(processor_path)}
    return "\n\n".join(env.get_template(name).render(**context) for name in ("data.py.j2", "shuffle.py.j2", "chat_data.py.j2"))


def reader_namespace(inputs: dict[str, Any], long_samples: str, processor_path: str) -> dict[str, Any]:
    """The reader's functions and classes (ChatManifest, ManifestError, ...), as the generated script defines them."""
    source = PRELUDE.format(seq_len=inputs["seq_len"]) + reader_source(inputs, long_samples, processor_path)
    namespace: dict[str, Any] = {"__name__": "omnigen_chat_reader"}
    exec(compile(source, "<chat_data.py.j2>", "exec"), namespace)  # noqa: S102 - our own rendered template
    return namespace


def load_manifest(namespace: dict[str, Any], manifest: Path, processor: Path, source: str) -> Any:
    """The reader on `manifest`, or a SpecError naming train.processor when transformers cannot load the folder."""
    where = f"{source}: key 'train.processor'"
    try:
        with redirect_stderr(io.StringIO()):  # transformers' backend warnings are not the user's business here
            return namespace["ChatManifest"](str(manifest), str(processor))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        hint = ""
        if "video" in str(e).lower() or "torchvision" in str(e).lower():
            hint = (" (processors with a video processor, such as Qwen2-VL's, need torchvision in transformers "
                    f"{_transformers_version()}: install the torchvision build that matches your torch)")
        raise SpecError(f"{where}: transformers cannot load a processor from {processor}: {reason}{hint}") from None


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def check_chat_manifest(manifest: Path, processor: Path, inputs: dict[str, Any], long_samples: str,
                        source: str) -> None:
    """Run the generated reader over every row: one SpecError listing the first rows it refuses (file:line: why),
    or saying that no row fits seq_len."""
    namespace = reader_namespace(inputs, long_samples, os.fspath(processor))
    reader = load_manifest(namespace, manifest, processor, source)
    where = f"{source}: key 'train.data'"
    if len(reader) == 0:
        raise SpecError(f"{where}: {manifest} holds no rows")
    problems, fitting = [], 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one row's feature extraction is small: threads cost more than they save (7x on audio)
    try:
        for n in range(len(reader)):
            problem, fits = _row_problem(reader, n, namespace["ManifestError"])
            fitting += fits
            if problem:
                problems.append(f"{manifest}:{reader.rows[n][1]}: {problem}")
                if len(problems) == MAX_REPORTED:
                    break
    finally:
        torch.set_num_threads(threads)
    if problems:
        more = "+" if len(problems) == MAX_REPORTED else ""
        raise SpecError(f"{where}: {len(problems)}{more} bad row(s):\n  " + "\n  ".join(problems))
    if fitting == 0:
        raise SpecError(f"{where}: every row of {manifest} is longer than train.seq_len={inputs['seq_len']}, and "
                        "train.long_samples: drop drops them all (raise seq_len)")


def _row_problem(reader: Any, n: int, manifest_error: type) -> tuple[str | None, bool]:
    """(why row n cannot train or None, whether it fits seq_len untruncated)."""
    try:
        with redirect_stderr(io.StringIO()):
            encoded = reader.encode(n)
            fits = len(encoded["input_ids"]) <= reader.seq_len
            if fits or reader.long_samples == "truncate":
                reader.fit(encoded)
        return None, fits
    except manifest_error as e:
        return str(e), False
    except Exception as e:  # noqa: BLE001 - the processor refusing a row is the row's problem, named by line
        return f"the processor refuses it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False
