"""evaluate.py's figures without a model: scoring answers against checks, which checks a baked target gets, and the
warning when --queries overlaps the training queries."""

import orjson

from promptbake.checks import parse_checks
from promptbake.config import Config
from promptbake.evaluate import score_answers, target_checks, training_queries, warn_overlap
from promptbake.io import sha256_text

LOOP = "Aye, aye, aye, aye, aye, aye, aye, aye, aye, aye"


def test_adherence_counts_loops_apart_and_checks_only_where_they_apply():
    checks = parse_checks([{"matches": r"\baye\b", "name": "aye"}, {"contains": "1987", "when": "founded"}], "t")
    questions = ["When was it founded?", "Hi?", "Hi?", "Hi?"]
    texts = ["Aye, in 1987.", "Aye matey, a fine day to you.", LOOP, "Hello there."]
    s = score_answers(texts, questions, checks, n_greedy=2, llrs=[0.5, 0.1, None, -0.2])
    assert s["answers"] == 4 and s["loop"]["k"] == 1
    assert (s["all"]["k"], s["all"]["n"]) == (3, 4)  # the loop passes the word check: counted among all answers
    assert (s["non_degenerate"]["k"], s["non_degenerate"]["n"]) == (2, 3)  # not among non-loop ones
    assert (s["greedy"]["k"], s["greedy"]["n"], s["sampled"]["n"]) == (2, 2, 2)
    assert s["checks"]["contains 1987"]["all"]["n"] == 1  # only the question matching `when`
    assert s["llr"]["n"] == 3 and s["llr"]["mean"] == 0.4 / 3
    assert "all" not in score_answers(texts, questions, [], 2)  # no checks: no adherence, the loop share stays


def test_a_baked_target_gets_its_live_front_matter_else_its_recorded_checks(tmp_path):
    prompt = tmp_path / "support.md"
    prompt.write_text("---\nchecks:\n  - max_words: 30\n---\nYou are Acme's support agent.\n")
    t = {"name": "support", "prompt_file": str(prompt), "system_prompt_sha256": sha256_text("You are Acme's support "
                                                                                               "agent."),
         "checks": [{"contains": "Acme", "name": "says Acme"}], "marker_regex": ""}
    cfg = Config()
    assert [c.name for c in target_checks(cfg, t)] == ["max_words 30"]  # edited checks take effect, no rebake
    prompt.write_text("You are someone else now.")  # the file no longer holds the baked prompt: the record counts
    assert [c.name for c in target_checks(cfg, t)] == ["says Acme"]
    cfg.checks = [{"starts_with": "Hello"}]  # the config, now, wins
    assert [c.name for c in target_checks(cfg, t)] == ["starts_with Hello"]
    assert [c.name for c in target_checks(Config(marker_regex="x"), {**t, "checks": []})] == ["marker_regex"]


def test_queries_that_were_trained_on_are_named_in_one_line(tmp_path, capsys):
    run = tmp_path / "checkpoints" / "r"
    (run / "final").mkdir(parents=True)
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Arr!"}]}
            for q in ("Who are you?", "What is rain?", "Tell me a joke.")]
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    (run / "held_out.jsonl").write_bytes(orjson.dumps({"messages": [rows[1]["messages"][0]], "target": "r"}) + b"\n")
    trained = training_queries(run / "final", {}, {"data": str(data)})
    assert trained == {"who are you?", "tell me a joke."}  # the held-out query was never trained on
    contexts = [[{"role": "user", "content": q}] for q in ("who are  you?", "What is rain?", "Tell me a joke.", "Hm?")]
    warn_overlap(contexts, trained, "mine.txt")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "warning: 2 of the 4 queries in mine.txt are training queries" in out
    assert "'who are  you?'" in out and "'Tell me a joke.'" in out
    warn_overlap(contexts[1:2], trained, "mine.txt")
    assert capsys.readouterr().out == ""
    assert training_queries(run / "final", {}, {"data": str(tmp_path / "gone.jsonl")}) == set()


def test_answering_shows_a_progress_bar_counting_every_answer(tiny_model_dir, capsys):
    """evaluate.py answers for minutes on a CPU: a bar named after the model counts greedy + sampled answers."""
    from promptbake.evaluate import sample
    from promptbake.model import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir, "cpu"), load_tokenizer(tiny_model_dir)
    contexts = [[{"role": "user", "content": q}] for q in ("Hi there", "What is rain?", "Name a colour.")]
    out = sample(model, tokenizer, contexts, None, 4, 2, seed=0, batch_size=2, greedy=True, desc="answering: base")
    assert len(out) == 9
    err = capsys.readouterr().err
    assert "answering: base" in err and "/9 [" in err  # the total: 3 queries x (1 greedy + 2 sampled)


def test_adherence_on_the_queries_never_trained_on_is_given_apart():
    """Questions a user evaluates on may include training queries (a frame can write the natural phrasing of a
    fact question): each model's adherence is then also scored on the others alone, greedy and sampled alike."""
    from promptbake.evaluate import unseen_adherence

    checks = parse_checks([{"contains": "2011", "name": "year"}], "t")
    contexts = [[{"role": "user", "content": q}] for q in ("When was it founded?", "What year did it start?")]
    answers = {who: [(c, [], True) for c in contexts * 2] for who in ("prompted", "baked")}  # 1 greedy + 1 sampled
    texts = {"prompted": ["2011", "2011", "2011", "in 2011"], "baked": ["2011", "1999", "2011", "no idea"]}
    unseen = unseen_adherence(answers, texts, checks, 2, {"when was it founded?"})
    assert unseen["n_queries"] == 1
    assert unseen["prompted"]["all"]["rate"] == 1.0 and unseen["baked"]["all"]["rate"] == 0.0
    assert unseen["baked"]["answers"] == 2 and unseen["baked"]["greedy_answers"] == 1
    assert unseen_adherence(answers, texts, checks, 2, set()) is None  # nothing trained on: the main figure says it
    assert unseen_adherence(answers, texts, checks, 2, {"when was it founded?", "what year did it start?"}) is None
