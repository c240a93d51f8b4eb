import random

import pytest
import torch

from autoglm_phone.app.evaluate import retrieval_report
from autoglm_phone.metrics import chance_metrics, first_correct_rank, retrieval_metrics


def test_ranks_count_duplicates_as_correct():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.3]])
    # query 0 has key "a"; gallery item 1 also has key "a" -> rank 1
    ranks = first_correct_rank(sim, ["a", "b"], ["a", "a", "b"])
    assert ranks.tolist() == [1, 2]


def test_perfect_similarity_gives_full_recall():
    keys = [f"c{i}" for i in range(20)]
    m = retrieval_metrics(torch.eye(20), keys, keys)
    assert m["R@1"] == 100.0 and m["median_rank"] == 1.0


def test_chance_matches_random_rankings():
    rnd = random.Random(0)
    gallery = [rnd.choice("abcdefghij") for _ in range(40)]
    queries = list("abcdefghij")
    expected = chance_metrics(queries, gallery)
    torch.manual_seed(0)
    trials = [retrieval_metrics(torch.rand(10, 40), queries, gallery) for _ in range(3000)]
    for k in ("R@1", "R@5", "R@10"):
        observed = sum(t[k] for t in trials) / len(trials)
        assert observed == pytest.approx(expected[k], abs=1.0), k


def test_query_without_answer_is_an_error():
    with pytest.raises(ValueError, match="correct gallery item"):
        first_correct_rank(torch.rand(1, 2), ["z"], ["a", "b"])


def test_a_collapsed_model_scores_no_better_than_chance():
    # constant similarity: every query ties with every gallery item
    keys = [f"c{i}" for i in range(50)]
    m = retrieval_metrics(torch.zeros(50, 50), keys, keys)
    assert m["R@1"] == 0.0 and m["R@5"] == 0.0 and m["median_rank"] == 50.0
    assert m["R@1"] <= chance_metrics(keys, keys)["R@1"]


def test_ties_count_against_the_query_and_correct_items_do_not():
    # the best correct item (0.5) ties with one incorrect item and with another correct one
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    assert first_correct_rank(sim, ["a"], ["b", "a", "a", "c"]).tolist() == [2]
    assert first_correct_rank(torch.ones(1, 1), ["a"], ["a"]).tolist() == [1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_similarities_raise(bad):
    keys = [f"c{i}" for i in range(4)]
    sim = torch.eye(4)
    sim[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(sim, keys, keys)
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(torch.full((4, 4), float("nan")), keys, keys)


def test_item_protocol_scores_a_perfect_model_perfectly_with_repeated_rows():
    # 3 items (10, 20, 30) with 2, 1, 2 captions; each feature is its item's axis (perfect)
    items = [10, 10, 20, 30, 30]
    keys = [1, 2, 3, 4, 5]
    axis = {10: 0, 20: 1, 30: 2}
    emb = {
        "media": torch.eye(3)[[axis[i] for i in items]],
        "text": torch.eye(3)[[axis[i] for i in items]],
        "items": torch.tensor(items),
        "keys": torch.tensor(keys),
    }
    # row orders with a replaced bad sample or a duplicate row (anywhere, not only at the end)
    for rows in ([0, 1, 2, 3, 4], [0, 0, 1, 2, 3, 4], [0, 1, 2, 2, 3, 4], [3, 0, 1, 1, 2, 4, 0]):
        dup = {k: v[rows] for k, v in emb.items()}
        report = retrieval_report(dup, "image", "item")
        for direction in ("image->text", "text->image"):
            assert report[direction]["R@1"] == 100.0, (rows, direction, report[direction])
        assert report["image->text"]["num_queries"] == 3
        assert report["text->image"]["num_queries"] == 5
