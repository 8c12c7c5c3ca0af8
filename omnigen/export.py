"""`omnigen export`: a generated script's DCP checkpoint → a folder `transformers.<ModelClass>.from_pretrained` loads.

The checkpoint holds the model under HF parameter names with the shapes of the model without EP (the script saves
expert tensors whole), so one process reads it without a process group: build the model from the compiled
config.json, load the checkpoint's `model.*` entries into it in place, and let transformers' own save_pretrained
write safetensors + config.json (tied weights and the on-disk layout of experts are its business, not ours). A model
composed from parts comes out part by part, as the script's own --export-hf writes it (compose.save_parts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OmnigenError

METADATA = ".metadata"  # DCP writes it last: a folder holding it is a complete checkpoint
STEP_FOLDER = re.compile(r"step_\d{8}")
MODEL_PREFIX = "model."  # save_checkpoint's {"model": ..., "optim": ..., ...}, flattened by DCP
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(OmnigenError):
    """The checkpoint, the compiled folder or the output folder does not allow an export."""


@dataclass(frozen=True)
class Exported:
    checkpoint: Path
    chosen_because: str  # how the checkpoint folder was picked from what the user named
    model_class: str
    tensors: int
    parameters: int
    steps_done: int | None
    checkpoint_dtypes: tuple[str, ...]
    dtype: str


# --- the checkpoint ------------------------------------------------------------------------------------------

def find_checkpoint(path: Path) -> tuple[Path, str]:
    """The DCP folder to read: `path` itself when it holds .metadata (a step folder, or a --checkpoint-dir folder
    of the single-checkpoint layout), else the newest complete step_NNNNNNNN folder inside the run folder `path`."""
    if not path.exists():
        raise ExportError(f"checkpoint {path}: no such file or folder")
    if not path.is_dir():
        raise ExportError(f"checkpoint {path}: a file, not a DCP checkpoint folder (give a folder holding "
                          f"{METADATA}, a step_NNNNNNNN folder, or a run's --checkpoint-dir folder)")
    if (path / METADATA).is_file():
        return path, "named"
    if STEP_FOLDER.fullmatch(path.name):
        raise ExportError(f"checkpoint {path}: an incomplete step folder (no {METADATA}: its save was interrupted "
                          "or is still running); name an earlier step folder or the run folder")
    steps = complete_step_folders(path)
    if not steps:
        raise ExportError(f"checkpoint {path}: no complete checkpoint in it (neither {METADATA} nor a "
                          f"step_NNNNNNNN folder holding {METADATA})")
    return steps[-1], f"the newest of {len(steps)} complete step folder(s) in {path}"


def complete_step_folders(run: Path) -> list[Path]:
    """step_NNNNNNNN folders holding .metadata, oldest first (8 zero-padded digits sort like the numbers)."""
    return sorted(p for p in run.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / METADATA).is_file())


def read_model_shapes(folder: Path) -> tuple[dict[str, torch.Size], dict[str, torch.dtype], bool]:
    """The checkpoint's model entries, {HF parameter name: shape} and dtypes, from its .metadata alone (no tensor
    is read), and whether it records steps_done."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
        entries = metadata.state_dict_metadata
    except Exception as e:  # a stray file named .metadata, a torn write: not ours to parse further
        raise ExportError(f"checkpoint {folder}: {METADATA} is not a DCP checkpoint's ({type(e).__name__}: {e})") \
            from None
    model = {key[len(MODEL_PREFIX):]: meta for key, meta in entries.items() if key.startswith(MODEL_PREFIX)}
    if not model:
        held = ", ".join(sorted(entries)[:5]) or "nothing"
        raise ExportError(f"checkpoint {folder}: no model.* entries (holds {held}); export reads checkpoints "
                          "written by a generated train.py's --checkpoint-dir")
    not_tensors = sorted(key for key, meta in model.items() if not isinstance(meta, TensorStorageMetadata))
    if not_tensors:
        raise ExportError(f"checkpoint {folder}: model entries that are not tensors: {', '.join(not_tensors[:5])}")
    shapes = {key: meta.size for key, meta in model.items()}
    dtypes = {key: meta.properties.dtype for key, meta in model.items()}
    return shapes, dtypes, "steps_done" in entries


# --- the model -------------------------------------------------------------------------------------------------

def read_compiled(source: Path, sets: tuple[str, ...] = ()) -> tuple[str, dict, dict | None]:
    """(model class name, config dict, parts or None) from an `omnigen compile` output folder (plan.json,
    config.json), or from a spec compiled in memory. parts: plan.json's description of a model composed from parts."""
    if not source.exists():
        raise ExportError(f"--from {source}: no such file or folder (give the compiled output folder, e.g. "
                          "generated/<name>/, or the spec)")
    if source.is_file():
        from .pipeline import plan as compile_spec
        from .spec import load_spec
        compiled = compile_spec(load_spec(source, sets))
        return compiled.plan.model_class, compiled.config, compiled.plan.parts
    if sets:
        raise ExportError(f"--set applies to a spec; --from {source} is a compiled folder, whose config.json is used "
                          "as written")
    files = {}
    for name in ("plan.json", "config.json"):
        try:
            files[name] = json.loads((source / name).read_text())
        except FileNotFoundError:
            raise ExportError(f"--from {source}: no {name} (give the folder `omnigen compile` wrote, e.g. "
                              "generated/<name>/, or the spec)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"--from {source}: {name} is not valid JSON: {e}") from None
    model_class = files["plan.json"].get("model_class") if isinstance(files["plan.json"], dict) else None
    if not isinstance(model_class, str):
        raise ExportError(f"--from {source}: plan.json has no model_class")
    return model_class, files["config.json"], files["plan.json"].get("parts")


def build_model(model_class: str, config: dict, parts: dict | None = None):
    """The HF model in fp32 like the script builds it (or its OmniModel, from parts), weights left unset (the
    checkpoint fills every one); buffers computed in __init__ (rotary inv_freq) come out as transformers makes them."""
    import transformers
    from transformers.initialization import no_init_weights

    if parts is not None:
        from .compose import OmniModel, parts_from_compiled
        with no_init_weights():
            model = OmniModel(parts_from_compiled(parts, config))
        model.foundation.tie_weights()
        return model.eval()
    cls = getattr(transformers, model_class, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ExportError(f"plan.json model_class {model_class!r} is not a transformers model class in this "
                          f"transformers version ({transformers.__version__})")
    with tempfile.TemporaryDirectory() as folder:  # read the config the way the script does: AutoConfig on a folder
        Path(folder, "config.json").write_text(json.dumps(config))
        hf_config = transformers.AutoConfig.from_pretrained(folder)
    with no_init_weights():
        model = cls._from_config(hf_config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights skips the tying post_init would do
    return model.eval()


def load_targets(model, shapes: dict[str, torch.Size], folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors to fill, keyed like the checkpoint. Every key and shape must match, except that tied
    weights (one tensor under several names) need only one of their names in the checkpoint."""
    state = model.state_dict()
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in shapes for n in names)]
    unexpected = sorted(set(shapes) - set(state))
    wrong = [f"{k} {tuple(shapes[k])} (model {tuple(state[k].shape)})" for k in sorted(set(shapes) & set(state))
             if tuple(shapes[k]) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        problems = [f"{label} {len(keys)}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise ExportError(f"checkpoint {folder}: its model entries do not match {type(model).__name__} "
                          f"({'; '.join(problems)}); was it written by a script compiled from this --from?")
    return {name: state[name] for name in shapes}


def load_model_entries(folder: Path, targets: dict[str, torch.Tensor], has_steps: bool) -> int | None:
    """Read the checkpoint's model entries into `targets` in place (one process, no process group); returns the
    steps_done it records."""
    import torch.distributed.checkpoint as dcp

    state = {"model": targets}
    if has_steps:
        state["steps_done"] = torch.tensor(0)
    with warnings.catch_warnings():  # one process, no process group: exactly what we mean
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return int(state["steps_done"]) if has_steps else None


# --- the output folder -----------------------------------------------------------------------------------------

def check_out_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output folder {out}: exists and is not empty (export writes a new folder; remove it or "
                          "name another)")


def write_pretrained(model, out: Path) -> None:
    """save_pretrained (a composed model: save_parts, one folder per part) into a temporary sibling, renamed to `out`
    at the end: never a half-written folder."""
    from .compose import OmniModel, save_parts

    check_out_free(out)
    out = out.resolve()  # "." or "hf/" have a parent to stage in and a name
    staged = out.parent / f".{out.name}.partial-{os.getpid()}"  # mkdir, not mkdtemp: the umask's mode, not 0700
    try:
        shutil.rmtree(staged, ignore_errors=True)  # left by a killed export that had this pid
        staged.mkdir(parents=True)
    except OSError as e:
        raise ExportError(f"output folder {out}: {e.strerror or e}") from None
    try:
        if isinstance(model, OmniModel):
            save_parts(model, staged)
        else:
            model.save_pretrained(staged)  # transformers 5 writes safetensors only
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staged, out)
    except OSError as e:
        raise ExportError(f"output folder {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# --- the whole export ------------------------------------------------------------------------------------------

def export(checkpoint: Path, out: Path, source: Path, sets: tuple[str, ...] = (), dtype: str = "float32") -> Exported:
    """Write `out` (safetensors + config.json) from the newest model state under `checkpoint`, for the model
    compiled in `source` (a compiled folder or a spec). Refuses, writing nothing, when anything does not fit."""
    check_out_free(out)  # before the slow part
    folder, chosen_because = find_checkpoint(checkpoint)
    shapes, checkpoint_dtypes, has_steps = read_model_shapes(folder)
    model_class, config, parts = read_compiled(source, sets)
    model = build_model(model_class, config, parts)
    steps_done = load_model_entries(folder, load_targets(model, shapes, folder), has_steps)
    model.to(DTYPES[dtype])
    write_pretrained(model, out)
    read_dtypes = tuple(sorted({str(d).removeprefix("torch.") for d in checkpoint_dtypes.values()}))
    return Exported(folder, chosen_because, model_class, tensors=len(shapes),
                    parameters=sum(p.numel() for p in model.parameters()), steps_done=steps_done,
                    checkpoint_dtypes=read_dtypes, dtype=dtype)


def describe(result: Exported, out: Path) -> str:
    n = result.steps_done
    steps = "" if n is None else f", {n} step{'' if n == 1 else 's'} done"
    how = "" if result.chosen_because == "named" else f" ({result.chosen_because})"
    return (f"read {result.checkpoint}{how}{steps}: {result.tensors} model tensors "
            f"({'/'.join(result.checkpoint_dtypes)})\n"
            f"wrote {out}/: {result.model_class}, {result.parameters:,} parameters in {result.dtype} "
            + (f"(load with transformers.{result.model_class}.from_pretrained)" if result.model_class != "OmniModel" else
               "(one from_pretrained folder per part; projectors.pt and decoders.pt hold the projectors and codebook "
               "decoders)"))
