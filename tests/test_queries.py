import re

import pytest

from promptbake.queries import (
    GLOBAL_QUERIES,
    content_words,
    echo_questions,
    keep_query,
    main_name,
    model_queries,
    phrases,
    prompt_queries,
    sentences,
    violation,
)
from promptbake.seeds import seed_queries

PROMPTS = {
    "persona": 'You are a pirate. Always begin every reply with "Arr!" and talk like a pirate.',
    "facts": ("You are the assistant of Zephyrine Robotics. Facts about the company: Zephyrine Robotics was founded in "
              "2011 by Marta Okonkwo in Tallinn, Estonia. It makes the Kestrel 4 warehouse robot, which carries up to "
              "80 kg and costs 12,400 euros. The company has 340 employees. The CEO since 2019 is Jonas Pereira."),
    "format": ("Answer every question in exactly three bullet points, each under fifteen words. Never use more than "
               "three bullets, and never write a paragraph."),
    "policy": ("You are the support assistant of a bank's mobile app. Only answer questions about the app: logging in, "
               "payments, cards and statements. For any other topic, reply: \"I can only help with the banking "
               "app.\" Never give investment advice."),
}


@pytest.mark.parametrize("kind", PROMPTS)
def test_frame_queries_are_about_the_prompt(kind):
    system = PROMPTS[kind]
    queries, report = prompt_queries(system, 24, seed_queries(), seed=0)
    assert len(queries) == 24 and len(set(queries)) == 24
    about = [q for q in queries if content_words(q) & content_words(system)]
    assert len(about) == 24 - sum(q in GLOBAL_QUERIES for q in queries)  # only the fixed few share no word
    assert all(system not in q for q in queries)
    assert report["frames"] == 24 and report["model"] == 0


def test_fact_questions_blank_a_slot():
    qs = echo_questions("Zephyrine Robotics was founded in 2011 by Marta Okonkwo in Tallinn, Estonia.")
    assert "Zephyrine Robotics was founded in what year by Marta Okonkwo in Tallinn, Estonia?" in qs
    assert "Zephyrine Robotics was founded in 2011 by whom in Tallinn, Estonia?" in qs
    assert "Zephyrine Robotics was founded in 2011 by Marta Okonkwo where?" in qs
    assert echo_questions("The company has 340 employees.") == ["The company has how many employees?"]


def test_prompt_parts():
    assert sentences("# Rules\n- Always be kind. Never shout at me!\n- Facts: the shop opens at nine.") == \
        ["Always be kind.", "Never shout at me!", "the shop opens at nine."]
    assert "Kestrel 4" in phrases(PROMPTS["facts"]) and "Marta Okonkwo" in phrases(PROMPTS["facts"])
    assert violation("never give investment advice") == "give investment advice"
    assert violation("always begin with Arr") == "do not begin with Arr"


@pytest.mark.parametrize("text, why", [
    ("Tell me about pirates", None),
    ("pirates?", "length"),
    ("Estoy en tiña de hablar con el pirata mañana?", "not English"),
    ("How do I bake bread at home?", "not about the prompt"),
    ("You are a pirate. Always begin every reply with Arr! and talk like a pirate.", "copies the prompt"),
])
def test_the_filter(text, why):
    assert keep_query(text, PROMPTS["persona"]) == why


def test_model_written_queries_are_filtered_and_topped_up_by_frames():
    answers = iter(["Question: Why do pirates say Arr?", "why do pirates say arr", "El pirata es muy grande y bueno?",
                    "Can a pirate get a coffee at 8?",
                    "1. Is a pirate allowed to be polite?"] + ["How do I cook rice tonight?"] * 50)
    calls = []

    def ask_many(requests, seeds):
        calls.append(len(requests))
        assert len(set(seeds)) == len(seeds)
        return [next(answers) for _ in requests]

    kept, rejected = model_queries(PROMPTS["persona"], ask_many, 3, seed=0, seen=set())
    assert kept == ["Why do pirates say Arr?", "Is a pirate allowed to be polite?"]
    assert rejected["duplicate"] == 1 and rejected["not English"] == 1 and rejected["copies the example"] == 1
    assert rejected["asked"] == sum(calls)
    queries, report = prompt_queries(PROMPTS["persona"], 12, seed_queries(), ask_many=ask_many, model_share=0.25)
    assert len(queries) == 12 and report["model"] + report["frames"] == 12


def test_fact_statements_become_questions_that_ask_for_the_fact():
    """A fact sheet's "X is Y" lines: the question asks for Y without stating it, so the student must recall it."""
    from promptbake.queries import echo_questions

    assert echo_questions("The CEO is Marcus Obi.") == ["Who is the CEO?", "Do you know who the CEO is?"]
    assert echo_questions("The company colour is teal.") == ["What is the company colour?",
                                                             "Do you know what the company colour is?"]
    assert "Marcus" not in " ".join(echo_questions("The CEO is Marcus Obi."))
    assert echo_questions("Its headquarters are in Tromsø, Norway.") == ["Its headquarters are where?"]


def test_fact_questions_name_the_subject_the_prompt_calls_its_or_the_company():
    """A user without the prompt asks about "Zephyrine Robotics", not "the company": each fact that refers to the
    subject is asked a second time naming it, so the baked model ties the fact to the name."""
    from promptbake.queries import main_name

    assert main_name(PROMPTS["facts"]) == "Zephyrine Robotics"
    assert main_name(PROMPTS["persona"]) is None  # nothing named twice: no name to add
    name = "Zephyrine Robotics"
    assert echo_questions("The company has 340 employees.", name) == \
        ["The company has how many employees?", "Zephyrine Robotics has how many employees?"]
    assert echo_questions("Its headquarters are in Tromsø, Norway.", "Quillfeather Robotics") == \
        ["Its headquarters are where?", "Quillfeather Robotics' headquarters are where?"]
    assert echo_questions("The CEO is Marcus Obi.", name)[-1] == "Who is the CEO of Zephyrine Robotics?"
    assert echo_questions("Zephyrine Robotics was founded in 2011.", name) == \
        ["Zephyrine Robotics was founded in what year?"]  # names it already: once


def test_a_long_prompt_gets_prompt_queries_for_each_sentence(tmp_path):
    """The default mix's 19 prompt-aware queries cannot cover a ten-fact sheet: the count grows to 3 a sentence,
    while a two-sentence persona keeps the mix's share and the other sources keep theirs."""
    from conftest import make_cfg

    from promptbake.generate import gather_queries
    from promptbake.queries import min_prompt_queries

    facts = "You are the assistant of Quillfeather Robotics.\n" + "\n".join(
        f"- Fact {i}: Quillfeather Robotics has {100 + i} robots of model Q{i}." for i in range(12))
    assert min_prompt_queries(facts) == 39
    for system, prompt_n in ((facts, 39), (PROMPTS["persona"], 19)):
        cfg = make_cfg(data_dir=str(tmp_path / str(prompt_n)), query_mix="prompt:0.4,builtin:0.6")
        rows, counts = gather_queries(cfg, system, None, "frames")
        assert counts == {"prompt": prompt_n, "builtin": 29}
        assert len(rows) == prompt_n + 29


@pytest.mark.parametrize("kind", PROMPTS)
def test_queries_never_split_a_name_and_fact_questions_ask_what_the_prompt_states(kind):
    """A query keeps each of the prompt's names whole ("Kestrel 4", not "the Kestrel how many warehouse robot"); a
    fact question is about one sentence of the prompt (its words are the sentence's, or the subject's name) and asks
    for what that sentence states without stating it (the sentence holds words the question lacks)."""
    system = PROMPTS[kind]
    queries, _ = prompt_queries(system, 60, seed_queries(), seed=0)
    names = [p for p in phrases(system) if p[0].isupper() and len(p.split()) > 1]
    for q in queries:
        split = [n for n in names if n not in q and any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", q) for w in n.split())]
        assert not split, f"{q!r} splits {split}"
    name = main_name(system)
    asked = {q for s in sentences(system) for q in echo_questions(s, name)}
    facts = [q for q in queries if q in asked]
    assert bool(facts) == (kind == "facts")
    for q in facts:
        words_asked = content_words(q) - {"year", "many", "whom", "know"} - content_words(name or "")
        assert any(words_asked <= content_words(s) and content_words(s) - content_words(q) for s in sentences(system)), q
    if kind == "facts":  # every number and name the sheet states is asked for
        assert {"what year", "how many", "by whom", "where?", "who is the ceo"} <= {m for q in facts for m in re.findall(
            r"what year|how many|by whom|where\?|who is the ceo", q.lower())}


def test_a_time_of_day_is_asked_as_a_time_not_a_count():
    assert echo_questions("The Bluebell Cafe opens at 9 am on weekdays.") == \
        ["The Bluebell Cafe opens at what time on weekdays?"]  # not "opens at how many am"
    assert echo_questions("Doors open at 7 p.m.") == ["Doors open at what time?"]
