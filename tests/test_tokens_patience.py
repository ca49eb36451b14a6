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


# ---- EarlyExit(criterion="patience"): routing and calibration ----------------------------


def _mlp_aux(depth: int = 4):
    """A Sequential of Linear+ReLU blocks with a head after each of the first depth - 1."""
    import auxhead

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(depth)]
    model = torch.nn.Sequential(*blocks, torch.nn.Linear(8, 3))
    taps = [str(i) for i in range(depth - 1)]
    aux = auxhead.attach(model, taps, num_classes=3, head="linear", sample=torch.randn(2, 8))
    return aux.eval()


def _reference_route(aux, x, patience):
    with torch.no_grad(), aux.heads_enabled():
        main = aux(x)
    return patience_logits([aux.aux_outputs[t] for t in aux.taps], main, patience)


@pytest.mark.parametrize("mode", ["staged", "generic"])
@pytest.mark.parametrize("patience", [1, 2])
def test_patience_routing_equals_the_rule_on_the_whole_batch(mode, patience):
    import auxhead

    aux = _mlp_aux()
    x = torch.randn(256, 8)
    early = auxhead.EarlyExit(aux, criterion="patience", patience=patience, mode=mode)
    logits = early(x)
    expected, exits = _reference_route(aux, x, patience)
    assert early.last_exits.tolist() == exits.tolist()
    assert len(set(exits.tolist())) >= 2  # some leave early, some do not: the batch narrowed
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for row in (0, 1):  # batch size 1 takes its own path
        alone = early(x[row : row + 1])
        torch.testing.assert_close(alone, expected[row : row + 1], rtol=1e-5, atol=1e-5)


def test_patience_calibration_picks_what_brute_force_picks():
    """Empirical: the cheapest patience whose drop on the data is within the target, against
    every patience tried by hand with FLOPs from the profile."""
    import auxhead
    from auxhead.exits import flop_profile

    aux = _mlp_aux()
    x = torch.randn(600, 8)
    with torch.no_grad():
        y = aux.model(x).argmax(-1)  # labels the main head gets right
    data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 600, 100)]
    profile = flop_profile(aux, x[:1])
    costs = torch.tensor(profile.exit_costs([True] * 3), dtype=torch.float64)
    tried = {}
    for patience in (1, 2):
        answers, exits = _reference_route(aux, x, patience)
        drop = 1 - (answers.argmax(-1) == y).float().mean().item()  # main alone: 100%
        tried[patience] = (drop, costs[exits].mean().item())
    target = max(drop for drop, _ in tried.values())  # every patience meets it
    fits = [p for p, (drop, cost) in tried.items() if drop <= target and cost < profile.full]
    assert fits, tried  # the test needs a patience that saves FLOPs
    best = min(fits, key=lambda p: tried[p][1])
    early = auxhead.EarlyExit(aux, criterion="patience")
    summary = early.calibrate(data, max_accuracy_drop=target, method="empirical")
    assert early.patience == summary.patience == best
    assert summary.drop == pytest.approx(tried[best][0])
    assert summary.mean_flops == pytest.approx(tried[best][1])
    assert "criterion: patience" in str(summary)
    assert early.evaluate(data).share == summary.share


def test_choose_patience_ltt_takes_the_cheapest_that_passes():
    from auxhead.exits._patience import choose_patience

    n = 3000
    predictions = torch.zeros(n, 4, dtype=torch.long)  # every head agrees, and is right
    correct = torch.ones(n, 5, dtype=torch.bool)
    costs = [10.0, 20.0, 30.0, 40.0, 41.0]
    choice = choose_patience(
        predictions, correct, costs, max_accuracy_drop=0.01, confidence=0.9, method="ltt", full=40
    )
    assert (choice.patience, choice.fallback, choice.passed) == (1, False, 3)
    assert choice.bound is not None and choice.bound <= 0.01
    # Heads that agree but are wrong wherever the main head is right: nothing passes.
    correct[:, :4] = False
    choice = choose_patience(
        predictions, correct, costs, max_accuracy_drop=0.01, confidence=0.9, method="ltt", full=40
    )
    assert (choice.patience, choice.fallback) == (4, True)


def test_patience_is_refused_where_it_does_not_apply(tmp_path):
    import auxhead

    aux = _mlp_aux()
    with pytest.raises(ValueError, match="whole number >= 1"):
        auxhead.EarlyExit(aux, criterion="patience", patience=0)
    early = auxhead.EarlyExit(aux, criterion="patience")
    with pytest.raises(ValueError, match="patience rule is eager only"):
        early.export(tmp_path / "p.pt2", torch.randn(2, 8))
    data = [(torch.randn(8, 8), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ValueError, match="use calibrate"):
        early.calibrate_budget(data, max_flops=0.5)
    with pytest.raises(ValueError, match="temperature=False"):
        early.calibrate(data, temperature=True)
    single = auxhead.attach(aux.strip(), ["0"], num_classes=3, sample=torch.randn(2, 8))
    with pytest.raises(ValueError, match="two heads or more"):
        auxhead.EarlyExit(single, criterion="patience")
