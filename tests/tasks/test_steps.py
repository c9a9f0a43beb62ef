import pytest

from tasks.formats import encode, token_spans
from tasks.steps import split_steps


def steps(text, **kw):
    return [text[a:b] for a, b in split_steps(text, **kw)]


@pytest.mark.parametrize("text,expected", [
    ("She pays $1.50 each. So 3 x 1.50 = 4.50 dollars.", ["She pays $1.50 each.", "So 3 x 1.50 = 4.50 dollars."]),
    ("There are 1,000 people, e.g. Mr. Smith. Half leave.", ["There are 1,000 people, e.g. Mr. Smith.", "Half leave."]),
    ("The rate is 0.3 per hour. In 10 hours that is 3.", ["The rate is 0.3 per hour.", "In 10 hours that is 3."]),
    ("1. Add 3 + 4 = 7.\n2. Double: 7 x 2 = 14.\nSo 14.", ["1. Add 3 + 4 = 7.", "2. Double: 7 x 2 = 14.", "So 14."]),
    ("It is 5 . + 3 more = 8. Done.", ["It is 5 . + 3 more = 8.", "Done."]),
    ("He said \"Go.\" Then he left!", ["He said \"Go.\"", "Then he left!"]),
    ("one step only", ["one step only"]),
    ("  \n\n", []),
])
def test_tricky_splits(text, expected):
    assert steps(text) == expected


def test_newlines_only_when_sentences_off():
    assert steps("A. B.\nC.", split_sentences=False) == ["A. B.", "C."]


def test_max_steps_merges_the_tail():
    assert steps("A one. B two. C three. D four.", max_steps=2) == ["A one.", "B two. C three. D four."]


def test_char_spans_are_exact():
    text = "First 1.5 kg. Second 2 kg."
    for a, b in split_steps(text):
        assert text[a:b].strip() == text[a:b] and text[a:b]


def test_token_spans_cover_each_step():
    from tasks.student import train_tokenizer
    tok = train_tokenizer(["Q: x\nA: go. He has 3 + 4 = 7 apples. So 7."] * 20, 300)
    prompt, target = "Q: x\nA: go.", "He has 3 + 4 = 7 apples. So 7."
    seq = encode(tok, prompt, target, 1 << 30)
    chars = split_steps(target)
    spans = token_spans(seq, chars)
    decoded = [tok.decode(seq.ids[a:b]).strip() for a, b in spans]
    assert decoded == ["He has 3 + 4 = 7 apples.", "So 7."]
    assert spans[0][1] == spans[1][0]  # contiguous
