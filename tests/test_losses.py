import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from autoglm_phone.losses import itc_loss
from autoglm_phone.objectives import ITC, Features


def test_itc_equals_direct_infonce():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(16, 32, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(16, 32, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    ours = itc_loss()(image_features=img, text_features=txt, logit_scale=scale)
    # InfoNCE written out: -log softmax of the diagonal, both directions, averaged
    logits = scale * img @ txt.T
    i2t = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    t2i = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    assert abs(ours.item() - (i2t + t2i).item() / 2) < 1e-6


def test_itc_perfect_alignment_is_low_and_random_is_near_log_n():
    torch.manual_seed(0)
    n = 64
    x = F.normalize(torch.randn(n, 128), dim=-1)
    loss = itc_loss()
    perfect = loss(image_features=x, text_features=x, logit_scale=torch.tensor(100.0))
    random = loss(
        image_features=x,
        text_features=F.normalize(torch.randn(n, 128), dim=-1),
        logit_scale=torch.tensor(1.0),
    )
    assert perfect.item() < 0.05
    assert abs(random.item() - math.log(n)) < 0.2


def _infonce_rows(logits: torch.Tensor, candidates: list[list[int]]) -> torch.Tensor:
    """Mean over rows ``i`` of ``-log softmax`` of logit ``(i, i)`` among ``candidates[i]``."""
    return torch.stack(
        [-(logits[i, i] - logits[i, c].logsumexp(0)) for i, c in enumerate(candidates)]
    ).mean()


def test_itc_other_captions_of_the_same_item_are_not_negatives():
    # rows 0 and 1: one image, two of its captions (item 7); row 2: another item (9)
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1)
    img[1] = img[0]
    txt = F.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    items = torch.tensor([7, 7, 9])
    ours = itc_loss()(img, txt, scale, item_ids=items)
    # the same loss with the duplicate left out of each row's candidates, both directions
    keep = [[0, 2], [1, 2], [0, 1, 2]]
    logits = scale * img @ txt.T
    expected = (_infonce_rows(logits, keep) + _infonce_rows(logits.T, keep)) / 2
    assert ours.item() == pytest.approx(expected.item(), abs=1e-12)
    plain = itc_loss()(img, txt, scale)
    assert plain.item() > ours.item() + 0.1  # unmasked, the twin caption costs as a negative
    # unique items: exactly open_clip's ClipLoss
    unique = itc_loss()(img, txt, scale, item_ids=torch.tensor([1, 2, 3]))
    assert unique.item() == pytest.approx(plain.item(), abs=1e-12)


def test_itc_objective_masks_same_item_pairs_unless_switched_off():
    """``objective.itc_mask_same_item=false`` is CLIP's plain loss (the ablation's baseline)."""
    torch.manual_seed(0)
    media, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    feats = Features(media=media, scale=torch.tensor(10.0), text=text)
    batch = {"item_id": torch.tensor([0, 0, 1, 2, 3, 3])}
    plain = ClipLoss()(media, text, torch.tensor(10.0))
    assert torch.allclose(ITC(mask_same_item=False)(None, batch, feats).loss, plain)
    assert not torch.allclose(ITC()(None, batch, feats).loss, plain)
