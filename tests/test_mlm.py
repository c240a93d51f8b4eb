"""MLM masking (BERT's 15% with 80/10/10), its loss and the unigram baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoglm_phone.losses import (
    mask_tokens,
    masked_accuracy,
    mlm_loss,
    token_counts,
    unigram_baseline_accuracy,
)
from autoglm_phone.tokenizer import cached_tokenizer

V, MASK = 200, 3
SPECIALS = (0, 1, 2, 3, 4, 5)  # pad, [gMASK], <sop>, [MASK], two media markers


def _ordinary(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), V, shape, generator=g)


def _mask(ids, seed=0, **kwargs):
    kwargs = {"mask_token_id": MASK, "vocab_size": V, "special_ids": SPECIALS, **kwargs}
    return mask_tokens(ids, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_rate_and_80_10_10_split():
    ids = _ordinary((128, 512))  # long rows: the at-least-one rule changes nothing
    masked, labels = _mask(ids)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    n = chosen.sum().item()
    as_mask = (masked == MASK) & chosen
    changed = (masked != ids) & (masked != MASK) & chosen
    kept = (masked == ids) & chosen
    assert abs(as_mask.sum().item() / n - 0.8) < 0.015
    # a random draw equals the original 1 time in 194; those count as kept
    assert abs(changed.sum().item() / n - 0.1 * 193 / 194) < 0.01
    assert abs(kept.sum().item() / n - 0.1 * (1 + 1 / 194)) < 0.01
    assert not torch.isin(masked[changed], torch.tensor(SPECIALS)).any()  # ordinary ids only
    assert torch.equal(masked[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])


def test_special_tokens_and_padding_are_never_masked():
    ids = _ordinary((64, 12))
    ids[:, :2] = torch.tensor([1, 2])  # [gMASK] <sop>
    ids[:, 5] = 4  # a media marker
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[:, 9:] = False  # padding (left as ordinary ids: only the mask says so)
    extra = torch.zeros_like(attention)
    extra[:, 7] = True  # a per-position special, e.g. from return_special_tokens_mask
    masked, labels = _mask(ids, mask_prob=1.0, attention_mask=attention, special_tokens_mask=extra)
    never = torch.zeros_like(attention)
    never[:, [0, 1, 5, 7]] = True
    never |= ~attention
    assert (labels[never] == -100).all() and torch.equal(masked[never], ids[never])
    assert (labels[~never] == ids[~never]).all()  # mask_prob=1: everything else is a target


def test_every_nonempty_row_gets_a_target():
    ids = _ordinary((500, 6))
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[:, 3:] = False  # three real tokens per row
    attention[0] = False  # an empty row
    ids[1, :3] = torch.tensor([1, 2, 5])  # a row of specials only
    _, labels = _mask(ids, mask_prob=0.01, attention_mask=attention)
    per_row = (labels != -100).sum(1)
    assert per_row[0] == 0 and per_row[1] == 0
    assert (per_row[2:] >= 1).all()
    assert (labels[:, 3:] == -100).all()


def test_seeded_masking_is_deterministic():
    ids = _ordinary((8, 40))
    a, b, c = _mask(ids, seed=1), _mask(ids, seed=1), _mask(ids, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_bad_mask_prob_raises():
    with pytest.raises(ValueError, match="mask_prob"):
        _mask(_ordinary((2, 4)), mask_prob=0.0)


def test_loss_accuracy_and_unigram_baseline():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 2, 6, 2
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(mlm_loss(logits, labels), expected)
    right = (logits[keep].argmax(-1) == labels[keep]).float().mean()
    assert torch.allclose(masked_accuracy(logits, labels), right)
    none = torch.full((2, 5), -100)
    loss = mlm_loss(logits, none)
    loss.backward()
    assert loss.item() == 0.0 and masked_accuracy(logits, none).item() == 0.0

    train = torch.tensor([[1, 2, 6, 2, 0], [1, 2, 5, 6, 2]])  # 1 = [gMASK], 0 = pad: specials
    counts = token_counts(train, vocab_size=7, special_ids=(0, 1))
    assert counts.tolist() == [0, 0, 4, 0, 0, 1, 2]
    assert unigram_baseline_accuracy(labels, counts).item() == pytest.approx(2 / 3)


def test_caption_masking_with_the_real_tokenizer(tmp_path):
    captions = ["two small red circles on the left", "one loud high pure beep, steady"] * 10
    tok = cached_tokenizer(captions, tmp_path, vocab_size=300)
    batch = tok(captions[:2], padding=True, return_tensors="pt")
    specials = tok.all_special_ids
    for t in ("[gMASK]", "<sop>", "<|pad|>", "<|begin_of_image|>", "<|image|>", "<|audio|>"):
        assert tok.convert_tokens_to_ids(t) in specials
    _, labels = mask_tokens(
        batch["input_ids"],
        mask_token_id=tok.mask_token_id,
        vocab_size=len(tok),
        special_ids=specials,
        attention_mask=batch["attention_mask"],
        mask_prob=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert (labels[:, :2] == -100).all()  # [gMASK] <sop>
    real = batch["attention_mask"].bool()
    assert (
        (labels != -100) == (real & ~torch.isin(batch["input_ids"], torch.tensor(specials)))
    ).all()
