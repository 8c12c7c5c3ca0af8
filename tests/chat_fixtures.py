"""Processor folders and chat manifests built here, with no hub: a word-level tokenizer whose special tokens sit at
the ids the tiny model configs use, each family's real image / audio processor class at tiny settings, assembled
into the model's processor class and saved with save_pretrained."""

import json
import math
import struct
import wave
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

from omnigen import zoo

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("USER ASSISTANT user assistant what colour shape is this sound the a it red green blue square circle triangle low middle high tone "
         "describe picture hello world").split()
PUNCTUATION = list("?.,!:")


def word_tokenizer(specials: dict[str, int], vocab_size: int) -> Tokenizer:
    """Words split on whitespace and punctuation; `specials` at exactly their ids, the rest of the vocabulary filled
    with placeholder words so that every id in [0, vocab_size) is a token."""
    vocab = dict(specials)
    free = (i for i in range(vocab_size) if i not in specials.values())
    for word in ["[UNK]", *WORDS, *PUNCTUATION]:
        vocab[word] = next(free)
    for i in free:
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def fast_tokenizer(tok: Tokenizer, **special) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


# Chat templates in the shape of the families' own (ChatML for Qwen, "USER: ... ASSISTANT:" for LLaVA-1.5).
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}"
          "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
          "{% elif c.type == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
          "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA = ("{% for m in messages %}{{ m.role | upper }}: {% for c in m.content %}"
         "{% if c.type == 'image' %}<image>\n{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
         "{% if m.role == 'assistant' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def llava(folder: Path) -> dict:
    """A tiny LLaVA (config.json in folder/model) and its LlavaProcessor (folder/processor): CLIP crops of 16 x 16,
    patch 4, the class token dropped: 16 image tokens."""
    spec = zoo.write_tiny(transformers.LlavaForConditionalGeneration, folder / "model")
    config = json.loads((folder / "model" / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    tok = word_tokenizer({"<s>": text["bos_token_id"], "</s>": text["eos_token_id"],
                          "<image>": config["image_token_index"]}, text["vocab_size"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", text["bos_token_id"])])
    side = vision["image_size"]
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                                      crop_size={"height": side, "width": side})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=fast_tokenizer(tok, bos_token="<s>", eos_token="</s>"),
        chat_template=LLAVA, patch_size=vision["patch_size"], num_additional_image_tokens=1,
        vision_feature_select_strategy=config["vision_feature_select_strategy"])
    processor.save_pretrained(folder / "processor")
    return spec


def qwen2_vl_parts(folder: Path) -> dict:
    """The tiny Qwen2-VL of specs/ and the parts of its processor: the real Qwen2-VL image processor (patch 4,
    merge 2, at most 32 x 32 pixels) and a ChatML tokenizer. Qwen2VLProcessor itself also holds a video processor,
    which transformers cannot build without torchvision."""
    config = json.loads((ROOT / "specs" / "models" / "qwen2_vl_tiny" / "config.json").read_text())
    text = config["text_config"]
    specials = {"<|vision_start|>": config["vision_start_token_id"], "<|vision_end|>": config["vision_end_token_id"],
                "<|image_pad|>": config["image_token_id"], "<|video_pad|>": config["video_token_id"],
                "<|im_start|>": 1004, "<|im_end|>": 1005, "<|endoftext|>": text["eos_token_id"],
                "<|pad|>": text["pad_token_id"]}
    tok = fast_tokenizer(word_tokenizer(specials, text["vocab_size"]), eos_token="<|endoftext|>", pad_token="<|pad|>")
    vision = config["vision_config"]
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"], min_pixels=8 * 8, max_pixels=32 * 32)
    return {"tokenizer": tok, "image_processor": image_processor, "config": config}


def qwen2_audio(folder: Path) -> dict:
    """A tiny Qwen2-Audio (folder/model) and its Qwen2AudioProcessor (folder/processor): a Whisper feature extractor
    with the tower's mel bins and a window of 2 x max_source_positions frames (hop 250 at 16 kHz)."""
    spec = zoo.write_tiny(transformers.Qwen2AudioForConditionalGeneration, folder / "model")
    config = json.loads((folder / "model" / "config.json").read_text())
    audio, text = config["audio_config"], config["text_config"]
    audio_token = config["audio_token_index"]
    specials = {"<|AUDIO|>": audio_token, "<|audio_bos|>": audio_token - 2, "<|audio_eos|>": audio_token - 1,
                "<|im_start|>": audio_token - 4, "<|im_end|>": audio_token - 3, "<|endoftext|>": audio_token - 5}
    tok = fast_tokenizer(word_tokenizer(specials, text["vocab_size"]), eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    window = 2 * audio["max_source_positions"]
    features = transformers.WhisperFeatureExtractor(feature_size=audio["num_mel_bins"], sampling_rate=16000,
                                                    hop_length=16000 // window, chunk_length=1)
    processor = transformers.Qwen2AudioProcessor(feature_extractor=features, tokenizer=tok, chat_template=CHATML)
    processor.save_pretrained(folder / "processor")
    return spec


# A chat template over string contents, as plain LLM tokenizers ship them (PartsProcessor joins each content list).
CHATML_TEXT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def omni_parts(folder: Path) -> dict:
    """specs/siglip_whisper_qwen3_moe_tiny_omni_ep2.yaml's parts with a text decoder only, and the folders released
    parts come with: the foundation's tokenizer (placeholders <image> 1000 and <audio> 1002 added as special
    tokens) in folder/processor, SigLIP's image processor (32 x 32) in processor/image, Whisper's feature extractor
    (16 mel bins, a window of 16 frames) in processor/audio."""
    import yaml
    spec = yaml.safe_load((ROOT / "specs" / "siglip_whisper_qwen3_moe_tiny_omni_ep2.yaml").read_text())
    parts = spec["model"]["parts"]
    for part in (*parts["encoders"], parts["foundation"]):
        part["config"] = str(ROOT / "specs" / part["config"])
    parts["decoders"] = [{"modality": "text"}]
    specials = {"<image>": 1000, "<audio>": 1002, "<|im_start|>": 1004, "<|im_end|>": 1005, "<|endoftext|>": 2,
                "<|pad|>": 0}
    tok = fast_tokenizer(word_tokenizer(specials, 1024), eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = CHATML_TEXT
    tok.save_pretrained(folder / "processor")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "processor" / "image")
    transformers.WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=1000,
                                         chunk_length=1).save_pretrained(folder / "processor" / "audio")
    return {"model": {"parts": parts}}


# --- media files ------------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_image(path: Path, colour: str, size=(16, 16)) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def write_wav(path: Path, hertz: float, seconds: float = 0.25, rate: int = 16000, width: int = 2,
              amplitude: float = 0.5) -> Path:
    """A sine tone (`amplitude` of full scale) as PCM WAV, through the standard library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * rate)
    peak = 2 ** (8 * width - 1) - 1
    fmt = {1: "B", 2: "h", 4: "i"}[width]
    values = [int(amplitude * peak * math.sin(2 * math.pi * hertz * t / rate)) + (128 if width == 1 else 0) for t in range(n)]
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(struct.pack(f"<{n}{fmt}", *values))
    return path


def image_chat(image: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def audio_chat(audio: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "audio", "path": audio}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def write_manifest(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
