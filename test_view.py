"""
test_view.py: the trajectory page in a real browser, asking one question, the pictures, --report-to (view.py).

    python -m pytest -q test_view.py
"""
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import common as C
import data as D
import dialects
import eval as E
import grpo as G
import model as M
import sft
import view as V
from conftest import GRPO_TINY, HERE, blank_episode, execute


# (the browser: Debian's chromium, driven by playwright; CI installs both)


def test_view_call_fields_for_drawing_are_in_original_pixels():
    """tools.execute records, for the page: the image acted on, the returned image's size, a point in original px."""
    ep = blank_episode()  # 1000x800, shown at 500x400: 2 original px per view px
    call, view, _ = execute(ep, dialects.render_call("zoom_point", {"image_index": 0, "point_2d": [100, 50]}))
    # a 400 px window around (200, 100), shifted inside: [0, 400] x [0, 400]; shown at the first view's 200000 px:
    # smart_resize(400, 400) with min = max = 200000 -> 392 x 392 is below, so ceil(400 * 1.118 / 28) * 28 = 448
    assert (call["image"], call["point"], call["region"], call["size"]) == (0, [200, 100], [0, 0, 400, 400], [448, 448])
    assert list(view["img"].size) == call["size"]
    call, _, _ = execute(ep, dialects.render_call("draw_box", {"image_index": 0, "boxes": [
        {"bbox_2d": [10, 10, 20, 20], "label": "a"}]}))
    assert (call["image"], call["size"], call["region"], "point" in call) == (0, [500, 400], [0, 0, 1000, 800], False)


def test_view_progress_bars_follow_tqdms_settings(monkeypatch):
    """A bar on rank 0 only; tqdm reads TQDM_* when it is imported: TQDM_DISABLE=1 for the run turns every bar off."""
    monkeypatch.setenv("RANK", "1")
    assert C.progress_bar(range(2), unit="step").disable
    monkeypatch.setenv("RANK", "0")
    assert C.progress_bar(range(2), unit="step").disable == ("TQDM_DISABLE" in os.environ)
    code = "import common as C; print(C.progress_bar(range(2), unit='step').disable)"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=dict(os.environ, TQDM_DISABLE="1", RANK="0"),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1:] == ["True"], out.stderr[-2000:]


def scripted_model(monkeypatch, turn):
    """model.sample replaced by a script: turn(row of the batch, images in that row so far) -> the turn's text."""
    def sample(pol, seqs, *a, **k):
        ids = [M.ids(pol, turn(row, s.count(pol.vision_start))) for row, s in enumerate(seqs)]
        return [(t, [0.0] * len(t), "stop", None) for t in ids]
    monkeypatch.setattr(M, "sample", sample)


XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture
def viewed_run(tmp_path, monkeypatch, one_thread):
    """eval.py on 3 synthetic items, with tools and without (--baseline), the model scripted: item 0 zooms on
    [10, 20, 60, 70] of image 0, then on [30, 30, 90, 90] of image 1 and answers right (with markup in its text);
    item 1 zooms once and answers wrong; item 2 calls for an image that is not there until the repeat stops it."""
    recs = D.synthetic(3, seed=10_000)  # eval.py's synthetic test items

    def turn(row, n):
        if n == 1:
            return "<think>look</think>" + dialects.render_call("zoom_in", {"image_index": 0 if row < 2 else 5,
                                                                     "bbox_2d": [10, 20, 60, 70]})
        if n == 2 and row == 0:
            return "<think>again</think>" + dialects.render_call("zoom_in", {"image_index": 1,
                                                                      "bbox_2d": [30, 30, 90, 90]})
        return f"<think>{XSS}</think><answer>{recs[0]['answer'] if row == 0 else 'grey'}</answer>"
    scripted_model(monkeypatch, turn)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--limit", "3", "--baseline", "--out", str(out)])
    E.main()
    return out


@pytest.fixture(scope="module")
def browser():
    chromium = "/usr/bin/chromium"
    assert os.path.isfile(chromium), "the browser tests need Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield b
        b.close()


def open_page(browser, path):
    """The page in a fresh tab -> (page, messages: console errors and uncaught exceptions, dialogs opened)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, dialogs = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"file://{path}")
    page.wait_for_load_state("load")
    return page, errors, dialogs


def _pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _shown(page):
    return page.evaluate("[...document.querySelectorAll('.item')].filter(e => !e.hidden).map(e => e.dataset.order)")


def test_view_page_in_a_real_browser(viewed_run, browser):
    lines = [json.loads(line) for line in open(viewed_run / "items.jsonl")]
    assert len(lines) == 6 and [it["setting"] for it in lines] == ["zoom_in"] * 3 + ["none"] * 3
    page, errors, dialogs = open_page(browser, viewed_run / "view.html")
    assert errors == [] and dialogs == []
    assert page.locator(".item").count() == len(lines) and len(_shown(page)) == 6
    # the filters and the setting, against what items.jsonl says
    for name, keep in (("wrong", lambda it: it["score"] < 0.5), ("right", lambda it: it["score"] >= 0.5),
                       ("tools", lambda it: any(c["ok"] for c in it["calls"])),
                       ("failed", lambda it: any(not c["ok"] for c in it["calls"]))):
        page.select_option("#filter", name)
        assert _shown(page) == [str(k) for k, it in enumerate(lines) if keep(it)], name
    assert _shown(page) == ["2", "3", "4", "5"]  # the missing image, and every call with tools off
    page.select_option("#filter", "all")
    page.select_option("#group", "none")
    assert _shown(page) == ["3", "4", "5"]
    page.select_option("#group", "")
    page.select_option("#sort", "score:-1")  # high first, ties in run order
    assert _shown(page) == [str(k) for k in sorted(range(6), key=lambda k: (-lines[k]["score"], k))]
    page.select_option("#sort", "order:1")
    assert page.locator(".item").first.locator(".head").inner_text().startswith("#0")
    # not blank: many colours, and the text of the page
    shot = _pixels(page.screenshot(full_page=True))
    assert shot.std() > 20 and len(np.unique(shot[..., 0] * 65536 + shot[..., 1] * 256 + shot[..., 2])) > 100
    # the model's markup is text: shown as written, nothing run
    first = page.locator(".item").first
    assert XSS in first.locator(".turn").last.inner_text() and dialogs == []
    # item 0's first zoom drawn where its call says: on the original (region, original px) and on the view it acted
    # on (its bbox_2d, in the 112 px view's px); the border (3 px, inside the box) in the call's colour
    call = lines[0]["calls"][0]
    assert call["ok"] and call["image"] == 0 and call["arguments"]["bbox_2d"] == [10, 20, 60, 70]
    colour = [int(v) for v in re.findall(r"\d+", first.locator(".box").first.evaluate(
        "e => getComputedStyle(e).borderTopColor"))][:3]
    W = lines[0]["originals"][0]["size"][0]
    for frame, box, scale in ((first.locator(".frame").first, call["region"], 1 / W),
                              (first.locator(".call .frame").first, call["arguments"]["bbox_2d"], 1 / 112)):
        px = _pixels(frame.screenshot())
        s = px.shape[1] * scale  # screen px per unit of the box
        x1, y1, x2, y2 = (v * s for v in box)
        xm, ym = int((x1 + x2) / 2), int((y1 + y2) / 2)
        for x, y in ((x1 + 1.5, ym), (x2 - 1.5, ym), (xm, y1 + 1.5), (xm, y2 - 1.5)):
            assert np.abs(px[int(y), int(x)] - colour).max() <= 40, (x, y, px[int(y), int(x)], colour)
        for x, y in ((x1 + 8, ym), (x1 - 4, ym), (xm, y2 + 4)):  # inside and outside: the image
            assert np.abs(px[int(y), int(x)] - colour).max() > 100, (x, y)
    page.close()


def test_view_missing_images_and_markup_in_the_data(viewed_run, browser):
    """A run folder with an image gone still renders, with a placeholder naming it; text anywhere in a line
    (question, answer, a call's unknown fields) is shown as text."""
    gone = viewed_run / "images" / "zoom_in-00000-v1.jpg"  # item 0's first zoom
    gone.unlink()
    lines = [json.loads(line) for line in open(viewed_run / "items.jsonl")]
    lines[1]["question"] = XSS + " <b>bold?</b>"
    lines[1]["answer"] = "</pre></div><script>window.__pwned = 1</script>"
    lines[1]["calls"][0]["dialect"] = "<i>qwen3</i>"
    lines[1]["calls"][0]["raw"] = "<script>window.__pwned = 2</script>"
    (viewed_run / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in lines) + '{"torn": ')
    V.write_page(str(viewed_run))
    page, errors, dialogs = open_page(browser, viewed_run / "view.html")
    assert errors == [] and dialogs == [] and page.evaluate("window.__pwned") is None
    assert page.locator(".item").count() == 6 and "items.jsonl:7" in page.inner_text("body")  # the torn line named
    assert "missing image: images/zoom_in-00000-v1.jpg" in page.locator(".item").first.inner_text()
    second = page.locator(".item").nth(1).inner_text()
    assert XSS + " <b>bold?</b>" in second and "</pre></div><script>window.__pwned = 1</script>" in second
    assert "[<i>qwen3</i>]" in second and '"raw": "<script>window.__pwned = 2</script>"' in second
    page.close()
    # an image gone after the page was written: the page puts a placeholder in its place when it fails to load
    (viewed_run / "images" / "zoom_in-00001-v0.jpg").unlink()
    page, errors, dialogs = open_page(browser, viewed_run / "view.html")
    item = page.locator(".item").nth(1)
    item.scroll_into_view_if_needed()
    item.locator(".missing", has_text="zoom_in-00001-v0.jpg").first.wait_for(timeout=5000)
    assert not [m for m in errors if m.startswith("uncaught")] and page.evaluate("window.__pwned") is None
    page.close()


def test_view_ask_one_question_prints_the_conversation(tmp_path, monkeypatch, capsys, one_thread):
    img = tmp_path / "photo.png"
    Image.new("RGB", (448, 336), (90, 120, 200)).save(img)

    def turn(row, n):
        return ("<think>the corner</think>"
                + dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [0, 0, 56, 42]})
                if n == 1 else "<think>blue</think><answer>blue</answer>")
    scripted_model(monkeypatch, turn)
    out = tmp_path / "ask"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--image", str(img), "--question",
                                      "What colour is it?", "--out", str(out)])
    E.main()
    printed = capsys.readouterr().out
    # 448 x 336 in tiny's 112 x 112 px budget: 112 x 84 (multiples of 28). The zoom: [0, 0, 224, 168] of the
    # original, a quarter of it: x1.667, then into the crop budget: 112 x 84 again
    want = [f"image 0: {img}, 448x336 px, shown at 112x84", "What colour is it?", "turn 1", "the corner",
            "zoom_in -> image 1 (112x84), region [0.0, 0.0, 224.0, 168.0] of image 0", "turn 2",
            "<answer>blue</answer>", "stopped: answer", "answer: blue", str(out / "view.html")]
    at = [printed.find(w) for w in want]
    assert -1 not in at and at == sorted(at), printed
    (line,) = [json.loads(x) for x in open(out / "items.jsonl")]
    assert line["score"] is None and line["prediction"] == "blue" and len(line["images"]) == 2
    assert Image.open(out / line["images"][1]["file"]).size == (112, 84)
    assert (out / "view.html").read_text().count('class="item"') == 1
    # a recipe with --image (an append flag) takes the recipe's settings and the images given
    args = E.get_args(["--recipe", "deepeyes", "--image", str(img), "--image", str(img), "--question", "q?"])
    assert args.image == [str(img)] * 2 and (args.max_turns, args.temperature, args.dialect) == (11, 0.0, "deepeyes")
    for argv, msg in ((["--question", "q?"], "--image and --question go together"),
                      (["--image", str(tmp_path / "nope.png"), "--question", "q?"], "nope.png: no such file")):
        with pytest.raises(SystemExit):
            E.get_args(argv)
        assert msg in capsys.readouterr().err


def test_view_curves_and_results_pictures(tmp_path, monkeypatch):
    """grpo.py's curves.png (a torn line skipped, a missing value a gap) and eval.py's results.png draw what
    the files say."""
    import matplotlib.axes
    drawn, bars = [], []
    plot, bar = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, **k: drawn.append((list(x), list(y), k))
                        or plot(ax, x, y, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda ax, x, h, w, **k: bars.append((k.get("label"), list(h)))
                        or bar(ax, x, h, w, **k))
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    assert V.plot_curves(str(path), str(tmp_path / "a.png")) is None and not drawn   # no rows: no picture
    rows = [dict(step=1, reward=0.5, accuracy=0.5, tool_use=None, response_tokens=30, kl_ref=0.0, entropy=2,
                 clip_frac=0),
            dict(step=2, reward=1.0, accuracy=1.0, tool_use=1.0, response_tokens=20, kl_ref=0.1, entropy=1,
                 clip_frac=0.5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')   # a line torn by a kill
    png = V.plot_curves(str(path), str(tmp_path / "curves.png"))
    raw = [(x, y) for x, y, k in drawn if "label" not in k]
    assert ([1, 2], [0.5, 1.0]) in raw and ([1, 2], [30, 20]) in raw and ([1, 2], [0.0, 0.1]) in raw
    assert any(x == [1, 2] and math.isnan(y[0]) and y[1] == 1.0 for x, y in raw)  # tool use: a gap, then 1
    assert _pixels(open(png, "rb").read()).std() > 10
    runs = {"tools": dict(accuracy=0.75, tool_use=1.0, coverage=dict(bins={
                "no zoom": dict(n=0, accuracy=None), "gt all in zoom": dict(n=4, accuracy=0.75)})),
            "none": dict(accuracy=0.25, tool_use=0.0)}
    (tmp_path / "results.json").write_text(json.dumps(dict(runs=runs)))
    assert _pixels(open(V.plot_results(str(tmp_path)), "rb").read()).std() > 10
    assert bars == [("accuracy", [75, 25]), ("tool use", [100, 0]), ("tools", [0, 75])]


def test_view_grpo_samples_rollouts_and_reports_to_tensorboard(tmp_path):
    """--view-every 1: each step's first group on the page with its reward terms and advantages; --report-to
    tensorboard: the metrics.jsonl rows and the completions, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    G.main(GRPO_TINY + ["--steps", "2", "--view-every", "1", "--view-groups", "1", "--report-to", "tensorboard",
                        "--out", str(tmp_path)])
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # every curve curves.png draws is a key grpo.py writes (eval_* only with --eval-every)
    assert {k for _, keys in V.CURVES for k in keys if not k.startswith("eval_")} <= set(metrics[0])
    for step in (1, 2):
        lines = [json.loads(line) for line in open(tmp_path / "rollouts" / f"step{step}.jsonl")]
        assert [(it["step"], it["group"], it["member"]) for it in lines] == [(step, 0, 0), (step, 0, 1)]
        r = np.array([it["reward"] for it in lines])  # groundlight's preset: 0.5 hard + 0.5 soft + 0.1 format
        assert r == pytest.approx([0.5 * it["rewards"]["vqa_hard"] + 0.5 * it["rewards"]["soft"]
                                   + 0.1 * it["rewards"]["format_groundlight"] for it in lines])
        want = (r - r.mean()) / (r.std(ddof=1) + 1e-4)  # the group's advantage, as TRL computes it
        assert [it["advantage"] for it in lines] == pytest.approx(want.tolist(), abs=1e-5)
        assert all(os.path.isfile(tmp_path / v["file"]) for it in lines for v in it["images"] + it["originals"])
    page = (tmp_path / "view.html").read_text()
    assert page.count('class="item"') == 4 and "rollouts/step2.jsonl:2" in page and (tmp_path / "curves.png").exists()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for k in ("reward", "accuracy", "tool_use", "loss", "lr"):
        assert [(e.step, e.value) for e in acc.Scalars(k)] == [
            (r["step"], pytest.approx(float(r[k]), rel=1e-6)) for r in metrics], k
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("completions/text_summary")]
    assert len(texts) == 2 and all(lines[0]["question"].split(" at ")[0] in t for t in texts)


def test_view_report_to_a_missing_package_is_named_before_loading(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for script in (G, sft):
        with pytest.raises(SystemExit):
            script.get_args(["--report-to", "wandb"])
        assert "wandb: the wandb package is not installed (pip install wandb)" in capsys.readouterr().err
    assert G.get_args(["--report-to", "tensorboard"]).report_to == "tensorboard"
