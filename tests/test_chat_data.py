"""Chat manifests read through the model's own processor: the reader the generated script holds
(templates/chat_data.py.j2) on real transformers processors built here, the compile-time check of every row, and
a 2-rank verify on a manifest."""

import ast
import ast
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner

from chat_fixtures import (CHATML, COLOURS, ROOT, audio_chat, image_chat, llava, omni_parts, qwen2_audio, qwen2_vl_parts,
                           write_image, write_manifest, write_wav)
from omnigen import pipeline, runner
from omnigen.chat_data import reader_namespace
from omnigen.cli import main
from omnigen.spec import load_spec

pytest.importorskip("PIL", reason="images need Pillow: pip install -e '.[media]'")
IGNORE = -100


class Qwen2VLImageOnlyProcessor(transformers.ProcessorMixin):
    """Qwen2VLProcessor's image path (its replace_image_token, the real Qwen2-VL image processor) without its video
    processor: transformers 5.23 cannot build Qwen2VLProcessor without torchvision, which this machine lacks."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    replace_image_token = transformers.Qwen2VLProcessor.replace_image_token


transformers.AutoProcessor.register(transformers.Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)


def write_spec(folder: Path, spec: dict, seq_len=64, **train) -> Path:
    spec = json.loads(json.dumps(spec))
    spec["model"]["config"] = "model"
    spec.update(name=folder.name, cluster={"procs_per_node": 2}, parallel={"dp_shard": 2},
                train={"seq_len": seq_len, "global_batch_size": 4, "steps": 3, "data": "data/chat.jsonl",
                       "processor": "processor", **train})
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    spec = llava(folder)
    for colour in COLOURS:
        write_image(folder / "data" / "img" / f"{colour}.png", colour, size=(24, 16))  # resized and cropped to 16
    rows = [image_chat(f"img/{c}.png", "what colour is this ?", f"it is {c} .") for c in COLOURS]
    write_manifest(folder / "data" / "chat.jsonl", rows)
    write_spec(folder, spec)
    return folder


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_audio")
    spec = qwen2_audio(folder)
    for name, hertz in (("low", 300), ("high", 3000)):
        write_wav(folder / "data" / f"{name}.wav", hertz)
    rows = [audio_chat(f"{n}.wav", "what sound is this ?", f"a {n} tone .") for n in ("low", "high")]
    write_manifest(folder / "data" / "chat.jsonl", rows)
    write_spec(folder, spec)
    return folder


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_vl")
    shutil.copytree(ROOT / "specs" / "models" / "qwen2_vl_tiny", folder / "model")
    parts = qwen2_vl_parts(folder)
    Qwen2VLImageOnlyProcessor(image_processor=parts["image_processor"], tokenizer=parts["tokenizer"],
                              chat_template=CHATML).save_pretrained(folder / "processor")
    write_image(folder / "data" / "red.png", "red", size=(32, 24))
    write_image(folder / "data" / "blue.png", "blue", size=(16, 16))
    write_manifest(folder / "data" / "chat.jsonl", [image_chat("red.png", "what colour is this ?", "red"),
                                                    image_chat("blue.png", "what colour is this ?", "blue")])
    write_spec(folder, {"model": {"class": "Qwen2VLForConditionalGeneration"}})
    return folder


def reader(folder: Path, rows=None, **train):
    """The generated script's ChatManifest for the spec in `folder` (its namespace too), on `rows` when given."""
    if rows is not None:
        write_manifest(folder / "data" / "chat.jsonl", rows)
    sets = [f"train.{k}={v}" for k, v in train.items()]
    spec = load_spec(folder / "spec.yaml", sets)
    compiled = pipeline.plan(spec)
    ns = reader_namespace(compiled.plan.inputs, spec.train.long_samples, str(folder / "processor"))
    ns["epoch_order"] = lambda index, size: index % size  # unshuffled: sample n is row n (test_packing checks the shuffle)
    return ns["ChatManifest"](str(folder / "data" / "chat.jsonl"), str(folder / "processor")), ns, compiled


def tokens(manifest, ids):
    return [manifest.tokenizer.convert_ids_to_tokens(int(i)) for i in ids if i != IGNORE]


def run_forward(compiled, folder: Path, samples, ns):
    """The model's own forward on a collated micro-batch: the tower inputs are what it takes."""
    config = transformers.AutoConfig.from_pretrained(folder / "model")
    torch.manual_seed(0)
    model = getattr(transformers, compiled.plan.model_class)._from_config(config).eval()
    batch = ns["collate"](samples)
    assert set(batch) - {"shift_labels"} <= set(inspect.signature(model.forward).parameters)
    labels = batch.pop("shift_labels")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == labels.shape and torch.isfinite(logits).all()


def test_llava_labels_only_on_assistant_turns(llava_dir):
    two_turns = {"messages": [
        {"role": "user", "content": [{"type": "image", "path": "img/red.png"}, {"type": "text", "text": "what colour ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red ."}]},
        {"role": "user", "content": [{"type": "text", "text": "what shape ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a square ."}]}]}
    manifest, ns, compiled = reader(llava_dir, [two_turns, image_chat("img/blue.png", "what colour ?", "blue")])
    s = manifest.sample(0)
    assert set(s) == {"input_ids", "attention_mask", "shift_labels", "pixel_values"}
    assert s["pixel_values"].shape == (1, 3, 16, 16) and s["input_ids"].shape == (64,)
    assert int((s["input_ids"] == ns["IMAGE_TOKEN_ID"]).sum()) == ns["IMAGE_LLM_TOKENS"] == 16
    # both assistant turns, each with its end of turn; nothing of the user's, no placeholder, no padding
    assert tokens(manifest, s["shift_labels"]) == ["red", ".", "</s>", "a", "square", ".", "</s>"]
    real = int(s["attention_mask"].sum())
    assert (s["shift_labels"][real - 1:] == IGNORE).all() and (s["attention_mask"][:real] == 1).all()
    # each label is the next input token
    positions = (s["shift_labels"] != IGNORE).nonzero().flatten()
    assert (s["shift_labels"][positions] == s["input_ids"][positions + 1]).all()
    run_forward(compiled, llava_dir, [manifest.sample(0), manifest.sample(1)], ns)


def test_rows_without_roles_train_on_every_text_token(llava_dir):
    row = {"messages": [{"content": [{"type": "text", "text": "a red square ."},
                                     {"type": "image", "path": "img/red.png"},
                                     {"type": "text", "text": "hello world"}]}]}
    manifest, ns, _ = reader(llava_dir, [row])
    s = manifest.sample(0)
    assert tokens(manifest, s["input_ids"][s["attention_mask"] == 1]) == [
        "<s>", "a", "red", "square", "."] + ["<image>"] * 16 + ["hello", "world", "</s>"]
    # every text token is predicted (the tokenizer's BOS is not text of the row); an image placeholder never is
    assert tokens(manifest, s["shift_labels"]) == ["a", "red", "square", ".", "hello", "world", "</s>"]


def test_samples_are_a_pure_function_of_the_row(llava_dir):
    rows = [image_chat(f"img/{c}.png", "what colour is this ?", f"it is {c} .") for c in COLOURS]
    first, _, _ = reader(llava_dir, rows)
    again, _, _ = reader(llava_dir)
    for i in range(7):
        a, b, c = first.sample(i), again.sample(i), first.sample(i % len(rows))
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert tokens(first, first.sample(4)["shift_labels"]) == ["it", "is", "green", ".", "</s>"]  # row 4 % 3


def test_long_rows_truncate_or_drop(llava_dir):
    long_text = " ".join(["hello world"] * 30)  # 60 tokens of answer
    rows = [image_chat("img/red.png", "describe", long_text), image_chat("img/blue.png", "what colour ?", "blue")]
    manifest, _, _ = reader(llava_dir, rows)
    s = manifest.sample(0)
    assert s["attention_mask"].all() and s["input_ids"].shape == (64,)  # cut to seq_len, labels up to its end
    assert s["shift_labels"][-1] != IGNORE and "pixel_values" in s
    dropping, _, _ = reader(llava_dir, long_samples="drop")
    assert tokens(dropping, dropping.sample(0)["shift_labels"]) == ["blue", "</s>"]  # the next row that fits
    assert tokens(dropping, dropping.sample(1)["shift_labels"]) == ["blue", "</s>"]


def test_qwen2_vl_patches_grid_and_token_types(qwen2_vl_dir):
    manifest, ns, compiled = reader(qwen2_vl_dir)
    s = manifest.sample(0)  # 32 x 24 pixels: an 8 x 6 grid of 4-pixel patches, 2 x 2 merged into 12 tokens
    assert set(s) == {"input_ids", "attention_mask", "shift_labels", "pixel_values", "image_grid_thw",
                      "mm_token_type_ids"}
    assert s["image_grid_thw"].tolist() == [[1, 6, 8]] and s["pixel_values"].shape == (48, ns["IMAGE_PATCH_DIM"])
    image = s["input_ids"] == ns["IMAGE_TOKEN_ID"]
    assert int(image.sum()) == 12 and torch.equal(s["mm_token_type_ids"], image.long() * ns["IMAGE_TOKEN_TYPE"])
    assert tokens(manifest, s["shift_labels"]) == ["red", "<|im_end|>"]
    text = tokens(manifest, s["input_ids"][:3])
    assert text == ["<|im_start|>", "user", "<|vision_start|>"]
    run_forward(compiled, qwen2_vl_dir, [manifest.sample(0), manifest.sample(1)], ns)


def test_qwen2_audio_whisper_window(audio_dir):
    manifest, ns, compiled = reader(audio_dir)
    s = manifest.sample(0)
    assert set(s) == {"input_ids", "attention_mask", "shift_labels", "input_features", "feature_attention_mask"}
    window = ns["AUDIO_WINDOW_FRAMES"]
    assert s["input_features"].shape == (1, ns["AUDIO_MEL_BINS"], window)
    assert int(s["feature_attention_mask"].sum()) == 16  # 0.25 s at 64 frames per second
    assert int((s["input_ids"] == ns["AUDIO_TOKEN_ID"]).sum()) == 4  # conv stride 2, then pool 2
    assert tokens(manifest, s["shift_labels"]) == ["a", "low", "tone", ".", "<|im_end|>"]
    run_forward(compiled, audio_dir, [manifest.sample(0), manifest.sample(1)], ns)


def test_wav_sample_widths_decode_alike(audio_dir, tmp_path):
    _, ns, _ = reader(audio_dir)
    clips = [ns["read_audio"](str(write_wav(tmp_path / f"{w}.wav", 440, width=w)), 16000) for w in (1, 2, 4)]
    assert all(c.shape == (4000,) for c in clips)
    assert (clips[0] - clips[1]).abs().max() < 0.02 and (clips[1] - clips[2]).abs().max() < 1e-4
    assert 0.45 < float(clips[1].abs().max()) < 0.55


# --- compile-time validation: one case each, exit 2, file:line named, nothing written ----------------------------

def compile_refused(folder: Path, *words, sets=()):
    out = folder / "out"
    args = ["compile", str(folder / "spec.yaml"), "-o", str(out)] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not out.exists()


def good(c="red"):
    return image_chat(f"img/{c}.png", "what colour ?", c)


@pytest.mark.parametrize("case", [
    "malformed", "no_messages", "missing_file", "undecodable_image", "empty_content", "no_assistant",
    "empty_answer", "video", "audio_in_image_model", "too_long_through_image", "all_dropped", "no_chat_template",
    "no_processor_folder", "processor_disagrees_with_model", "manifest_of_token_rows"])
def test_compile_refuses_bad_manifests(llava_dir, tmp_path, case):
    folder = tmp_path / "case"
    shutil.copytree(llava_dir, folder)
    manifest = folder / "data" / "chat.jsonl"
    rows, words, sets = [good(), good("blue")], [], []
    if case == "malformed":
        rows.insert(1, '{"messages": [')
        words = [f"{manifest}:2:", "not valid JSON"]
    elif case == "no_messages":
        rows.append({"input_ids": [1, 2, 3]})
        words = [f"{manifest}:3:", '"messages" list']
    elif case == "missing_file":
        rows.append(good("green") | {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/none.png"}]},
                                                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]})
        words = [f"{manifest}:3:", "img/none.png does not exist"]
    elif case == "undecodable_image":
        (folder / "data" / "img" / "bad.png").write_bytes(b"not a png at all")
        rows.append(image_chat("img/bad.png", "what ?", "red"))
        words = [f"{manifest}:3:", "cannot decode image", "bad.png"]
    elif case == "empty_content":
        rows.append({"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": []}]})
        words = [f"{manifest}:3:", 'non-empty "content"']
    elif case == "no_assistant":
        rows.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]})
        words = [f"{manifest}:3:", "no assistant message"]
    elif case == "empty_answer":
        rows.append(image_chat("img/red.png", "what ?", "") | {})
        rows[-1]["messages"][1]["content"] = [{"type": "image", "path": "img/red.png"}]
        words = [f"{manifest}:3:", "empty sample", "assistant"]
    elif case == "video":
        rows.append({"messages": [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]})
        words = [f"{manifest}:3:", "video items are not supported"]
    elif case == "audio_in_image_model":
        rows.append(audio_chat("tone.wav", "what ?", "red"))
        words = [f"{manifest}:3:", "audio item", "takes no audio input"]
    elif case == "too_long_through_image":
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "text", "text": " ".join(["hello"] * 60)},
                                         {"type": "image", "path": "img/red.png"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]})
        words = [f"{manifest}:3:", "truncating would cut it", "train.long_samples: drop"]
    elif case == "all_dropped":
        sets = ["train.long_samples=drop", "train.seq_len=24"]
        words = ["every row of", "longer than train.seq_len=24"]
    elif case == "no_chat_template":
        (folder / "processor" / "chat_template.jinja").unlink()
        words = [f"{manifest}:1:", "has no chat template"]
    elif case == "no_processor_folder":
        shutil.rmtree(folder / "processor")
        words = ["key 'train.processor'", "no folder"]
    elif case == "processor_disagrees_with_model":
        config = json.loads((folder / "processor" / "processor_config.json").read_text())
        config["patch_size"] = 8  # the processor would place 4 tokens per image; the model's tower makes 16
        (folder / "processor" / "processor_config.json").write_text(json.dumps(config))
        words = [f"{manifest}:1:", "4 image tokens per image", "the model places 16"]
    elif case == "manifest_of_token_rows":
        sets = ["train.processor=null"]
        words = [f"{manifest}:1:", "train.processor"]
    write_manifest(manifest, rows)
    compile_refused(folder, *words, sets=sets)


def test_compile_accepts_a_good_manifest(llava_dir, tmp_path):
    result = CliRunner().invoke(main, ["compile", str(llava_dir / "spec.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "train.py").read_text()
    assert "class ChatManifest" in text and "return ChatManifest(" in text and "data.sample(i)" in text
    assert "epoch_order(index + step, len(self))" in text  # rows in a seeded order, a fresh one every epoch
    assert "PROCESSOR = " in text
    tree = ast.parse(text)  # standalone: torch, transformers, the standard library, and Pillow to decode images
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"argparse", "functools", "json", "math", "os", "re", "resource", "shutil", "signal", "sys",
                        "time", "torch", "transformers", "safetensors", "PIL"}, imported


@pytest.mark.distributed
def test_verify_on_manifests(llava_dir, audio_dir):
    """dp_shard=2 on a LLaVA image manifest and a Qwen2-Audio audio manifest equals the single process."""
    for folder in (llava_dir, audio_dir):
        rows = [image_chat(f"img/{c}.png", "what colour is this ?", f"it is {c} .") for c in COLOURS] * 2 \
            if folder == llava_dir else \
            [audio_chat(f"{n}.wav", "what sound is this ?", f"a {n} tone .") for n in ("low", "high")] * 2
        write_manifest(folder / "data" / "chat.jsonl", rows)
        spec = load_spec(folder / "spec.yaml")
        assert runner.verify(spec, steps=3, workdir=str(folder / "verify")) == 0


@pytest.mark.distributed
def test_packed_rows_carry_their_images_and_audio(llava_dir, audio_dir):
    """train.packing with images and audio: a packed row holds whole samples with their tower inputs in row order
    (rows with no image among them), positions restart per document; dp_shard=2 and sp=2 (LLaVA) and dp_shard=2
    (Qwen2-Audio) equal the single process."""
    text_row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what shape is a square ?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "a square ."}]}]}
    rows = [image_chat(f"img/{c}.png", "what colour is this ?", f"it is {c} .") for c in COLOURS] + [text_row]
    write_manifest(llava_dir / "data" / "chat.jsonl", rows * 2)
    packed = ["train.packing=true", "train.micro_batch_tokens=160", "train.global_batch_size=8"]
    out = llava_dir / "packed"
    result = CliRunner().invoke(main, ["compile", str(llava_dir / "spec.yaml"), "-o", str(out),
                                       *[a for s in packed for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    ns = {"__name__": "train_module", "__file__": str(out / "train.py")}
    exec(compile((out / "train.py").read_text(), str(out / "train.py"), "exec"), ns)
    data = ns["open_data"]()
    batches = ns["step_batches"](0, data, 0, 1, torch.device("cpu"))
    images = sum(1 for i in range(8) if "pixel_values" in data.unpadded(i))
    assert len(batches) < 8 and sum(len(b["pixel_values"]) for b in batches) == images == 6
    for b in batches:  # every placeholder has its image, and positions restart at each document
        assert int((b["input_ids"] == ns["IMAGE_TOKEN_ID"]).sum()) == len(b["pixel_values"]) * ns["IMAGE_LLM_TOKENS"]
        starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert starts == [0] + [i for i in range(1, 160) if b["document_ids"][0, i] != b["document_ids"][0, i - 1]]
    # each packed row's loss is the sum of its samples' losses run one by one: no document sees another's tokens
    model = ns["build_model"]()
    ns["apply_sequence_parallel"](model)
    indices, packing = ns["step_rows"](0, data)
    with torch.no_grad():
        for batch, row in zip(batches, packing):
            alone = sum(ns["forward_with_loss"](model, ns["collate"]([data.sample(indices[p])]))[1] for p in row)
            assert torch.allclose(ns["forward_with_loss"](model, dict(batch))[1], alone, rtol=1e-5), row
    for folder, sets in ((llava_dir, ["parallel.dp_shard=1", "parallel.sp=2"]), (llava_dir, []), (audio_dir, [])):
        write_manifest(folder / "data" / "chat.jsonl", rows * 2 if folder == llava_dir else
                       [audio_chat(f"{n}.wav", "what sound is this ?", f"a {n} tone .") for n in ("low", "high")] * 4)
        spec = load_spec(folder / "spec.yaml", [*packed, *sets])
        assert runner.verify(spec, steps=2, workdir=str(folder / f"verify_packed{len(sets)}")) == 0


@pytest.mark.distributed
def test_a_model_composed_from_parts_reads_chat_manifests(tmp_path):
    """Parts come with no processor class: the script's PartsProcessor joins the foundation's tokenizer (its chat
    template on string contents) with SigLIP's image processor and Whisper's feature extractor. A sample holds each
    image as 16 placeholders and each clip as 8 (what the encoders put out), labels on the assistant's words only;
    a row with a missing file is refused at compile by file:line; dp_shard=2 equals the single process. Packed
    (a Llama foundation): each row's loss is its samples' run alone; dp_shard=2 and sp=2 equal the single process."""
    spec = omni_parts(tmp_path)
    write_image(tmp_path / "data" / "red.png", "red", size=(40, 24))
    write_wav(tmp_path / "data" / "low.wav", 300, seconds=0.5)
    both = {"messages": [
        {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "and"},
                                     {"type": "audio", "path": "low.wav"}, {"type": "text", "text": "describe"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square , a low tone ."}]}]}
    rows = [image_chat("red.png", "what colour is this ?", "red ."), audio_chat("low.wav", "what sound is this ?",
                                                                            "a low tone ."), both,
            {"messages": [{"content": [{"type": "text", "text": "hello world"}, {"type": "image", "path": "red.png"}]}]}]
    write_manifest(tmp_path / "data" / "chat.jsonl", rows)
    spec.update(name="parts_chat", cluster={"procs_per_node": 2}, parallel={"dp_shard": 2},
                train={"seq_len": 64, "global_batch_size": 4, "steps": 3, "data": "data/chat.jsonl",
                       "processor": "processor"})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    compiled = pipeline.plan(load_spec(tmp_path / "spec.yaml"))
    ns = reader_namespace(compiled.plan.inputs, "truncate", str(tmp_path / "processor"))
    ns["epoch_order"] = lambda index, size: index % size
    manifest = ns["ChatManifest"](str(tmp_path / "data" / "chat.jsonl"), str(tmp_path / "processor"))
    samples = [manifest.sample(i) for i in range(4)]
    counts = [(int((s["input_ids"] == 1000).sum()), int((s["input_ids"] == 1002).sum())) for s in samples]
    assert counts == [(16, 0), (0, 8), (16, 8), (16, 0)]
    assert samples[2]["pixel_values"].shape == (1, 3, 32, 32) and samples[2]["input_features"].shape == (1, 16, 16)
    said = [manifest.tokenizer.convert_ids_to_tokens(int(i)) for i in samples[2]["shift_labels"] if i != IGNORE]
    assert said == ["a", "red", "square", ",", "a", "low", "tone", ".", "<|im_end|>"]
    # pre-training text: every text token after the first (this tokenizer adds no BOS), never a placeholder
    assert tokens(manifest, samples[3]["shift_labels"]) == ["world", "<|endoftext|>"]

    script = pipeline.render(compiled, tmp_path / "out")
    assert "class PartsProcessor" in script["train.py"] and "AutoProcessor.from_pretrained" not in script["train.py"]
    write_manifest(tmp_path / "data" / "chat.jsonl", rows + [image_chat("gone.png", "what ?", "gone .")])
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "chat.jsonl:5" in result.output and "gone.png does not exist" in result.output, \
        result.output
    write_manifest(tmp_path / "data" / "chat.jsonl", rows)
    assert runner.verify(load_spec(tmp_path / "spec.yaml"), steps=3, workdir=str(tmp_path / "verify")) == 0

    # Packed rows: whole samples with their images and clips in row order, documents kept apart. The Qwen3-MoE's
    # router loss averages over a fixed count of micro-batches, so packing it is refused; a Llama foundation packs.
    packed = ["train.packing=true", "train.micro_batch_tokens=96", "train.global_batch_size=8"]
    write_manifest(tmp_path / "data" / "chat.jsonl", rows * 2)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "refused"),
                                       *[a for s in packed for a in ("--set", s)]])
    assert result.exit_code == 2 and "key 'train.packing'" in result.output and "router" in result.output
    spec["model"]["parts"]["foundation"] = {"config": str(ROOT / "specs" / "models" / "llama_tiny")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "packed"
    runner.compile_to(load_spec(tmp_path / "spec.yaml", packed), out)
    ns = {"__name__": "train_module", "__file__": str(out / "train.py")}
    exec(compile((out / "train.py").read_text(), str(out / "train.py"), "exec"), ns)
    data = ns["open_data"]()
    batches = ns["step_batches"](0, data, 0, 1, torch.device("cpu"))
    indices, packing = ns["step_rows"](0, data)
    assert len(batches) < 8 and sum(len(b.get("pixel_values", ())) for b in batches) == 6  # 3 rows of 4 carry one
    model = ns["build_model"]()
    ns["apply_sequence_parallel"](model)
    with torch.no_grad():
        for batch, row in zip(batches, packing):  # each row's loss is its samples' run one by one
            assert int((batch["input_ids"] == 1002).sum()) == 8 * len(batch.get("input_features", ()))
            alone = sum(ns["forward_with_loss"](model, ns["collate"]([data.sample(indices[p])]))[1] for p in row)
            assert torch.allclose(ns["forward_with_loss"](model, dict(batch))[1], alone, rtol=1e-5), row
    for sets in ([], ["parallel.dp_shard=1", "parallel.sp=2"]):
        spec_packed = load_spec(tmp_path / "spec.yaml", [*packed, *sets])
        assert runner.verify(spec_packed, steps=2, workdir=str(tmp_path / f"verify_packed{len(sets)}")) == 0
