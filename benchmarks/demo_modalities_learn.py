"""Proof that modalities learn: a tiny VLM and a tiny audio model, trained by omnigen's script on 2 ranks, answer
from the image / the sound what the text alone cannot tell.

python benchmarks/demo_modalities_learn.py [--modality image|audio|both] [--steps N] [--rows N] [--blank] [--seed N]
    → per modality: the held-out answer-word loss of the trained model (per answer slot too) next to the text-only
      floor, and their ratio.

The data set is generated here, not downloaded. image: coloured shapes (red / green / blue x square / circle /
triangle) drawn with Pillow on black, filling most of a 32 x 32 canvas at a random size, offset and shade; every row
asks "what is this ?" and the answer is "a <colour> <shape> ." audio: sine tones (low ~300 Hz, middle ~1 kHz, high
~3 kHz) at a random pitch within +-10 %, length and loudness; every row asks "what sound is this ?" and the answer is
"a <pitch> tone ." The question is the same on every row and the classes are balanced, so from the text alone the
best prediction of each answer word (the colour, the shape, the pitch) is uniform over its 3 values: the text-only
floor is log 3 = 1.099 nats per answer word, whatever the model. Only the image / the sound can take the loss below.

How it runs: the processor folder (tests/chat_fixtures.py: a word-level tokenizer with the family's real image
processor / feature extractor) and the tiny model config are written into the work folder with a spec; omnigen
compiles it (checking every manifest row through the script's own reader) and the generated train.py runs with
torchrun on 2 ranks (dp_shard=2, 16 rows a step, lr 3e-3 with warm-up and cosine decay) over the 360 training rows,
epoch after epoch in the script's own shuffled order, and exports the final weights (--export-hf). The answer loss
is then measured on held-out rows the model never trained on (drawn from another seed, balanced over the classes):
the exported model, loaded with from_pretrained, on samples read by the same ChatManifest reader the script uses,
cross-entropy at the answer words only ("a", ".", the end of turn are left out: the text predicts them).

The colour is learnt first (within ~60 steps), the shape later. With 8 rows a step (and a dark random background) the
shape was still at the floor after 150 steps for 2 of 4 seeds, and learnt when each batch held 8 different classes
instead of a shuffled draw: the classes' imbalance in small batches drowns its signal. 16 rows a step on black
learnt it for every seed tried (5). --blank trains and evaluates on one blank image (or silence) in every row: the control, where the medium
carries nothing and the answer loss stays at the floor. Runs stay in runs/demo_modalities_learn/ (git-ignored).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the processor folders and media writers the chat-data tests use

from chat_fixtures import COLOURS, audio_chat, image_chat, llava, qwen2_audio, write_manifest, write_wav  # noqa: E402
from omnigen import runner  # noqa: E402
from omnigen.chat_data import reader_namespace  # noqa: E402
from omnigen.spec import load_spec  # noqa: E402

WORK = ROOT / "runs" / "demo_modalities_learn"
SHAPES = ("square", "circle", "triangle")
TONES = {"low": 300.0, "middle": 1000.0, "high": 3000.0}  # Hz, each drawn within +-10 %
IMAGE_QUESTION = "what is this ?"
AUDIO_QUESTION = "what sound is this ?"
CANVAS = 32  # pixels drawn; the LLaVA processor resizes to the tower's 16 x 16
SHAPE_SIZES = (26, 31)  # [low, high) pixels: most of the canvas, so a square's and a circle's corners differ by patches
SHADE = 25  # each channel of the shape within +-SHADE of its colour's
SEQ_LEN = 40
GLOBAL_BATCH = 16  # rows a step, 8 a rank in one micro-batch
TRAIN_ROWS = 360  # read for as many epochs as the steps take; held-out rows are drawn apart


@dataclass(frozen=True)
class Modality:
    name: str
    model: str            # the transformers class, for the report
    slots: dict           # the answer words' slots: name -> the equally likely words
    write_processor: object  # chat_fixtures' builder: folder -> spec dict
    write_row: object     # (data folder, row number, answer, rng, blank) -> manifest row
    lr: float
    steps: int            # the demo's default: under a minute on 2 CPU cores


# --- the data set ---------------------------------------------------------------------------------------------

def draw_shape(path: Path, colour: str, shape: str, rng: random.Random, blank: bool) -> None:
    """A filled shape in a shade of `colour` on black; with `blank`, the black canvas alone."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    if blank:
        Image.new("RGB", (CANVAS, CANVAS)).save(path)
        return
    image = Image.new("RGB", (CANVAS, CANVAS))
    fill = tuple(max(0, min(255, c + rng.randrange(-SHADE, SHADE + 1))) for c in COLOURS[colour])
    size = rng.randrange(*SHAPE_SIZES)
    x, y = (CANVAS - size) // 2 + rng.randrange(-2, 3), (CANVAS - size) // 2 + rng.randrange(-2, 3)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle((x, y, x + size, y + size), fill=fill)
    elif shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=fill)
    else:
        draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    image.save(path)


def image_row(data: Path, n: int, answer: tuple, rng: random.Random, blank: bool) -> dict:
    colour, shape = answer
    draw_shape(data / "img" / f"{n}.png", colour, shape, rng, blank)
    return image_chat(f"img/{n}.png", IMAGE_QUESTION, f"a {colour} {shape} .")


def audio_row(data: Path, n: int, answer: tuple, rng: random.Random, blank: bool) -> dict:
    (pitch,) = answer
    hertz = TONES[pitch] * rng.uniform(0.9, 1.1)
    write_wav(data / "wav" / f"{n}.wav", hertz, seconds=rng.uniform(0.15, 0.3),
              amplitude=0.0 if blank else rng.uniform(0.2, 0.8))
    return audio_chat(f"wav/{n}.wav", AUDIO_QUESTION, f"a {pitch} tone .")


MODALITIES = {
    "image": Modality("image", "LlavaForConditionalGeneration", {"colour": tuple(COLOURS), "shape": SHAPES}, llava,
                      image_row, lr=3e-3, steps=200),
    "audio": Modality("audio", "Qwen2AudioForConditionalGeneration", {"pitch": tuple(TONES)}, qwen2_audio,
                      audio_row, lr=3e-3, steps=100),
}


def answers(modality: Modality) -> list[tuple]:
    """Every combination of the answer slots' words, each once."""
    combos = [()]
    for slot in modality.slots.values():
        combos = [c + (w,) for c in combos for w in slot]
    return combos


def write_rows(modality: Modality, data: Path, manifest: str, count: int, seed: int, first: int, blank: bool) -> Path:
    """`count` rows, the answers cycling through every combination (balanced), each drawn afresh from `seed`."""
    rng, combos = random.Random(seed), answers(modality)
    rows = [modality.write_row(data, first + n, combos[n % len(combos)], rng, blank) for n in range(count)]
    return write_manifest(data / manifest, rows)


def text_only_floor(modality: Modality) -> float:
    """The best mean loss per answer word from the text alone: each slot's words are equally likely whatever the
    question, so the best prediction is uniform over them, log(slot size) nats."""
    return sum(math.log(len(slot)) for slot in modality.slots.values()) / len(modality.slots)


# --- training and evaluation ------------------------------------------------------------------------------------

def prepare(modality: Modality, folder: Path, steps: int, train_rows: int, heldout: int, blank: bool = False,
            seed: int = 0) -> Path:
    """The processor folder, tiny model config, training and held-out manifests and the spec, in `folder`: the
    rows drawn from `seed` (training) and seed + 1 (held out), the model initialised from `seed`."""
    shutil.rmtree(folder / "data", ignore_errors=True)  # no media of an earlier, larger run
    folder.mkdir(parents=True, exist_ok=True)
    spec = modality.write_processor(folder)
    write_rows(modality, folder / "data", "train.jsonl", train_rows, seed=seed, first=0, blank=blank)
    write_rows(modality, folder / "data", "heldout.jsonl", heldout, seed=seed + 1, first=train_rows, blank=blank)
    spec["model"]["config"] = "model"
    spec.update(name=f"modalities_learn_{modality.name}", cluster={"procs_per_node": 2}, parallel={"dp_shard": 2},
                train={"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH,
                       "micro_batch_size": GLOBAL_BATCH // 2, "steps": steps, "seed": seed, "lr": modality.lr,
                       "warmup_steps": max(1, steps // 10), "lr_schedule": "cosine", "min_lr": modality.lr / 10,
                       "data": "data/train.jsonl", "processor": "processor"})
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def train(spec_path: Path, quiet: bool = True):
    """Compile the spec and run its train.py with torchrun on 2 ranks; the exported weights' folder, the step
    records and the compiled stages."""
    spec = load_spec(spec_path, [])
    out = spec_path.parent / "out"
    compiled = runner.compile_into(spec, out)
    export, metrics = spec_path.parent / "trained", spec_path.parent / "metrics.jsonl"
    args = ["--metrics", str(metrics), "--export-hf", str(export)]
    code = runner.launch(spec, out / "train.py", args, spec_path.parent / "run.log",
                         progress=spec.name if quiet else None, steps=spec.train.steps)
    if code != 0:
        raise SystemExit(f"{out / 'train.py'} exited {code}; its output is in {spec_path.parent / 'run.log'}")
    return export, runner.read_metrics(metrics), compiled


def answer_loss(modality: Modality, spec_path: Path, export: Path, compiled) -> tuple[float, dict, int]:
    """Mean cross-entropy at the answer words of the held-out rows, per slot too (colour, shape / pitch), and how
    many answer words there were: the exported model on samples read by the generated script's own reader."""
    spec = load_spec(spec_path, [])
    processor = str(spec_path.parent / "processor")
    ns = reader_namespace(compiled.plan.inputs, spec.train.long_samples, processor)
    manifest = ns["ChatManifest"](str(spec_path.parent / "data" / "heldout.jsonl"), processor)
    batch = ns["collate"]([manifest.fit(manifest.encode(n)) for n in range(len(manifest))])  # each row once, in order
    labels = batch.pop("shift_labels")
    model = getattr(transformers, compiled.plan.model_class).from_pretrained(export).eval()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(**batch).logits.float().transpose(1, 2), labels,
                                                   reduction="none")  # 0 where the label is ignored
    slot_masks = [torch.isin(labels, torch.tensor(manifest.tokenizer.convert_tokens_to_ids(list(slot))))
                  for slot in modality.slots.values()]
    at_answer = torch.stack(slot_masks).any(0)
    per_slot = {name: float(losses[m].mean()) for name, m in zip(modality.slots, slot_masks)}
    return float(losses[at_answer].mean()), per_slot, int(at_answer.sum())


def demo(name: str, folder: Path, steps: int | None = None, rows: int = TRAIN_ROWS, heldout: int = 90,
         blank: bool = False, seed: int = 0, quiet: bool = True) -> dict:
    """Generate, train on 2 ranks, evaluate: the figures for one modality."""
    modality = MODALITIES[name]
    steps = steps or modality.steps
    # One thread here: the compile-time check runs every row through the processor (many tiny tensor ops), which
    # two threads contending for the cores the ranks also use ran 7x slower (75 vs 10 ms a row of Whisper features).
    torch.set_num_threads(1)
    started = time.perf_counter()
    spec_path = prepare(modality, folder, steps, rows, heldout, blank, seed)
    export, records, compiled = train(spec_path, quiet)
    loss, per_slot, count = answer_loss(modality, spec_path, export, compiled)
    return {"modality": name, "model": modality.model, "answer_loss": loss, "per_slot": per_slot,
            "answer_tokens": count, "floor": text_only_floor(modality), "steps": steps, "train_rows": rows,
            "first_step_loss": records[0]["loss"], "last_step_loss": records[-1]["loss"],
            "seconds": time.perf_counter() - started}


def report(r: dict, blank: bool) -> str:
    slots = ", ".join(f"{name} {loss:.3f}" for name, loss in r["per_slot"].items())
    return (f"{r['modality']}: {r['model']}{', one blank medium in every row' if blank else ''}, {r['steps']} steps of "
            f"{GLOBAL_BATCH} rows on 2 ranks over {r['train_rows']} training rows, {r['seconds']:.0f} s (step loss "
            f"{r['first_step_loss']:.3f} -> {r['last_step_loss']:.3f})\n"
            f"  held-out answer-word loss {r['answer_loss']:.3f} ({slots}; {r['answer_tokens']} words)  vs  text-only "
            f"floor {r['floor']:.3f}: {r['answer_loss'] / r['floor']:.2f} x the floor")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", choices=["image", "audio", "both"], default="both")
    ap.add_argument("--steps", type=int, help=f"optimizer steps of {GLOBAL_BATCH} rows (default: image "
                    f"{MODALITIES['image'].steps}, audio {MODALITIES['audio'].steps})")
    ap.add_argument("--rows", type=int, default=TRAIN_ROWS, help="training rows")
    ap.add_argument("--heldout", type=int, default=90, help="held-out rows (a multiple of 9 keeps them balanced)")
    ap.add_argument("--blank", action="store_true", help="the control: one blank image / silence in every row")
    ap.add_argument("--seed", type=int, default=0, help="draws the rows (held-out ones from seed + 1) and the init")
    args = ap.parse_args()
    names = ["image", "audio"] if args.modality == "both" else [args.modality]
    for name in names:
        r = demo(name, WORK / (name + ("_blank" if args.blank else "")), args.steps, args.rows, args.heldout,
                 args.blank, args.seed)
        print(report(r, args.blank), flush=True)


if __name__ == "__main__":
    main()
