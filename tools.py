"""
tools.py: the environment: the tools (zoom_in, zoom_point, draw_box, draw_line), strict tool-call parsing, the episode
(images mapped to original pixels, the token sequence, counters, stop rules), and the one multi-turn rollout loop that
sft.py, grpo.py and eval.py share. Conventions (docs/methods.md): one call per assistant turn, as Qwen2.5's
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. Coordinates are pixels of the image *as the model was
shown it* (image 0: the question's, then one per tool result). Each image knows the rectangle of its original it shows
(`box`), so a zoom on a zoom cuts from the original, and drawings (kept in original pixels) reappear on every image
derived from theirs. A bad call is data: an error observation, a failed call, and the episode goes on.
Three frames meet here: pixels of an image as shown (every tool's arguments), pixels of its original (a view's box,
drawings, a call's region and point; floats), and a dialect's own frame (normalized, a stated size, 1-based image
numbers), which its read() converts into the first before anything here runs (dialects.py).
"""
import argparse
import math

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

import model as M
from data import load_images
from dialects import DIALECTS

# -----------------------------------------------------------------------------
# geometry


def smart_resize(h, w, factor=28, min_pixels=M.QWEN_MIN_PIXELS, max_pixels=112 * 112):
    """Qwen2-VL's resize rule: the nearest (h, w) with both sides multiples of `factor` (the patch times the 2x2
    merge: 28 for Qwen2.5-VL's 14 px patches, 32 for Qwen3-VL's and Qwen3.5's 16) and min_pixels <= h*w <= max_pixels,
    keeping the aspect ratio."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"aspect ratio {max(h, w) / min(h, w):.0f} is over Qwen's limit of 200")
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    # out of budget: both sides scaled by one beta (the aspect kept), then rounded down when shrinking and up when
    # growing, as rounding to the nearest could land just outside the budget again
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = (max(factor, math.floor(h / beta / factor) * factor),
                  max(factor, math.floor(w / beta / factor) * factor))
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def zoom_scale(crop_area, image_area):
    """VLM-R3's adaptive zoom (r3_vllm.py): 2x for crops under 1/8 of the image, 1x from half of it, linear in
    between. Both areas in original px^2, the crop's after zoom_in has grown it to a resize unit."""
    return min(2.0, max(1.0, 2.0 - (crop_area / image_area - 0.125) / 0.375))


def to_original(view, x, y):
    """A point in a view's pixel frame -> the same point in its original's pixels. Floats, never rounded (VLM-R3's
    bbox_transform truncates with int()): a zoom of a zoom maps through two boxes without adding up rounding."""
    x0, y0, x1, y1 = view["box"]
    w, h = view["img"].size
    return x0 + x * (x1 - x0) / w, y0 + y * (y1 - y0) / h


def fit_window(c, size, limit):
    """A window of `size` centred on c, shifted to stay within [0, limit] (shrunk if limit < size)."""
    size = min(size, limit)
    lo = min(max(c - size / 2, 0), limit - size)
    return lo, lo + size


# -----------------------------------------------------------------------------
# images: an original, the rectangle of it shown, the drawings, rendered at a size

# ViLaSR's colour cycle (edit_image.py: 23 names, then PIL's whole colour map), by a box's place among the boxes
BOX_COLOURS = ["red", "green", "blue", "yellow", "orange", "pink", "purple", "brown", "gray", "beige", "turquoise",
               "cyan", "magenta", "lime", "navy", "maroon", "teal", "olive", "coral", "lavender", "violet", "gold",
               "silver"] + list(ImageColor.colormap)


def render_view(original, box, size, annots):
    """Cut `box` (original px, floats allowed), resize it to `size` (w, h), draw the annotations as ViLaSR does
    (edit_image.py: 4 px box outlines in its colour cycle, the label at (x1 + 8, y1 + 6); black 4 px lines, a red
    start dot and a blue end dot of radius 4, no label). Theirs draws on the image shown, earlier drawings included,
    and truncates coordinates to ints; this redraws every drawing on a fresh cut of the original."""
    # Cut from the original, never from the image shown: that one is downscaled, and enlarging it would only
    # magnify pixels already averaged away (test_tools_zoom_reads_original_pixels). resize(box=) cuts and resamples
    # in one step, at the box's fractional edges.
    img = original.resize(size, Image.BICUBIC, box=tuple(box))
    if not annots:
        return img
    (x0, y0, x1, y1), (w, h) = box, img.size
    d, font = ImageDraw.Draw(img), ImageFont.load_default()

    # drawn after the resize, so an outline is 4 px as shown on every image, however magnified; dict order is
    # drawing order
    for a in annots.values():  # original pixels -> this image's
        p, q = [((x - x0) * w / (x1 - x0), (y - y0) * h / (y1 - y0)) for x, y in (a["xy"][:2], a["xy"][2:])]
        if a["kind"] == "box":
            colour = BOX_COLOURS[a["colour"] % len(BOX_COLOURS)]
            d.rectangle([*p, *q], outline=colour, width=4)
            d.text((p[0] + 8, p[1] + 6), a["label"], fill=colour, font=font)
        else:
            d.line([p, q], fill="black", width=4)
            for (x, y), c in ((p, "red"), (q, "blue")):
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
    return img


# A view is one image the model was shown, a dict:
#   img     PIL image, exactly as shown (its size is a multiple of the patch factor, within the pixel budget)
#   src     index of the original (in the episode's "originals") it was cut from
#   box     (x1, y1, x2, y2): the rectangle of that original it shows, in original pixels (floats)
#   annots  {label: dict(kind "box" | "line", xy [x1, y1, x2, y2] in original pixels, label, colour)}: ViLaSR's drawings
#   enc     the encoded image (model.encode_image: pixels, grid, n tokens), filled in once, on first use


def make_view(originals, src, box, size, annots=None):
    """A new view of originals[src]; its annots are a copy, so drawing on it never changes the image drawn from."""
    annots = dict(annots or {})
    return dict(img=render_view(originals[src], box, size, annots), src=src, box=tuple(box), annots=annots, enc=None)


# -----------------------------------------------------------------------------
# the tools: each a function (episode, its arguments, cfg) -> the new image (a view)


class ToolError(Exception):
    """A call the model got wrong: run_tool records it as the call's error, which the dialect shows the model as
    the observation; never a crash."""


def _clamped_box(view, box):
    """A box in a view's frame -> the part inside the view, or an error for a degenerate/outside box. A box partly
    outside is cut to the view rather than refused (VLM-R3's get_img_crop clamps too)."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ToolError(f"degenerate box {box}: need x1 < x2 and y1 < y2")
    w, h = view["img"].size
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ToolError(f"box {box} is outside the image ({w}x{h})")
    return cx1, cy1, cx2, cy2


def zoom_in(ep, image_index, bbox_2d, cfg):
    """VLM-R3's crop: the box clamped, in original pixels, grown to >= one resize unit a side (28 px for Qwen2.5-VL),
    adaptively magnified."""
    view = ep["images"][image_index]
    x1, y1, x2, y2 = _clamped_box(view, bbox_2d)  # pixels of image k as shown
    (ox1, oy1), (ox2, oy2) = to_original(view, x1, y1), to_original(view, x2, y2)  # from here on: original px
    W, H = ep["originals"][view["src"]].size
    # each side at least a resize unit and 1/199 of the other (Qwen's aspect limit is 200: a thin box across a wide
    # image would break it); the window still fits, as data.py admits images of aspect <= 200 only
    w, h = ox2 - ox1, oy2 - oy1
    ox1, ox2 = fit_window((ox1 + ox2) / 2, max(w, cfg["factor"], h / 199), W)
    oy1, oy2 = fit_window((oy1 + oy2) / 2, max(h, cfg["factor"], w / 199), H)
    s = zoom_scale((ox2 - ox1) * (oy2 - oy1), W * H) if cfg["adaptive_zoom"] else 1.0
    # the sides scaled and truncated (VLM-R3's r3_vllm.py, int() included; the aspect kept within Qwen's 200), then
    # Qwen's resize into the crop budget
    h, w = int((oy2 - oy1) * s), int((ox2 - ox1) * s)
    h, w = max(h, math.ceil(w / 200)), max(w, math.ceil(h / 200))
    h, w = smart_resize(h, w, cfg["factor"], cfg["crop_min_pixels"], cfg["crop_max_pixels"])
    return make_view(ep["originals"], view["src"], (ox1, oy1, ox2, oy2), (w, h), view["annots"])


def zoom_point(ep, image_index, point_2d, cfg, frame=None):
    """Groundlight's zoom: a zoom_window window centred on the point, shifted inside the image. zoom_source "original":
    in original pixels, shown at the question view's pixel count; "view" (Groundlight's zoom.py): cut from the pixels
    shown, long side scaled to max(w, h, window) (less magnification on a large photo). frame: (w, h) of the image the
    point and the window are measured in when it is not the view (Groundlight's dialect: the size its prompt states)."""
    view, win = ep["images"][image_index], cfg["zoom_window"]
    vw, vh = view["img"].size
    w, h = frame or (vw, vh)
    if not (0 <= point_2d[0] <= w and 0 <= point_2d[1] <= h):
        raise ToolError(f"point {point_2d} is outside the image ({w}x{h})")
    if cfg["zoom_source"] == "view" or frame:  # (a frame: the image the dialect's harness cuts from is the one shown)
        (x1, x2), (y1, y2) = fit_window(point_2d[0], win, w), fit_window(point_2d[1], win, h)  # in the frame
        # zoom.py's output size: the window's long side becomes max(w, h, window) of the frame; then the resize unit
        s = max(w, h, win) / max(x2 - x1, y2 - y1)
        hh, ww = smart_resize((y2 - y1) * s, (x2 - x1) * s, cfg["factor"], cfg["crop_min_pixels"],
                              cfg["crop_max_pixels"])
        cut = (x1 * vw / w, y1 * vh / h, x2 * vw / w, y2 * vh / h)  # in the pixels shown
        box = (*to_original(view, *cut[:2]), *to_original(view, *cut[2:]))
        img = view["img"].resize((ww, hh), Image.BICUBIC, box=cut)
        # not make_view: the pixels are the shown image's, drawings already on them; `box` still lets a later zoom
        # of this image cut from the original
        return dict(img=img, src=view["src"], box=box, annots=dict(view["annots"]), enc=None)
    (ox, oy), (W, H) = to_original(view, point_2d[0] * vw / w, point_2d[1] * vh / h), ep["originals"][view["src"]].size
    (x1, x2), (y1, y2) = fit_window(ox, win, W), fit_window(oy, win, H)
    # the window's original pixels shown at the question view's pixel count (min = max): the paper's "upsampled to
    # the size of the downsampled view" (arXiv 2506.14821, docs/methods.md): a large original is magnified more
    # than zoom.py's cut would be
    target = math.prod(ep["images"][0]["img"].size)
    hh, ww = smart_resize(y2 - y1, x2 - x1, cfg["factor"], min_pixels=target, max_pixels=target)
    return make_view(ep["originals"], view["src"], (x1, y1, x2, y2), (ww, hh), view["annots"])


def _draw(ep, image_index, ops):
    """ViLaSR's drawing: a copy of image k with k's drawings plus these (a label drawn again replaces its earlier
    drawing), kept in original pixels so they follow the image into later zooms. An op with a bbox_2d is a box, one
    with start_point_2d / end_point_2d a line (ViLaSR's Object Mapper and Path Tracer; one call may hold both)."""
    view = ep["images"][image_index]
    w, h = view["img"].size
    annots = dict(view["annots"])
    for op in ops:
        kind = "box" if "bbox_2d" in op else "line"
        if kind == "box":
            x1, y1, x2, y2 = _clamped_box(view, op["bbox_2d"])
        else:
            (x1, y1), (x2, y2) = op["start_point_2d"], op["end_point_2d"]
            if not all(0 <= x <= w for x in (x1, x2)) or not all(0 <= y <= h for y in (y1, y2)):
                raise ToolError(f"line from {op['start_point_2d']} to {op['end_point_2d']} leaves the image ({w}x{h})")
        xy = [*to_original(view, x1, y1), *to_original(view, x2, y2)]
        # boxes and lines are merged by label, each kind apart (merge_bbox_list); an unlabelled op stands alone
        key = f"{kind}:{op['label']}" if op["label"] else f"{kind}#{len(annots)}"
        boxes = sum(a["kind"] == "box" for a in annots.values())  # the colour: its place among the boxes
        colour = annots.pop(key)["colour"] if key in annots else boxes  # redrawn: its colour, on top
        annots[key] = dict(kind=kind, xy=xy, label=op["label"], colour=colour)
    return make_view(ep["originals"], view["src"], view["box"], view["img"].size, annots)


def draw_box(ep, image_index, boxes, cfg):
    # _draw tells a box from a line by its keys: ViLaSR's dialect sends both its tools' calls here
    return _draw(ep, image_index, boxes)


def draw_line(ep, image_index, lines, cfg):
    return _draw(ep, image_index, lines)


# -----------------------------------------------------------------------------
# what a tool is, said once: adding one is a function above and a row here (and its test). run: the function; doc,
# params (name -> (type, description)): the system prompt's JSON schema and the argument checks; zoom: its result
# is a zoom of a region (coverage credit, `region`); ops (drawings): the argument holding them

INDEX = ("integer", "Index of the image to use: 0 is the question's image, each tool result is the next.")
TOOLS = {
    "zoom_in": dict(run=zoom_in, zoom=True, doc="Crop a region of an image and see it at higher resolution.",
                    params={"image_index": INDEX,
                            "bbox_2d": ("box", "The region [x1, y1, x2, y2] in pixels of that image as you see it.")}),
    "zoom_point": dict(run=zoom_point, zoom=True,
                       doc="See a fixed-size window around a point of an image at higher resolution.",
                       params={"image_index": INDEX,
                               "point_2d": ("point", "The centre [x, y] in pixels of that image as you see it.")}),
    "draw_box": dict(run=draw_box, zoom=False, ops="boxes", doc="Draw labelled boxes on a copy of an image.",
                     params={"image_index": INDEX, "boxes": ("boxes", 'A list of {"bbox_2d": [x1, y1, x2, y2], '
                                                                      '"label": "..."}.')}),
    "draw_line": dict(run=draw_line, zoom=False, ops="lines",
                      doc="Draw labelled auxiliary lines on a copy of an image.",
                      params={"image_index": INDEX, "lines": ("lines", 'A list of {"start_point_2d": [x, y], '
                                                                       '"end_point_2d": [x, y], "label": "..."}.')}),
}
# -----------------------------------------------------------------------------
# the episode

def add_episode_flags(p):
    """The episode's settings as command-line flags, the one source of their defaults: sft.py, grpo.py and eval.py
    add them (common.add_common_flags), and DEFAULTS is what they parse to when none is given."""
    p.add_argument("--view-max-pixels", type=int, help="first look's pixel budget (default: the image processor's)")
    p.add_argument("--crop-max-pixels", type=int, help="a zoom's pixel budget (default: the image processor's)")
    p.add_argument("--view-min-pixels", type=int, help="first look's least pixels (default: the model's minimum)")
    p.add_argument("--crop-min-pixels", type=int, help="a zoom's least pixels: a smaller crop is enlarged to it "
                   "(default: the model's minimum; Pixel-Reasoner: 256 x 784)")
    p.add_argument("--zoom-window", type=int, default=400, help="zoom_point's window, original pixels")
    p.add_argument("--max-turns", type=int, default=4, help="assistant turns per episode")
    p.add_argument("--max-images", type=int, default=6, help="images per episode, the question's included")
    p.add_argument("--max-turn-tokens", type=int, default=96, help="sampled tokens per turn")
    p.add_argument("--max-tokens", type=int, default=256, help="sampled tokens per trajectory")
    # the methods' own variants of the environment (common.RECIPES sets them per paper)
    p.add_argument("--view-max-side", type=int, default=0,
                   help="Groundlight: resize each image to this long side first (0: off)")
    p.add_argument("--adaptive-zoom", action=argparse.BooleanOptionalAction, default=True,
                   help="VLM-R3's 1-2x zoom factor (DeepEyes shows the crop as it is)")
    p.add_argument("--zoom-source", default="original", choices=["original", "view"],
                   help="zoom_point cuts its window from the original, or (Groundlight) from the pixels shown")
    p.add_argument("--stop-on", type=stop_list, default=("repeat",), help="what ends an episode early, "
                   "comma-separated: repeat (a repeated call), error (a failed call: ViLaSR), or none")
    p.add_argument("--final-answer-turn", action="store_true",
                   help="ViLaSR, Groundlight: the last allowed turn is told to answer")
    p.add_argument("--dialect", default="lookagain", choices=list(DIALECTS),
                   help="the format the model is spoken to in (dialects.py): lookagain's own, or a released "
                   "checkpoint's; --recipe X selects dialect X where there is one")
    p.add_argument("--answer-format", default="tags", choices=["tags", "boxed"],
                   help="<answer>...</answer>, or (VL-Rethinker) \\boxed{} asked for in the question")
    return p


def stop_list(s):
    stops = tuple(x for x in s.split(",") if x not in ("", "none"))
    if set(stops) - {"repeat", "error"}:
        raise argparse.ArgumentTypeError(f"{s!r}: a comma-separated list of repeat, error (or none)")
    return stops


DEFAULTS = vars(add_episode_flags(argparse.ArgumentParser()).parse_args([]))


def settings(improc, **cfg):
    """An episode's settings: DEFAULTS updated by cfg, the resize unit (factor: the vision patch times the 2x2 merge,
    28 px for Qwen2.5-VL, 32 for Qwen3-VL and Qwen3.5) and the pixel budgets left open (None) taken from the model's
    image processor (a real Qwen2.5-VL's 3136 to 12845056 px, Qwen3-VL's 65536 to 16777216; tiny: 112 x 112 px), none
    below 2 x 2 merged tokens (Qwen2.5-VL: 56 x 56 px; ValueError)."""
    cfg = {**DEFAULTS, **cfg}
    factor = improc.patch_size * improc.merge_size
    lo = max((2 * factor) ** 2, improc.size["shortest_edge"])
    hi = max(lo, improc.size["longest_edge"])
    keys = ("view_max_pixels", "crop_max_pixels", "view_min_pixels", "crop_min_pixels")
    low = [k for k in keys if cfg[k] is not None and cfg[k] < lo]
    if low:  # all at once, with the flags that fix them (a recipe's budgets are Qwen2.5-VL's: docs/models.md)
        flag = lambda k: "--" + k.replace("_", "-")
        raise ValueError(", ".join(f"{flag(k)} {cfg[k]}" for k in low) + f": below the model's minimum of {lo} px; "
                         "pass " + " ".join(f"{flag(k)} {lo}" for k in low) + " (or more)")
    for k in keys:
        cfg[k] = cfg[k] or (hi if "max" in k else lo)
    for k in ("view", "crop"):
        if cfg[f"{k}_min_pixels"] > cfg[f"{k}_max_pixels"]:
            raise ValueError(f"--{k}-min-pixels {cfg[f'{k}_min_pixels']} is over "
                             f"--{k}-max-pixels {cfg[f'{k}_max_pixels']}")
    return dict(cfg, factor=factor)


# An episode is a dict; rollout() and advance() update it in place:
#   record     the data record (data.py); tools: the tool names enabled, specs: their TOOLS rows; cfg: its settings
#   dialect    its format (a dialects.DIALECTS entry): how the conversation is written, calls parsed, results shown
#   originals  the record's images at full resolution (PIL); images: the views shown so far, image 0 first
#   messages   the conversation so far (model.py's: role, parts, closed), its last message the open assistant one
#   turns      the text of each model call (what the model wrote, and what the harness appended in its message)
#   calls      one dict per tool call that ran or failed (run_tool: name, arguments as written, ok, error, zoom,
#              region, point, size, image, new_image, turn); a call an environment stop refused is not in it
#   stop       None while running, then why it ended (advance()'s table); truncated: it ended at a limit; cut: its
#              last model call ran into its token cap (no <|im_end|>), even where the dialect reads it as an answer
#   seq, mask, logp  the conversation rendered (model.render): token ids, 1 on trained tokens, the sampler's
#              log-probs (0 where not sampled). logp is diagnostic only: training recomputes log-probs
#              (grpo.fill_old_logprobs, or the update's own forward when on-policy)
#   n_sampled  tokens sampled so far (the --max-tokens budget); rethinks: forced rethinks (rethink.py)
#   guide      tags a regex-shaped step still has to write (Groundlight's last step), else []; guided: the step
#              has begun (its pieces are one model call, one turn)
#   gen        the episode's own torch.Generator (seed_episode), or None for the global RNG


def new_episode(policy, record, tools=("zoom_in",), **cfg):
    """A fresh episode: the record's images resized to the view budget, the dialect's prompt, empty counters."""
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise ValueError(f"unknown tool(s) {sorted(unknown)}; available: {', '.join(TOOLS)}")
    cfg = settings(policy.improc, **cfg)
    if cfg["dialect"] not in DIALECTS:
        raise ValueError(f"unknown dialect {cfg['dialect']!r}; known: {', '.join(DIALECTS)}")
    originals = load_images(record)
    images = []
    for i, im in enumerate(originals):  # each image of the record (a video's frames too): a view of its whole original
        # --view-max-side: Groundlight's training gives its model the photo at a long side of at most 1024 (their
        # text_vqa_tool_use_r1.py, docs/recipes.md); the view budget's smart_resize then applies as to any image
        s = min(1.0, cfg["view_max_side"] / max(im.size)) if cfg["view_max_side"] else 1.0
        h, w = smart_resize(im.height * s, im.width * s, cfg["factor"], cfg["view_min_pixels"], cfg["view_max_pixels"])
        images.append(make_view(originals, i, (0, 0, im.width, im.height), (w, h)))
    d = DIALECTS[cfg["dialect"]]
    ep = dict(record=record, tools=list(tools), specs={t: TOOLS[t] for t in tools}, cfg=cfg, dialect=d,
              compact=policy.toy, originals=originals, images=images, turns=[], calls=[], stop=None, truncated=False,
              cut=False, n_sampled=0, rethinks=0, guide=[], guided=False, gen=None)
    ep["messages"] = d["prompt"](ep) + [dict(role="assistant", parts=[d["prefill"]] if d["prefill"] else [],
                                             closed=False)]
    return render(policy, ep)


def render(policy, ep):
    """The episode's conversation as token ids (seq, mask, logp), its images encoded; returns the episode."""
    d = ep["dialect"]
    ep["seq"], ep["mask"], ep["logp"] = M.render(policy, ep["messages"], episode_images(policy, ep),
                                                 d["trained_text"], d["trained_eos"])
    return ep


def copy_episode(ep):
    """An independent copy that shares the (immutable) images, originals and sampled parts. A view changes once, when
    its enc is filled, so the members of a group share one encoding of each image."""
    return dict(ep, seq=list(ep["seq"]), mask=list(ep["mask"]), logp=list(ep["logp"]), turns=list(ep["turns"]),
                calls=list(ep["calls"]), images=list(ep["images"]), guide=list(ep["guide"]),
                messages=[dict(m, parts=list(m["parts"])) for m in ep["messages"]])


def new_group(policy, record, tools, n, **cfg):
    """n fresh episodes of one record (a GRPO group): the image is loaded and encoded once."""
    ep = new_episode(policy, record, tools, **cfg)
    return [ep] + [copy_episode(ep) for _ in range(n - 1)]


def encode(policy, view):
    if view["enc"] is None:
        view["enc"] = M.encode_image(policy, view["img"])
    return view["enc"]


def run_tool(ep, req):
    """Run a call a dialect read (dialects.py's request) -> its record (what items.jsonl and rewards.py read: name and
    arguments as the model wrote them, ok, error, zoom, region: the zoomed region or the image drawn on in original
    pixels, point: a keypoint in original pixels, image: the index of the image it acted on, size: [w, h] of the image
    it returned, new_image: that image's index, turn: the model call's), appended to ep["calls"], and the new image (a
    view) appended too."""
    call = dict(name=req["name"], arguments=req["arguments"], ok=False, error=req.get("error"), region=None,
                size=None, image=None, zoom=bool(req.get("tool") and TOOLS[req["tool"]]["zoom"]),
                turn=len(ep.get("turns", [])) - 1)  # the model call that made it (view.py draws it under its turn)
    if req.get("silent"):  # a failure its harness does not report (VLM-R3's observe shows the last crop again)
        call["silent"] = True
    if call["error"] is None and req["tool"] not in ep["tools"]:
        call["error"] = f"{req['tool']} is not offered in this run (--tools)"
    if call["error"] is None:
        args = req["args"]
        try:
            k = args["image_index"]
            if not 0 <= k < len(ep["images"]):
                raise ToolError(f"image_index {str(k)[:40]} out of range: images are 0..{len(ep['images']) - 1}")
            view = TOOLS[req["tool"]]["run"](ep, **args, cfg=ep["cfg"])
            # original px, as the record's bbox is: rewards.py's IoU and coverage credit where a zoom of a zoom
            # really looked
            region = view["box"] if call["zoom"] else ep["images"][k]["box"]
            call.update(ok=True, region=[round(v, 2) for v in region], size=list(view["img"].size), image=k,
                        new_image=len(ep["images"]))
            if "point_2d" in args:  # (in the pixels shown, or of the frame the dialect measures in)
                (x, y), (vw, vh) = args["point_2d"], ep["images"][k]["img"].size
                fw, fh = args.get("frame") or (vw, vh)
                call["point"] = [round(v, 2) for v in to_original(ep["images"][k], x * vw / fw, y * vh / fh)]
            ep["images"].append(view)
        except ToolError as e:
            call["error"] = str(e)
    ep["calls"].append(call)
    return call


def prefix_ids(policy, ids, n_chars):
    """The longest prefix of `ids` whose text fits in n_chars characters (binary search over decodes)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(policy.tok.decode(ids[:mid])) <= n_chars else (lo, mid - 1)
    return ids[:lo]


def _cut(policy, ep, ids, logps, reason):
    """One model call's ids -> (ids kept, their log-probs, its text, text the harness writes in place of what was cut).
    The text ends before <|im_end|>; at a stop string the dialect keeps it (the ids as sampled) or cuts it off (and
    what was sampled after it): the ids whose text fits before it stay, a token the cut splits is written as text."""
    text = policy.tok.decode(ids, skip_special_tokens=False).split("<|im_end|>")[0].split("<|endoftext|>")[0]
    if ep["guide"] and reason == "eos":  # a regex-shaped step cannot end before its last tag: the end is not kept
        return ids[:-1], logps[:-1], text, ""
    stops = ("<",) if ep["guide"] else ep["dialect"]["stops"]
    if reason != "stop" or (ep["dialect"]["keep_stop"] and not ep["guide"]):
        return ids, logps, text, ""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    kept = prefix_ids(policy, ids, at)
    rest = text[len(policy.tok.decode(kept)):at]
    return kept, logps[:len(kept)], text[:at], rest


def advance(policy, ep, new_ids, logps=None, reason="eos"):
    """Add one model call's output (sampled or scripted ids) to the open assistant message and act on it as the
    episode's dialect reads it: run its tool calls and add what they return, go on in the same message, or stop.
    reason: how the sampler ended it ("eos": <|im_end|>; "stop": a stop string; "length": the token cap of a call;
    "invalid": a vision placeholder, not kept). The episode's stop reasons:

        answer         the turn has an answer (and, in most dialects, no tool call)
        no_action      the turn ended with neither a call nor an answer (ViLaSR ends the episode there too)
        max_tokens     the turn was cut by its token cap without a call, or the trajectory's budget is spent
        invalid_token  the policy wrote a vision placeholder (an image token with no image behind it)
        repeat         a call identical to an earlier one (--stop-on repeat, the default)
        tool_error     a call failed where the dialect (ViLaSR, DeepEyes) or --stop-on error ends the episode
        max_images     a call when the episode holds --max-images images already
        max_calls      a call past the dialect's cap (Pixel-Reasoner: 4)
        max_turns      the turn after a call was the last allowed one (a dialect with last_call_runs False: that
                       turn's call is not run)"""
    _act(policy, ep, new_ids, list(logps) if logps is not None else [0.0] * len(new_ids), reason)
    return render(policy, ep)


def _act(policy, ep, new_ids, logps, reason):
    # The order decides the stop reason when several apply: the dialect's reading first (its own end, then an answer;
    # where it reads an answer in a turn cut at its cap, that is "answer" and ep["cut"] says it was cut), then a turn
    # with nothing to run, then the environment's stops (the turn cap where the dialect runs no call in the last
    # allowed model call, repeat, max_images, max_calls), checked before any call runs so a refused call adds no image
    # and no record, then a failed call, and the turn and token caps only once the observation is in the conversation.
    d, cfg, msg = ep["dialect"], ep["cfg"], ep["messages"][-1]
    new_ids, logps, text, rest = _cut(policy, ep, new_ids, logps, reason)
    ep["cut"] = reason == "length"
    if d.get("split_prefill") and not any(isinstance(p, dict) for p in msg["parts"]):
        msg["closed"] = True  # Groundlight: a prefill is an assistant message of its own
        msg = dict(role="assistant", parts=[], closed=False)
        ep["messages"].append(msg)
    msg["parts"] += [dict(ids=new_ids, logps=logps)] + ([rest] if rest and not ep["guide"] else [])
    ep["n_sampled"] += len(new_ids)
    if ep["guide"]:  # a regex-shaped step: free text, then the pattern's next tag where the model writes a "<"
        if reason not in ("stop", "eos"):
            return _stop(ep, {"length": "max_tokens", "invalid": "invalid_token"}[reason])
        tag = ep["guide"].pop(0)
        # Groundlight's grammar-constrained sampler has the model write the tag (and what the cut split): trained as
        # all it writes (its completion mask); not sampled here, so log-prob 0.0 (as rethink.py's trigger)
        forced = M.ids(policy, rest + tag)
        msg["parts"].append(dict(ids=forced, logps=[0.0] * len(forced)))
        if ep["guided"]:  # the step's first piece opened its turn; the rest of the step is that one model call
            ep["turns"][-1] += text + rest + tag
        else:
            ep["turns"].append(text + rest + tag)
        ep["guided"] = bool(ep["guide"])
        if not ep["guide"]:
            return _stop(ep, "answer")
        return _stop(ep, "max_tokens") if ep["n_sampled"] >= cfg["max_tokens"] else None
    r = d["read"](ep, text + rest, reason)
    if r.get("tail"):
        msg["parts"].append(r["tail"])
    ep["turns"].append(text + rest + r.get("tail", ""))
    if r.get("end"):
        return _stop(ep, r["end"])
    if r.get("answered"):
        return _stop(ep, "answer")
    calls = r.get("calls") or []
    if not calls and not r.get("respond"):
        if r.get("again") is not None and reason != "length":  # go on writing in the same message
            msg["parts"] += [r["again"]] if r["again"] else []
            return _go_on(ep)
        return _stop(ep, {"length": "max_tokens", "invalid": "invalid_token"}.get(reason, "no_action"))
    # the environment's own stops, before anything runs
    if not d["last_call_runs"] and len(ep["turns"]) >= cfg["max_turns"]:
        return _stop(ep, "max_turns")  # VLM-R3: a crop is shown as the next call starts, and none follows the last
    if "repeat" in cfg["stop_on"] and any(c["error"] is None and any(
            p["name"] == c["name"] and p["arguments"] == c["arguments"] for p in ep["calls"]) for c in calls):
        return _stop(ep, "repeat")
    if calls and len(ep["images"]) >= cfg["max_images"]:
        return _stop(ep, "max_images")
    if len(ep["calls"]) + len(calls) > d.get("max_calls", len(ep["calls"]) + len(calls)):
        return _stop(ep, "max_calls")  # Pixel-Reasoner: its 5th call is not run, the episode ends
    done = [run_tool(ep, c) for c in calls]
    if not all(c["ok"] for c in done) and ("error" in cfg["stop_on"] or d.get("errors_end")):
        return _stop(ep, "tool_error")
    # final: the next model call is the last allowed one (ViLaSR's and --final-answer-turn's "answer now" prompt)
    obs = d["observe"](ep, done, len(ep["turns"]) == cfg["max_turns"] - 1)
    if "inline" in obs:  # VLM-R3: the result goes into the assistant message itself
        msg["parts"] += obs["inline"]
    else:
        msg["closed"] = True
        ep["messages"] += obs["messages"] + [dict(role="assistant", parts=[obs["prefill"]] if obs.get("prefill")
                                                   else [], closed=False)]
    ep["guide"] = list(obs.get("guide", []))
    if len(ep["turns"]) >= cfg["max_turns"]:
        return _stop(ep, "max_turns")
    if ep["n_sampled"] >= cfg["max_tokens"]:
        return _stop(ep, "max_tokens")
    return _go_on(ep)


def _go_on(ep):
    if len(ep["turns"]) >= ep["cfg"]["max_turns"]:
        return _stop(ep, "max_turns")
    if ep["n_sampled"] >= ep["cfg"]["max_tokens"]:
        return _stop(ep, "max_tokens")


def _stop(ep, why):
    ep["stop"] = why
    ep["messages"][-1]["closed"] = True
    # Mini-o3's over-turn masking can drop trajectories cut by a limit rather than finished by the model
    ep["truncated"] = why in ("max_turns", "max_images", "max_tokens", "max_calls")


def seed_episode(ep, device, *key):
    """Give an episode its own generator, seeded from `key` (ints >= 0, e.g. (seed, step, prompt, member)) alone:
    its samples then depend neither on the other episodes of its batch nor on how work is split over ranks."""
    ep["gen"] = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def rollout(policy, episodes, temperature=1.0, top_p=1.0, greedy=False, max_turn_tokens=None, top_k=0, min_p=0.0,
            reuse_cache=True, scripted=False, on_turn=None):
    """The multi-turn loop: sample every active episode's next model call in one batch (each with its ep["gen"] and
    its dialect's stop strings) and act on it (advance) until all have stopped; each keeps its KV cache between calls
    while its new rendering extends what the cache holds (a dialect that rewrites its past, Groundlight's, prefills
    again; reuse_cache=False: prefill the whole conversation every call, for comparison). scripted: no sampling; each
    call's text is the next of ep["script"] (eval.py --replay), cut as the sampler would have cut it (script_call).
    on_turn(ep): after each model call is acted on (eval.py --question prints it). The episodes are updated in place
    and returned."""
    # the same per-turn cap on every rank: sharded ranks step together, one with no episode left on an empty batch
    cap = max_turn_tokens or min((ep["cfg"]["max_turn_tokens"] for ep in episodes), default=1)
    caches = {}  # id(episode) -> (its cache, the ids it holds), between its calls
    while True:
        active = [ep for ep in episodes if ep["stop"] is None]
        if not (M.any_rank(bool(active), policy) if M.lockstep(policy) else active):
            return episodes
        if scripted:
            for ep in active:
                call = script_call(policy, ep, cap)
                if call is None:  # the texts ran out: as if the token budget had
                    _stop(ep, "max_tokens")
                    render(policy, ep)
                else:
                    advance(policy, ep, *call)
                if on_turn is not None:
                    on_turn(ep)
            continue
        held = [caches.pop(id(ep), (None, None)) for ep in active]
        outs = M.sample(policy, [ep["seq"] for ep in active], [episode_images(policy, ep) for ep in active],
                        [c if c is not None and ep["seq"][:len(ids)] == ids else None
                         for ep, (c, ids) in zip(active, held)] if reuse_cache else None, max_new_tokens=cap,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy,
                        stops=[("<",) if ep["guide"] else ep["dialect"]["stops"] for ep in active],
                        generators=[ep["gen"] for ep in active])
        for ep, (new_ids, logps, reason, cache) in zip(active, outs):
            seq = ep["seq"]
            advance(policy, ep, new_ids, logps, reason)
            if on_turn is not None:
                on_turn(ep)
            if ep["stop"] is None and cache is not None:
                # the cache holds the rendering before this call and every sampled token but the last (sampled, not
                # yet forwarded); the next call reuses it only if its rendering starts with exactly these ids
                caches[id(ep)] = (cache, seq + new_ids[:-1])


def script_call(policy, ep, cap, close=False):
    """The next of a replayed episode's texts as the sampler would have returned it -> (ids, None, reason), or None
    when none is left. Past the first stop string the text is cut (rollout's sampler stops there), with <|im_end|>
    where it has none (it ended the call), at most `cap` tokens ("length"). In a regex-shaped step the text goes on
    after each forced tag: what follows the tag is the step's next piece. close (sft.py): a text that ends at a stop
    string the dialect keeps ends its turn with <|im_end|> too, so that the model also learns to close it."""
    if not ep.get("script"):
        return None
    text = ep["script"].pop(0)
    stops = ("<",) if ep["guide"] else ep["dialect"]["stops"]
    at = min(((text.find(s), s) for s in stops if s in text), default=None)
    if at is None or (close and ep["dialect"]["keep_stop"] and not ep["guide"]):
        ids, reason = M.ids(policy, text if at is None else text[:at[0] + len(at[1])]) + [policy.eos[0]], "eos"
    else:
        i, s = at
        ids, reason = M.ids(policy, text[:i + len(s)]), "stop"
        if ep["guide"]:
            after = text[i:]
            after = after[len(ep["guide"][0]):] if after.startswith(ep["guide"][0]) else after.partition(">")[2]
            if len(ep["guide"]) > 1:
                ep["script"].insert(0, after)
    return (ids[:cap], None, "length") if len(ids) > cap else (ids, None, reason)


def episode_images(policy, ep):
    return [encode(policy, v) for v in ep["images"]]


def trajectory(ep):
    """What rewards.py scores: the turns, the calls, the stop reason, the dialect (its name: a term reads the format
    the turns are written in), its answer extractor, whether the response was cut at a limit."""
    return dict(turns=ep["turns"], calls=ep["calls"], stop=ep["stop"], rethinks=ep["rethinks"],
                dialect=ep["cfg"]["dialect"], extract=ep["dialect"]["answer"], cut=ep["truncated"] or ep["cut"])
