"""itrcli.evaluation.metrics against hand-computed cases and a naive reference written with plain loops."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from itrcli.evaluation import metrics

# --- the naive reference: full sorts by (-score, index), loops, no numpy tricks ----------


def naive_t2i(scores, caption_image):
    ranks = []
    for c, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks.append(order.index(caption_image[c]))
    return ranks


def naive_i2t(scores, caption_image):
    ranks = []
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        for pos, c in enumerate(order):
            if caption_image[c] == i:
                ranks.append(pos)
                break
    return ranks


def naive_recall(ranks, k):
    hits = 0
    for r in ranks:
        if r < k:
            hits += 1
    return 100.0 * hits / len(ranks)


def naive_medr(ranks):
    r = sorted(ranks)
    n = len(r)
    mid = r[n // 2] if n % 2 else (r[n // 2 - 1] + r[n // 2]) / 2
    return math.floor(mid) + 1


def random_dataset(rng: random.Random, n_images: int, max_caps: int = 5, levels: int = 4):
    """Scores from a few levels (many ties) and 1..max_caps captions per image."""
    caption_image = []
    for i in range(n_images):
        caption_image += [i] * rng.randint(1, max_caps)
    rng.shuffle(caption_image)  # captions of an image need not be adjacent
    scores = [[rng.randint(0, levels - 1) / levels for _ in range(n_images)] for _ in caption_image]
    return scores, caption_image


# --- hand-computed tiny case -------------------------------------------------------------

# 3 images; image 0 has captions 0 and 1, image 1 caption 2, image 2 caption 3.
TINY_CAPTION_IMAGE = [0, 0, 1, 2]
TINY_T2I_SCORES = [  # [caption, image]
    [0.9, 0.1, 0.2],  # own image 0 best: rank 0
    [0.5, 0.5, 0.7],  # image 2 higher; image 1 ties but has a higher index: rank 1
    [0.3, 0.3, 0.1],  # image 0 ties with a lower index: rank 1
    [0.2, 0.8, 0.4],  # image 1 higher: rank 1
]


def test_tiny_case_by_hand():
    t2i = metrics.t2i_ranks(np.array(TINY_T2I_SCORES), TINY_CAPTION_IMAGE)
    assert t2i.tolist() == [0, 1, 1, 1]
    # image->text: image 0 -> caption 0 first (rank 0); image 1 -> its caption 2 (0.3) is
    # behind captions 3 (0.8) and 1 (0.5): rank 2; image 2 -> caption 3 (0.4) behind 1 (0.7)
    i2t = metrics.i2t_ranks(np.array(TINY_T2I_SCORES).T, TINY_CAPTION_IMAGE)
    assert i2t.tolist() == [0, 2, 1]
    s = metrics.summarise(t2i, i2t, (1, 2, 5))
    assert s["t2i"] == {"R@1": 25.0, "R@2": 100.0, "R@5": 100.0, "medr": 2.0}
    assert s["i2t"]["R@1"] == pytest.approx(100 / 3)
    assert s["i2t"]["R@2"] == pytest.approx(200 / 3)
    assert s["i2t"]["medr"] == 2.0
    # rsum is always R@1+R@5+R@10 of both directions, whatever K were asked for
    assert s["rsum"] == pytest.approx(25 + 100 + 100 + 100 / 3 + 100 + 100)


def test_all_equal_scores_rank_by_index():
    # a model that scores everything the same finds nothing by luck: rank = the true index
    caption_image = [2, 0, 1, 1]
    zeros = np.zeros((4, 3))
    assert metrics.t2i_ranks(zeros, caption_image).tolist() == [2, 0, 1, 1]
    # image 0's first caption is caption 1; image 1's is caption 2; image 2's is caption 0
    assert metrics.i2t_ranks(zeros.T, caption_image).tolist() == [1, 2, 0]


def test_medr_even_and_odd():
    assert metrics.median_rank(np.array([0, 1, 2])) == 2  # 1-based median of 1, 2, 3
    assert metrics.median_rank(np.array([0, 1, 2, 5])) == 2  # floor(1.5) + 1, as VSE++
    assert metrics.median_rank(np.array([0, 3])) == 2
    assert metrics.median_rank(np.array([4])) == 5


def test_not_retrieved_is_a_miss_and_hides_medr():
    nr = metrics.NOT_RETRIEVED
    ranks = np.array([0, 3, nr, nr])
    assert metrics.recall_at(ranks, 1) == 25.0
    assert metrics.recall_at(ranks, 10) == 50.0
    assert metrics.median_rank(ranks) is None  # the median lies beyond the returned lists
    assert metrics.median_rank(np.array([0, 1, 2, nr])) == 2


# --- against the naive reference on random data with ties ----------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_ranks_match_naive(seed):
    rng = random.Random(seed)
    scores, caption_image = random_dataset(rng, n_images=rng.randint(1, 12))
    s = np.array(scores)  # [n_captions, n_images]
    t2i = metrics.t2i_ranks(s, caption_image)
    i2t = metrics.i2t_ranks(s.T, caption_image)
    assert t2i.tolist() == naive_t2i(scores, caption_image)
    assert i2t.tolist() == naive_i2t([list(col) for col in zip(*scores)], caption_image)
    for k in (1, 2, 5, 10):
        assert metrics.recall_at(t2i, k) == pytest.approx(naive_recall(t2i.tolist(), k))
        assert metrics.recall_at(i2t, k) == pytest.approx(naive_recall(i2t.tolist(), k))
    assert metrics.median_rank(t2i) == naive_medr(t2i.tolist())
    assert metrics.median_rank(i2t) == naive_medr(i2t.tolist())


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_exact_ranks_from_vectors_in_chunks(chunk):
    # entries in {-1, 0, 1} / 4: every dot product is exact in float32, so the many ties
    # (duplicate vectors) are real ties whatever BLAS kernel computes them
    rng = np.random.default_rng(5)
    n_images, dim = 9, 4
    caption_image = rng.permutation(np.repeat(np.arange(n_images), rng.integers(1, 5, n_images)))
    images = rng.integers(-1, 2, (n_images, dim)).astype(np.float32) / 4
    images[3] = images[1]  # duplicate images: tied scores for every caption
    texts = rng.integers(-1, 2, (len(caption_image), dim)).astype(np.float32) / 4
    t2i, i2t = metrics.exact_ranks(images, texts, caption_image, chunk=chunk)
    scores = (texts.astype(np.float64) @ images.T.astype(np.float64)).tolist()
    assert t2i.tolist() == naive_t2i(scores, caption_image.tolist())
    assert i2t.tolist() == naive_i2t([list(c) for c in zip(*scores)], caption_image.tolist())


def test_ranks_from_lists_match_full_ranking():
    rng = random.Random(3)
    scores, caption_image = random_dataset(rng, n_images=10)
    ci = np.array(caption_image)
    t2i_lists = [sorted(range(10), key=lambda j: (-row[j], j)) for row in scores]
    cols = [list(c) for c in zip(*scores)]
    i2t_lists = [sorted(range(len(ci)), key=lambda c: (-row[c], c)) for row in cols]
    full_t2i = metrics.t2i_ranks_from_lists(np.array(t2i_lists), ci)
    full_i2t = metrics.i2t_ranks_from_lists(np.array(i2t_lists), ci)
    assert full_t2i.tolist() == naive_t2i(scores, caption_image)
    assert full_i2t.tolist() == naive_i2t(cols, caption_image)
    # truncated lists: ranks beyond the list are NOT_RETRIEVED, the others unchanged
    short = metrics.t2i_ranks_from_lists(np.array(t2i_lists)[:, :3], ci)
    expected = [r if r < 3 else metrics.NOT_RETRIEVED for r in full_t2i.tolist()]
    assert short.tolist() == expected
    # image->text lists of a subset of query rows
    rows = np.array([4, 7])
    part = metrics.i2t_ranks_from_lists(np.array(i2t_lists)[rows], ci, images=rows)
    assert part.tolist() == full_i2t[rows].tolist()


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="no caption"):
        metrics.i2t_ranks(np.zeros((2, 2)), [0, 0])


def test_folds_split_images_and_follow_captions():
    caption_image = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5])
    folds = metrics.fold_indices(caption_image, 6, 3)
    assert [f[0].tolist() for f in folds] == [[0, 1], [2, 3], [4, 5]]
    assert [f[1].tolist() for f in folds] == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    # 5 x 1,000 out of 5,000 (COCO 1K); uneven sizes differ by at most one
    assert [len(f[0]) for f in metrics.fold_indices(np.arange(5000), 5000, 5)] == [1000] * 5
    assert [len(f[0]) for f in metrics.fold_indices(np.arange(7), 7, 3)] == [3, 2, 2]
    with pytest.raises(ValueError):
        metrics.fold_indices(np.arange(2), 2, 3)


def test_mean_over_folds():
    a = metrics.summarise(np.array([0, 1]), np.array([0]), (1,))
    b = metrics.summarise(np.array([2, 3]), np.array([5]), (1,))
    m = metrics.mean_of([a, b])
    assert m["t2i"]["R@1"] == 25.0
    assert m["i2t"]["R@1"] == 50.0
    assert m["t2i"]["medr"] == (1 + 3) / 2  # per fold: floor(0.5)+1=1 and floor(2.5)+1=3
    assert m["rsum"] == pytest.approx((a["rsum"] + b["rsum"]) / 2)
