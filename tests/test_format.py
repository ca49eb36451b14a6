"""`auxhead._format`: the one number and table formatter."""

from auxhead._format import count, percent, si, table


def test_si():
    assert [si(n) for n in (950, 1234, 18_140_000, 2.5e9, -3000)] == [
        "950",
        "1.23k",
        "18.14M",
        "2.50G",
        "-3.00k",
    ]


def test_percent():
    assert percent(0.92114) == "92.11%" and percent(0.5, 0) == "50%" and percent(None) == "-"


def test_plain_table_aligns_and_rules():
    text = table(["exit", "acc"], [["stage1", "87.94%"], ["main", "100.00%"]])
    assert text.splitlines() == [
        "exit        acc",
        "------  -------",
        "stage1   87.94%",
        "main    100.00%",
    ]
    left = table(["name", "type"], [["a", "Conv2d"]], align="ll")
    assert left.splitlines()[2] == "a     Conv2d"


def test_markdown_table():
    assert table(["a", "b"], [[1, 2.5]], markdown=True) == "| a | b |\n|---|---|\n| 1 | 2.5 |"


def test_count():
    assert (count(1, "epoch"), count(3, "epoch"), count(0, "step")) == (
        "1 epoch",
        "3 epochs",
        "0 steps",
    )
