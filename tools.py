"""
tools.py: the environment: the tools (zoom_in, zoom_point, draw_box, draw_line), strict tool-call parsing, the episode
(images mapped to original pixels, the token sequence, counters, stop rules), and the one multi-turn rollout loop that
sft.py, grpo.py and eval.py share. Conventions (SPEC section 3): one call per assistant turn, as Qwen2.5's
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. Coordinates are pixels of the image *as the model was
shown it* (image 0: the question's, then one per tool result). Each image knows the rectangle of its original it shows
(`box`), so a zoom on a zoom cuts from the original, and drawings (kept in original pixels) reappear on every image
derived from theirs. A bad call is data: an error observation, a failed call, and the episode goes on.
"""
import json
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import model as M
from data import load_images
from rewards import extract_answer

# -----------------------------------------------------------------------------
# geometry


def smart_resize(h, w, factor=28, min_pixels=M.QWEN_MIN_PIXELS, max_pixels=112 * 112):
    """Qwen2-VL's resize rule: the nearest (h, w) with both sides multiples of `factor` (the 14 px patch times the
    2x2 merge) and min_pixels <= h*w <= max_pixels, keeping the aspect ratio."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"aspect ratio {max(h, w) / min(h, w):.0f} is over Qwen's limit of 200")
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def zoom_scale(crop_area, image_area):
    """VLM-R3's adaptive zoom: 2x for crops under 1/8 of the image, 1x from half of it, linear in between."""
    return min(2.0, max(1.0, 2.0 - (crop_area / image_area - 0.125) / 0.375))


def to_original(view, x, y):
    """A point in a view's pixel frame -> the same point in its original's pixels."""
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

BOX_COLOURS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple"]


def render(original, box, size, annots):
    """Cut `box` (original px, floats allowed), resize it to `size` (w, h), draw the annotations as ViLaSR does."""
    img = original.resize(size, Image.BICUBIC, box=tuple(box))
    if not annots:
        return img
    (x0, y0, x1, y1), (w, h) = box, img.size
    d, font = ImageDraw.Draw(img), ImageFont.load_default()

    for a in annots.values():  # original pixels -> this image's
        p, q = [((x - x0) * w / (x1 - x0), (y - y0) * h / (y1 - y0)) for x, y in (a["xy"][:2], a["xy"][2:])]
        if a["kind"] == "box":
            colour = BOX_COLOURS[a["colour"] % len(BOX_COLOURS)]
            d.rectangle([*p, *q], outline=colour, width=4)
            d.text((p[0] + 5, p[1] + 4), a["label"], fill=colour, font=font)
        else:
            d.line([p, q], fill="black", width=4)
            for (x, y), c in ((p, "red"), (q, "blue")):
                d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=c)
            d.text((p[0] + 7, p[1] - 7), a["label"], fill="black", font=font)
    return img


def make_view(originals, src, box, size, annots=None):
    annots = dict(annots or {})
    return dict(img=render(originals[src], box, size, annots), src=src, box=tuple(box), annots=annots, enc=None)


# -----------------------------------------------------------------------------
# the tools: each a function (episode, its arguments, cfg) -> the new image (a view)


class ToolError(Exception):
    pass


def _clamped_box(view, box):
    """A box in a view's frame -> the part inside the view, or an error for a degenerate/outside box."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ToolError(f"degenerate box {box}: need x1 < x2 and y1 < y2")
    w, h = view["img"].size
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ToolError(f"box {box} is outside the image ({w}x{h})")
    return cx1, cy1, cx2, cy2


def zoom_in(ep, image_index, bbox_2d, cfg):
    """VLM-R3's crop: the box clamped, in original pixels, grown to >= 28 px a side, adaptively magnified."""
    view = ep["images"][image_index]
    x1, y1, x2, y2 = _clamped_box(view, bbox_2d)
    (ox1, oy1), (ox2, oy2) = to_original(view, x1, y1), to_original(view, x2, y2)
    W, H = ep["originals"][view["src"]].size
    # each side at least 28 px and 1/199 of the other (Qwen's aspect limit is 200: a thin box across a wide
    # image would break it); the window still fits, as data.py admits images of aspect <= 200 only
    w, h = ox2 - ox1, oy2 - oy1
    ox1, ox2 = fit_window((ox1 + ox2) / 2, max(w, 28, h / 199), W)
    oy1, oy2 = fit_window((oy1 + oy2) / 2, max(h, 28, w / 199), H)
    s = zoom_scale((ox2 - ox1) * (oy2 - oy1), W * H) if cfg["adaptive_zoom"] else 1.0
    h, w = smart_resize((oy2 - oy1) * s, (ox2 - ox1) * s, min_pixels=cfg["crop_min_pixels"],
                        max_pixels=cfg["crop_max_pixels"])
    return make_view(ep["originals"], view["src"], (ox1, oy1, ox2, oy2), (w, h), view["annots"])


def zoom_point(ep, image_index, point_2d, cfg):
    """Groundlight's zoom: a zoom_window window centred on the point, shifted inside the image. zoom_source "original":
    in original pixels, shown at the question view's pixel count; "view" (Groundlight's zoom.py): cut from the pixels
    shown, long side scaled to max(w, h, window) (less magnification on a large photo)."""
    view, win = ep["images"][image_index], cfg["zoom_window"]
    w, h = view["img"].size
    if not (0 <= point_2d[0] <= w and 0 <= point_2d[1] <= h):
        raise ToolError(f"point {point_2d} is outside the image ({w}x{h})")
    if cfg["zoom_source"] == "view":
        (x1, x2), (y1, y2) = fit_window(point_2d[0], win, w), fit_window(point_2d[1], win, h)
        s = max(w, h, win) / max(x2 - x1, y2 - y1)
        hh, ww = smart_resize((y2 - y1) * s, (x2 - x1) * s, min_pixels=cfg["crop_min_pixels"],
                              max_pixels=cfg["crop_max_pixels"])
        box = (*to_original(view, x1, y1), *to_original(view, x2, y2))
        img = view["img"].resize((ww, hh), Image.BICUBIC, box=(x1, y1, x2, y2))
        return dict(img=img, src=view["src"], box=box, annots=dict(view["annots"]), enc=None)
    (ox, oy), (W, H) = to_original(view, *point_2d), ep["originals"][view["src"]].size
    (x1, x2), (y1, y2) = fit_window(ox, win, W), fit_window(oy, win, H)
    target = math.prod(ep["images"][0]["img"].size)
    hh, ww = smart_resize(y2 - y1, x2 - x1, min_pixels=target, max_pixels=target)
    return make_view(ep["originals"], view["src"], (x1, y1, x2, y2), (ww, hh), view["annots"])


def _draw(ep, image_index, ops, kind):
    """ViLaSR's drawing: a copy of image k with k's drawings plus these (a label drawn again replaces its earlier
    drawing), kept in original pixels so they follow the image into later zooms."""
    view = ep["images"][image_index]
    w, h = view["img"].size
    annots = dict(view["annots"])
    for op in ops:
        if kind == "box":
            x1, y1, x2, y2 = _clamped_box(view, op["bbox_2d"])
        else:
            (x1, y1), (x2, y2) = op["start_point_2d"], op["end_point_2d"]
            if not all(0 <= x <= w for x in (x1, x2)) or not all(0 <= y <= h for y in (y1, y2)):
                raise ToolError(f"line from {op['start_point_2d']} to {op['end_point_2d']} leaves the image ({w}x{h})")
        xy = [*to_original(view, x1, y1), *to_original(view, x2, y2)]
        key = op["label"] or f"#{len(annots)}"
        colour = annots.pop(key)["colour"] if key in annots else len(annots)  # redrawn: its colour, on top
        annots[key] = dict(kind=kind, xy=xy, label=op["label"], colour=colour)
    return make_view(ep["originals"], view["src"], view["box"], view["img"].size, annots)


def draw_box(ep, image_index, boxes, cfg):
    return _draw(ep, image_index, boxes, "box")


def draw_line(ep, image_index, lines, cfg):
    return _draw(ep, image_index, lines, "line")


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
    "draw_line": dict(run=draw_line, zoom=False, ops="lines", doc="Draw labelled auxiliary lines on a copy of an image.",
                      params={"image_index": INDEX, "lines": ("lines", 'A list of {"start_point_2d": [x, y], '
                                                                       '"end_point_2d": [x, y], "label": "..."}.')}),
}
NUMBERS, OBJECTS = ({"type": "array", "items": {"type": t}} for t in ("number", "object"))
JSON_TYPES = {"integer": {"type": "integer"}, "box": NUMBERS, "point": NUMBERS, "boxes": OBJECTS, "lines": OBJECTS}


def system_prompt(tools, compact=False, boxed=False):
    """Qwen2.5's function-calling system prompt (boxed: the question asks for \\boxed{} as VL-Rethinker's does; the
    system turn is Qwen's default). compact (toy models): one line per tool, as a random 2M-parameter model did not
    learn to copy a word from the question behind the ~300-token tool prompt in 300 steps, and did in 100 without."""
    s = "You are a helpful assistant." + ("" if boxed else " Think inside <think></think>, then either call a tool "
                                          "or give the final answer inside <answer></answer>.")
    if not tools:
        return s
    if compact:
        return s + " Tools: " + "; ".join(f"{n}({', '.join(TOOLS[n]['params'])})" for n in tools) + "."
    s += ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
          "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
    for name in tools:
        params = TOOLS[name]["params"]
        props = {k: {**JSON_TYPES[t], "description": d} for k, (t, d) in params.items()}
        schema = {"type": "function", "function": {"name": name, "description": TOOLS[name]["doc"], "parameters": {
            "type": "object", "properties": props, "required": list(params)}}}
        s += "\n" + json.dumps(schema)
    return s + ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                '<args-json-object>}\n</tool_call>\nCoordinates are pixels of the image as you see it.')


def question_text(record):
    """The user's text: the question, then lettered options for multiple choice."""
    q = record["question"]
    if record.get("options"):
        q += "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(record["options"]))
    return q


def _show(v):
    """At most 40 characters of what the model wrote (a number, a string, else its type), for an error message."""
    return repr(v[:40]) if isinstance(v, str) else str(v)[:40] if isinstance(v, (int, float)) else type(v).__name__


def _number(v, what):
    # abs(v) <= 1e6 is False for inf and NaN, and compares an integer too big for a float without converting it
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= 1e6:
        raise ToolError(f"{what} must be a number in [-1e6, 1e6], got {_show(v)}")
    return float(v)


def _check(kind, v, what):
    """One argument checked by its spec type, normalised."""
    if kind == "string":
        if not isinstance(v, str) or len(v) > 64:
            raise ToolError("label must be a string of at most 64 characters")
        return v
    if kind == "integer":
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ToolError(f"{what} must be an integer")
        return int(v)
    if kind in ("box", "point"):
        n = 4 if kind == "box" else 2
        if not isinstance(v, list) or len(v) != n:
            raise ToolError(f"{what} must be a list of {n} numbers")
        return [_number(x, what) for x in v]
    if kind in ("boxes", "lines"):  # several drawing operations in one call (ViLaSR)
        keys = {"boxes": {"bbox_2d": "box", "label": "string"},
                "lines": {"start_point_2d": "point", "end_point_2d": "point", "label": "string"}}[kind]
        if not isinstance(v, list) or not 1 <= len(v) <= 16:
            raise ToolError(f"{what} must be a list of 1 to 16 objects")
        out = []
        for i, op in enumerate(v):
            if not isinstance(op, dict) or set(op) != set(keys):
                raise ToolError(f"{what}[{i}] must have exactly the keys {sorted(keys)}")
            out.append({k: _check(t, op[k], f"{what}[{i}].{k}") for k, t in keys.items()})
        return out
    raise AssertionError(kind)


def parse_call(text, tools):
    """A turn's first <tool_call>, parsed strictly (never raises, never evals). -> (name, args, None) or (name or
    None, None, error)"""
    start = text.find("<tool_call>")
    end = text.find("</tool_call>", start + 1)
    if start < 0 or end < 0:
        return None, None, "no <tool_call>" if start < 0 else "unclosed <tool_call>"
    try:
        call = json.loads(text[start + len("<tool_call>"):end])
    except (ValueError, RecursionError) as e:
        return None, None, f"invalid JSON in tool call ({str(e)[:60]})"
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return None, None, 'a tool call must be {"name": ..., "arguments": {...}}'
    name, args = call["name"], call["arguments"]
    if not isinstance(name, str) or name not in tools:  # echo at most 40 characters of what the model wrote
        return None, None, f"unknown tool {_show(name)}; available: {', '.join(tools)}"
    params = TOOLS[name]["params"]
    if not isinstance(args, dict):
        return name, None, "arguments must be an object"
    if set(args) != set(params):
        missing, extra = set(params) - set(args), set(args) - set(params)
        return name, None, (f"missing argument(s) {sorted(missing)}" if missing
                            else f"unexpected argument(s) {[k[:40] for k in sorted(extra)[:5]]}")
    try:
        return name, {k: _check(t, args[k], k) for k, (t, _) in params.items()}, None
    except ToolError as e:
        return name, None, str(e)


RESULT = "Image {i} ({w}x{h}), from image {j}."  # the observation of a successful call


def render_call(name, arguments):
    """What Qwen2.5's chat template appends to an assistant turn's text for a tool call (sft.py's demos too)."""
    return "\n<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def execute(ep, text, cfg):
    """Parse and run a turn's tool call. -> (call, new view or None, observation); call (what rewards.py reads): name,
    arguments, ok, error, zoom, and region: the zoomed region or the image drawn on, in original pixels; for view.py
    also image (the index of the image acted on), size (the returned image's [w, h]), point (point_2d, original px)."""
    name, args, err = parse_call(text, ep["tools"])
    call = dict(name=name, arguments=args, ok=False, error=err, region=None, zoom=bool(name and TOOLS[name]["zoom"]))
    if err is None:
        try:
            if not 0 <= args["image_index"] < len(ep["images"]):
                raise ToolError(f"image_index {_show(args['image_index'])} out of range: images are 0..{len(ep['images']) - 1}")
            view = TOOLS[name]["run"](ep, **args, cfg=cfg)
            acted_on = ep["images"][args["image_index"]]
            region = view["box"] if call["zoom"] else acted_on["box"]
            w, h = view["img"].size
            call.update(ok=True, region=[round(v, 2) for v in region], image=args["image_index"], size=[w, h])
            if "point_2d" in args:
                call["point"] = [round(v, 2) for v in to_original(acted_on, *args["point_2d"])]
            return call, view, RESULT.format(i=len(ep["images"]), w=w, h=h, j=args["image_index"])
        except ToolError as e:
            call["error"] = err = str(e)
    return call, None, f"Error: {err}"


# -----------------------------------------------------------------------------
# the episode

DEFAULTS = dict(max_turns=6, max_images=8, max_turn_tokens=256, max_tokens=1024, view_min_pixels=M.QWEN_MIN_PIXELS,
                view_max_pixels=112 * 112, crop_min_pixels=M.QWEN_MIN_PIXELS, crop_max_pixels=112 * 112, zoom_window=400,
                # the methods' own variants (common.RECIPES sets them per paper):
                view_max_side=0,          # Groundlight: the image is first resized to this long side (0: off)
                adaptive_zoom=True,       # VLM-R3's 1-2x zoom factor; DeepEyes shows the crop as it is
                zoom_source="original",   # zoom_point cuts its window from the original, or (Groundlight) the view
                stop_on=("repeat",),      # a repeated call ends the episode; ViLaSR: any failed call ("error")
                final_answer_turn=False,  # ViLaSR, Groundlight: the last allowed turn is told to answer
                answer_format="tags")     # <answer>...</answer>, or (VL-Rethinker) "boxed": \boxed{} in the question
FINAL_TURN = "This is your last turn: you cannot call a tool again. Answer the question now."
BOXED = "Please reason step by step, and put your final answer within \\boxed{}."


def new_episode(policy, record, tools=("zoom_in",), **cfg):
    """A fresh episode: the record's images resized to the view budget, the prompt's ids, empty counters."""
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise ValueError(f"unknown tool(s) {sorted(unknown)}; available: {', '.join(TOOLS)}")
    cfg = {**DEFAULTS, **cfg}
    originals = load_images(record)
    images = []
    for i, im in enumerate(originals):
        s = min(1.0, cfg["view_max_side"] / max(im.size)) if cfg["view_max_side"] else 1.0
        h, w = smart_resize(im.height * s, im.width * s, min_pixels=cfg["view_min_pixels"], max_pixels=cfg["view_max_pixels"])
        images.append(make_view(originals, i, (0, 0, im.width, im.height), (w, h)))
    encs = [encode(policy, v) for v in images]
    boxed = cfg["answer_format"] == "boxed"
    question = question_text(record) + ("\n\n" + BOXED if boxed else "")
    seq = M.prompt_ids(policy, system_prompt(tools, compact=policy.toy, boxed=boxed), question, encs)
    return dict(record=record, tools=list(tools), cfg=cfg, originals=originals, images=images, turns=[], calls=[],
                stop=None, truncated=False, n_sampled=0, rethinks=0, gen=None, seq=seq, mask=[0] * len(seq),
                logp=[0.0] * len(seq))


def copy_episode(ep):
    """An independent copy that shares the (immutable) images and originals."""
    return dict(ep, seq=list(ep["seq"]), mask=list(ep["mask"]), logp=list(ep["logp"]), turns=list(ep["turns"]),
                calls=list(ep["calls"]), images=list(ep["images"]))


def new_group(policy, record, tools, n, **cfg):
    """n fresh episodes of one record (a GRPO group): the image is loaded and encoded once."""
    ep = new_episode(policy, record, tools, **cfg)
    return [ep] + [copy_episode(ep) for _ in range(n - 1)]


def encode(policy, view):
    if view["enc"] is None:
        view["enc"] = M.encode_image(policy, view["img"])
    return view["enc"]


def _extend(ep, ids, sampled, logps=None):
    ep["seq"] += ids
    ep["mask"] += [int(sampled)] * len(ids)
    ep["logp"] += list(logps) if logps is not None else [0.0] * len(ids)


def advance(policy, ep, new_ids, logps=None, reason="eos"):
    """Add one assistant turn (sampled or scripted ids) and act on it: run its tool call and add the observation,
    or stop. reason: how the turn ended ("eos", "stop", "length")."""
    cfg = ep["cfg"]
    text = policy.tok.decode(new_ids, skip_special_tokens=False).split("<|im_end|>")[0].split("<|endoftext|>")[0]
    _extend(ep, new_ids, True, logps)
    if reason != "eos":  # close the turn as the chat layout expects; not sampled, so never trained
        _extend(ep, M.ids(policy, "<|im_end|>"), False)
    ep["turns"].append(text)
    ep["n_sampled"] += len(new_ids)
    if "<tool_call>" in text:
        name, args, _ = parse_call(text, ep["tools"])
        repeat = args is not None and any(c["name"] == name and c["arguments"] == args for c in ep["calls"])
        if repeat and "repeat" in cfg["stop_on"]:
            return _stop(ep, "repeat")  # lookagain's default: a repeated operation ends the episode
        if len(ep["images"]) >= cfg["max_images"]:
            return _stop(ep, "max_images")
        call, view, obs = execute(ep, text, cfg)
        ep["calls"].append(dict(call, turn=len(ep["turns"]) - 1))  # the turn that made it (view.py)
        if not call["ok"] and "error" in cfg["stop_on"]:
            return _stop(ep, "tool_error")  # ViLaSR's rollout: a call that fails ends the episode
        if cfg["final_answer_turn"] and len(ep["turns"]) == cfg["max_turns"] - 1:
            obs += " " + FINAL_TURN
        if view is not None:
            ep["images"].append(view)
        _extend(ep, M.observation_ids(policy, obs, encode(policy, view) if view else None), False)
        if len(ep["turns"]) >= cfg["max_turns"]:
            return _stop(ep, "max_turns")
        if ep["n_sampled"] >= cfg["max_tokens"]:
            return _stop(ep, "max_tokens")
    elif extract_answer(text) is not None:
        _stop(ep, "answer")
    else:  # "invalid": the policy wrote a vision placeholder; no_action (ViLaSR): neither a call nor an answer
        _stop(ep, {"length": "max_tokens", "invalid": "invalid_token"}.get(reason, "no_action"))


def _stop(ep, why):
    ep["stop"] = why
    # Mini-o3's over-turn masking can drop trajectories cut by a limit rather than finished by the model
    ep["truncated"] = why in ("max_turns", "max_images", "max_tokens")


def seed_episode(ep, device, *key):
    """Give an episode its own generator, seeded from `key` (ints >= 0, e.g. (seed, step, prompt, member)) alone:
    its samples then depend neither on the other episodes of its batch nor on how work is split over ranks."""
    ep["gen"] = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def rollout(policy, episodes, temperature=1.0, top_p=1.0, greedy=False, max_turn_tokens=None, top_k=0, min_p=0.0,
            reuse_cache=True, on_turn=None):
    """The multi-turn loop: sample every active episode's next turn in one batch (each with its ep["gen"]) and run
    the tools until all have stopped; each keeps its KV cache between turns (reuse_cache=False: prefill the whole
    conversation every turn, for comparison). on_turn(ep): after each turn is acted on (eval.py --question prints
    it). The episodes are updated in place and returned."""
    # the same per-turn cap on every rank: sharded ranks step together, one with no episode left on an empty batch
    cap = max_turn_tokens or min((ep["cfg"]["max_turn_tokens"] for ep in episodes), default=DEFAULTS["max_turn_tokens"])
    caches = {}  # id(episode) -> its cache, between its turns
    while True:
        active = [ep for ep in episodes if ep["stop"] is None]
        if not (M.any_rank(bool(active), policy) if M.lockstep(policy) else active):
            return episodes
        outs = M.sample(policy, [ep["seq"] for ep in active], [episode_images(policy, ep) for ep in active],
                        [caches.pop(id(ep), None) for ep in active] if reuse_cache else None, max_new_tokens=cap,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy,
                        generators=[ep["gen"] for ep in active])
        for ep, (new_ids, logps, reason, cache) in zip(active, outs):
            advance(policy, ep, new_ids, logps, reason)
            if on_turn is not None:
                on_turn(ep)
            if ep["stop"] is None and cache is not None:
                caches[id(ep)] = cache


def episode_images(policy, ep):
    return [encode(policy, v) for v in ep["images"]]


def trajectory(ep):
    """What rewards.py scores: the assistant turns, the calls, the stop reason."""
    return dict(turns=ep["turns"], calls=ep["calls"], stop=ep["stop"], rethinks=ep["rethinks"])

