"""``Split`` and the few-shot protocol's row selection."""

import pytest
import torch

from vtvc_pyro.data.split import Split, few_shot_rows


def test_split_rows_keep_images_features_labels_and_classes_aligned():
    split = Split(torch.arange(5.0)[:, None], torch.arange(5.0)[:, None] * 10, torch.arange(5),
                  torch.eye(5, dtype=torch.bool))
    part = split.rows(torch.tensor([4, 1]))
    assert len(part) == 2 and part.labels.tolist() == [4, 1]
    assert part.images[:, 0].tolist() == [4.0, 1.0] and part.features[:, 0].tolist() == [40.0, 10.0]
    assert part.classes[0, 4] and part.classes[1, 1] and part.classes.sum() == 2
    assert Split(torch.zeros(3, 1), None, torch.arange(3)).rows(slice(0, 2)).classes is None  # no features, no classes


def test_few_shot_keeps_k_per_group_and_shrinks_val_in_proportion():
    train = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)  # group 2 has fewer than k rows: all kept
    val = torch.tensor([0] * 20 + [1] * 10 + [2] * 4)
    rows = few_shot_rows(train, val, shots=5, seed=0)
    assert [int((train[rows.train] == g).sum()) for g in range(3)] == [5, 5, 3]
    assert rows.train.tolist() == sorted(set(rows.train.tolist()))  # unique, in data set order
    fraction = 13 / 83
    kept = [int((val[rows.val] == g).sum()) for g in range(3)]
    assert kept == [max(2, round(20 * fraction)), max(2, round(10 * fraction)), max(2, round(4 * fraction))]
    again = few_shot_rows(train, val, shots=5, seed=0)
    other = few_shot_rows(train, val, shots=5, seed=1)
    assert torch.equal(again.train, rows.train) and torch.equal(again.val, rows.val)
    assert not torch.equal(other.train, rows.train)


@pytest.mark.parametrize("shots", [1, 1000])
def test_few_shot_extremes(shots):
    train, val = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1])
    rows = few_shot_rows(train, val, shots=shots, seed=3)
    assert len(rows.train) == (2 if shots == 1 else 5)
    assert sorted(val[rows.val].tolist()) == [0, 1, 1]  # at least 2 per class, or all a class has
