"""`run.py report`: one self-contained page with every run, curves on the fine-tuning step, tables; it renders
in headless Chromium with the network cut off."""

import json
import re

import pytest

from benchmarks.tools.screenshot_report import find_browser, rendered_dom, screenshot
from engine.results.report_page import write_report


def fake_run(folder, *, method, seed_moments=True, seed_u=True, scores, osr_steps=0, skipped=None):
    """A run folder whose log holds a start record, OSR steps, fine-tuning steps and evaluations."""
    folder.mkdir(parents=True)
    config = {"method": method, "loss": {"surrogate": "auto", "margin": 0.1},
              "osr": {"seed_moments": seed_moments, "seed_u": seed_u}, "run": {"below_base_tolerance": 0.0},
              "eval": {"best_metric": "zs/acc1"}}
    log = [{"event": "start", "config": config}]
    log.append({"event": "eval", "stage": "start", "step": 0, "ft_step": 0,
                "results": {"zs": {"acc1": scores[0], "acc5": 0.9}, "rt": {"mean_recall@1": 0.2}}})
    for i in range(1, osr_steps + 1):
        log.append({"event": "step", "stage": "osr", "step": i, "stage_step": i, "loss": 1.0 + i, "d_q50": -0.3,
                    "inside_hinge": 0.01})
    if osr_steps:
        log.append({"event": "stage_end", "stage": "osr", "seconds": 36.0, "world_size": 2, "stage_step": osr_steps})
    for k, score in enumerate(scores[1:], start=1):
        step = osr_steps + 2 * k
        log.append({"event": "step", "stage": "finetune", "step": step, "stage_step": 2 * k, "ft_step": 2 * k,
                    "loss": 2.0 / k, "contrastive_loss": 2.0 / k, "lr": 1e-4 / k, "gamma": 1.0,
                    "samples_per_s": 100.0 * k, "samples_per_s_per_device": 50.0 * k, "mfu": 0.1 * k})
        log.append({"event": "eval", "stage": "finetune", "step": step, "ft_step": 2 * k,
                    "results": {"zs": {"acc1": score, "acc5": 0.9}, "rt": {"mean_recall@1": 0.2 + 0.01 * k}}})
    log.append({"event": "epoch_end", "skipped": skipped or {}, "num_skipped": 0})
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    return [
        fake_run(tmp_path / "runs" / "openclip", method="openclip", scores=[0.40, 0.31, 0.38, 0.43]),
        fake_run(tmp_path / "runs" / "tuneclip", method="tuneclip", scores=[0.40, 0.41, 0.44, 0.47], osr_steps=5,
                 skipped={"shard-0001.tar": {"undecodable image": 2}}),
        fake_run(tmp_path / "runs" / "tuneclip-no-seed", method="tuneclip", seed_moments=False, seed_u=False,
                 scores=[0.40, 0.35, 0.36, 0.39], osr_steps=5),
    ]


def test_report_holds_every_run_the_tables_and_no_network_reference(runs, tmp_path):
    html_path, md_path = write_report(runs, tmp_path / "report")
    page = html_path.read_text()
    md = md_path.read_text()
    for name in ("openclip", "tuneclip", "tuneclip-no-seed"):
        assert f"<td>{name}</td>" in page and f"| {name} |" in md
    # before / best / final with fine-tuning steps (OSR steps not counted)
    assert "<td>tuneclip</td><td>tuneclip</td><td>zs/acc1</td><td>40.00</td><td>47.00 @ 6</td>" in page
    # the base model stays best when nothing beats it
    assert "<td>40.00 @ 0 (base)</td>" in page
    # Table-2-style ablation: seeded and unseeded TuneCLIP
    assert "Ablation (paper Table 2)" in page
    assert "| tuneclip-no-seed | no | no | 40.00 | 39.00 | 40.00 |" in md
    assert "undecodable image" in page
    assert "<td>100 (20.0%)</td>" in page  # fine-tuning's median samples/s per device over steps 50, 100, 150, MFU
    assert "final model is worse than the base" in page  # tuneclip-no-seed: 39 < 40
    # Figures: evaluation metrics (one line per run + base), training curves, OSR apart; inline SVG only.
    assert page.count("<svg") == 3 and "id='fig-osr'" in page
    assert (tmp_path / "report" / "figures" / "metrics.svg").exists() and "figures/metrics.svg" in md
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)
    assert "<script" not in page


def test_names_are_inert_in_the_markdown_and_plain_text_in_the_figures(tmp_path, capsys):
    from markdown_it import MarkdownIt

    from engine.cli import main

    name = "<img src=x onerror=alert(1)> $x^ [a](b) *em*"
    run = fake_run(tmp_path / "runs" / name, method="tuneclip", scores=[0.40, 0.30])
    log = run / "log.jsonl"
    log.write_text(log.read_text().replace("zs", "zs $y^_"))  # a task name matplotlib would read as math
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "<img" not in md and "**&lt;img src=x onerror=alert\\(1\\)&gt; \\$x^ \\[a\\]\\(b\\) \\*em\\***" in md
    rendered = MarkdownIt("commonmark").render(md)
    assert "<img src=x" not in rendered and "<a href" not in rendered and "<em>" not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt; $x^ [a](b) *em*" in rendered  # shown as written
    assert "zs $y^_/acc1" in rendered.replace("\\", "")
    assert "<svg" in (tmp_path / "report" / "figures" / "metrics.svg").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.skipif(find_browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_network(runs, tmp_path):
    from PIL import Image

    html_path, _ = write_report(runs, tmp_path / "report")
    dom = rendered_dom(html_path)
    assert dom.count("<svg") == 3
    for name in ("openclip", "tuneclip", "tuneclip-no-seed"):
        assert f"<td>{name}</td>" in dom
    png = screenshot(html_path, tmp_path / "shot.png", width=1200, height=1600)
    image = Image.open(png).convert("L")
    assert image.size == (1200, 1600)
    # Something was drawn: more than a blank page's single grey level, and dark pixels (text, lines).
    histogram = image.histogram()
    assert sum(1 for count in histogram if count) > 20 and sum(histogram[:100]) > 1000


def test_interpolate_json_adds_the_metric_vs_a_curve_with_the_chosen_a(runs, tmp_path):
    rows = [{"alpha": a, "results": {"zs": {"acc1": 0.40 + 0.1 * a}, "rt": {"mean_recall@1": 0.3 - 0.1 * a}}}
            for a in (0.0, 0.5, 1.0)]
    (runs[1] / "interpolate.json").write_text(json.dumps({"evaluations": rows, "chosen_alpha": 0.5}))
    html_path, md_path = write_report(runs, tmp_path / "report")
    page = html_path.read_text()
    assert page.count("<svg") == 4 and "id='fig-interpolation'" in page and "Weight-space interpolation" in page
    figure = (tmp_path / "report" / "figures" / "interpolation.svg").read_text()
    assert "figures/interpolation.svg" in md_path.read_text()
    # One panel per task/metric of the interpolation, a on the x axis (glyphs are paths; their text is a comment).
    assert figure.count("a (0 = base, 1 = fine-tuned)") == 2 and figure.count('<g id="axes_') == 2
    assert "<!-- zs/acc1 -->" in figure and "<!-- rt/mean_recall@1 -->" in figure
    # Without interpolate.json there is no such figure.
    (runs[1] / "interpolate.json").unlink()
    page = write_report(runs, tmp_path / "report2")[0].read_text()
    assert page.count("<svg") == 3 and "fig-interpolation" not in page
