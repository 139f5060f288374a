"""The out-of-domain grammars: the wide one is wider than the narrow one, and neither shares wording
(nor, for the wide one, a word's stem) with the evaluation's utterances or holds a word of the domain."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from microturn.model.config import tiny
from microturn.training.curricula import CURRICULA, Curriculum
from microturn.training.data import DuplexGenerator
from microturn.training.fallback import (
    FALLBACK_ANSWER,
    FUNCTION_WORDS,
    IN_DOMAIN_WORDS,
    carriers,
    shares_stem,
    utterances,
    wide_requests,
    wording,
    words,
)


@pytest.mark.parametrize("grammar", ["narrow", "wide"])
def test_training_grammar_shares_no_wording_with_the_evaluation(grammar: str) -> None:
    train, held = utterances("train", grammar), utterances("heldout", grammar)
    assert len(train) > 1000 and len(held) >= 24
    assert held == utterances("heldout")  # the evaluation's grammar whatever a curriculum names
    trained = set().union(*(wording(u) for u in train))
    assert not [u for u in held if wording(u) & trained]
    assert not [u for u in train if set(words(u)) & IN_DOMAIN_WORDS]


def test_wide_grammar_is_many_requests_over_many_words_and_keeps_no_held_out_stem() -> None:
    def content(us: tuple[str, ...]) -> set[str]:
        return {w for u in us for w in words(u) if w not in FUNCTION_WORDS}

    narrow, wide = utterances("train"), utterances("train", "wide")
    assert set(narrow) < set(wide) and len(wide) > 20 * len(narrow)
    assert len(wide_requests()) > 1000 and len(content(wide)) > 2 * len(content(narrow))
    held = content(utterances("heldout"))
    assert not [(w, h) for w in content(tuple(wide_requests())) for h in held if shares_stem(w, h)]
    assert shares_stem("paint", "painted") and shares_stem("grow", "grows") and not shares_stem("dim", "dime")


def test_a_wide_curriculum_draws_its_fallback_from_the_wide_grammar_and_names_only_known_grammars() -> None:
    wide = CURRICULA["hear-fallback"]
    assert wide == dataclasses.replace(CURRICULA["hear-masked"], fallback_grammar="wide")
    only_wide = set(utterances("train", "wide")) - set(utterances("train"))
    # a small room bank: each room's impulse response costs up to ~0.25 s to compute
    small_rooms = dataclasses.replace(wide, augment=dataclasses.replace(wide.augment, rooms=2))
    gen = DuplexGenerator(tiny(), "train", seed=0, curriculum=small_rooms)
    drawn = [gen.question("fallback", np.random.default_rng(i)) for i in range(40)]
    assert all(q.answer == FALLBACK_ANSWER for q in drawn)
    assert sum(q.text in only_wide for q in drawn) > 30  # ~97% of the wide grammar is new
    # in-domain questions borrow the wide grammar's carriers, so that no opener means "out of the domain"
    openers, _ = carriers("wide")
    new_openers = tuple(o for o in openers if o not in carriers("narrow")[0])
    carried = [gen.question("arith", np.random.default_rng(i)).text for i in range(200)]
    assert any(t.startswith(new_openers) for t in carried)
    with pytest.raises(ValueError, match="fallback_grammar"):
        Curriculum(fallback_grammar="everything")
    with pytest.raises(ValueError, match="unknown out-of-domain grammar"):
        utterances("train", "everything")
