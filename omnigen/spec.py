"""Stage 0: read spec.yaml (+ --set overrides) into a frozen, validated Spec.

Every problem becomes one SpecError naming the file, the key and what is allowed. Unknown keys are
errors with a did-you-mean, never silently ignored.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from .errors import SpecError

Auto = Literal["auto"]
# Finite floats only: `lr: .inf` or `.nan` would train nothing and say nothing.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
MAX_NAME_LENGTH = 100
MAX_SEED = 2**63 - 1  # torch.manual_seed's range


class _Strict(BaseModel):
    # strict: `micro_batch_size: true` or `seq_len: "128"` are refused, not coerced to 1 and 128.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class PartParallel(_Strict):
    """One part's own placement; anything "auto" is the planner's to choose."""
    placement: Literal["auto", "fsdp", "replicate"] = "auto"
    activation_checkpointing: Literal["auto", "none", "full", "selective"] = "auto"


class EncoderPart(_Strict):
    """An encoder (lm_encode): one modality's HF encoder model, built from its config, and a projector into the
    foundation's hidden size. Its features replace the foundation's embeddings at the placeholder token."""
    modality: Literal["image", "audio"]
    config: str                                   # an encoder's config.json (SiglipVisionConfig, CLIPVisionConfig, ...)
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    placeholder_token_id: int = Field(ge=0)       # the foundation's token id that marks this modality's positions
    tokens_per_item: PositiveInt | None = None    # optional check: the encoder's output length per item
    weights: str | None = None                    # a folder of *.safetensors of this encoder model
    trainable: bool = True                        # false: the encoder is frozen (its projector still trains)
    parallel: PartParallel = PartParallel()


class FoundationPart(_Strict):
    """The LLM every encoder feeds: a causal LM class transformers ships (dense or MoE)."""
    config: str
    class_name: str | None = Field(None, alias="class")  # default: the config's architectures[0]
    weights: str | None = None
    trainable: bool = True
    parallel: PartParallel = PartParallel()


class DecoderPart(_Strict):
    """An output head on the foundation's hidden states, and its weight in the objective.

    text: the foundation's own lm_head. image_tokens, audio_codec: a codebook head. The foundation predicts the
    discrete tokens of a VQ tokenizer at the positions of an item being generated (an image: Janus/Emu3/Chameleon
    style; a clip: an audio codec's frames), and the codebook embeddings are fed back as the input at those
    positions. A codec with several codebooks (residual VQ) has `codebooks` tokens per position: their embeddings
    are summed, and each codebook has its own head."""
    modality: Literal["text", "image_tokens", "audio_codec"]
    kind: Literal["lm_head", "codebook_head"] | None = None   # default: lm_head for text, codebook_head otherwise
    loss_weight: FiniteFloat = Field(1.0, gt=0.0)
    codebook_size: PositiveInt | None = None      # codebook_head: entries of the VQ codebook (its head's outputs)
    placeholder_token_id: int | None = Field(None, ge=0)  # codebook_head: the foundation's token id at its positions
    tokens_per_item: PositiveInt | None = None    # codebook_head: positions per generated item (image, clip)
    codebooks: PositiveInt = 1                    # codebook_head: tokens per position, one from each codebook

    @model_validator(mode="after")
    def _kind_of_modality(self) -> "DecoderPart":
        natural = "lm_head" if self.modality == "text" else "codebook_head"
        if self.kind is None:
            object.__setattr__(self, "kind", natural)
        elif self.kind != natural:
            raise ValueError(f"the {self.modality} decoder is a {natural} (got kind: {self.kind})")
        given = [k for k in CODEBOOK_KEYS if getattr(self, k) is not None]
        given += ["codebooks"] if self.codebooks != 1 else []
        if natural == "lm_head" and given:
            raise ValueError(f"{', '.join(given)}: the text decoder is the foundation's lm_head, sized by its config")
        missing = [k for k in CODEBOOK_KEYS if getattr(self, k) is None]
        if natural == "codebook_head" and missing:
            raise ValueError(f"the {self.modality} decoder needs {', '.join(missing)}")
        return self


CODEBOOK_KEYS = ("codebook_size", "placeholder_token_id", "tokens_per_item")


class PartsSpec(_Strict):
    """A model composed from separately released parts: encoders -> projectors -> foundation -> decoders."""
    encoders: tuple[EncoderPart, ...] = Field((), strict=False)
    foundation: FoundationPart
    decoders: tuple[DecoderPart, ...] = Field((DecoderPart(modality="text"),), strict=False)

    @model_validator(mode="after")
    def _one_encoder_per_modality(self) -> "PartsSpec":
        seen = [e.modality for e in self.encoders]
        twice = sorted({m for m in seen if seen.count(m) > 1})
        if twice:
            raise ValueError(f"two encoders for {', '.join(twice)}: one encoder per modality")
        ids = [e.placeholder_token_id for e in self.encoders]
        if len(set(ids)) != len(ids):
            raise ValueError("two encoders share a placeholder_token_id: each modality needs its own")
        outputs = [d.modality for d in self.decoders]
        if outputs.count("text") != 1:
            raise ValueError("decoders: exactly one text decoder (the foundation's lm_head) is needed")
        twice = sorted({m for m in outputs if outputs.count(m) > 1})
        if twice:
            raise ValueError(f"two decoders for {', '.join(twice)}: one decoder per modality")
        ids += [d.placeholder_token_id for d in self.decoders if d.placeholder_token_id is not None]
        if len(set(ids)) != len(ids):
            raise ValueError("an encoder and a decoder share a placeholder_token_id: each modality needs its own")
        return self


# Module paths of the parts in the composed model (OmniModel): what a part's trainable: false freezes.
def encoder_path(modality: str) -> str:
    return f"encoders.{modality}"


FOUNDATION_PATH = "foundation"


def decoder_path(modality: str) -> str:
    """A codebook decoder's module (its head and its codebook embedding); the text decoder is foundation.lm_head."""
    return f"decoders.{modality}"


class TalkerSpec(_Strict):
    """Qwen2.5-Omni's talker, trained beside its thinker (model.class Qwen2_5OmniForConditionalGeneration with
    enable_audio_output): it reads the thinker's last hidden states plus input embeddings and predicts codec tokens.
    Each synthetic sample's last reply_tokens positions are the thinker's reply, the text the talker speaks in
    codec_tokens steps (the last one the codec's end token)."""
    loss_weight: FiniteFloat = Field(1.0, gt=0.0)  # the speech loss's weight in the objective (the text loss has 1)
    reply_tokens: PositiveInt = 16                 # the sample's last positions that are the thinker's reply
    codec_tokens: PositiveInt = 32                 # codec steps per sample: the talker's targets


class ModelSpec(_Strict):
    config: str | None = None
    class_name: str | None = Field(None, alias="class")
    overrides: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    # Modules kept frozen (no gradients, no optimizer state): dotted module-path prefixes.
    freeze: tuple[str, ...] = Field((), strict=False)  # a YAML list
    # Or a model composed from parts (README: "Composing a model from parts"): then config, class, overrides and
    # weights belong to the parts.
    parts: PartsSpec | None = None
    # Qwen2.5-Omni's talker (README: "Qwen2.5-Omni's talker"): with class Qwen2_5OmniForConditionalGeneration whose
    # config enables audio output; omitted there, these defaults apply.
    talker: TalkerSpec | None = None

    @model_validator(mode="after")
    def _one_model(self) -> "ModelSpec":
        if self.parts is None and self.config is None:
            raise ValueError("give either config (one HF model) or parts (encoders, foundation, decoders)")
        if self.parts is not None and self.talker is not None:
            raise ValueError("talker belongs to a whole Qwen2_5OmniForConditionalGeneration (model.config and "
                             "model.class), not to a model composed from parts")
        if self.parts is not None:
            given = [k for k, v in (("config", self.config), ("class", self.class_name), ("weights", self.weights),
                                    ("overrides", self.overrides or None)) if v is not None]
            if given:
                raise ValueError(f"with parts, {', '.join(given)} belong(s) to each part "
                                 "(model.parts.foundation.config, model.parts.encoders[i].config, ...)")
            # trainable: false is a freeze of the part's module path (the planner and the script read model.freeze)
            frozen = [encoder_path(e.modality) for e in self.parts.encoders if not e.trainable]
            frozen += [FOUNDATION_PATH] if not self.parts.foundation.trainable else []
            object.__setattr__(self, "freeze", tuple(dict.fromkeys((*self.freeze, *frozen))))
        return self

    def part_parallel(self, module_path: str) -> PartParallel | None:
        """The parallel block of the part holding `module_path` (None for a whole-model spec)."""
        if self.parts is None:
            return None
        if module_path == FOUNDATION_PATH or module_path.startswith(FOUNDATION_PATH + "."):
            return self.parts.foundation.parallel
        return next((e.parallel for e in self.parts.encoders
                     if module_path == encoder_path(e.modality) or module_path.startswith(encoder_path(e.modality) + ".")),
                    None)


class ClusterSpec(_Strict):
    nodes: PositiveInt = 1
    procs_per_node: PositiveInt = 2
    device: Literal["cpu", "cuda"] = "cpu"
    hardware: Union[str, dict[str, Any]] = "cpu"

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class SyntheticSpec(_Strict):
    """Synthetic data: sample i carries an image iff i % image_every == 0 (likewise audio, image-token outputs for a
    model with an image_tokens decoder, and video where video_every > 0: videos are made only when asked for, for
    patch-grid vision towers)."""
    image_every: PositiveInt = 1
    audio_every: PositiveInt = 1
    video_every: Annotated[int, Field(ge=0)] = 0
    image_tokens_every: PositiveInt = 1  # sample i ends in an image to generate iff i % image_tokens_every == 0
    audio_codec_every: PositiveInt = 1   # likewise a clip to generate (a model with an audio_codec decoder)


class TrainSpec(_Strict):
    seq_len: PositiveInt = 128
    micro_batch_size: PositiveInt = 1
    global_batch_size: PositiveInt = 2
    steps: PositiveInt = 4
    lr: FiniteFloat = Field(1.0e-3, gt=0.0)
    weight_decay: FiniteFloat = Field(0.0, ge=0.0)
    grad_clip: FiniteFloat = Field(1.0, ge=0.0)  # max global grad norm; 0 disables clipping
    seed: int = Field(0, ge=0, le=MAX_SEED)
    precision: Literal["fp32", "bf16"] = "fp32"
    data: str = "synthetic"  # or a .jsonl file of {"input_ids": [...]} rows, or a token-shard folder
    # A folder AutoProcessor loads (tokenizer, chat template, image/audio processors): train.data is then a chat
    # manifest, {"messages": [...]} rows in transformers' chat format (README: "Image, audio and chat data").
    processor: str | None = None
    # A chat-manifest row longer than seq_len: "truncate" cuts the text past seq_len (never an image or audio clip),
    # "drop" skips the row (its sample is the next row that fits).
    long_samples: Literal["truncate", "drop"] = "truncate"
    pack_documents: PositiveInt = 1  # synthetic documents packed into each row (text-only models)
    # The loss in chunks of this many tokens (of one rank's micro-batch): the LM head and cross entropy run a chunk at
    # a time and again in backward, so logits never exist for the whole sequence. 0: the whole sequence at once;
    # auto: the planner's choice (whole while it is the fastest plan that fits).
    loss_chunk_tokens: Union[NonNegativeInt, Auto] = "auto"
    # Real data packed (text-only models): each sample keeps its own length (at most seq_len), samples are packed
    # whole into rows of micro_batch_tokens tokens (default micro_batch_size x seq_len), one row per micro-batch,
    # documents kept apart (README: "Packing and token budgets").
    packing: bool = False
    micro_batch_tokens: Union[PositiveInt, None] = None
    synthetic: SyntheticSpec = SyntheticSpec()
    # Learning-rate schedule: linear warmup over warmup_steps, then constant, or cosine / linear decay to min_lr at
    # `steps`. Defaults keep the constant lr and torch's AdamW betas and eps: a spec that sets none trains as before.
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr: FiniteFloat = Field(0.0, ge=0.0)
    betas: list[FiniteFloat] = Field([0.9, 0.999], min_length=2, max_length=2)
    eps: FiniteFloat = Field(1.0e-8, gt=0.0)
    # Under --checkpoint-dir: a checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT); the newest
    # keep_checkpoints are kept.
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: PositiveInt = 3

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each AdamW beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _token_budget_fits(self) -> "TrainSpec":
        if self.micro_batch_tokens is not None and not self.packing:
            raise ValueError("micro_batch_tokens makes micro-batches by a token budget, which needs packing: true")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.seq_len:
            raise ValueError(f"micro_batch_tokens ({self.micro_batch_tokens}) must hold a whole sample of up to "
                             f"seq_len ({self.seq_len}) tokens")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> "TrainSpec":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self


class ParallelSpec(_Strict):
    dp_replicate: Union[PositiveInt, Auto] = "auto"
    dp_shard: Union[PositiveInt, Auto] = "auto"
    sp: Union[PositiveInt, Auto] = "auto"
    ep: Union[PositiveInt, Auto] = "auto"
    activation_checkpointing: Literal["auto", "none", "full", "selective"] = "auto"
    # Share of device memory no plan may use: the caching allocator's fragmentation and what the memory model
    # leaves out. A plan predicted at 99% of the device would not survive its first long batch.
    memory_headroom: FiniteFloat = Field(0.05, ge=0.0, lt=1.0)


class Spec(_Strict):
    name: str
    model: ModelSpec
    cluster: ClusterSpec = ClusterSpec()
    train: TrainSpec = TrainSpec()
    parallel: ParallelSpec = ParallelSpec()
    # Where the spec came from: relative paths inside it resolve against this folder.
    source: str = Field("<memory>", exclude=True)
    base_dir: str = Field(".", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _parallel_auto(cls, raw: Any) -> Any:
        """`parallel: auto` is every parallel key left to the planner."""
        if isinstance(raw, dict) and raw.get("parallel") == "auto":
            return {**raw, "parallel": {}}
        return raw

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        # The output goes to generated/<name>/: '.', '..', separators or a hidden name would land elsewhere.
        if (not v or len(v) > MAX_NAME_LENGTH or v.startswith(".")
                or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in v)):
            raise ValueError(f"must be a plain folder name of at most {MAX_NAME_LENGTH} characters: ASCII letters, "
                             "digits, '-', '_' or '.', not starting with '.'")
        return v

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def config_path(self) -> Path:
        p = self.resolve(self.model.config)
        return p / "config.json" if p.is_dir() else p

    def to_dict(self) -> dict[str, Any]:
        raw = self.model_dump(mode="json", by_alias=True)
        if raw["model"]["parts"] is None:  # a whole-model spec reads (and hashes) as it did before parts existed
            del raw["model"]["parts"]
        if raw["model"]["talker"] is None:  # likewise for specs without a talker
            del raw["model"]["talker"]
        for output in ("image_tokens_every", "audio_codec_every"):  # likewise for specs without generated outputs
            if raw["train"]["synthetic"][output] == 1:
                del raw["train"]["synthetic"][output]
        return raw


def load_spec(path: str | Path, sets: tuple[str, ...] | list[str] = ()) -> Spec:
    """Read, override and validate a spec file; raise SpecError on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}): a spec is a UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping with keys {sorted(_fields(Spec))}")
    for item in sets:
        _apply_set(raw, item, path)
    return spec_from_dict(raw, source=str(path), base_dir=str(path.parent.resolve()))


def spec_from_dict(raw: dict[str, Any], source: str = "<memory>", base_dir: str = ".") -> Spec:
    try:
        spec = Spec.model_validate({**raw, "source": source, "base_dir": base_dir})
    except ValidationError as e:
        raise SpecError(_describe(e, source)) from None
    _check_files(spec)
    return spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _apply_set(raw: dict[str, Any], item: str, path: Path) -> None:
    """`--set train.seq_len=256`: the value is parsed as YAML (numbers, lists, null, auto stay typed)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"{path}: --set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.seq_len=256")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{path}: --set {item!r}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: --set {item!r}: the value is not a YAML scalar or list: "
                        f"{str(e).splitlines()[0]}") from None


def _fields(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items() if not f.exclude]


_SECTIONS: dict[str, type[BaseModel]] = {
    "": Spec, "model": ModelSpec, "cluster": ClusterSpec, "train": TrainSpec, "parallel": ParallelSpec,
    "train.synthetic": SyntheticSpec, "model.parts": PartsSpec, "model.parts.encoders": EncoderPart,
    "model.parts.foundation": FoundationPart, "model.talker": TalkerSpec, "model.parts.decoders": DecoderPart,
    "model.parts.encoders.parallel": PartParallel, "model.parts.foundation.parallel": PartParallel,
}


def _describe(error: ValidationError, source: str) -> str:
    """One line per problem key: file, dotted key, what is wrong, what is allowed."""
    lines: dict[str, list[str]] = {}
    for err in error.errors():
        # Union members add their type to the location ("int", "literal['auto']"): keep only real keys.
        loc = [str(p) for p in err["loc"] if not _is_type_tag(str(p))]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = ".".join(p for p in loc[:-1] if not p.isdigit())  # list items: model.parts.encoders.0
            allowed = _fields(_SECTIONS.get(section, Spec))
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines[f"{source}: unknown key '{key}'{hint} Allowed keys here: {', '.join(allowed)}"] = []
        elif err["type"] == "missing":
            lines[f"{source}: missing required key '{key}'"] = []
        else:
            got = json.dumps(err.get("input"), default=str)
            lines.setdefault(f"{source}: key '{key}' (got {got})", []).append(err["msg"])
    return "\n".join(head.replace(" (got", ": " + "; or ".join(msgs) + " (got", 1) if msgs else head
                     for head, msgs in lines.items())


def _is_type_tag(part: str) -> bool:
    return part in ("int", "str", "float", "bool") or part.startswith(("literal[", "constrained-", "dict[", "function-"))


def _check_part_files(spec: Spec) -> None:
    parts = spec.model.parts
    named = [(f"model.parts.encoders[{i}]", e) for i, e in enumerate(parts.encoders)]
    for key, part in [*named, ("model.parts.foundation", parts.foundation)]:
        cfg = spec.resolve(part.config)
        cfg = cfg / "config.json" if cfg.is_dir() else cfg
        if not cfg.is_file():
            raise SpecError(f"{spec.source}: key '{key}.config': no config.json at {cfg} "
                            "(give a folder holding config.json or the path of a config.json)")
        if part.weights is not None:
            w = spec.resolve(part.weights)
            if not w.is_dir() or not any(w.glob("*.safetensors")):
                raise SpecError(f"{spec.source}: key '{key}.weights': no *.safetensors files in {w}")


def _check_files(spec: Spec) -> None:
    if spec.model.parts is not None:
        _check_part_files(spec)
        _check_data_files(spec)
        return
    cfg = spec.config_path()
    if not cfg.is_file():
        raise SpecError(f"{spec.source}: key 'model.config': no config.json at {cfg} "
                        "(give a folder holding config.json or the path of a config.json)")
    if spec.model.weights is not None:
        w = spec.resolve(spec.model.weights)
        if not w.is_dir() or not any(w.glob("*.safetensors")):
            raise SpecError(f"{spec.source}: key 'model.weights': no *.safetensors files in {w}")
    _check_data_files(spec)


def _check_data_files(spec: Spec) -> None:
    if spec.train.processor is not None:
        _check_chat_files(spec)
    elif spec.train.long_samples != "truncate":
        raise SpecError(f"{spec.source}: key 'train.long_samples': applies to chat manifests (train.processor); "
                        f"other data is cut to seq_len")
    if spec.train.data != "synthetic":
        d = spec.resolve(spec.train.data)
        if not (d.is_file() and d.suffix == ".jsonl" or d.is_dir()):
            raise SpecError(f"{spec.source}: key 'train.data': expected 'synthetic', an existing .jsonl file or a "
                            f"token-shard folder (omnigen data tokenize), got {spec.train.data!r}")
    mb, gb = spec.train.micro_batch_size, spec.train.global_batch_size
    if gb % mb:
        raise SpecError(f"{spec.source}: key 'train.global_batch_size': {gb} is not a multiple of "
                        f"train.micro_batch_size={mb}")


def _check_chat_files(spec: Spec) -> None:
    """train.processor names a folder, and train.data the .jsonl chat manifest it reads."""
    p = spec.resolve(spec.train.processor)
    if not p.is_dir():
        raise SpecError(f"{spec.source}: key 'train.processor': no folder {p} (a processor folder as save_pretrained "
                        "writes it: tokenizer files, chat_template.jinja, the image/audio processor's config)")
    d = spec.resolve(spec.train.data)
    if not (d.is_file() and d.suffix == ".jsonl"):
        raise SpecError(f"{spec.source}: key 'train.data': with train.processor set, train.data is a .jsonl chat "
                        f"manifest ({{\"messages\": [...]}} rows), got {spec.train.data!r}")
    if spec.train.pack_documents > 1:
        raise SpecError(f"{spec.source}: key 'train.pack_documents': chat manifests are not packed yet "
                        "(use pack_documents: 1)")
