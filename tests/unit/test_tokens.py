"""Prompts to tokens: spans, BOS policies, left padding and targets, with both tiny tokenizers.

``byte_level_tokenizer()`` is GPT-2-style (``Ġ`` word starts, no BOS); ``sentencepiece_tokenizer()``
is Llama-2-style (``▁`` word starts, prepends ``<s>``). Both wrap the same tiny GPT-2: tokenization
needs a :class:`rs.Model` but never runs it (except the one padding-parity check at the end).
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers

import recallscope as rs
from recallscope.core.tokens import encode_prompt, find_token_span
from tiny import byte_level_tokenizer, sentencepiece_tokenizer, tiny_hf_model

PROMPTS = ["The capital of France is", "France is", "Miles Davis plays the"]


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("gpt2")


@pytest.fixture(scope="module")
def byte_model(hf_model):
    return rs.Model(hf_model, byte_level_tokenizer())


@pytest.fixture(scope="module")
def sp_model(hf_model):
    return rs.Model(hf_model, sentencepiece_tokenizer())


@pytest.fixture(params=["byte_level", "sentencepiece"])
def model(request, byte_model, sp_model):
    return byte_model if request.param == "byte_level" else sp_model


def _byte_level_with_bos() -> transformers.PreTrainedTokenizerFast:
    """The byte-level tokenizer, declaring ``<|endoftext|>`` as its BOS but not adding it."""
    base = byte_level_tokenizer()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )


def _token_texts(model, ids) -> list[str]:
    """Token strings with the word-start marker turned back into a space."""
    tokens = model.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return [t.replace("Ġ", " ").replace("▁", " ") for t in tokens]


def _span_text(model, batch, name, row) -> str:
    start, end = (int(v) for v in batch.spans[name][row])
    return "".join(_token_texts(model, batch.input_ids[row, start:end])).strip()


# -- span location ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "subject"),
    [
        ("The capital of France is", "France"),
        ("The capital of France is", "capital of France"),
        ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
        ("Miles Davis plays the", "Miles Davis"),
        ("Miles Davis plays the", "Davis"),
        ("The official language of Japan is", "official language"),
        ("Steve Jobs founded", "Steve"),
        ("Paris is the capital of", "Paris"),
    ],
)
def test_span_tokens_spell_the_subject(model, prompt, subject):
    batch = rs.tokenize(model, [prompt], spans={"subject": [subject]})
    start, end = batch.spans["subject"][0].tolist()
    assert 0 <= start < end <= batch.seq_len
    assert _span_text(model, batch, "subject", 0) == subject
    texts = _token_texts(model, batch.input_ids[0])
    # the tokens before the span spell the text before the subject, the tokens after it the rest
    at = prompt.index(subject)
    assert "".join(texts[batch.n_prefix : start]).strip() == prompt[:at].strip()
    assert "".join(texts[end:]).strip() == prompt[at + len(subject) :].strip()


def test_spans_exact_values_byte_level(byte_model):
    prompts = [
        "The capital of France is",
        "The Eiffel Tower is located in the city of",
        "Miles Davis plays the",
    ]
    batch = rs.tokenize(byte_model, prompts, spans={"subject": ["France", "Eiffel Tower", "Davis"]})
    # tokens: The|Ġcapital|Ġof|ĠFrance|Ġis ; The|Ġ|Ei|f|f|e|l|Ġ|To|w|er|Ġis|... ; Mi|l|es|Ġ|Da|v|is|Ġ|...
    pad = batch.pad_lengths.tolist()
    assert pad == [18, 0, 11]
    assert batch.spans["subject"].tolist() == [[18 + 3, 18 + 4], [2, 11], [11 + 4, 11 + 7]]
    # whitespace-only tokens ("Ġ") next to a subject are not part of it
    assert _token_texts(byte_model, batch.input_ids[1, 1:2]) == [" "]
    assert _token_texts(byte_model, batch.input_ids[2, 11 + 3 : 11 + 4]) == [" "]


def test_spans_exact_values_sentencepiece(sp_model):
    prompts = [
        "The capital of France is",
        "The Eiffel Tower is located in the city of",
        "Miles Davis plays the",
    ]
    batch = rs.tokenize(sp_model, prompts, spans={"subject": ["France", "Eiffel Tower", "Davis"]})
    # tokens: <s>|▁The|▁capital|▁of|▁France|▁is ; <s>|▁The|▁Eiffel|▁Tower|... ; <s>|▁Miles|▁Davis|...
    assert batch.pad_lengths.tolist() == [4, 0, 5]
    assert batch.spans["subject"].tolist() == [[4 + 4, 4 + 5], [2, 4], [5 + 2, 5 + 3]]


def test_subject_at_start_of_prompt(model):
    batch = rs.tokenize(
        model, ["Miles Davis plays the", "Paris is the capital of"], spans={"s": ["Miles", "Paris"]}
    )
    for row in range(2):
        start = int(batch.spans["s"][row, 0])
        # the subject starts right after the padding and the BOS, if any
        assert start == int(batch.pad_lengths[row]) + batch.n_prefix
    assert _span_text(model, batch, "s", 0) == "Miles"
    assert _span_text(model, batch, "s", 1) == "Paris"


def test_spacing_around_the_subject_is_ignored(byte_model):
    prompt = "The capital of France is"
    spans = {"plain": ["France"], "lead": [" France"], "trail": ["France "], "tuple": [(15, 21)]}
    batch = rs.tokenize(byte_model, [prompt], spans=spans)
    for name in spans:
        assert batch.spans[name].tolist() == [[3, 4]], name


def test_tuple_spans_are_character_ranges(model):
    prompt = "The capital of France is"
    as_tuple = (prompt.index("capital"), prompt.index("capital") + len("capital of"))
    batch = rs.tokenize(model, [prompt], spans={"t": [as_tuple], "s": ["capital of"]})
    assert torch.equal(batch.spans["t"], batch.spans["s"])
    assert _span_text(model, batch, "t", 0) == "capital of"
    # a character range cutting into a token takes the whole token (tokens overlapping the range)
    inside = rs.tokenize(model, [prompt], spans={"t": [(as_tuple[0] + 2, as_tuple[0] + 4)]})
    assert _span_text(model, inside, "t", 0) == "capital"


def test_none_spans_give_minus_one(model):
    batch = rs.tokenize(model, PROMPTS[:2], spans={"subject": [None, "France"], "none": [None, None]})
    assert batch.spans["subject"][0].tolist() == [-1, -1]
    assert batch.spans["none"].tolist() == [[-1, -1], [-1, -1]]
    assert _span_text(model, batch, "subject", 1) == "France"
    assert not batch.span_mask("none").any()
    assert batch.span_positions("subject", 0) == []


def test_first_occurrence_is_used(byte_model):
    batch = rs.tokenize(byte_model, ["The capital of France is the capital"], spans={"c": ["capital"]})
    assert batch.spans["c"].tolist() == [[1, 2]]


# -- BOS policies ----------------------------------------------------------------------------------


def test_bos_tokenizer_policy(sp_model, byte_model):
    sp = sentencepiece_tokenizer()
    batch = rs.tokenize(sp_model, ["The capital of France is"], spans={"s": ["The"]})
    assert batch.n_prefix == 1
    assert int(batch.input_ids[0, 0]) == sp.bos_token_id
    assert sp.convert_ids_to_tokens(int(batch.input_ids[0, 0])) == "<s>"
    assert batch.spans["s"].tolist() == [[1, 2]]
    assert batch.input_ids[0].tolist() == sp("The capital of France is")["input_ids"]

    byte = rs.tokenize(byte_model, ["The capital of France is"], spans={"s": ["The"]})
    assert byte.n_prefix == 0
    assert byte.spans["s"].tolist() == [[0, 1]]
    assert byte.input_ids[0].tolist() == byte_level_tokenizer()("The capital of France is")["input_ids"]


def test_bos_never_drops_it(hf_model, sp_model):
    never = rs.load_model(hf_model, tokenizer=sentencepiece_tokenizer(), bos="never")
    assert never.bos == "never"
    kw = dict(spans={"s": ["France", "France"]}, targets=[" Paris", " Paris"])
    dropped = rs.tokenize(never, PROMPTS[:2], **kw)
    kept = rs.tokenize(sp_model, PROMPTS[:2], **kw)
    assert dropped.n_prefix == 0
    assert dropped.seq_len == kept.seq_len - 1
    assert sentencepiece_tokenizer().bos_token_id not in dropped.input_ids[dropped.attention_mask.bool()]
    for row in range(2):
        real = kept.input_ids[row][kept.attention_mask[row].bool()].tolist()
        assert real[0] == sentencepiece_tokenizer().bos_token_id
        assert dropped.input_ids[row][dropped.attention_mask[row].bool()].tolist() == real[1:]
    assert torch.equal(dropped.spans["s"], kept.spans["s"] - 1)
    assert torch.equal(dropped.target_ids, kept.target_ids)
    assert dropped.answer_ids == kept.answer_ids


def test_bos_always_adds_bos_token(hf_model, byte_model):
    tok = _byte_level_with_bos()
    always = rs.load_model(hf_model, tokenizer=tok, bos="always")
    plain = rs.Model(hf_model, tok)  # policy "tokenizer": this tokenizer adds nothing
    kw = dict(spans={"s": ["France", "France"]}, targets=[" Paris", " Paris"])
    added = rs.tokenize(always, PROMPTS[:2], **kw)
    bare = rs.tokenize(plain, PROMPTS[:2], **kw)
    assert bare.n_prefix == 0 and added.n_prefix == 1
    assert added.seq_len == bare.seq_len + 1
    real = added.attention_mask.bool()
    first_real = real.int().argmax(-1)
    assert added.input_ids[torch.arange(2), first_real].tolist() == [tok.bos_token_id] * 2
    for row in range(2):
        with_bos = added.input_ids[row][real[row]].tolist()
        assert with_bos[1:] == bare.input_ids[row][bare.attention_mask[row].bool()].tolist()
    assert torch.equal(added.spans["s"], bare.spans["s"] + 1)
    assert torch.equal(added.target_ids, bare.target_ids)
    ids, offsets, n_prefix = encode_prompt(always, "France is")
    assert ids[0] == tok.bos_token_id and offsets[0] == (0, 0) and n_prefix == 1


def test_bos_always_does_not_double_it(hf_model, sp_model):
    always = rs.Model(hf_model, sentencepiece_tokenizer(), bos="always")
    kw = dict(spans={"s": ["France", "Miles"]}, targets=[" Paris", " trumpet"])
    prompts = [PROMPTS[0], PROMPTS[2]]
    a, t = rs.tokenize(always, prompts, **kw), rs.tokenize(sp_model, prompts, **kw)
    assert torch.equal(a.input_ids, t.input_ids) and a.n_prefix == t.n_prefix == 1
    assert torch.equal(a.spans["s"], t.spans["s"]) and a.answer_ids == t.answer_ids


def test_bos_always_without_bos_token_raises(hf_model):
    model = rs.Model(hf_model, byte_level_tokenizer(), bos="always")
    with pytest.raises(rs.SpanError, match="bos='always' but the tokenizer has no bos_token"):
        rs.tokenize(model, ["The capital of France is"])


def test_unknown_bos_policy(hf_model):
    with pytest.raises(ValueError, match="bos must be 'tokenizer', 'never' or 'always', got 'sometimes'"):
        rs.Model(hf_model, byte_level_tokenizer(), bos="sometimes")


# -- left padding ----------------------------------------------------------------------------------


def test_left_padding(model):
    alone = [
        rs.tokenize(model, [p], spans={"s": [s]})
        for p, s in zip(PROMPTS, ["France", "France", "Davis"], strict=True)
    ]
    batch = rs.tokenize(model, PROMPTS, spans={"s": ["France", "France", "Davis"]})
    lengths = [a.seq_len for a in alone]
    width = max(lengths)
    assert batch.seq_len == width
    assert batch.pad_lengths.tolist() == [width - n for n in lengths]
    pad_id = model.tokenizer.pad_token_id
    for row, (single, n) in enumerate(zip(alone, lengths, strict=True)):
        pad = width - n
        assert batch.input_ids[row, pad:].tolist() == single.input_ids[0].tolist()  # right-aligned
        assert batch.input_ids[row, :pad].tolist() == [pad_id] * pad
        assert batch.attention_mask[row].tolist() == [0] * pad + [1] * n
        assert batch.position_ids[row].tolist() == [0] * pad + list(range(n))
        assert torch.equal(batch.spans["s"][row], single.spans["s"][0] + pad)
        assert single.pad_lengths.tolist() == [0]
        assert single.position_ids[0].tolist() == list(range(n))
    inputs = batch.model_inputs("cpu")
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    assert torch.equal(inputs["position_ids"], batch.position_ids)


def test_span_mask(byte_model):
    batch = rs.tokenize(byte_model, PROMPTS, spans={"s": ["capital of France", None, "Davis"]})
    mask = batch.span_mask("s")
    assert mask.shape == (3, batch.seq_len) and mask.dtype == torch.bool
    for row in range(3):
        positions = batch.span_positions("s", row)
        assert torch.nonzero(mask[row]).flatten().tolist() == positions
    assert batch.span_positions("s", 0) == [8, 9, 10]  # tokens 1..3 of 5, after 7 pads (width 12)
    assert not mask[1].any()
    assert not (mask & ~batch.attention_mask.bool()).any()


def test_select_reorders_and_repeats_every_field(byte_model):
    batch = rs.tokenize(
        byte_model,
        PROMPTS,
        spans={"s": ["France", None, "Miles"]},
        targets=[" Paris", " Paris", " trumpet"],
        fact_ids=["a", "b", "c"],
    )
    for rows in ([2, 0, 0], torch.tensor([1, 2]), [-1]):
        picked = batch.select(rows)
        index = torch.as_tensor(rows).tolist()
        assert len(picked) == len(index)
        assert torch.equal(picked.input_ids, batch.input_ids[index])
        assert torch.equal(picked.attention_mask, batch.attention_mask[index])
        assert torch.equal(picked.position_ids, batch.position_ids[index])
        assert torch.equal(picked.spans["s"], batch.spans["s"][index])
        assert torch.equal(picked.target_ids, batch.target_ids[index])
        assert picked.prompts == tuple(batch.prompts[i] for i in index)
        assert picked.answer_ids == tuple(batch.answer_ids[i] for i in index)
        assert picked.fact_ids == tuple(batch.fact_ids[i] for i in index)
        assert picked.n_prefix == batch.n_prefix and picked.seq_len == batch.seq_len
    assert batch.select([2, 0, 0]).fact_ids == ("c", "a", "a")


def test_select_keeps_none_fields(byte_model):
    batch = rs.tokenize(byte_model, PROMPTS)
    picked = batch.select([1])
    assert picked.target_ids is None and picked.answer_ids is None and picked.fact_ids is None
    assert picked.spans == {}


def test_left_padding_keeps_logits_at_real_positions(byte_model):
    """GPT-2 has learned absolute positions: the position ids must undo the padding."""
    prompts = PROMPTS[1:]  # 3 and 12 tokens
    batch = rs.tokenize(byte_model, prompts)
    assert batch.pad_lengths.tolist() == [9, 0]
    padded = rs.forward(byte_model, batch, logits="all")
    for row, prompt in enumerate(prompts):
        single = rs.forward(byte_model, rs.tokenize(byte_model, [prompt]), logits="all")[0]
        pad = int(batch.pad_lengths[row])
        torch.testing.assert_close(padded[row, pad:], single, rtol=0, atol=1e-10)


# -- targets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ("The capital of France is", " Paris"),
        ("Microsoft is headquartered in", " Redmond"),
        ("Miles Davis plays the", " trumpet"),
        ("The capital of France", " is Paris"),
    ],
)
def test_targets_are_the_continuation_tokens(model, prompt, target):
    tok = model.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    full_ids = tok(prompt + target)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the continuation is well defined
    expected = tuple(full_ids[len(prompt_ids) :])
    batch = rs.tokenize(model, [prompt], targets=[target])
    assert batch.answer_ids == (expected,)
    assert batch.target_ids.tolist() == [expected[0]]
    assert batch.target_ids.dtype == torch.long


def test_multi_token_target(byte_model, sp_model):
    batch = rs.tokenize(
        byte_model,
        ["Microsoft is headquartered in", "The capital of France is"],
        targets=[" Redmond", " Paris"],
    )
    assert [_token_texts(byte_model, a) for a in batch.answer_ids] == [
        [" R", "ed", "m", "o", "nd"],
        [" Paris"],
    ]
    assert batch.target_ids.tolist() == [batch.answer_ids[0][0], batch.answer_ids[1][0]]
    sp = rs.tokenize(sp_model, ["Microsoft is headquartered in"], targets=[" Redmond"])
    assert "".join(_token_texts(sp_model, sp.answer_ids[0])) == " Redmond"
    assert len(sp.answer_ids[0]) > 1


def test_target_after_trailing_space_falls_back_to_target_alone(byte_model):
    """``"is " + "Paris"`` does not extend the prompt's tokens ("Ġ" becomes "ĠParis")."""
    batch = rs.tokenize(byte_model, ["The capital of France is "], targets=["Paris"])
    alone = byte_level_tokenizer()("Paris", add_special_tokens=False)["input_ids"]
    assert batch.answer_ids == (tuple(alone),)
    assert batch.target_ids.tolist() == [alone[0]]


def test_empty_target_raises(byte_model):
    with pytest.raises(rs.SpanError, match="target '' has no tokens"):
        rs.tokenize(byte_model, ["The capital of France is"], targets=[""])


def test_fact_ids_and_prompts_carried(byte_model):
    batch = rs.tokenize(byte_model, PROMPTS[:2], fact_ids=["f1", "f2"])
    assert batch.fact_ids == ("f1", "f2") and batch.prompts == tuple(PROMPTS[:2])
    assert batch.target_ids is None and batch.answer_ids is None and len(batch) == 2


# -- errors ----------------------------------------------------------------------------------------


def test_subject_not_in_prompt(model):
    message = re.escape("subject 'Germany' does not occur in prompt 'The capital of France is'")
    with pytest.raises(rs.SpanError, match=message):
        rs.tokenize(model, ["The capital of France is"], spans={"subject": ["Germany"]})
    with pytest.raises(
        rs.SpanError, match=r"subject 'france' does not occur .*\(case and spacing included\)"
    ):
        rs.tokenize(model, ["The capital of France is"], spans={"subject": ["france"]})
    with pytest.raises(rs.SpanError, match="relation '' does not occur in prompt"):
        rs.tokenize(model, ["The capital of France is"], spans={"relation": [""]})


def test_span_error_is_a_recallscope_error():
    assert issubclass(rs.SpanError, rs.RecallscopeError)


def test_character_range_covering_no_token(byte_model):
    # characters 14:15 are the space before "France": whitespace belongs to no span
    with pytest.raises(rs.SpanError, match=re.escape("no token covers characters 14:15 (' ')")):
        rs.tokenize(byte_model, ["The capital of France is"], spans={"s": [(14, 15)]})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(spans={"subject": ["France"]}),
            "spans['subject'] has 1 entries for 2 prompts; give one per prompt",
        ),
        (
            dict(targets=[" Paris", " Paris", " Rome"]),
            "targets has 3 entries for 2 prompts; give one per prompt",
        ),
        (dict(fact_ids=["a"]), "fact_ids has 1 entries for 2 prompts; give one per prompt"),
    ],
)
def test_mismatched_lengths(byte_model, kwargs, message):
    with pytest.raises(rs.SpanError, match=re.escape(message)):
        rs.tokenize(byte_model, PROMPTS[:2], **kwargs)


def test_model_without_tokenizer(hf_model):
    model = rs.Model(hf_model)
    with pytest.raises(
        rs.SpanError, match="this model has no tokenizer: pass token ids, or load it with one"
    ):
        rs.tokenize(model, ["The capital of France is"])


def test_empty_prompt_list(byte_model):
    with pytest.raises(rs.RecallscopeError, match="tokenize needs at least one prompt"):
        rs.tokenize(byte_model, [])


# -- find_token_span on hand-written offsets -------------------------------------------------------


def test_find_token_span_hand_offsets():
    text = "Hello big world"
    # <s> Hello | ▁big | ▁wor | ld </s>   (special tokens have empty (0, 0) offsets)
    offsets = [(0, 0), (0, 5), (5, 9), (9, 13), (13, 15), (0, 0)]
    assert find_token_span(text, offsets, (0, 5)) == (1, 2)
    assert find_token_span(text, offsets, (6, 9)) == (2, 3)
    assert find_token_span(text, offsets, (10, 15)) == (3, 5)  # "world" spans two tokens
    assert find_token_span(text, offsets, (6, 15)) == (2, 5)
    assert find_token_span(text, offsets, (11, 12)) == (3, 4)  # inside a token
    assert find_token_span(text, offsets, (0, 15)) == (1, 5)  # specials are never included
    # a span touching only the stripped space of "▁big" belongs to "Hello" alone
    assert find_token_span(text, offsets, (3, 6)) == (1, 2)


def test_find_token_span_whitespace_only_tokens():
    text = "Miles  Davis"
    offsets = [(0, 5), (5, 6), (6, 12)]  # "Miles" | " " | " Davis"
    assert find_token_span(text, offsets, (7, 12)) == (2, 3)
    with pytest.raises(
        rs.SpanError, match=re.escape("no token covers characters 5:6 (' ') of 'Miles  Davis'")
    ):
        find_token_span(text, offsets, (5, 6))


def test_find_token_span_only_specials():
    with pytest.raises(rs.SpanError, match=re.escape("no token covers characters 0:2 ('ab') of 'ab'")):
        find_token_span("ab", [(0, 0), (0, 0)], (0, 2))
    with pytest.raises(rs.SpanError, match="no token covers characters 1:1"):
        find_token_span("ab", [(0, 1), (1, 2)], (1, 1))  # an empty range covers nothing


# -- slow (Python) tokenizers: offsets from decoded prefixes ---------------------------------------


class _SlowTokenizer(transformers.PythonBackend):
    """A non-fast tokenizer with the vocabulary and token splits of a fast one."""

    def __init__(self, fast, prepend_bos: bool = False, **kwargs):
        self._fast = fast
        self._vocab = fast.get_vocab()
        self._inverse = {i: t for t, i in self._vocab.items()}
        self._prepend_bos = prepend_bos
        super().__init__(**kwargs)

    def get_vocab(self):
        return dict(self._vocab)

    @property
    def vocab_size(self):
        return len(self._vocab)

    def _tokenize(self, text, **kwargs):
        return self._fast.tokenize(text)

    def _convert_token_to_id(self, token):
        return self._vocab[token]

    def _convert_id_to_token(self, index):
        return self._inverse[index]

    def convert_tokens_to_string(self, tokens):
        return self._fast.convert_tokens_to_string(tokens)

    def build_inputs_with_special_tokens(self, ids, pair=None):
        return [self.bos_token_id, *ids] if self._prepend_bos else list(ids)

    def get_special_tokens_mask(self, ids, pair=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(i in self.all_special_ids) for i in ids]
        return [1, *[0] * len(ids)] if self._prepend_bos else [0] * len(ids)


def _slow(fast, **kwargs):
    special = dict(eos_token=fast.eos_token, pad_token=fast.pad_token)
    if fast.bos_token is not None:
        special.update(bos_token=fast.bos_token, unk_token=fast.unk_token)
    return _SlowTokenizer(fast, prepend_bos=fast.bos_token is not None, **special, **kwargs)


SLOW_CASES = [
    ("The capital of France is", "France", " Paris"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
    ("Miles Davis plays the", "Davis", " trumpet"),
    ("Steve Jobs founded", "Steve", " Apple"),
]


@pytest.mark.parametrize(
    "fast", [byte_level_tokenizer, sentencepiece_tokenizer], ids=["byte_level", "sentencepiece"]
)
def test_slow_tokenizer_gives_the_same_batch(hf_model, fast):
    fast = fast()
    slow = _slow(fast)
    assert not slow.is_fast
    prompts, subjects, targets = (list(c) for c in zip(*SLOW_CASES, strict=True))
    kw = dict(spans={"subject": subjects}, targets=targets)
    a = rs.tokenize(rs.Model(hf_model, fast), prompts, **kw)
    b = rs.tokenize(rs.Model(hf_model, slow), prompts, **kw)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.spans["subject"], b.spans["subject"])
    assert a.answer_ids == b.answer_ids and a.n_prefix == b.n_prefix
    for prompt in prompts:
        assert (
            encode_prompt(rs.Model(hf_model, slow), prompt)[1]
            == encode_prompt(rs.Model(hf_model, fast), prompt)[1]
        )


def test_slow_tokenizer_offsets_ignore_cleanup_of_spaces(hf_model):
    fast = byte_level_tokenizer()
    slow = _slow(fast, clean_up_tokenization_spaces=True)
    prompt = "A , B , C , D"
    kw = dict(spans={"s": ["D"]})
    expected = rs.tokenize(rs.Model(hf_model, fast), [prompt], **kw).spans["s"]
    assert torch.equal(rs.tokenize(rs.Model(hf_model, slow), [prompt], **kw).spans["s"], expected)
