"""Proof that modalities learn (benchmarks/demo_modalities_learn.py, smaller): trained by the generated script on 2
ranks, a tiny LLaVA and a tiny Qwen2-Audio answer held-out rows from the image / the sound far better than the text
alone allows. Every row asks the same question and the answers are balanced, so no text-only model can get the
answer words' loss below log 3; with one blank image or silence in every row, these runs stay at that floor."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from demo_modalities_learn import demo  # noqa: E402

pytest.importorskip("PIL", reason="images need Pillow: pip install -e '.[media]'")


@pytest.mark.distributed
@pytest.mark.parametrize("modality, steps", [("image", 150), ("audio", 80)])
def test_answer_loss_falls_below_the_text_only_floor(tmp_path, modality, steps):
    r = demo(modality, tmp_path / modality, steps=steps, heldout=45)
    assert r["answer_tokens"] == 45 * (2 if modality == "image" else 1)  # every held-out answer word is scored
    assert r["answer_loss"] < 0.5 * r["floor"], r
    assert max(r["per_slot"].values()) < 0.8 * r["floor"], r  # the shape (or pitch) is learnt too, not the colour alone
