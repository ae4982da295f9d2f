"""Decoder-only models (GPT-2, Llama): their pad token, as a classifier pools by it."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune_trainer.batches import encode_text, make_collate
from finetune_trainer.config import ModelSpec, Task
from finetune_trainer.data import Split
from finetune_trainer.models import load_model, load_tokenizer, logits_of
from tiny import TINY_GPT2, bpe_tokenizer


def test_a_decoder_classifier_pads_with_the_id_it_pools_by(tmp_path: Path) -> None:
    """A checkpoint whose config names a pad id its tokenizer does not pad with (Llama-2's names its unk, 0, and its
    tokenizer has no pad, so the trainer pads with eos): the classifier pools the last token that is not its pad id,
    and so pooled the padding of every row shorter than the batch's longest."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=300, pad_token_id=5, **TINY_GPT2)  # 5: a token, not the tokenizer's eos
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "gpt2")
    spec = ModelSpec(uri=f"file://{tmp_path / 'gpt2'}", task="sequence-classification",
                     tokenizerUri=f"file://{bpe_tokenizer(tmp_path / 'tok')}")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, seed=0).eval()
    data = encode_text(Split(["a fine day indeed", "ok"], [0, 1]), tokenizer, 16)
    batch = make_collate(Task.SEQUENCE_CLASSIFICATION, tokenizer.pad_token_id, 0)(data, [0, 1])
    assert batch.inputs["attention_mask"][1].sum() < batch.inputs["attention_mask"][0].sum()  # row 1 is padded
    with torch.no_grad():
        together = logits_of(model, batch.inputs)
        alone = logits_of(model, {"input_ids": torch.tensor([data.features[1]])})
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=1e-5)
    assert model.config.pad_token_id == tokenizer.pad_token_id  # as exported, beside the tokenizer
