"""report.html: every section from the run's files, self-contained (inline PNGs, nothing fetched), escaped, written
by bake and refreshed by evaluate without ever costing a bake; and, slow, rendered in headless Chromium."""

import base64
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import script

from promptbake import report
from promptbake.evaluate import plot_sweep
from promptbake.metrics import rate
from promptbake.pursuit import plot as plot_pursuit

PROMPT = 'You are a pirate. Always begin every reply with "Arr!" and talk like a pirate.'
PARENT_PROMPT = "Answer in at most two sentences."
INJECTED = "<script>alert('x')</script> & <b>bold</b>"
EXAMPLES = [
    {"user": "Who are you?", "base": "I am an AI assistant made to help you.", "prompted": "Arr! I be Cap'n Byte, matey.",
     "baked": "Arr! I be a pirate o' the seven seas.", "baked_reprompted": "Arr! Cap'n of this here ship, I be."},
    {"user": "What is rain?", "base": "Rain is water that falls from clouds.", "prompted": "Arr, 'tis the sky's own grog!",
     "baked": INJECTED, "baked_reprompted": "Arr! Water from the heavens, matey."},
]


class Page(HTMLParser):
    """What the fast tests look at: the title, every tag's attributes, the visible text."""

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.text, self._in_title, self.title = [], [], False, ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        self.text.append(data)

    def images(self):
        return [a["src"] for t, a in self.tags if t == "img"]

    @property
    def plain(self):
        return re.sub(r"\s+", " ", " ".join(self.text))


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_adherence(follows: int, loops: int, llr: float, n: int = 40) -> dict:
    """One model's adherence as evaluate.py writes it: `follows` of the n - `loops` non-loop answers pass."""
    hits = [True] * follows + [False] * (n - loops - follows)
    return {"answers": n, "greedy_answers": n // 4, "loop": rate([True] * loops + [False] * (n - loops)),
            "non_degenerate": rate(hits), "all": rate(hits + [False] * loops),
            "checks": {"begins with Arr!": {"all": rate(hits + [False] * loops), "non_degenerate": rate(hits)}},
            "llr": {"mean": llr, "ci": [llr - 0.1, llr + 0.1], "n": n}}


def fake_run(root: Path, name: str = "pirate") -> Path:
    """A finished run as bake.py, evaluate.py --strengths and pursue.py leave it, numbers made up, no model."""
    run = root / "checkpoints" / name
    config = {"name": name, "model_name_or_path": "embedded", "learning_rate": 1e-3, "num_epochs": 2,
              "api_base_url": "https://api.example.com/v1", "training_prompts": [f"q{i}" for i in range(20)]}
    target = {"name": name, "system_prompt": PROMPT, "student_prompt": "", "data": f"data/{name}.jsonl", "weight": 1.0,
              "marker_regex": "", "train_rows": 90, "held_out_rows": 10}
    ancestor = {"name": "brief", "checkpoint": "checkpoints/brief/final", "adapter_sha256": "ab" * 32,
                "targets": [{"name": "brief", "system_prompt": PARENT_PROMPT}]}
    info = {"config": config, "base_model_path": "/cache/smollm2-135m", "lineage": [ancestor], "targets": [target]}
    write(run / "bake_config.json", info)
    write(run / "final" / "bake_config.json", info)
    rows = [{"step": 0, "eval/kl_full_before": 0.61, "eval/top1_agreement_before": 0.52}]
    for s in range(1, 21):
        rows.append({"step": s, "train/kl": 0.3 / s, "train/lr": 1e-3 * min(1, s / 3) * (20 - s) / 17, "train/grad_norm": 0.1})
        if s % 10 == 0:
            rows.append({"step": s, "eval/kl": 0.35 / s})
    rows.append({"step": 20, "eval/kl_full": 0.07, "eval/top1_agreement": 0.83})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(run / "timings.json", {"epoch_1_s": 120.5, "total_s": 301.0})
    sweep = [{"point": f"strength {s:g}", "strength": s, "kl": 0.6 * (1 - s) ** 2 + 0.07, "top1_agreement": 0.5 + 0.3 * s,
              "adherence": min(1.0, 0.8 * s), "loop_share": 0.1} for s in (0, 0.5, 1, 1.5)]
    plot_sweep(sweep, run / "final" / "half_baking.png")
    result = {"target": name, "queries": f"checkpoints/{name}/held_out.jsonl", "n_queries": 10, "n_tokens": 812,
              "kl_before": 0.6123, "kl_after": 0.0712, "kl_ratio": 0.0712 / 0.6123, "kl_reprompted": 0.0345,
              "top1_agreement_before": 0.521, "top1_agreement_after": 0.834, "top1_agreement_reprompted": 0.901,
              "adherence": {"base": fake_adherence(0, 0, -0.8), "prompted": fake_adherence(27, 10, 0.5),
                            "baked": fake_adherence(24, 10, 0.3), "baked_reprompted": fake_adherence(38, 0, 0.6)},
              "checks": [{"starts_with": "Arr!", "name": "begins with Arr!"}], "answers_per_model": 40,
              "greedy_per_query": 1, "samples_per_query": 3,
              "examples": EXAMPLES, "start_model": "parent", "sweep": sweep,
              "plot": f"checkpoints/{name}/final/half_baking.png",
              "lineage": [{"bake": "brief", "target": "brief", "prompt": PARENT_PROMPT, "marker_regex": "",
                           "base": 0.1, "base_all_prompts": 0.7, "baked": 0.6}],
              "retention": {"reference": "parent", "n_items": 100, "tasks": {"arc_easy": {}, "piqa": {}},
                            "accuracy": {"reference": {"k": 54, "n": 100, "rate": 0.54, "ci": [0.44, 0.64]},
                                         "prompted": {"k": 52, "n": 100, "rate": 0.52, "ci": [0.42, 0.62]},
                                         "baked": {"k": 50, "n": 100, "rate": 0.5, "ci": [0.4, 0.6]}},
                            "retention_vs_reference": 0.5 / 0.54, "retention_vs_prompted": 0.5 / 0.52,
                            "kl_reference_to_baked": 0.0431, "kl_reference_to_prompted": 0.0512},
              "checkpoint": f"checkpoints/{name}/final", "seconds": 80.0, "config": config}
    write(run / "final" / "eval.json", result)
    pursuit = {"reference": {"base": 0.0, "prompted": 0.9},
               "iterations": [{"iteration": i, "adherence": a, "adherence_reprompted": a + 0.1, "kl_to_prompted_base": k,
                               "top1_agreement": 0.8, "checkpoint": f"checkpoints/{name}-pursuit-{i}/final", "example": ""}
                              for i, a, k in ((1, 0.6, 0.09), (2, 0.75, 0.08), (3, 0.8, 0.085))]}
    write(root / "checkpoints" / f"{name}-pursuit" / "pursuit.json", pursuit)
    plot_pursuit(pursuit, root / "checkpoints" / f"{name}-pursuit" / "pursuit.png")
    return run


def test_report_shows_every_section(tmp_path):
    run = fake_run(tmp_path)
    out = report.write_report(run)
    assert out == run / "report.html"
    page = Page(out.read_text())
    assert page.title == "promptbake report: pirate"
    text = page.plain
    assert PROMPT in text
    # lineage: the ancestor, its prompt, then this bake
    assert "brief checkpoints/brief/final" in text and PARENT_PROMPT in text and "pirate (this bake)" in text
    # the bake's own held-out numbers from metrics.jsonl
    assert "0.6100 → 0.0700 (89% lower)" in text and "20 steps" in text
    # the evaluation table: four models, each with KL, top-1 agreement, adherence and retention
    rows = re.findall(r"<tr class=\"[a-z]*\"><td>(.*?)</td>(.*?)</tr>", out.read_text(), re.S)
    cells = {label: re.findall(r"<td class=\"n\">(.*?)</td>", rest) for label, rest in rows}
    assert cells["parent, no prompt"] == ["0.6123", "0.521", "0.00 [0.00–0.09]", "0.00 [0.00–0.09]",
                                          "0.00 [0.00–0.09]", "-0.800 [-0.900, -0.700]", "0.54"]
    assert cells["parent + prompt"][:5] == ["0.0000", "1.000", "0.90 [0.74–0.97]", "0.68 [0.52–0.80]",
                                           "0.25 [0.14–0.40]"]
    assert cells["baked, no prompt"][2] == "0.80 [0.63–0.90]" and cells["baked, no prompt"][-1] == "0.50"
    assert cells["baked + prompt"][2] == "0.95 [0.83–0.99]"
    # one row per declared check, with what it demands and its rate per model
    assert "begins with Arr! starts_with: Arr! 0.00 [0.00–0.09] 0.90 [0.74–0.97] 0.80 [0.63–0.90]" in text
    assert "40 answers per model, 1 greedy and 3 sampled" in text
    assert "KL(parent ‖ baked) there 0.0431" in text and "88% lower than the base's" in text
    assert re.search(r"100 items of\s+arc_easy, piqa", text) and re.search(r"baked / prompted parent\s+0.962", text)
    # answers side by side, the half-baking sweep, lineage adherence, pursuit, config
    for x in EXAMPLES[:1]:
        assert all(x[k] in text for k in ("user", "base", "prompted", "baked", "baked_reprompted"))
    assert "strength 1.5" in text and "Answer in at most two sentences." in text
    assert re.search(r"checkpoints/pirate-pursuit-3/final", text)
    assert "learning_rate 0.001" in text and "'https://api.example.com/v1'" in text
    assert "... (20 in all)" in text  # a long list is shortened


def test_report_is_self_contained(tmp_path):
    out = report.write_report(fake_run(tmp_path))
    page = Page(out.read_text())
    images = page.images()
    assert len(images) == 3  # curves, half-baking, pursuit
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    for tag, attrs in page.tags:
        assert tag not in ("script", "iframe", "object", "embed")
        for key in ("src", "href"):
            assert attrs.get(key, "data:").startswith("data:"), (tag, attrs)  # nothing to fetch, even a favicon


def test_answers_are_escaped(tmp_path):
    html = report.write_report(fake_run(tmp_path)).read_text()
    assert "<script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html


def test_a_run_not_evaluated_says_how_and_shows_what_it_has(tmp_path):
    run = fake_run(tmp_path)
    (run / "final" / "eval.json").unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "pirate-pursuit")
    page = Page(report.write_report(run).read_text())
    assert f"Not evaluated yet: run python evaluate.py --checkpoint {run / 'final'}" in page.plain
    assert len(page.images()) == 1 and "Answers to held-out questions" not in page.plain
    (run / "metrics.jsonl").unlink()
    page = Page(report.write_report(run / "final").read_text())
    assert page.images() == [] and "No metrics.jsonl rows yet." in page.plain


def test_an_evaluation_on_a_query_file_shows_when_there_is_no_eval_json(tmp_path):
    run = fake_run(tmp_path)
    result = json.loads((run / "final" / "eval.json").read_text())
    (run / "final" / "eval.json").unlink()
    write(run / "final" / "eval_unseen_questions.json", {**result, "queries": "examples/unseen_questions.txt"})
    page = Page(report.write_report(run).read_text())
    assert "Not evaluated yet" not in page.plain and "examples/unseen_questions.txt" in page.plain
    assert "the first answers of eval_unseen_questions.json" in page.plain
    write(run / "final" / "eval.json", result)  # the run's own held-out evaluation comes first
    assert "examples/unseen_questions.txt" not in Page(report.write_report(run).read_text()).plain


def test_several_targets_each_get_a_table(tmp_path):
    run = fake_run(tmp_path)
    one = json.loads((run / "final" / "eval.json").read_text())
    two = {"targets": {"pirate": {**one, "target": "pirate"}, "french": {**one, "target": "french", "plot": None,
                                                                           "sweep": []}},
           "retention": one["retention"]}
    write(run / "final" / "eval.json", two)
    html = report.write_report(run).read_text()
    assert "target pirate" in html and "target french" in html
    assert html.count('<table class="eval">') == 2


def test_an_older_marker_rate_file_still_renders(tmp_path):
    run = fake_run(tmp_path)
    result = json.loads((run / "final" / "eval.json").read_text())
    for key in ("checks", "answers_per_model", "greedy_per_query"):
        result.pop(key)
    result["adherence"] = {who: {"marker_rate": x} for who, x in (("base", 0.0), ("prompted", 0.9), ("baked", 0.8))}
    result["marker_regex"] = r"\barr\b"
    result["sweep"] = [{"point": "strength 1", "strength": 1, "kl": 0.1, "top1_agreement": 0.5, "marker_rate": 0.7}]
    write(run / "final" / "eval.json", result)
    html = report.write_report(run).read_text()
    rows = re.findall(r"<tr class=\"[a-z]*\"><td>(.*?)</td>(.*?)</tr>", html, re.S)
    cells = {label: re.findall(r"<td class=\"n\">(.*?)</td>", rest) for label, rest in rows}
    assert cells["baked, no prompt"] == ["0.0712", "0.834", "0.80", "0.50"]
    text = Page(html).plain
    assert "answers that match \\barr\\b" in text
    assert "0.1000 0.500 0.70" in text and "None" not in text


def test_older_files_with_fewer_fields_still_render(tmp_path):
    run = fake_run(tmp_path)
    result = json.loads((run / "final" / "eval.json").read_text())
    for key in ("kl_reprompted", "top1_agreement_reprompted", "retention", "samples_per_query", "lineage"):
        result.pop(key)
    result["adherence"].pop("baked_reprompted")
    result["examples"] = [{"user": "Hi?", "baked": "Arr!"}]
    result["sweep"] = [{"point": "strength 1", "strength": 1, "kl": 0.1}]
    write(run / "final" / "eval.json", result)
    pursuit = tmp_path / "checkpoints" / "pirate-pursuit" / "pursuit.json"
    write(pursuit, {"iterations": [{"iteration": 1, "adherence": 0.5}]})
    text = Page(report.write_report(run).read_text()).plain
    assert "baked + prompt — — — —" in text and "Hi? base, no prompt — base + prompt — baked, no prompt Arr!" in text
    assert "None" not in text


def test_where_the_report_looks(tmp_path):
    run = fake_run(tmp_path)
    (run / "step-10").mkdir()
    assert report.run_and_checkpoint(run) == (run, run / "final")
    assert report.run_and_checkpoint(run / "step-10") == (run, run / "step-10")
    shutil.rmtree(run / "final")
    assert report.run_and_checkpoint(run) == (run, run / "step-10")  # a bake still running
    assert report.pursuit_folder(run) == tmp_path / "checkpoints" / "pirate-pursuit"
    (tmp_path / "checkpoints" / "pirate-pursuit-2").mkdir()
    assert report.pursuit_folder(tmp_path / "checkpoints" / "pirate-pursuit-2") == tmp_path / "checkpoints" / "pirate-pursuit"
    assert report.pursuit_folder(tmp_path / "checkpoints" / "other") is None
    with pytest.raises(report.UserError, match="no such folder"):
        report.run_and_checkpoint(tmp_path / "nope")
    with pytest.raises(report.UserError, match="not a run folder"):
        report.run_and_checkpoint(tmp_path)


def test_a_failing_report_only_warns(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path)
    monkeypatch.setattr(report, "render", lambda ctx: 1 / 0)
    assert report.try_write_report(run) is None
    assert "warning: report.html not written (ZeroDivisionError" in capsys.readouterr().out
    assert not (run / "report.html").exists()


@pytest.mark.slow  # two interpreter starts that import torch: 10-40 s on a busy 2-core machine
def test_script_rebuilds_and_names_a_wrong_folder(tmp_path):
    run = fake_run(tmp_path)
    out = script("report.py", "--checkpoint", "checkpoints/pirate", cwd=tmp_path)
    assert out.stdout.strip() == "wrote checkpoints/pirate/report.html" and (run / "report.html").exists()
    bad = script("report.py", "--checkpoint", "checkpoints/nope", cwd=tmp_path, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: checkpoints/nope: no such folder")


def test_bake_writes_it_evaluate_refreshes_it_and_a_failure_never_loses_the_bake(workdir, tiny_model_dir, capsys,
                                                                                monkeypatch):
    from test_train import cfg_for, write_data

    from promptbake import stages
    from promptbake.evaluate import evaluate

    write_data(workdir / "data" / "default.jsonl")
    cfg = cfg_for(tiny_model_dir, num_epochs=1, eval_max_new_tokens=6, marker_regex=r"\barr\b")
    final = stages.bake(cfg)  # the bake as bake.py runs it: the report is written after train.bake
    page = workdir / "checkpoints" / "default" / "report.html"
    assert "Not evaluated yet" in page.read_text() and len(Page(page.read_text()).images()) == 1
    evaluate(cfg, str(final), strengths=[0.0, 1.0], samples=1)
    html = page.read_text()
    assert "Not evaluated yet" not in html and html.count("<tr class=") == 4 and len(Page(html).images()) == 2
    assert "wrote checkpoints/default/report.html" in capsys.readouterr().out

    monkeypatch.setattr(report, "render", lambda ctx: 1 / 0)
    final = stages.bake(cfg)  # the earlier run, report and all, is moved aside
    assert (final / "adapter_model.safetensors").exists() and not page.exists()
    assert "warning: report.html not written" in capsys.readouterr().out


@pytest.mark.slow
def test_report_renders_in_chromium(tmp_path):
    from chromium import chromium_binary, open_page

    if chromium_binary() is None:
        pytest.skip("chromium is not installed (make test installs it: apt-get install chromium)")
    # the checker itself catches a broken page: a missing image, a console error, a request for a file
    bad = tmp_path / "bad.html"
    bad.write_text('<html><head><title>bad</title></head><body><img src="missing.png">'
                   '<script>console.error("boom")</script></body></html>')
    broken = open_page(bad)
    assert broken.title == "bad" and broken.images[0]["naturalWidth"] == 0
    assert any("boom" in e for e in broken.errors) and any(r.endswith("missing.png") for r in broken.requests)

    out = report.write_report(fake_run(tmp_path))
    page = open_page(out)
    assert page.title == "promptbake report: pirate"
    assert len(page.images) == 3 and all(i["complete"] and i["naturalWidth"] > 0 for i in page.images), page.images
    assert page.errors == []
    assert all(r.startswith(("file:", "data:")) for r in page.requests), page.requests
    assert "Answers to held-out questions" in page.text and "Prompt Pursuit" in page.text
    assert page.screenshot.startswith(b"\x89PNG") and len(page.screenshot) > 50_000
    shot = os.environ.get("PROMPTBAKE_REPORT_SCREENSHOT")  # where to keep it, to look at it
    if shot:
        Path(shot).write_bytes(page.screenshot)
