import pytest

from tasks.answers import extract_answer, is_correct, normalise


@pytest.mark.parametrize("raw,expected", [("9 (apples)", "9"), ("$1,000.50", "1000.5"), ("72", "72"), (18.0, "18"),
                                          ("-3", "-3"), ("3/4", "0.75")])
def test_number_normalisation(raw, expected):
    assert normalise(raw, "number")[0] == expected


def test_unparseable_number_raises():
    with pytest.raises(ValueError, match="no number"):
        normalise("many", "number")


def test_choice_and_text():
    assert normalise("(b) a dog", "choice")[0] == "B"
    assert normalise("  Paris  ", "text")[0] == "paris"


def test_extract_prefers_answer_phrase_over_last_number():
    text = "He has 3 + 4 = 7 apples. Therefore, the answer is 7. He had 2 bags."
    assert extract_answer(text) == "7"
    assert extract_answer("so 5 x 2 = 10 apples") == "10"
    assert extract_answer("The answer is $1,250.") == "1250"
    assert extract_answer("no numbers here") is None


def test_numeric_tolerance():
    assert is_correct("18.00001", "18", tolerance=1e-4)
    assert not is_correct("18.1", "18", tolerance=1e-4)
    assert not is_correct(None, "18")


def test_label_first_outputs_read_the_first_answer():
    out = "Therefore, the answer is 7. Mia has 3 apples, 3 + 4 = 7, and the answer is 9 later"
    assert extract_answer(out, "number", first=True) == "7"
    assert extract_answer(out, "number") == "9"
    assert extract_answer("12 then 15", "number", first=True) == "12"
