"""
test_tools.py: geometry, tool-call parsing, episodes and the rollout loop (tools.py).

    python -m pytest -q test_tools.py
"""
import json
import random

import numpy as np
import pytest
from PIL import Image

import data as D
import dialects
import model as M
import tools as T
from conftest import TINY_CFG, blank_episode, cached_equals_uncached, execute, scripted_zooms, zoom_episodes


def test_tools_smart_resize_rules():
    # 1000x800 into 112*112 px: beta = sqrt(800000 / 12544) = 7.986; floor(800/7.986/28)*28 = 84,
    # floor(1000/7.986/28)*28 = 112
    assert T.smart_resize(800, 1000, max_pixels=112 * 112) == (84, 112)
    assert T.smart_resize(10, 10, min_pixels=28 * 28) == (28, 28)
    h, w = T.smart_resize(3000, 1500, max_pixels=448 * 448)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 448 * 448
    with pytest.raises(ValueError):
        T.smart_resize(1, 300)


def test_tools_adaptive_zoom_factor():
    # VLM-R3: 2.0 below r = 0.125, 1.0 from r = 0.5, linear between: r = 0.3125 is half way -> 1.5
    assert T.zoom_scale(10, 100) == 2.0
    assert T.zoom_scale(12.5, 100) == 2.0
    assert T.zoom_scale(31.25, 100) == pytest.approx(1.5)
    assert T.zoom_scale(50, 100) == 1.0
    assert T.zoom_scale(90, 100) == 1.0


def test_tools_zoom_on_zoom_maps_to_original_pixels():
    ep = blank_episode()  # original 1000x800, view 500x400: one view pixel = two original pixels
    v1 = T.zoom_in(ep, 0, [100, 50, 200, 150], ep["cfg"])
    assert v1["box"] == pytest.approx((200, 100, 400, 300))
    # r = 200*200 / 800000 = 0.05 < 0.125 -> 2x: 400x400 px, capped by the 112*112 crop budget -> 112x112
    assert v1["img"].size == (112, 112)
    ep["images"].append(v1)
    # in the 112 px zoom, one pixel is 200/112 original pixels; [28, 56, 84, 112] -> 200 + 50 .. 200 + 150
    v2 = T.zoom_in(ep, 1, [28, 56, 84, 112], ep["cfg"])
    assert v2["box"] == pytest.approx((250, 200, 350, 300))


def test_tools_zoom_clamps_and_grows_tiny_boxes():
    ep = blank_episode()
    v = T.zoom_in(ep, 0, [450, 350, 600, 500], ep["cfg"])  # half outside: clamped to the 500x400 view
    assert v["box"] == pytest.approx((900, 700, 1000, 800))
    v = T.zoom_in(ep, 0, [10, 10, 12, 12], ep["cfg"])     # 4x4 original px -> grown to 28 around its centre
    assert v["box"] == pytest.approx((8, 8, 36, 36))
    v = T.zoom_in(ep, 0, [0, 0, 3, 3], ep["cfg"])         # grown at the corner: shifted inside
    assert v["box"] == pytest.approx((0, 0, 28, 28))
    for bad in ([10, 10, 10, 20], [30, 10, 20, 20], [600, 500, 700, 600]):
        with pytest.raises(T.ToolError):
            T.zoom_in(ep, 0, bad, ep["cfg"])


def test_tools_zoom_point_window_at_border():
    ep = blank_episode(zoom_window=400)
    v = T.zoom_point(ep, 0, [10, 390], ep["cfg"])          # original (20, 780): window shifted inside
    assert v["box"] == pytest.approx((0, 400, 400, 800))
    v = T.zoom_point(ep, 0, [250, 200], ep["cfg"])         # centre (500, 400)
    assert v["box"] == pytest.approx((300, 200, 700, 600))
    # upsampled to about the question view's pixel count (500x400 = 200,000 px)
    w, h = v["img"].size
    assert w == h and abs(w * h - 500 * 400) <= 2 * 28 * w
    with pytest.raises(T.ToolError):
        T.zoom_point(ep, 0, [501, 10], ep["cfg"])


def test_tools_groundlight_window_in_the_frame_of_the_image_shown(policy):
    # Groundlight's recipe: a 4000 x 3000 photo is shown at long side 1024 (1024 x 768 -> smart_resize to
    # multiples of 28: round(768/28) = 27 -> 756, round(1024/28) = 37 -> 1036); zoom_point [100, 100] takes a
    # 400 px window of *that* image, shifted inside: [0, 400] x [0, 400], i.e. original [0, 400 x 4000/1036]
    # x [0, 400 x 3000/756]; shown with its long side max(1036, 756, 400) = 1036
    board = np.kron(np.indices((1500, 2000)).sum(0) % 2, np.ones((2, 2)))[:3000, :4000]  # 2 px checkerboard
    img = Image.fromarray((board * 255).astype(np.uint8)).convert("RGB")
    rec = dict(id="big", image=img, question="q?", answer="a", type="text")
    cfg = dict(view_max_side=1024, view_max_pixels=16384 * 784, crop_max_pixels=16384 * 784, zoom_window=400)
    ep = T.new_episode(policy, rec, ["zoom_point"], zoom_source="view", **cfg)
    assert ep["images"][0]["img"].size == (1036, 756)
    v = T.zoom_point(ep, 0, [100, 100], ep["cfg"])
    assert v["box"] == pytest.approx((0, 0, 400 * 4000 / 1036, 400 * 3000 / 756))
    assert v["img"].size == (1036, 1036)
    # cut from the shown image, where the 2 px checkerboard is already a grey blur: no contrast left; the
    # original-resolution window of the other mode (400 px of the original) still shows it
    assert np.asarray(v["img"].convert("L"), float).std() < 20
    ep2 = T.new_episode(policy, rec, ["zoom_point"], **cfg)
    sharp = T.zoom_point(ep2, 0, [100, 100], ep2["cfg"])  # (100, 100) is original (386.1, 396.8): +-200 around it
    x, y = 100 * 4000 / 1036, 100 * 3000 / 756
    assert sharp["box"] == pytest.approx((x - 200, y - 200, x + 200, y + 200))
    assert np.asarray(sharp["img"].convert("L"), float).std() > 60


def test_tools_vilasr_stops_on_a_failed_call_and_the_last_turn_is_told_to_answer(policy):
    rec = D.synthetic(1, seed=3)[0]
    call = '<think>x</think>' + dialects.render_call("draw_box", {"image_index": 0,
                                                                 "boxes": [{"bbox_2d": [1, 1, 50, 50], "label": "a"}]})
    bad = '<think>x</think>' + dialects.render_call("draw_box", {"image_index": 7,
                                                                "boxes": [{"bbox_2d": [1, 1, 50, 50], "label": "a"}]})
    # stop_on error (ViLaSR's rollout): a failed call ends the episode; lookagain's default goes on
    for stop_on, want in ((("error",), "tool_error"), (("repeat",), None)):
        ep = T.new_episode(policy, rec, ["draw_box"], stop_on=stop_on)
        T.advance(policy, ep, M.ids(policy, bad), reason="stop")
        assert ep["stop"] == want and ep["calls"][-1]["ok"] is False
    # without "repeat" a repeated call runs again; the turn before the last allowed one gets FINAL_TURN
    ep = T.new_episode(policy, rec, ["draw_box"], stop_on=(), final_answer_turn=True, max_turns=3)
    T.advance(policy, ep, M.ids(policy, call), reason="stop")
    assert dialects.FINAL_TURN not in policy.tok.decode(ep["seq"])
    T.advance(policy, ep, M.ids(policy, call), reason="stop")
    assert ep["stop"] is None and len(ep["images"]) == 3
    assert policy.tok.decode(ep["seq"]).count(dialects.FINAL_TURN) == 1


def test_tools_boxed_answer_format_and_plain_crops(policy):
    rec = D.synthetic(1, seed=3)[0]
    ep = T.new_episode(policy, rec, [], answer_format="boxed")
    text = policy.tok.decode(ep["seq"])
    assert rec["question"] + "\n\n" + dialects.BOXED in text and "<answer>" not in text  # VL-Rethinker's prompt
    # DeepEyes shows a crop as it is: no 1-2x zoom factor (VLM-R3's), only the budget's 28 px rounding
    ep = blank_episode(crop_max_pixels=10**6)
    assert T.zoom_in(ep, 0, [0, 0, 56, 56], ep["cfg"])["img"].size == (224, 224)        # 112 px box x 2
    ep = blank_episode(crop_max_pixels=10**6, adaptive_zoom=False)
    assert T.zoom_in(ep, 0, [0, 0, 56, 56], ep["cfg"])["img"].size == (112, 112)


def test_tools_zoom_reads_original_pixels():
    # a 2x2 checkerboard of 1 px cells is grey in the half-size view but sharp in a 2x zoom
    arr = np.zeros((200, 200, 3), np.uint8)
    arr[::2, ::2] = arr[1::2, 1::2] = 255
    img = Image.fromarray(arr)
    ep = dict(tools=["zoom_in"], cfg=dict(TINY_CFG, crop_max_pixels=200 * 200), originals=[img], calls=[],
              images=[T.make_view([img], 0, (0, 0, 200, 200), (100, 100))])
    view = np.asarray(ep["images"][0]["img"]).astype(float)
    assert view[10:90, 10:90].std() < 20                  # the view has lost the pattern
    v = T.zoom_in(ep, 0, [0, 0, 14, 14], ep["cfg"])         # 28x28 original px, magnified 2x -> 56x56
    assert v["img"].size == (56, 56)
    z = np.asarray(v["img"]).astype(float)
    assert z[4:52, 4:52].std() > 50                         # the zoom shows it again (bicubic 2x: 67 vs 188)


def test_tools_draw_box_pixels_source_unchanged_and_accumulation():
    ep = blank_episode()
    before = np.asarray(ep["images"][0]["img"]).copy()
    v = T.draw_box(ep, 0, [dict(bbox_2d=[100, 100, 200, 180], label="")], ep["cfg"])
    a = np.asarray(v["img"])
    assert tuple(a[140, 101]) == (255, 0, 0)                # red 4 px outline on the left edge (x = 100..103)
    assert tuple(a[102, 150]) == (255, 0, 0)                # top edge
    assert tuple(a[140, 150]) == (128, 128, 128)            # inside untouched
    assert np.array_equal(np.asarray(ep["images"][0]["img"]), before)  # drawing happened on a copy
    ep["images"].append(v)
    v2 = T.draw_line(ep, 1, [dict(start_point_2d=[300, 50], end_point_2d=[300, 350], label="l")], ep["cfg"])
    a2 = np.asarray(v2["img"])
    assert tuple(a2[140, 101]) == (255, 0, 0)               # the earlier box is still there
    assert tuple(a2[200, 300]) == (0, 0, 0)                 # black line
    assert a2[50, 300][0] > 200 and a2[50, 300][2] < 60     # red start dot
    assert a2[350, 300][2] > 200 and a2[350, 300][0] < 60   # blue end dot
    ep["images"].append(v2)
    # same label again replaces the line, and a zoom carries the drawing into its frame
    v3 = T.draw_line(ep, 2, [dict(start_point_2d=[400, 50], end_point_2d=[400, 350], label="l")], ep["cfg"])
    a3 = np.asarray(v3["img"])
    assert tuple(a3[200, 300]) == (128, 128, 128) and tuple(a3[200, 400]) == (0, 0, 0)
    assert len(v3["annots"]) == 2
    ep["images"].append(v3)
    z = T.zoom_in(ep, 3, [50, 50, 250, 250], ep["cfg"])    # original 100..500; the box edge at x=200 orig
    zx = round((200 - 100) * z["img"].size[0] / 400)
    assert tuple(np.asarray(z["img"])[z["img"].size[1] // 2, zx + 1]) == (255, 0, 0)


def test_tools_drawing_follows_vilasrs_edit_image():
    """edit_image.py by hand: boxes and lines merged by label, each kind apart; a box's colour is its place among the
    boxes in ['red', 'green', ...]; the label at (x1 + 8, y1 + 6); dots of radius 4; a line has no label."""
    ep = blank_episode(w=500, h=400)  # the view is the original at half size: 250x200, drawn at 250x200
    v = T.draw_box(ep, 0, [dict(bbox_2d=[20, 20, 80, 80], label="a")], ep["cfg"])
    ep["images"].append(v)
    v = T.draw_line(ep, 1, [dict(start_point_2d=[150, 100], end_point_2d=[220, 100], label="a")], ep["cfg"])
    ep["images"].append(v)
    v = T.draw_box(ep, 2, [dict(bbox_2d=[100, 140, 140, 190], label="b")], ep["cfg"])
    a = np.asarray(v["img"])
    assert len(v["annots"]) == 3                                # the line labelled "a" did not replace the box "a"
    assert tuple(a[50, 21]) == (255, 0, 0)                      # the first box: red
    assert tuple(a[165, 101]) == (0, 128, 0)                    # the second box is green: the line does not count
    assert tuple(a[100, 147]) == (255, 0, 0)                    # 3 px left of the start: inside the red dot
    assert tuple(a[100, 145]) == (128, 128, 128)                # 5 px left: outside a dot of radius 4
    assert tuple(a[96, 185]) == (128, 128, 128)                 # the 4 px line spans y 98..101, no label above it
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    ys, xs = np.nonzero(red[24:60, 24:60])                      # the label "a", clear of the outline (x, y < 24)
    # PIL's default font puts "a" in (0, 4)-(5, 10) of its origin: from (28, 26) that is x 28..32, y 30..35
    assert xs.min() + 24 >= 28 and ys.min() + 24 >= 30 and xs.max() + 24 <= 33 and ys.max() + 24 <= 36


def test_tools_parse_valid_and_each_error():
    tools = {t: T.TOOLS[t] for t in ("zoom_in", "zoom_point")}
    ok = '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1, 2, 3, 4]}}</tool_call>'
    assert dialects.parse_call(ok, tools) == ("zoom_in", {"image_index": 0, "bbox_2d": [1.0, 2.0, 3.0, 4.0]}, None)
    cases = {
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1, 2, 3, 4]}': "unclosed",
        "<tool_call>{'name': 'zoom_in'}</tool_call>": "invalid JSON",
        '<tool_call>{"name": "crop", "arguments": {}}</tool_call>': "unknown tool",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0}}</tool_call>': "missing",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,3,4], "x": 1}}</tool_call>':
            "unexpected",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": "0", "bbox_2d": [1,2,3,4]}}</tool_call>':
            "integer",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,3]}}</tool_call>': "4 numbers",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,true,4]}}</tool_call>':
            "number",
        '<tool_call>[1, 2]</tool_call>': "must be",
    }
    for text, err in cases.items():
        name, args, e = dialects.parse_call(text, tools)
        assert args is None and err in e, (text, e)


def test_tools_execute_errors_are_observations():
    ep = blank_episode()
    for text, err in [
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 3, "bbox_2d": [1, 2, 30, 40]}}</tool_call>',
         "out of range"),
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [50, 2, 30, 40]}}</tool_call>',
         "degenerate"),
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [900, 900, 990, 990]}}'
         '</tool_call>', "outside"),
        ('<tool_call>{"name": "draw_line", "arguments": {"image_index": 0, "lines": [{"start_point_2d": [0, 0], '
         '"end_point_2d": [600, 0], "label": "a"}]}}</tool_call>', "leaves the image"),
    ]:
        call, view, obs = execute(ep, text)
        assert view is None and not call["ok"] and obs.startswith("Error:") and err in obs, obs


def _fuzz_calls(rng, n, view_w, view_h):
    """n adversarial tool-call turns (seeded): JSON-ish soup, mutated valid calls, valid calls with wild values
    (integers too big for a float, inf, NaN, bools, thin boxes), random boxes and points around the view,
    deep nesting, huge strings and a 1 MB argument name."""
    good = [{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [10, 2, 200, 20]}},
            {"name": "zoom_point", "arguments": {"image_index": 0, "point_2d": [30, 12]}},
            {"name": "draw_box", "arguments": {"image_index": 0, "boxes": [{"bbox_2d": [1, 1, 9, 9], "label": "a"}]}},
            {"name": "draw_line", "arguments": {"image_index": 0, "lines": [
                {"start_point_2d": [0, 0], "end_point_2d": [5, 5], "label": "b"}]}}]
    big = "1" + "0" * 400  # an integer too big for a float, written out
    pieces = ['{', '}', '[', ']', '"', ':', ',', 'null', 'true', '1e999', '-1', 'NaN', 'Infinity', big, '"zoom_in"',
              '"name"', '"arguments"', '"image_index"', '"bbox_2d"', '\\u0000', '😀', '<tool_call>', '</tool_call>',
              ' ']
    wild = [None, True, -5, 0, 3.5, 1e300, -0.0, "x", [], {"a": 1}, [0, 0, 0, 0], [1, 2, 3, 4], [-10, -10, 5000, 5000]]
    for i in range(n):
        kind = i % 6
        if kind == 0:   # random soup of JSON-ish pieces
            body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        elif kind == 1:  # a valid call, mutated at one character
            s = json.dumps(rng.choice(good))
            j = rng.randrange(len(s))
            body = s[:j] + rng.choice(pieces) + s[j + 1:] if rng.random() < 0.8 else s
        elif kind == 2:  # valid structure, wild argument values (or a number replaced by the huge integer)
            call = json.loads(json.dumps(rng.choice(good)))
            key = rng.choice(list(call["arguments"]))
            call["arguments"][key] = rng.choice(wild)
            body = json.dumps(call)
            if rng.random() < 0.3:
                body = json.dumps(rng.choice(good)).replace("10", big, 1).replace("30", big, 1)
        elif kind == 3:  # random boxes around the view, a third of them thin (a tenth of a pixel high or wide)
            x1, y1 = rng.uniform(-20, view_w + 20), rng.uniform(-20, view_h + 20)
            w, h = rng.uniform(0.05, view_w), rng.uniform(0.05, view_h)
            if rng.random() < 0.33:
                w, h = ((view_w * 1.2, rng.uniform(0.01, 0.3)) if rng.random() < 0.5
                        else (rng.uniform(0.01, 0.3), view_h * 1.2))
            body = json.dumps({"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [x1, y1, x1 + w, y1 + h]}})
        elif kind == 4:  # random points, inside and out
            body = json.dumps({"name": "zoom_point", "arguments": {"image_index": rng.choice([0, 0, 0, 1, -1]),
                                                                   "point_2d": [rng.uniform(-5, view_w + 5),
                                                                                rng.uniform(-5, view_h + 5)]}})
        else:            # deep nesting, huge strings, a huge unknown argument name
            r = rng.random()
            body = ("[" * rng.randint(1, 5000) + "]" * rng.randint(0, 5000) if r < 0.4 else '"' + "a" * 100000 + '"'
                    if r < 0.7 else json.dumps({"name": "zoom_in",
                                                "arguments": {"image_index": 0, "k" * 1_000_000: 1}}))
        yield f"<think>x</think><tool_call>{body}</tool_call>"


def _check_call(ep, call, view, obs):
    """A call either worked (an image whose region lies inside the original, a zoom_in's covering the box
    asked for, clamped to the view) or is an `Error:` observation of bounded length; never an exception."""
    if not call["ok"]:
        assert view is None and obs.startswith("Error:") and len(obs) < 300, obs[:400]
        return 0
    assert view is not None and obs.startswith("Image ")
    W, H = ep["originals"][0].size
    x1, y1, x2, y2 = call["region"]
    assert -0.01 <= x1 < x2 <= W + 0.01 and -0.01 <= y1 < y2 <= H + 0.01, (call, W, H)
    if call["name"] == "zoom_in":
        src = ep["images"][call["arguments"]["image_index"]]
        w, h = src["img"].size
        b = call["arguments"]["bbox_2d"]
        (a1, b1), (a2, b2) = (T.to_original(src, max(b[0], 0), max(b[1], 0)),
                              T.to_original(src, min(b[2], w), min(b[3], h)))
        assert x1 <= a1 + 0.01 and y1 <= b1 + 0.01 and a2 <= x2 + 0.01 and b2 <= y2 + 0.01, (b, call["region"])
    return 1


def test_tools_fuzz_tool_calls_never_raise(policy):
    """1,500 seeded adversarial turns through execute() on blank episodes (a 1000 x 800 image, and 7680 x 900
    and 900 x 7680 ones, as an HR-Bench 8K panorama may be), and 300 through T.advance in real episodes of
    the tiny policy: nothing raises, a failure is an `Error:` observation, a zoom lies inside the original."""
    rng = random.Random(0)
    n_ok = 0
    for w, h, n in ((1000, 800, 1000), (7680, 900, 250), (900, 7680, 250)):
        ep = blank_episode(w, h)
        ep["images"] = [T.make_view(ep["originals"], 0, (0, 0, w, h), T.smart_resize(h, w)[::-1])]
        vw, vh = ep["images"][0]["img"].size
        for text in _fuzz_calls(rng, n, vw, vh):
            call, view, obs = execute(ep, text)
            n_ok += _check_call(ep, call, view, obs)
    assert 300 < n_ok < 1200, n_ok
    # through the episode: the observation goes into the token sequence, a zoom's image is encoded
    img = Image.new("RGB", (7680, 900), (90, 90, 90))
    rec = dict(id="pano", image=[img], question="What is written?", answer="x", type="text")
    ep, n_ok, n = None, 0, 0
    for text in _fuzz_calls(rng, 300, 308, 28):
        if ep is None or ep["stop"] is not None:
            ep = T.new_episode(policy, rec, list(T.TOOLS), max_turns=8, max_images=8, max_tokens=10**9)
        if len(text) > 20000:  # tokenizing a megabyte takes seconds; execute() above had those
            continue
        n_calls = len(ep["calls"])
        T.advance(policy, ep, M.ids(policy, text), reason="stop")
        if len(ep["calls"]) > n_calls:
            n += 1
            call = ep["calls"][-1]
            n_ok += _check_call(ep, call, ep["images"][-1] if call["ok"] else None,
                                "Image " if call["ok"] else "Error: " + call["error"])
    assert n > 150 and 0 < n_ok < n, (n, n_ok)


def test_tools_rollout_with_scripted_tool_call(policy):
    recs = D.synthetic(3, seed=3)
    eps = [T.new_episode(policy, r, max_turns=3, max_turn_tokens=24, max_tokens=64) for r in recs]
    prompt_len = len(eps[0]["seq"])
    call = ('<think>the ring</think><tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, '
            '"bbox_2d": [30, 30, 80, 80]}}</tool_call>')
    T.advance(policy, eps[0], M.ids(policy, call), reason="stop")
    assert eps[0]["calls"][0]["ok"] and len(eps[0]["images"]) == 2
    assert eps[0]["calls"][0]["region"] == pytest.approx([240, 240, 640, 640])  # 896/112 = 8 px per view px
    for i, ep in enumerate(eps):
        T.seed_episode(ep, "cpu", i)
    T.rollout(policy, eps)
    for ep in eps:
        assert ep["stop"] in ("answer", "max_turns", "max_images", "repeat", "no_action", "max_tokens", "invalid_token")
        assert len(ep["seq"]) == len(ep["mask"]) == len(ep["logp"])
        assert len(ep["images"]) == 1 + sum(c["ok"] for c in ep["calls"])
        assert sum(ep["mask"]) == ep["n_sampled"] and ep["n_sampled"] <= 64 + 24
        assert ep["mask"][:prompt_len] == [0] * prompt_len
    # the mask covers exactly the sampled tokens: rebuild what the mask says from the turns
    ep = eps[0]
    trained = [t for t, m in zip(ep["seq"], ep["mask"]) if m]
    assert trained[:len(M.ids(policy, call))] == M.ids(policy, call)
    obs = M.ids(policy, "<tool_response>")
    assert all(m == 0 for t, m in zip(ep["seq"], ep["mask"]) if t in obs or t == policy.image_pad)


def test_tools_samples_do_not_depend_on_the_batch(policy):
    recs = D.synthetic(3, seed=8)
    def run(records):
        eps = [T.new_episode(policy, r, max_turns=1, max_turn_tokens=12) for r in records]
        for ep in eps:
            T.seed_episode(ep, "cpu", int(ep["record"]["id"].split("-")[1]))
        T.rollout(policy, eps)
        return {ep["record"]["id"]: ep["seq"] for ep in eps}
    together, alone = run(recs), run(recs[1:2])
    assert alone[recs[1]["id"]] == together[recs[1]["id"]]


def test_tools_cached_rollout_equals_uncached(policy, monkeypatch):
    cached_equals_uncached(policy, monkeypatch)  # (test_qwen_cached_rollout_equals_uncached: the same on Qwen's shape)


def test_tools_group_prompt_prefilled_once_finished_rows_leave_the_batch(policy, monkeypatch):
    """Every pass through the decoder, counted by a hook: a group's prompt is prefilled once, the next turn
    prefills only the new tokens (last sampled token, tool call, observation, image), and each decode step
    forwards only the rows still sampling."""
    passes, log = [], []   # (rows, new tokens) of each decoder pass; model.sample's calls
    hook = policy.model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: passes.append(tuple(k["inputs_embeds"].shape[:2])), with_kwargs=True)
    scripted_zooms(monkeypatch, policy, calls=1, log=log)
    try:
        T.rollout(policy, zoom_episodes(policy, groups=((0, 4), (1, 1)), max_turns=2))
    finally:
        hook.remove()
    (lens1, n1), (lens2, n2) = log
    assert passes[0] == (2, max(lens1))   # the group's prompt and the other one, once each

    def decode_rows(n):  # a row that draws m tokens is forwarded after each of its first m - 1 draws
        return [r for r in (sum(k < m - 1 for m in n) for k in range(max(n))) if r]
    k = 1 + len(decode_rows(n1))
    assert [r for r, L in passes[1:k]] == decode_rows(n1) and all(L == 1 for _, L in passes[1:k])
    # turn 2: each row's sequence now, minus what its cache holds (the prompt, all its sampled tokens but the last)
    blocks = [s2 - (s1 + m - 1) for s1, m, s2 in zip(lens1, n1, lens2)]
    # (and less than prefilling each row's whole conversation again)
    assert passes[k] == (5, max(blocks)) and min(lens1) < min(lens2) and max(blocks) < min(lens2)
    assert [r for r, _ in passes[k + 1:]] == decode_rows(n2)
