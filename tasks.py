"""
tasks.py: the synthetic tasks, one table (TASKS). A task is a generator of records (item i depends only on (seed, i)),
a demonstrator that writes SFT's cold-start turns for a record with the tools the run has (none: it answers from the
first look), the demonstrator's habits (what RL is left to fix), the tools the task is meant for and what helps on it.
`--data synthetic` is the CPU demo's task (data.synthetic); `--data synthetic:<name>` is one of the others, each made
for one mechanism (README: "Each mechanism at work"; docs/mechanisms.md: what was measured).

The demonstrators are imperfect on purpose, in ways the reward can see: on some items they answer from the first look
(lazy), zoom on the whole cell instead of the square (loose), or, after a lazy look, catch themselves ("Wait, let's
double check.") and zoom (wait). SFT copies the habits; what GRPO changes is what the tables measure.
"""
import math
from functools import partial

import numpy as np
from PIL import Image

import data as D
import dialects
import model as M
import tools as T

LAZY_PLACES = ("middle left",)  # where a lazy demonstrator often answers from the first look
LOOSE_PLACES = ("top centre", "top right", "bottom left")  # where a loose one often zooms on the whole cell
LOOKED = "<think>I can see the square.</think>"  # a demonstrator's first look when it does not zoom
WAIT = "\n\nWait, let's double check."            # VL-Rethinker's trigger after a right answer, as a demo says it


def place(record):
    """The place a synthetic question names ("top left")."""
    return record["question"].split(" at the ")[-1].rstrip("?")


def on_lazy_place(record):
    return place(record) in LAZY_PLACES


def on_loose_place(record):
    return place(record) in LOOSE_PLACES


def view_frame(record, view_max_pixels):
    """The view of the record's first image: (width, height) in view pixels, then (view / original) in x and y."""
    W, H = D.load_images(record)[0].size
    # the view as tools.new_episode sizes it: a demonstration's boxes are in the pixels the model is shown
    vh, vw = T.smart_resize(H, W, min_pixels=M.QWEN_MIN_PIXELS, max_pixels=view_max_pixels)
    return vw, vh, vw / W, vh / H


def answer(think, record):
    return f"<think>{think}</think><answer>{record['answer']}</answer>"

# -----------------------------------------------------------------------------
# the zoom tasks' demonstrator


def demo_zoom(record, rng, tools=("zoom_in",), view_max_pixels=112 * 112, noise=2, correct=0.1, lazy=0.0, loose=0.0,
              wait=0.0, lazy_on=on_lazy_place, loose_on=on_loose_place, half=4, loose_half=14):
    """Zoom on the record's bbox (a 2*half view px box around it, each side jittered by up to `noise`; zoom_point: its
    centre), then answer. With probability `correct` (zoom_in) a first zoom is off (the square just out, still
    overlapping the right box), then refined: a self-correction sft.reflective recognises. Habits: where
    lazy_on(record), with probability `lazy` no zoom (and of those, with probability `wait`, a "Wait, let's double
    check." and the zoom after all); where loose_on(record), with probability `loose` a 2*loose_half px box. No
    tools: the answer only."""
    if not tools:
        return [answer("I can see the square.", record)]
    vw, vh, sx, sy = view_frame(record, view_max_pixels)
    x1, y1, x2, y2 = record["bbox"]
    cx, cy = (x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy  # the square's centre and half side, view pixels
    s = (x2 - x1) / 2 * sx
    half = max(half, math.ceil(s + noise))  # a tight box holds the square whatever the jitter
    j = rng.integers(-noise, noise + 1, size=4) if noise > 0 else np.zeros(4, int)  # jitter of x1, y1, x2, y2
    first = f"<think>Zoom in on the {place(record)}.</think>"
    if lazy and lazy_on(record) and rng.random() < lazy:
        if not (wait and rng.random() < wait):
            return [answer("I can see the square.", record)]
        first = LOOKED + WAIT
    if "zoom_in" not in tools:
        if "zoom_point" not in tools:
            raise ValueError(f"demo_zoom zooms with zoom_in or zoom_point; tools {list(tools)} have neither")
        point = [min(max(round(cx + j[0] / 2), 0), vw), min(max(round(cy + j[1] / 2), 0), vh)]  # j / 2: a centre
        return [first + dialects.render_call("zoom_point", {"image_index": 0, "point_2d": point}),
                answer("I see the square.", record)]
    h = loose_half if loose and loose_on(record) and rng.random() < loose else half
    box = [max(round(cx - h + j[0]), 0), max(round(cy - h + j[1]), 0),
           min(round(cx + h + j[2]), vw), min(round(cy + h + j[3]), vh)]
    turns = [first]
    if rng.random() < correct:  # shift just far enough that the square is out
        (dx, dy), need = [((1, 0), cx + s - box[0]), ((-1, 0), box[2] - cx + s),
                          ((0, 1), cy + s - box[1]), ((0, -1), box[3] - cy + s)][rng.integers(4)]
        d = math.floor(need) + 1  # the least whole shift that puts the square out
        off = [box[0] + dx * d, box[1] + dy * d, box[2] + dx * d, box[3] + dy * d]
        size = box[2] - box[0] if dx else box[3] - box[1]  # the box's extent along the shift
        if d < size and off[0] >= 0 and off[1] >= 0 and off[2] <= vw and off[3] <= vh:  # still overlapping
            turns[0] += zoom_call(off)
            turns.append("<think>The square is not in view. Look again.</think>")
    turns[-1] += zoom_call(box)
    return turns + [answer("I see the square.", record)]


def zoom_call(box):
    return dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [int(v) for v in box]})

# -----------------------------------------------------------------------------
# glance (VLM-R3's region reward): some items are answered at a glance, and a zoom there only earns r_valid


def glance_layout(rng, share=0.3, side=64, **kw):
    """data.synthetic_layout, and on `share` of the items every square one colour, `side` px, no decoys: the answer is
    the colour of the whole first view, no zoom needed (the record says so: "glance")."""
    lay = D.synthetic_layout(rng, **kw)
    if rng.random() < share:  # drawn after the base layout: the other items are data.synthetic's own
        colour = lay["squares"][lay["target"]][2]
        lay.update(side=side, squares=[(x, y, colour) for x, y, _ in lay["squares"]], decoys=[],
                   record=dict(glance=True))
    return lay


def at_a_glance(record):
    return bool(record.get("glance"))

# -----------------------------------------------------------------------------
# boxes (ViLaSR's drawing): which of four boxes holds a point named by its coordinates

BOX_COLOURS = ("green", "yellow", "magenta", "cyan", "orange", "purple")  # not red or blue: draw_line's end dots
BOXES_QUESTION = "What colour is the box around the point ({x}, {y})?"


def boxes_layout(rng, size=112, n=4, lo=24, hi=40, gap=4, margin=8):
    """n filled boxes of distinct colours, sides lo..hi px, `gap` px apart, on grey noise in a size x size image
    (its own first view, so the question's coordinates are the view's); a point `margin`+ px inside one of them."""
    while True:  # rejection sampling: a layout that does not fit is drawn again, so (seed, i) still decides it
        boxes = []
        for _ in range(n):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            x, y = (int(v) for v in rng.integers(0, size - np.array([w, h]) + 1))
            boxes.append((x, y, x + w, y + h))
        if all(a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
               for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            break
    colours = [BOX_COLOURS[k] for k in rng.permutation(len(BOX_COLOURS))[:n]]  # distinct: one right answer
    k = int(rng.integers(n))  # the box the question's point is in
    x1, y1, x2, y2 = boxes[k]
    point = (int(rng.integers(x1 + margin, x2 - margin + 1)), int(rng.integers(y1 + margin, y2 - margin + 1)))
    return dict(size=size, boxes=boxes, colours=colours, target=k, point=point, noise_seed=int(rng.integers(2**31)))


def draw_boxes(lay):
    size = lay["size"]
    img = D.grey_noise(lay["noise_seed"], size)
    for (x1, y1, x2, y2), c in zip(lay["boxes"], lay["colours"]):
        img[y1:y2, x1:x2] = D.COLOURS[c]
    return Image.fromarray(img)


def boxes(n, seed=0, **kw):
    """n records of the boxes task; item i depends only on (seed, i); bbox: the box holding the point."""
    out = []
    for i in range(n):
        lay = boxes_layout(np.random.default_rng([seed, i]), **kw)
        out.append(dict(id=f"box{seed}-{i}", image=partial(draw_boxes, lay), question=BOXES_QUESTION.format(
            x=lay["point"][0], y=lay["point"][1]), answer=lay["colours"][lay["target"]], type="text",
            bbox=list(lay["boxes"][lay["target"]])))
    return out


def demo_boxes(record, rng, tools=("draw_line",), view_max_pixels=112 * 112, **_):
    """Mark the point (copied from the question, in view pixels): draw_line from the view's centre to it (its blue end
    dot lands in the box), or draw_box a 6 px box on it (no label: nothing else drawn); then answer. No tools: the
    answer only."""
    if not tools:
        return [answer("I can see the boxes.", record)]
    vw, vh, sx, sy = view_frame(record, view_max_pixels)
    x, y = (int(v) for v in record["question"].rsplit("(", 1)[1].rstrip(")?").split(", "))  # the (x, y) it names
    x, y = round(x * sx), round(y * sy)  # to view pixels (the same at the 112 px default)
    if "draw_line" in tools:
        call = dialects.render_call("draw_line", {"image_index": 0, "lines": [
            {"start_point_2d": [vw // 2, vh // 2], "end_point_2d": [x, y], "label": ""}]})
    elif "draw_box" in tools:
        call = dialects.render_call("draw_box", {"image_index": 0, "boxes": [
            {"bbox_2d": [max(x - 3, 0), max(y - 3, 0), min(x + 3, vw), min(y + 3, vh)], "label": ""}]})
    else:
        raise ValueError(f"demo_boxes draws with draw_line or draw_box; tools {list(tools)} have neither")
    return ["<think>Mark the point.</think>" + call, answer("I see the box the mark is in.", record)]

# -----------------------------------------------------------------------------
# the table: name -> generator (n, seed) -> records, demonstrator, its habits, the tools it is for, what helps

TASKS = {
    "synthetic": dict(make=D.synthetic, demo=demo_zoom, habits=dict(lazy=0.9, loose=0.7), tools="zoom_in",
                      helps="a tight zoom_in on the named cell: the square is a 3 px smudge at first look, and in a "
                            "zoom on the whole cell a 12 px block among three decoys"),
    "glance": dict(make=partial(D.synthetic, layout=glance_layout), demo=demo_zoom,
                   habits=dict(lazy=0.7, lazy_on=at_a_glance), tools="zoom_in",
                   helps="a zoom, except on the glance items (all squares one colour, big): the answer is in view"),
    "boxes": dict(make=boxes, demo=demo_boxes, habits={}, tools="draw_line",
                  helps="a mark on the point (draw_line, draw_box): the model cannot map a coordinate to a place"),
}


def task_name(spec):
    """--data -> the task's name (TASKS), or None for a JSONL path."""
    if spec != "synthetic" and not spec.startswith("synthetic:"):
        return None
    name = spec.partition(":")[2] or "synthetic"
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: synthetic, "
                         + ", ".join(f"synthetic:{k}" for k in TASKS if k != "synthetic"))
    return name


def dataset(spec, split="train", n=None, seed=0):
    """--data's records: a synthetic task's n items (2000 train, 200 test; the test split uses a disjoint seed) or a
    JSONL file's (data.dataset)."""
    name = task_name(spec)
    if name is None:
        return D.dataset(spec, n=n)
    n = n or (2000 if split == "train" else 200)
    # test items from seed 10_000 + seed: never among the training items of any seed below 10_000
    return TASKS[name]["make"](n, seed=seed if split == "train" else 10_000 + seed)


def demonstrations(spec, n, seed, tools, view_max_pixels, **habits):
    """n items (record, turns, where) of the task's train split, turns made at replay by its demonstrator with the
    task's habits (a habit given here, not None, wins)."""
    task = TASKS[task_name(spec)]
    kw = {**task["habits"], **{k: v for k, v in habits.items() if v is not None}}  # None: the flag was not given
    # a partial, called by sft.prepare once the record's images are read; [seed, i, 1]: a stream apart from the
    # item's own [seed, i], so the habits' draws do not change the image
    return [(r, partial(task["demo"], rng=np.random.default_rng([seed, i, 1]), tools=tools,
                        view_max_pixels=view_max_pixels, **kw), f"demo {r['id']}")
            for i, r in enumerate(dataset(spec, "train", n=n, seed=seed))]


def default_tools(spec):
    """The tools a task is meant for (--tools when not given); zoom_in for a JSONL file."""
    name = task_name(spec) if isinstance(spec, str) else None
    return TASKS[name]["tools"] if name else "zoom_in"


def corpus():
    """The tasks' own text, for the tiny tokenizer (common.tiny_corpus): questions, demonstrators' phrases, calls."""
    # the question at a spread of coordinates, as the tiny tokenizer will meet it
    lines = [BOXES_QUESTION.format(x=x, y=y) for x in range(0, 112, 7) for y in range(0, 112, 13)]
    lines += [LOOKED + WAIT, answer("I see the box the mark is in.", dict(answer="green")),
              "<think>Mark the point.</think> <think>The square is not in view. Look again.</think>"]
    lines += [dialects.render_call("draw_line", {"image_index": i, "lines": [
        {"start_point_2d": [56, 56], "end_point_2d": [x, 9], "label": ""}]}) for i in range(2) for x in (14, 70)]
    lines += [dialects.render_call("draw_box", {"image_index": i, "boxes": [{"bbox_2d": [3, 4, 9, 10], "label": ""}]})
              for i in range(2)]
    return lines
