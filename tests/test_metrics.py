import random

import pytest
import torch

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
