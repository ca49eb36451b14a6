"""PABEE's patience rule (issue #22, item 3, the criterion alone): against a sample-by-sample
loop written from the paper's description, and by hand."""

import pytest
import torch

from auxhead.exits._patience import patience_exits, patience_logits


def _reference(predictions: list[list[int]], patience: int) -> list[int]:
    """PABEE, one sample at a time: counter +1 when a head agrees with the one before it, 0
    otherwise; exit at the first head where it reaches `patience`; else the main output."""
    exits = []
    for sample in zip(*predictions, strict=True):
        counter, exit = 0, len(predictions)
        for index in range(1, len(sample)):
            counter = counter + 1 if sample[index] == sample[index - 1] else 0
            if counter >= patience:
                exit = index
                break
        exits.append(exit)
    return exits


def _one_hot(predictions: list[list[int]], classes: int = 3) -> list[torch.Tensor]:
    return [torch.nn.functional.one_hot(torch.tensor(p), classes).float() for p in predictions]


def test_by_hand():
    # Five heads, four samples (one column each), patience 2.
    predictions = [
        [0, 1, 2, 0],
        [1, 1, 2, 1],
        [1, 1, 0, 0],
        [1, 2, 0, 1],
        [1, 2, 0, 1],
    ]
    exits = patience_exits(_one_hot(predictions), patience=2)
    assert exits.tolist() == [3, 2, 4, 5]  # the last never agrees twice in a row: main


@pytest.mark.parametrize("patience", [1, 2, 3, 5])
def test_against_a_loop_over_samples(patience):
    generator = torch.Generator().manual_seed(patience)
    for heads in (1, 2, 6):
        # Few classes, so that runs of agreement happen often.
        predictions = torch.randint(0, 2, (heads, 64), generator=generator).tolist()
        exits = patience_exits(_one_hot(predictions, 2), patience)
        assert exits.tolist() == _reference(predictions, patience)


def test_the_answer_comes_from_the_exit():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(16, 4, generator=generator) for _ in range(4)]
    logits[1] = logits[0] + 0.01  # the same predictions at heads 0 and 1: patience 1 exits at 1
    main = torch.randn(16, 4, generator=generator)
    answer, exits = patience_logits(logits, main, patience=1)
    assert (exits == 1).all()
    torch.testing.assert_close(answer, logits[1])
    answer, exits = patience_logits(logits, main, patience=9)
    assert (exits == 4).all()
    torch.testing.assert_close(answer, main)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="patience must be a whole number >= 1"):
        patience_exits([torch.zeros(2, 3)], 0)
    with pytest.raises(ValueError, match="at least one head"):
        patience_exits([], 1)
    with pytest.raises(ValueError, match=r"one \(B, K\) shape"):
        patience_exits([torch.zeros(2, 3), torch.zeros(2, 4)], 1)
