"""DPO's pairs as gateway.dpo_pairs makes them: the best answer of each prompt over its negative ones, found through
an index, each pair once; texts of any script (a lone surrogate too) round-trip."""

from __future__ import annotations

import threading

from gateway import dpo_pairs
from gateway.conversation import answer
from gateway.dpo_pairs import PreferencePairs

ASK = [{"role": "user", "content": "Capital of France?"}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_the_best_answer_is_the_highest_rated_and_the_oldest_of_a_tie() -> None:
    with PreferencePairs() as pairs:
        for text, value in [("Lyon.", 0.0), ("Paris.", 1.0), ("Paris!", 1.0), ("Nice.", 0.25), ("Pariss.", 0.75)]:
            pairs.rated(ASK, "ask", answer(ASK, text), value)
        pairs.rated("The sky is", "sky", " green.", 0.0)  # no positive answer: no pair
        rows = list(pairs.rest())
    assert rows == [
        {"prompt": ASK, "chosen": assistant("Paris."), "rejected": assistant("Lyon.")},
        {"prompt": ASK, "chosen": assistant("Paris."), "rejected": assistant("Nice.")},
    ]


def test_a_pair_is_made_once_whether_a_correction_or_ratings_made_it_first() -> None:
    with PreferencePairs() as pairs:
        first = list(pairs.correction(ASK, "ask", answer(ASK, "Paris."), answer(ASK, "Lyon.")))
        again = list(pairs.correction(ASK, "ask", answer(ASK, "Paris."), answer(ASK, "Lyon.")))
        pairs.rated(ASK, "ask", answer(ASK, "Paris."), 1.0)
        pairs.rated(ASK, "ask", answer(ASK, "Lyon."), 0.0)
        pairs.rated(ASK, "ask", answer(ASK, "Marseille."), 0.0)
        rest = list(pairs.rest())
        same = list(pairs.correction(ASK, "ask", answer(ASK, "Paris."), answer(ASK, "Paris.")))
    assert first == [{"prompt": ASK, "chosen": assistant("Paris."), "rejected": assistant("Lyon.")}] and not again
    assert rest == [{"prompt": ASK, "chosen": assistant("Paris."), "rejected": assistant("Marseille.")}]
    assert same == [], "an answer is never preferred over itself"


def test_texts_of_any_script_round_trip_and_text_prompts_get_text_answers() -> None:
    prompt = [{"role": "user", "content": "首都は\ud800?"}]
    with PreferencePairs() as pairs:
        pairs.rated(prompt, "jp", answer(prompt, "東京\udc00"), 1.0)
        pairs.rated(prompt, "jp", answer(prompt, "大阪"), 0.0)
        pairs.rated("The sky is", "sky", " blue.", 1.0)
        pairs.rated("The sky is", "sky", " green.", 0.0)
        rows = list(pairs.rest())
    assert rows == [
        {"prompt": prompt, "chosen": assistant("東京\udc00"), "rejected": assistant("大阪")},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ]


def test_the_best_answer_is_looked_up_through_the_index_not_sorted_per_negative() -> None:
    """Every thumbs-up ties at 1.0: sorting a prompt's positive answers for each negative one made pairing quadratic
    (1,000 of each: 1.5 s); the index in the lookup's order makes it one lookup each (0.03 s)."""
    with PreferencePairs() as pairs:
        plan = pairs._db.execute("EXPLAIN QUERY PLAN " + dpo_pairs._NEGATIVES, {"positive": 0.5}).fetchall()
    (lookup,) = [row[0] for row in plan if "CORRELATED SCALAR SUBQUERY" in row[-1]]
    steps = [row[-1] for row in plan if row[1] == lookup]
    assert any("USING INDEX answers_by_prompt" in step for step in steps), plan
    assert not any("TEMP B-TREE" in step for step in steps), plan  # a sort per negative answer


def test_a_prompt_is_kept_once_however_many_answers_it_has() -> None:
    system = {"role": "system", "content": "Follow the support policy. " * 800}  # 20 kB
    prompt = [system, *ASK]
    with PreferencePairs() as pairs:
        for n in range(50):
            pairs.rated(prompt, "long", answer(prompt, f"Answer {n}."), float(n == 0))
        (prompts,) = pairs._db.execute("SELECT count(*) FROM prompts").fetchone()
        (answers,) = pairs._db.execute("SELECT count(*) FROM answers").fetchone()
        rows = list(pairs.rest())
    assert (prompts, answers, len(rows)) == (1, 50, 49)


def test_pairing_stops_at_the_next_answer_read_once_told_to() -> None:
    stop = threading.Event()
    with PreferencePairs() as pairs:
        for n in range(1000):  # negative answers of prompts without a positive one: they make no pair
            pairs.rated(f"Prompt {n}", f"p{n}", "No.", 0.0)
        pairs.rated("Last", "last", "Yes.", 1.0)
        pairs.rated("Last", "last", "No.", 0.0)
        made = pairs.rest(stop)
        stop.set()
        assert list(made) == [], "stopped before the last prompt's pair, however many answers come before it"
        assert list(pairs.rest()) == [{"prompt": "Last", "chosen": "Yes.", "rejected": "No."}]


def test_an_answer_that_called_tools_is_not_its_text_and_a_prompts_tools_open_its_rows() -> None:
    """An answer is compared whole, without its calls' ids (nothing in a row refers to them): a call of a tool with the
    same (empty) text as another answer is another answer, the same call under another id the same one."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    tools = '[{"type": "function", "function": {"name": "weather"}}]'
    with PreferencePairs() as pairs:
        pairs.rated(ASK, "tools", answer(ASK, "", [{"id": "c1", **call}]), 1.0, tools)
        pairs.rated(ASK, "tools", answer(ASK, "", [{"id": "c2", **call}]), 0.0, tools)
        pairs.rated(ASK, "tools", answer(ASK, ""), 0.0, tools)
        rows = list(pairs.rest())
    assert rows == [
        {
            "prompt": ASK,
            "tools": tools,
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
            "rejected": assistant(""),
        }
    ]
