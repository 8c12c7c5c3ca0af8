"""The loss in chunks of tokens (train.loss_chunk_tokens): the generated script's ChunkedLoss against its
whole-sequence loss, in-process on a real transformers model (values, gradients, what autograd keeps), and the models
whose forward changes the LM head's output, for which compile keeps the whole-sequence loss or refuses chunks.
The distributed layouts (FSDP, Ulysses, EP with the router aux loss, towers on idle ranks) are verified in
tests/test_distributed.py::test_chunked_loss_matches_the_whole_sequence_reference."""

import runpy
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from omnigen import pipeline, runner, zoo
from omnigen.errors import PlanError
from omnigen.lm_head import chunked_loss_refusal
from omnigen.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN, ROWS, CHUNK = 128, 2, 48  # 256 tokens: five chunks of 48 and one of 16


def script(tmp_path, chunk, tied=False):
    """The generated train.py of the tiny Llama on one process, loaded as a module."""
    spec = load_spec(ROOT / "specs" / "llama_tiny.yaml",
                     [f"train.loss_chunk_tokens={chunk}", "parallel=auto", "cluster.procs_per_node=1",
                      f"model.overrides.tie_word_embeddings={str(tied).lower()}"])
    out = tmp_path / f"chunk{chunk}{'_tied' if tied else ''}"
    runner.compile_to(spec, out)
    return runpy.run_path(str(out / "train.py"), run_name="omnigen_script")


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (ROWS, SEQ_LEN), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((ROWS, 1), -100)], dim=1)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = -100  # prompt tokens, padding: no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "shift_labels": labels}


def loss_and_grads(script, model, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = script["forward_with_loss"](model, batch())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast,tied", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "bf16-autocast", "tied-embeddings"])
def test_chunked_loss_equals_the_whole_sequence_loss(tmp_path, autocast, tied):
    whole, chunked = script(tmp_path, 0, tied), script(tmp_path, CHUNK, tied)
    assert "ChunkedLoss" not in whole and chunked["LOSS_CHUNK_TOKENS"] == CHUNK
    reference, model = whole["build_model"](), chunked["build_model"]()  # the same seed: the same weights
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    chunked["ChunkedLoss"](model)
    want, want_grads = loss_and_grads(whole, reference, autocast)
    got, grads = loss_and_grads(chunked, model, autocast)
    # fp32: only the order of the loss's sums differs. bf16: the LM head's weight gradient is a sum of per-chunk
    # bf16 products instead of one matmul's (measured 3.8e-3 relative, bf16's epsilon; verify allows 0.1 in bf16).
    loss_tolerance, grad_tolerance = (1e-4, 2e-2) if autocast else (1e-6, 1e-5)
    assert got == pytest.approx(want.item(), rel=loss_tolerance)
    for name, grad in want_grads.items():
        assert (grads[name] - grad).norm() <= grad_tolerance * grad.norm(), name
    # Without labels the head is the plain head again.
    ids = batch()["input_ids"]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def saved_for_backward(script, model):
    """The sizes (elements) of the tensors autograd keeps from the forward."""
    sizes = []

    def keep(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        script["forward_with_loss"](model, batch())
    return sizes


def test_no_tensor_of_a_whole_sequence_times_vocabulary_is_kept(tmp_path):
    """What the chunked loss is for: the forward keeps no logits-sized tensor; the whole-sequence loss keeps several."""
    whole, chunked = script(tmp_path, 0), script(tmp_path, CHUNK)
    model = chunked["build_model"]()
    chunked["ChunkedLoss"](model)
    vocab = model.config.vocab_size
    assert max(saved_for_backward(chunked, model)) < CHUNK * vocab
    assert max(saved_for_backward(whole, whole["build_model"]())) >= ROWS * SEQ_LEN * vocab


def meta_build(name):
    cls = getattr(transformers, name)
    with torch.device("meta"):
        return cls._from_config(zoo.tiny_config(cls))


@pytest.mark.parametrize("name,refused", [
    ("LlamaForCausalLM", ""), ("Qwen2VLForConditionalGeneration", ""), ("Qwen3MoeForCausalLM", ""),
    ("Qwen2_5OmniThinkerForConditionalGeneration", ""),
    ("GraniteMoeForCausalLM", "logits = logits / self.config.logits_scaling"),  # scales the logits
    ("PaliGemmaForConditionalGeneration", "logits = logits / final_logit_softcapping"),  # caps them
    ("Blip2ForConditionalGeneration", "called by a sub-model's forward"),  # its language model calls the head
])
def test_compile_reads_what_the_forward_does_with_the_head_output(name, refused):
    reason = chunked_loss_refusal(meta_build(name))
    assert (refused in reason) if refused else reason == ""


def test_a_model_that_changes_its_logits_keeps_the_whole_sequence_loss():
    with tempfile.TemporaryDirectory() as folder:
        raw = zoo.write_tiny(transformers.GraniteMoeForCausalLM, Path(folder) / "model", name="granite",
                             cluster={"nodes": 1, "procs_per_node": 1, "device": "cpu", "hardware": "cpu"},
                             train={"seq_len": 4096, "micro_batch_size": 2})
        auto = pipeline.plan(spec_from_dict(raw, "granite.yaml", folder)).plan
        assert auto.train["loss_chunk_tokens"] == 0
        raw["train"]["loss_chunk_tokens"] = 1024
        with pytest.raises(PlanError, match=r"granite.yaml: train.loss_chunk_tokens=1024: .*logits_scaling.*use 0"):
            pipeline.plan(spec_from_dict(raw, "granite.yaml", folder))
