"""Stage 3: render the Plan into generated/<name>/ (train.py, launch.sh, sbatch.sh, plan.json, config.json).

The emitter decides nothing: templates read Plan fields. Output bytes are a pure function of the Plan
and the model config. train.py is parsed with libcst before anything is written, so a template bug is
an omnigen error, never a broken file on disk.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import libcst

from .errors import OmnigenError
from .hf import supports_sdpa
from .merge import Conflict, Merged, merge
from .model_graph import router_aux_loss
from .plan import Plan, hardware_provenance


@dataclass(frozen=True)
class Paths:
    """Files the script reads at run time, relative to the output folder (None when unused)."""
    data: str | None = None
    weights: str | None = None
    part_weights: dict[str, str] | None = None  # a composed model's: module path -> weights folder
    data_format: str | None = None  # None (synthetic), "jsonl", "chat" or "token_shards"
    processor: str | None = None  # the processor folder a chat manifest is read through


def _template_dir() -> str:
    # A source checkout's own templates first: an editable install elsewhere (or a second git worktree on
    # PYTHONPATH) must never render another tree's templates.
    checkout = Path(__file__).resolve().parent.parent / "templates"
    if (checkout / "sections").is_dir():
        return str(checkout)
    return str(resources.files("omnigen.templates"))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_template_dir()), keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    # mesh["dp_shard"] for one dim, mesh[("dp_replicate", "dp_shard")] for a 2-D submesh
    env.globals["mesh_dims"] = lambda dims: f'"{dims[0]}"' if len(dims) == 1 else "(" + ", ".join(f'"{d}"' for d in dims) + ")"
    return env


def canonical_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def digest(spec_dict: dict[str, Any], plan: Plan) -> str:
    blob = canonical_json({"spec": spec_dict, "plan": plan.to_dict()})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mesh_summary(plan: Plan) -> str:
    dims = " x ".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1)
    return f"{dims or 'single process'} (world size {plan.world_size})"


def sections(plan: Plan, context: dict[str, Any]) -> list[str]:
    """The sections of train.py (templates/sections/), in the script's order: the ones this plan needs."""
    parallel, sp, multimodal = context["parallel"], plan.sequence_parallel, context["multimodal"]
    wanted = {
        "header": True, "data": True, "packing": plan.train.get("packing", False), "distributed": True,
        "comm_bytes": context["explicit_comm"],
        "sequence_parallel": sp is not None,
        "expert_parallel": plan.expert_parallel is not None,
        # A composed model runs every part on every rank itself (OmniModel.place), so needs no IdleTowers.
        "idle_towers": multimodal and parallel and plan.parts is None,
        "router_aux": context["router_aux"] is not None,
        "model": True, "composite_model": plan.parts is not None,
        "codebook_decoders": plan.parts is not None and any(d["kind"] == "codebook_head" for d in plan.parts["decoders"]),
        "talker": "talker" in plan.inputs,  # Qwen2.5-Omni's talker beside its thinker (omnigen/talker.py)
        "activation_checkpointing": True,
        "fsdp": parallel, "single_process": not parallel,
        "loss": True, "chunked_loss": plan.train.get("loss_chunk_tokens", 0) > 0, "optimizer": True, "dumps": True,
        "checkpoints": True, "guards": True, "loop": True, "main": True,
    }
    return [name for name, used in wanted.items() if used]


HOOKS = ("setup", "batches", "micro_batch", "gradients", "step_record", "flags", "to_checkpoint", "from_checkpoint",
         "full_grad")


def render_train_py(env: jinja2.Environment, plan: Plan, context: dict[str, Any]) -> str:
    """train.py: every section's functions, joined. A section joins train() and its helpers only through hooks,
    macros named in HOOKS that other sections place (e.g. `setup` lines run in section order inside train()),
    and may provide a function in place of another section's default (`provides`)."""
    names = sections(plan, context)
    templates = [env.get_template(f"sections/{name}.py.j2") for name in names]
    # First pass: what each section provides and hooks, read off its macros (its body is rendered again below).
    modules = [t.make_module({**context, "hooks": lambda point: [], "provided": set(), "sections": names,
                              "setup_order": []}) for t in templates]
    provided = {f for m in modules for f in getattr(m, "provides", ())}

    def hooks(point: str) -> list[str]:
        assert point in HOOKS, point
        return [code for m in modules if hasattr(m, point) and (code := str(getattr(m, point)()).strip())]

    setup_order = [name.replace("_", " ") for name, m in zip(names, modules) if hasattr(m, "setup")]
    full = {**context, "hooks": hooks, "provided": provided, "sections": names, "setup_order": setup_order}
    bodies = [t.render(full).strip("\n") for t in templates]
    return "\n\n\n".join(body for body in bodies if body) + "\n"


def attn_implementation(model_class: str) -> str:
    """The attention the script builds the model with: SDPA, unless transformers says the class cannot run it
    (_supports_sdpa = False: attention sinks, compressed or indexed attention), then the model's own eager attention.
    (A class omnigen's own attention replaces under Ulysses or packing is refused there when SDPA cannot compute it.)"""
    return "sdpa" if supports_sdpa(model_class) else "eager"


def render(plan: Plan, config: dict[str, Any], spec_dict: dict[str, Any], paths: Paths = Paths()) -> dict[str, str]:
    """All output files as {name: text}."""
    env = environment()
    context = {
        "plan": plan, "inputs": plan.inputs, "digest": digest(spec_dict, plan), "mesh_summary": mesh_summary(plan),
        "parallel": plan.world_size > 1, "total_params": plan.total_params,
        "explicit_comm": plan.has_explicit_collectives,
        "multimodal": any(m in plan.inputs for m in ("image", "audio")),
        "ep": plan.expert_parallel,
        # a composed model's config.json holds its parts' configs: the foundation's says whether routers add a loss
        "router_aux": router_aux_loss(config["foundation"] if plan.parts is not None else config),
        # ep is carved out of dp_shard x sp (see build_expert_mesh), so it is not a dim of the world mesh
        "mesh_dict": "{" + ", ".join(f'"{k}": {v}' for k, v in plan.mesh.items() if k.startswith("dp") or k == "sp" and v > 1) + "}",
        "data_path": repr(paths.data), "weights_path": repr(paths.weights), "part_weights": paths.part_weights or {},
        "data_format": paths.data_format, "processor_path": repr(paths.processor),
        # where the prediction's figures come from: fitted on which machine, or uncalibrated and how to calibrate
        "hardware_provenance": hardware_provenance(plan),
        "attn_implementation": attn_implementation(plan.model_class),
    }
    try:
        train_py = render_train_py(env, plan, context)
        launch_sh = env.get_template("launch.sh.j2").render(**context)
        sbatch_sh = env.get_template("sbatch.sh.j2").render(**context)
    except jinja2.TemplateError as e:
        raise OmnigenError(f"internal error: a template failed to render for {plan.name}: {e}") from None
    try:
        libcst.parse_module(train_py)
    except libcst.ParserSyntaxError as e:
        raise OmnigenError(f"internal error: the train.py template rendered invalid Python for {plan.name}: {e}") from None
    return {"train.py": train_py, "launch.sh": launch_sh, "sbatch.sh": sbatch_sh, "plan.json": canonical_json(plan.to_dict()),
            "config.json": canonical_json(config)}


LAST_EMITTED = ".omnigen"  # <out>/.omnigen/ keeps what omnigen last wrote: the base of the three-way merge


def read_folder(out_dir: Path, names) -> dict[str, str]:
    return {name: (out_dir / name).read_text() for name in names if (out_dir / name).is_file()}


def merged(files: dict[str, str], out_dir: Path, resolutions: dict[str, str] | None = None) -> Merged:
    """What writing `files` into out_dir gives once the user's edits there are merged in (omnigen/merge.py)."""
    base = read_folder(out_dir / LAST_EMITTED, files)
    try:
        return merge(base, read_folder(out_dir, files), files, resolutions)
    except libcst.ParserSyntaxError as e:
        raise OmnigenError(f"{out_dir}: an edited file is not valid Python, so edits cannot be merged: {e}") from None


def diff(files: dict[str, str], out_dir: Path, old: dict[str, str] | None = None, old_label: str = "on disk") -> str:
    """Unified diff from `old` (default: what is on disk) to `files` ('' when identical)."""
    old = read_folder(out_dir, files) if old is None else old
    return "".join("".join(difflib.unified_diff(old.get(name, "").splitlines(True), text.splitlines(True),
                                                f"{out_dir / name} ({old_label})", f"{out_dir / name} (omnigen)"))
                   for name, text in sorted(files.items()) if old.get(name) != text)


class MergeConflict(OmnigenError):
    """Units both the user and omnigen changed: nothing is written until --ours / --theirs settles them."""

    def __init__(self, out_dir: Path, conflicts: list[Conflict]):
        names = ", ".join(f"{c.file}: {c.key}" for c in conflicts)
        shown = "".join(c.describe() for c in conflicts)
        unknown = "" if (out_dir / LAST_EMITTED).is_dir() else (
            f" ({out_dir / LAST_EMITTED} is missing, so omnigen cannot tell your edits from its own older output: "
            "every difference counts as both)")
        super().__init__(f"{out_dir}: you and omnigen both changed {names}{unknown}; nothing was written.\n{shown}"
                         "Keep yours with --ours UNIT, take omnigen's with --theirs UNIT (UNIT 'all' for every one)")
        self.conflicts = conflicts


def update(files: dict[str, str], out_dir: Path, resolutions: dict[str, str] | None = None) -> Merged:
    """Write `files` into out_dir, keeping the user's edits (raises MergeConflict, writing nothing, when both sides
    changed a unit), and record them as the new base."""
    result = merged(files, out_dir, resolutions)
    if result.conflicts:
        raise MergeConflict(out_dir, result.conflicts)
    write({**result.files, **{f"{LAST_EMITTED}/{name}": text for name, text in files.items()}}, out_dir)
    return result


class WriteError(OmnigenError):
    def __init__(self, folder: Path, reason: str):
        super().__init__(f"cannot write the output folder {folder}: {reason}")
        self.reason = reason


def write(files: dict[str, str], out_dir: Path) -> None:
    """Write every file through a temporary sibling and rename: never a half-written output folder."""
    staged = []
    try:
        for name, text in sorted(files.items()):
            folder = (out_dir / name).parent
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{Path(name).name}.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755 if name.endswith(".sh") else 0o644)
            staged.append((tmp, out_dir / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as e:  # a file in the way, a read-only folder, a full disk: the user's to fix
        raise WriteError(out_dir, e.strerror or str(e)) from None
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
