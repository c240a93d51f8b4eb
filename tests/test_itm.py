"""ITM hard negatives (ALBEF): never a positive, softmax-distributed, NaN-free, rank offsets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoglm_phone.losses import (
    caption_keys,
    hard_negative_weights,
    itm_accuracy,
    itm_loss,
    itm_targets,
    sample_hard_negatives,
    sample_hard_negatives_across_ranks,
)
from autoglm_phone.losses.itm import IGNORE_INDEX
from autoglm_phone.objectives import ITM, Features
from autoglm_phone.objectives import itm as itm_module

# a fixed 3x4 case: row i's positive is column i, column 3 is nobody's
SIM = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 0.5, 1.5], [-2.0, 0.0, 1.0, 2.0]])
KEYS_ROW, KEYS_COL = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3])


def _draws(sim, keys_row, keys_col, n, seed=0):
    """``n`` independent draws per row in one call, ``(n, B)``, by repeating the rows."""
    g = torch.Generator().manual_seed(seed)
    idx, valid = sample_hard_negatives(sim.repeat(n, 1), keys_row.repeat(n), keys_col, g)
    return idx.view(n, -1), valid.view(n, -1)


def test_never_draws_a_positive_or_a_duplicate_caption():
    keys = caption_keys(["a", "b", "b", "c", "d", "d", "d", "e"])  # duplicates are positives
    sim = 5 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    sim[keys[:, None] == keys[None, :]] += 100.0  # positives most similar, as after training
    idx, valid = _draws(sim, keys, keys, n=500)
    assert valid.all()
    assert (keys[idx] != keys[None, :]).all()


def test_draws_follow_the_softmax_over_negatives():
    n = 20000
    idx, valid = _draws(SIM, KEYS_ROW, KEYS_COL, n)
    assert valid.all()
    counts = F.one_hot(idx, 4).sum(0).double()  # (3, 4)
    expected = SIM.masked_fill(torch.eye(3, 4, dtype=torch.bool), float("-inf")).softmax(1) * n
    assert (counts.diagonal() == 0).all()
    off = ~torch.eye(3, 4, dtype=torch.bool)
    chi2 = ((counts - expected)[off] ** 2 / expected[off]).sum().item()
    assert chi2 < 22.46  # 99.9% quantile of chi-square with 3 * (3 - 1) = 6 degrees of freedom


def test_same_draw_as_torch_multinomial():
    weights, _ = hard_negative_weights(SIM, KEYS_ROW, KEYS_COL)
    ours, _ = sample_hard_negatives(SIM, KEYS_ROW, KEYS_COL, torch.Generator().manual_seed(3))
    ref = torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "keys, expect_valid",
    [
        ([7], [False]),  # batch of one
        ([1, 2], [True, True]),  # batch of two: each must take the other
        ([4, 4], [False, False]),  # two copies of one caption
        ([5, 5, 5, 5], [False] * 4),  # all duplicates
        ([1, 1, 2], [True, True, True]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_cases_give_no_nan_and_flag_rows_without_negatives(keys, expect_valid, dtype):
    keys = torch.tensor(keys)
    b = len(keys)
    # extreme logits (what a large logit scale gives), an infinity and a NaN
    sim = (1e4 * torch.randn(b, b, generator=torch.Generator().manual_seed(b))).to(dtype)
    sim[0, -1], sim[-1, 0] = float("inf"), float("nan")
    weights, valid = hard_negative_weights(sim, keys, keys)
    assert torch.isfinite(weights).all() and valid.tolist() == expect_valid
    idx, valid = _draws(sim, keys, keys, n=50)
    assert ((idx >= 0) & (idx < b)).all()
    assert (keys[idx][valid] != keys.expand(50, b)[valid]).all()
    if b == 2 and valid.all():
        assert (idx == torch.tensor([1, 0])).all()
    media_idx, text_idx, labels = itm_targets(idx[0], idx[1], valid[0], valid[1])
    logits = torch.randn(3 * b, 2, dtype=dtype, requires_grad=True)
    loss = itm_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bf16_similarities_sample_like_fp32():
    sim = SIM.to(torch.bfloat16)  # these values are exact in bf16
    a, _ = sample_hard_negatives(sim, KEYS_ROW, KEYS_COL, torch.Generator().manual_seed(1))
    b, _ = sample_hard_negatives(SIM, KEYS_ROW, KEYS_COL, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_across_ranks_uses_the_offset_and_global_indices():
    """Two ranks simulated in one process: each sees its own rows against all 6 candidates."""
    world, b = 2, 3
    keys = torch.tensor([10, 11, 12, 13, 11, 15])  # rank 0's item 1 and rank 1's item 1 match
    sim_all = torch.randn(world * b, world * b, generator=torch.Generator().manual_seed(0))
    full_weights, _ = hard_negative_weights(sim_all, keys, keys)
    for rank in range(world):
        offset = rank * b
        sim = sim_all[offset : offset + b]  # (B, N) this rank's rows, gathered columns
        weights, _ = hard_negative_weights(sim, keys[offset : offset + b], keys)
        assert torch.equal(weights, full_weights[offset : offset + b])
        g = torch.Generator().manual_seed(rank)
        with pytest.raises(ValueError, match="offset"):
            sample_hard_negatives_across_ranks(sim, keys, offset=5)
        # with keys: never the row's own item, nor the other rank's copy of its caption
        reps = 200
        own_keys = keys[offset : offset + b].repeat(reps)
        idx, valid = sample_hard_negatives(sim.repeat(reps, 1), own_keys, keys, g)
        assert valid.all() and (keys[idx] != own_keys).all()
        # an overwhelming similarity to one column of the other rank: that global index comes back
        target = torch.tensor([4, 5, 3]) if rank == 0 else torch.tensor([0, 2, 1])
        peaked = sim.clone()
        peaked[torch.arange(b), target] = 1e3
        idx, valid = sample_hard_negatives_across_ranks(peaked, keys, offset, g)
        assert valid.all() and torch.equal(idx, target)
        # without keys only the own column (offset + i) is excluded, by position
        peaked[torch.arange(b), offset + torch.arange(b)] = 1e4
        idx, _ = sample_hard_negatives_across_ranks(peaked, None, offset, g)
        assert torch.equal(idx, target)
        media_idx, text_idx, _ = itm_targets(idx, idx, valid, valid, offset=offset)
        own = offset + torch.arange(b)
        assert torch.equal(media_idx[:b], own) and torch.equal(text_idx[2 * b :], own)


def test_itm_targets_order_labels_and_loss():
    neg_text, neg_media = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    valid_text, valid_media = torch.tensor([True, False, True]), torch.tensor([True] * 3)
    media_idx, text_idx, labels = itm_targets(neg_text, neg_media, valid_text, valid_media)
    assert media_idx.tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]
    assert text_idx.tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]
    assert labels.tolist() == [1, 1, 1, 0, IGNORE_INDEX, 0, 0, 0, 0]
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(0))
    keep = labels != IGNORE_INDEX
    assert torch.allclose(itm_loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    expected_acc = (logits[keep].argmax(1) == labels[keep]).float().mean()
    assert torch.allclose(itm_accuracy(logits, labels), expected_acc)
    nothing = torch.full((4,), IGNORE_INDEX)
    assert itm_loss(torch.randn(4, 2), nothing).item() == 0.0


def test_caption_keys_equal_exactly_for_equal_captions():
    keys = caption_keys(["two red stars", "one blue circle", "two red stars"])
    assert keys.dtype == torch.long and keys[0] == keys[2] and keys[0] != keys[1]
    assert torch.equal(keys, caption_keys(["two red stars", "one blue circle", "two red stars"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_never_syncs_with_the_host():
    sim = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randint(0, 20, (128,), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, valid = sample_hard_negatives_across_ranks(sim, keys, 64, g)
        _, _, labels = itm_targets(idx, idx, valid, valid, offset=64)
        itm_loss(torch.randn(labels.shape[0], 2, device="cuda"), labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_itm_objective_never_draws_another_caption_of_the_same_item(monkeypatch):
    """Multi-caption data: a caption of the same image is not its negative (BLIP's image ids),
    even when its text differs and the ITC similarity favours it."""
    seen = {}

    def capture(model, block, input_ids, attention_mask, media_index, text_index):
        seen["pairs"] = (media_index, text_index)
        return torch.zeros(len(media_index), 2)

    monkeypatch.setattr(itm_module, "match_logits", capture)
    b = 8
    items = torch.arange(b) // 2  # two captions per item, every caption its own text
    media = F.normalize(torch.randn(b, 16), dim=-1)
    media = media[items * 2]  # both rows of an item show the same media
    # each caption is most similar to the other caption of its item: the hardest "negative"
    text = media + 0.01 * torch.randn(b, 16)
    feats = Features(media=media, scale=torch.tensor(100.0), text=F.normalize(text, dim=-1))
    batch = {"item_id": items, "caption_id": torch.arange(b) + 100, "input_ids": None,
             "attention_mask": None}  # fmt: skip
    objective = ITM()
    for seed in range(20):
        objective.targets(None, batch, feats, torch.Generator().manual_seed(seed))
        mi, ti = seen["pairs"]
        assert (items[mi[b:]] != items[ti[b:]]).all(), "a caption of the same item was a negative"
