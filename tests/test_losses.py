import math

import torch
import torch.nn.functional as F

from autoglm_phone.losses import itc_loss


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
