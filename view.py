"""
view.py: see what the model did. One place for every picture of a run: the images an episode saw, saved as JPEG
thumbnails while it is alive (eval.py per item, grpo.py per --view-every sample); the trajectory page <out>/view.html,
written from the run folder alone (items.jsonl, rollouts/step<N>.jsonl, images/), so a copied folder can be drawn again
(`python -c "import view; view.write_page('runs/eval')"`); the curves (grpo's curves.png, eval's results.png); and
--report-to (wandb or tensorboard: the metrics.jsonl rows and a table of sampled completions, imported when asked).

What the page draws of a call, from its fields alone (tools.execute writes them; never by tool name, so a new tool
or dialect needs no change here): `region` (original px) as a box, `point` (original px) as a dot, both on the
original and on `image` (the index of the view it acted on); `size`: the image it returned (the next view). Any
other field shows as JSON. An image is placed by its `box`, the rectangle of its original it shows.
"""
import argparse
import glob
import html
import importlib.util
import json
import math
import os
import re

import numpy as np
from PIL import Image

import rewards as R
import scorers as S
import tools as T

ORIGINAL_SIDE, VIEW_SIDE, QUALITY = 512, 1024, 75  # thumbnails: 200 demo items' images are ~4 MB
GT = "#00d000"  # the ground-truth box, dashed
COLOURS = ["#ff00ff", "#ff8c00", "#00bfff", "#ffe000", "#ff3030", "#8a2be2", "#00e0a0", "#ff69b4"]  # call k's colour

# -----------------------------------------------------------------------------
# saving: an episode's images, while it is alive


def _jpeg(img, out, name, side):
    """A JPEG thumbnail (long side <= side) at <out>/images/<name>.jpg -> its path relative to out."""
    rel = f"images/{name}.jpg"
    im = img.copy()
    im.thumbnail((side, side), Image.BICUBIC)  # only ever shrinks
    im.convert("RGB").save(os.path.join(out, rel), quality=QUALITY)  # JPEG holds no alpha or palette
    return rel


def save_images(ep, out, name, shared=None, write_shared=True):
    """The episode's originals (as <shared or name>-o<k>, shared by the items of one record; write_shared=False: saved
    already) and every image the model was shown (<name>-v<k>), as thumbnails -> {"images": [{file, size (as shown),
    box, src}], "originals": [{file, size}]}, the fields an item keeps for the page."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    # the items of one record show the same originals: one file, written by the first of them
    originals = [dict(file=_jpeg(im, out, f"{shared or name}-o{k}", ORIGINAL_SIDE) if write_shared or not shared
                      else f"images/{shared}-o{k}.jpg", size=list(im.size)) for k, im in enumerate(ep["originals"])]
    # size: as the model saw it (the thumbnail may be smaller); box: the rectangle of original src it shows, in
    # original px (the page places every mark by it)
    images = [dict(file=_jpeg(v["img"], out, f"{name}-v{k}", VIEW_SIDE), size=list(v["img"].size),
                   box=[round(x, 2) for x in v["box"]], src=v["src"]) for k, v in enumerate(ep["images"])]
    return dict(images=images, originals=originals)


def slug(label):
    """A setting's label as a file-name part: 'after GRPO (zoom_in)' -> 'after-GRPO-zoom_in'."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-") or "run"  # (a label of symbols only: still a name)


def prediction(text, record, extract=None):
    """What eval.py reports as the answer: the option letter for multiple choice, else the answer (extract: as the
    episode's dialect reads it, default scorers.final_answer)."""
    return (S.extract_choice(text, record["options"], extract) if record.get("type") == "multiple_choice"
            else (extract or S.final_answer)(text))


RECORD_KEYS = ("id", "category", "question", "options", "answer", "bbox", "type")  # what a GRPO sample shows of it


def _rollout_files(run):
    """{step: path} of <run>/rollouts/step<N>.jsonl."""
    paths = glob.glob(os.path.join(run, "rollouts", "step*.jsonl"))
    steps = [(re.fullmatch(r"step(\d+)\.jsonl", os.path.basename(p)), p) for p in paths]  # the glob also takes step-x
    return dict(sorted((int(m.group(1)), p) for m, p in steps if m))  # by number: step10 after step9


def clear_rollouts(out, after):
    """A run starting at step `after` (0: a new one) drops samples of later steps an earlier run left in <out>."""
    for step, path in _rollout_files(out).items():
        if step > after:  # written again by this run: a stale sample would show a rollout it never made
            os.remove(path)


def save_rollouts(out, step, groups, advantages, preset, weights):
    """grpo.py, every --view-every steps: these groups' episodes with their rewards (each term and its reason,
    recomputed: they are deterministic), advantages (flat, in group order) and images to
    <out>/rollouts/step<N>.jsonl. -> the rows of the completions table (--report-to)."""
    os.makedirs(os.path.join(out, "rollouts"), exist_ok=True)
    lines, rows, k = [], [], 0
    for gi, g in enumerate(groups):
        for ei, ep in enumerate(g):
            traj, rec = T.trajectory(ep), ep["record"]
            total, comp, reasons = R.reward(traj, rec, preset, weights)  # the terms grpo.py summed: deterministic
            iou, inside = R.coverage(traj, rec)  # (None, None) without a ground-truth box
            calls = ep["calls"]
            line = dict(step=step, group=gi, member=ei, idx=k, **{key: rec.get(key) for key in RECORD_KEYS},
                        prediction=prediction("".join(ep["turns"]), rec), score=comp["accuracy"],
                        why=reasons["accuracy"], reward=total, rewards=comp, reasons=reasons,
                        advantage=advantages[k], turns=ep["turns"], calls=calls, stop=ep["stop"],  # k: flat index
                        n_calls=len(calls), n_failed=sum(not c["ok"] for c in calls),
                        used_tool=any(c["ok"] for c in calls), coverage_iou=iou, coverage_inside=inside,
                        **save_images(ep, out, f"step{step}-g{gi}-m{ei}", shared=f"step{step}-g{gi}"))
            lines.append(line)
            rows.append([step, gi, ei, rec["question"], str(rec.get("answer")), "\n".join(ep["turns"]),
                         round(total, 4), round(advantages[k], 4)])
            k += 1
    with open(os.path.join(out, "rollouts", f"step{step}.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return rows


# the completions table of --report-to: save_rollouts' rows, in this order
TABLE_COLUMNS = ["step", "group", "member", "question", "answer", "completion", "reward", "advantage"]

# -----------------------------------------------------------------------------
# the terminal's view of a turn (eval.py --question)


def call_text(call, returned=None):
    """One line for a call: its name, what it returned (image index and size as shown) or its error."""
    what = call.get("name") or "(no tool)"
    if call.get("dialect"):
        what += f" [{call['dialect']}]"
    if not call.get("ok"):
        return f"{what}: error: {call.get('error')}"
    got = f"image {returned}" if returned is not None else "an image"
    size = call.get("size")
    got += f" ({size[0]}x{size[1]})" if size else ""
    region = call.get("region")
    src = f" of image {call['image']}" if call.get("image") is not None else ""
    return f"{what} -> {got}" + (f", region {region}{src} (original px)" if region else "")


def turn_text(ep):
    """The episode's latest assistant turn, the call it made and what that returned, for printing as it happens."""
    k = len(ep["turns"]) - 1
    lines = [f"--- assistant, turn {k + 1}", ep["turns"][-1]]
    n_images = len(ep["originals"])  # images: the first look at each original, then one per call that returned one
    for c in ep["calls"]:
        n_images += bool(c.get("size"))  # size: set only when the call returned an image
        if c.get("turn") == k:
            lines.append("  -> " + call_text(c, returned=n_images - 1 if c.get("size") else None))
    if ep["stop"] is not None:
        lines.append(f"--- stopped: {ep['stop']}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the page: <run>/view.html from the run's outputs alone


def read_run(run):
    """The items of a run folder: eval's items.jsonl and grpo's rollouts/step<N>.jsonl -> ([(item, "file:line")],
    [unreadable "file:line"]). A run with neither: ValueError naming the folder."""
    paths = [p for p in [os.path.join(run, "items.jsonl")] if os.path.isfile(p)] + list(_rollout_files(run).values())
    if not paths:
        raise ValueError(f"{run}: nothing to view (no items.jsonl, no rollouts/step<N>.jsonl)")
    items, bad = [], []
    for path in paths:
        rel = os.path.relpath(path, run)
        for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):  # bad bytes: one bad line at most
            try:
                it = json.loads(line)
                items.append((it if isinstance(it, dict) else {}, f"{rel}:{n}"))  # "file:line": where each came from
            except ValueError:  # a line torn by a kill
                bad.append(f"{rel}:{n}")
    return items, bad


def esc(x):  # every text of a run passes here: model output is untrusted, never markup
    return html.escape(str(x), quote=True)


def _num(v, fmt="{:.3g}"):  # a number as text, else '-' (None, a bool, NaN, text written where a number goes)
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"


def _mark(kind, xy, colour, label, frame):
    """A box (x1, y1, x2, y2) or a dot (x, y) in original px, placed in % of an image showing `frame` of it."""
    try:
        fx0, fy0, fx1, fy1 = (float(v) for v in frame)
        xy = [float(v) for v in xy]
        sx, sy = 100 / (fx1 - fx0), 100 / (fy1 - fy0)  # original px -> % of the image: marks scale with it (2x)
    except (TypeError, ValueError, ZeroDivisionError):  # a malformed field is shown as JSON, not drawn
        return ""
    tag = f"<b style=\"background:{colour}\">{esc(label)}</b>" if label else ""
    if kind == "dot" and len(xy) == 2:
        x, y = (xy[0] - fx0) * sx, (xy[1] - fy0) * sy
        return "" if not (0 <= x <= 100 and 0 <= y <= 100) else (  # a dot outside what this image shows: none
            f'<i class="dot" style="left:{x:.3f}%;top:{y:.3f}%;background:{colour}">{tag}</i>')
    if kind != "box" or len(xy) != 4:
        return ""
    x1, y1, x2, y2 = (xy[0] - fx0) * sx, (xy[1] - fy0) * sy, (xy[2] - fx0) * sx, (xy[3] - fy0) * sy
    if x2 <= 0 or y2 <= 0 or x1 >= 100 or y1 >= 100 or x2 <= x1 or y2 <= y1:
        return ""  # outside this image
    style = f"left:{x1:.3f}%;top:{y1:.3f}%;width:{x2 - x1:.3f}%;height:{y2 - y1:.3f}%;border-color:{colour}"
    return f'<i class="{"gt" if colour == GT else "box"}" style="{style}">{tag}</i>'  # gt: dashed


def _pic(run, entry, width, marks, title, kind="view"):
    """An image file of the run at `width` px with its marks, or a placeholder naming the file when it is missing.
    kind: "view" (an image the model was shown: the page's 2x switch enlarges it) or "original"."""
    file, size = entry.get("file"), entry.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in size)):
        size = [width, width]  # no usable size: a square
    height = round(width * size[1] / size[0])
    pic, cap = f'<span class="pic {kind}" style="--w:{width}px">', f'<span class="cap">{esc(title)}</span></span>'
    if not isinstance(file, str) or not os.path.isfile(os.path.join(run, file)):  # (deleted later: onerror below)
        return f'{pic}<span class="missing" style="height:{height}px">missing image: {esc(file)}</span>{cap}'
    # lazy: a page of hundreds of items loads the pictures in view first; onerror: a file deleted since
    return (f'{pic}<span class="frame"><img src="{esc(file)}" width="{width}" height="{height}" loading="lazy" '
            f'alt="{esc(title)}" onerror="missing(this)">{"".join(marks)}</span>{cap}')


def _clean(it):
    """An item with the lists the page reads made safe to read: a malformed entry becomes an empty one."""
    def dicts(v):  # each entry a dict, so every later .get() is safe
        return [x if isinstance(x, dict) else {} for x in v] if isinstance(v, list) else []
    turns = it.get("turns") if isinstance(it.get("turns"), list) else []  # a non-string turn shows as its JSON
    return dict(it, images=dicts(it.get("images")), originals=dicts(it.get("originals")), calls=dicts(it.get("calls")),
                turns=[t if isinstance(t, str) else json.dumps(t) for t in turns])


def _call_marks(it, ci, frame):
    """Call ci's region (a box) and point (a dot), numbered in its colour, in an image showing `frame`."""
    c, colour = it["calls"][ci], COLOURS[ci % len(COLOURS)]  # the colour follows the call: the same on every image
    return [_mark(kind, c[key], colour, str(ci + 1), frame) for kind, key in (("box", "region"), ("dot", "point"))
            if c.get(key) is not None]


def _src(it, k):
    """The original that image k shows (0 when unknown)."""
    v = it["images"][k] if isinstance(k, int) and 0 <= k < len(it["images"]) else {}
    return v.get("src") if isinstance(v.get("src"), int) else 0  # unknown: original 0, which every item has


def _view(run, it, k, calls, title):
    """Image k as the model was shown it, with the ground truth where it falls and these calls' marks."""
    v, src = it["images"][k], _src(it, k)
    o = it["originals"][src] if 0 <= src < len(it["originals"]) else {}
    frame = v.get("box") or [0, 0, *(o.get("size") or [1, 1])]  # the part of the original it shows (else all of it)
    marks = [_mark("box", it["bbox"], GT, "", frame)] if it.get("bbox") and src == 0 else []  # bbox: of original 0
    marks += [m for ci in calls for m in _call_marks(it, ci, frame)]
    size = v.get("size") if isinstance(v.get("size"), list) and len(v["size"]) == 2 else [112, 112]
    return _pic(run, v, size[0], marks, f"image {k}, {title} ({size[0]}x{size[1]})")


def _original(run, it, src):
    """Original src as a thumbnail, with the ground truth and every successful call made on an image of it."""
    o = it["originals"][src]
    w, h = o.get("size") if isinstance(o.get("size"), list) and len(o["size"]) == 2 else [1, 1]
    frame = [0, 0, w, h]  # the whole original, in its px: the frame of bbox, region and point
    gt = it.get("bbox") and src == 0
    marks = [_mark("box", it["bbox"], GT, "", frame)] if gt else []
    for ci, c in enumerate(it["calls"]):  # region is in original px: a zoom on a zoom is marked where it looked
        if c.get("ok") and _src(it, c.get("image")) == src:
            marks += _call_marks(it, ci, frame)
    width = round(w * min(1, ORIGINAL_SIDE / max(w, h, 1)))  # as the thumbnail was saved (_jpeg)
    return _pic(run, o, width, marks, f"original {src} ({w}x{h})" + (", ground truth dashed" if gt else ""), "original")


# the call fields the page draws or prints; any other shows as JSON (a new tool's field is never hidden)
KNOWN_CALL_KEYS = {"name", "dialect", "arguments", "ok", "error", "region", "point", "zoom", "image", "size", "turn"}


def _call(run, it, ci, returned):
    """Call ci: what it did or its error (red), its arguments and unknown fields as JSON, the view it acted on with
    its marks, the image it returned."""
    c, colour = it["calls"][ci], COLOURS[ci % len(COLOURS)]
    line = esc(call_text(c, returned=returned))
    out = [f'<div class="call{"" if c.get("ok") else " bad"}"><span class="tag" style="background:{colour}">{ci + 1}'
           f'</span> {line if c.get("ok") else f"<span class=err>{line}</span>"} ']
    if c.get("arguments") is not None:  # (None: the call could not be parsed; its text is in the turn above)
        out.append(f'<code>{esc(json.dumps(c["arguments"], ensure_ascii=False))}</code>')
    other = {k: v for k, v in c.items() if k not in KNOWN_CALL_KEYS}
    if other:
        out.append(f'<div class="other">other fields: <code>{esc(json.dumps(other, ensure_ascii=False))}</code></div>')
    pics, k = [], c.get("image")  # image: the view it acted on (an index into images)
    if c.get("ok") and isinstance(k, int) and 0 <= k < len(it["images"]):
        pics.append(_view(run, it, k, [ci], "the view it acted on"))
    if c.get("ok") and returned is not None and returned < len(it["images"]):  # (an image not saved: no picture)
        pics.append('<span class="arrow">&rarr;</span>' + _view(run, it, returned, [], "returned, as shown"))
    return "".join(out) + (f'<div class="pics">{"".join(pics)}</div>' if pics else "") + "</div>"


def _conversation(run, it):
    """Each assistant turn, then the call it made (a call that names no turn: after the last)."""
    turns, returned, n = it["turns"], {}, len(it["originals"])
    for ci, c in enumerate(it["calls"]):  # the images calls returned: the views after the first look(s), in order
        if c.get("size"):
            returned[ci], n = n, n + 1
    by_turn = {}
    for ci, c in enumerate(it["calls"]):  # no valid turn: after the last one
        t = c.get("turn") if isinstance(c.get("turn"), int) and 0 <= c["turn"] < len(turns) else len(turns)
        by_turn.setdefault(t, []).append(_call(run, it, ci, returned.get(ci)))
    out = [f'<div class="turn"><div class="who">assistant, turn {t + 1}</div><pre>{esc(text)}</pre>'
           f'{"".join(by_turn.get(t, []))}</div>' for t, text in enumerate(turns)]
    return "".join(out + by_turn.get(len(turns), []))


def _about(it, where, order):
    """The head line (the verdict and the numbers, the line it came from), then question, answer, prediction, the
    reward terms of a GRPO sample, the other samples of an item."""
    calls, score = it["calls"], it.get("score")
    scored = isinstance(score, (int, float)) and not isinstance(score, bool)
    verdict = ("right" if score >= R.CORRECT else "wrong") if scored else "not scored"  # the rewards' line of correct
    head = [f"#{esc(it.get('idx', order))}", esc(_group(it)), esc(it.get("id") or ""), esc(it.get("category") or ""),
            f'<span class="{dict(right="ok", wrong="err").get(verdict, "na")}">{verdict}</span>',
            f"score {_num(score)}", f"stop {esc(it.get('stop'))}",
            f"calls {len(calls)} ({sum(not c.get('ok') for c in calls)} failed)"]
    # where it zoomed, only if it did (a 0 IoU without a zoom says nothing)
    if it.get("coverage_iou") is not None and any(c.get("ok") and c.get("zoom") for c in calls):
        inside = it.get("coverage_inside")
        head.append(f"zoom IoU with gt {_num(it['coverage_iou'], '{:.2f}')}, gt inside "
                    f"{_num(100 * inside if isinstance(inside, (int, float)) else None, '{:.0f}')}%")
    if "reward" in it:
        head.append(f"reward {_num(it.get('reward'))}, advantage {_num(it.get('advantage'), '{:+.3f}')}")
    head.append(f'<a href="{esc(where.rsplit(":", 1)[0])}">{esc(where)}</a>')  # the file, its line in the text
    qa = [f"<div><b>question</b> <pre>{esc(it.get('question', ''))}</pre></div>"]
    if isinstance(it.get("options"), list):
        qa.append("<div><b>options</b> " + " ".join(f"{chr(65 + i)}. {esc(o)}" for i, o in enumerate(it["options"]))
                  + "</div>")
    qa.append(f"<div><b>answer</b> {esc(it.get('answer'))} &nbsp; <b>prediction</b> {esc(it.get('prediction'))}"
              f" &nbsp; <span class=\"why\">{esc(it.get('why') or '')}</span></div>")
    if it.get("error"):
        qa.append(f'<div class="err">skipped: {esc(it["error"])}</div>')
    if isinstance(it.get("rewards"), dict):
        why = it.get("reasons") if isinstance(it.get("reasons"), dict) else {}
        qa.append('<table class="terms"><tr><th>reward term</th><th>value</th><th>why</th></tr>' + "".join(
            f"<tr><td>{esc(k)}</td><td>{_num(v)}</td><td>{esc(why.get(k, ''))}</td></tr>"
            for k, v in it["rewards"].items()) + "</table>")
    others = [s for s in it.get("other_samples") or [] if isinstance(s, dict)]  # eval's --samples beyond the first
    if others:
        qa.append("<div><b>other samples</b> " + "; ".join(
            f"{esc(s.get('prediction'))} (score {_num(s.get('score'))}, {len(s.get('calls') or [])} calls)"
            for s in others) + "</div>")
    # what SCRIPT filters and sorts by, as data- attributes: the script never reads the run's text itself
    filters = dict(order=order, group=_group(it), score=score if scored else "", right=int(verdict == "right"),
                   wrong=int(verdict == "wrong"), tools=int(any(c.get("ok") for c in calls)),
                   failed=int(any(not c.get("ok") for c in calls)), calls=len(calls),
                   coverage=it.get("coverage_iou"), reward=it.get("reward"), advantage=it.get("advantage"))
    attrs = " ".join(f'data-{k}="{esc("" if v is None else v)}"' for k, v in filters.items())
    return attrs, (f'<div class="head">{" &middot; ".join(h for h in head if h)}</div>'
                   f'<div class="qa">{"".join(qa)}</div>')


def _group(it):
    """What the page groups items by: a GRPO sample's step, an eval item's setting."""
    return f"step {it['step']}" if it.get("step") is not None else str(it.get("setting") or "")


def _item(run, it, where, order):
    """One item (an eval item or a GRPO sample) as HTML; every field optional, every text escaped."""
    raw, it = json.dumps(it, ensure_ascii=False), _clean(it)  # raw: the line as read, shown in full at the bottom
    attrs, about = _about(it, where, order)
    tops = [_original(run, it, src) for src in range(len(it["originals"]))]
    # the first len(originals) images are the first look at each original (tools.new_episode)
    tops += [_view(run, it, k, [], "the first look") for k in range(min(len(it["originals"]), len(it["images"])))]
    return (f'<div class="item" {attrs}>{about}<div class="pics">{"".join(tops)}</div>{_conversation(run, it)}'
            f'<details><summary>the line in {esc(where)}</summary><pre>{esc(raw)}</pre>'
            f"</details></div>")


# the style and the script inline: view.html is one file, readable beside its images with no server
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{position:sticky;top:0;z-index:9;background:#222;color:#eee;padding:6px 12px}header a{color:#9cf}
header select,header label{margin-right:10px}#items{padding:8px 12px}
.item{background:#fff;border:1px solid #ccc;border-radius:6px;margin:10px 0;padding:8px 10px;scroll-margin-top:60px}
.item[hidden]{display:none}
.head{font-weight:600;margin-bottom:4px}.qa pre,.turn pre{display:inline;white-space:pre-wrap;font:inherit;margin:0}
.turn{border-left:3px solid #888;margin:8px 0;padding:2px 8px}.who{color:#666;font-size:12px}
.turn pre{display:block;font-family:ui-monospace,monospace;font-size:13px}
.call{margin:6px 0 6px 10px;padding:4px 6px;background:#f7f7ff;border-radius:4px}.call.bad{background:#fff0f0}
.err{color:#d00000;font-weight:600}.ok{color:#080;font-weight:600}.na{color:#666}.why{color:#666}
.tag{color:#000;padding:0 5px;border-radius:3px;font-weight:700}.other{color:#555;font-size:12px}
.pics{display:flex;flex-wrap:wrap;align-items:flex-end;gap:8px;margin:6px 0}.arrow{font-size:20px;align-self:center}
.pic{display:inline-block;width:var(--w);max-width:100%}.x2 .view{width:calc(2*var(--w))}
.frame{position:relative;display:block;overflow:hidden;line-height:0}
.frame img{width:100%;height:auto;display:block;image-rendering:pixelated}
.cap{display:block;font-size:11px;color:#666}
.missing{display:flex;align-items:center;justify-content:center;background:repeating-linear-gradient(45deg,#ddd 0 8px,
#eee 8px 16px);color:#900;font-size:11px;min-height:40px;word-break:break-all;text-align:center}
.box,.gt,.dot{position:absolute;box-sizing:border-box;display:block}.box{border:3px solid}.gt{border:2px dashed}
.dot{width:10px;height:10px;margin:-5px 0 0 -5px;border-radius:50%;border:1px solid #000}
.box b,.dot b{position:absolute;left:0;top:0;font:bold 10px/1 sans-serif;color:#000;padding:1px 2px}
table.terms{border-collapse:collapse;margin:4px 0;font-size:12px}
.terms td,.terms th{border:1px solid #ddd;padding:1px 6px}
details pre{white-space:pre-wrap;word-break:break-all;font-size:11px}"""

# filter, group and sort by the data- attributes Python wrote (no text of the run passes through the script)
SCRIPT = """function missing(img){const s=document.createElement('span');s.className='missing';
s.textContent='missing image: '+img.getAttribute('src');img.replaceWith(s);}
document.addEventListener('DOMContentLoaded',()=>{
const items=[...document.querySelectorAll('.item')],list=document.getElementById('items');
const f=document.getElementById('filter'),g=document.getElementById('group'),s=document.getElementById('sort');
const num=(el,k)=>{const v=parseFloat(el.dataset[k]);return isNaN(v)?-Infinity:v;};
function update(){const [key,dir]=s.value.split(':');let shown=0;
const order=items.slice().sort((a,b)=>(dir*(num(a,key)-num(b,key))||0)||num(a,'order')-num(b,'order'));
for(const el of order){const ok=(f.value==='all'||el.dataset[f.value]==='1')&&(!g.value||el.dataset.group===g.value);
el.hidden=!ok;shown+=ok;list.appendChild(el);}
document.getElementById('shown').textContent=shown+' of '+items.length+' shown';}
for(const el of [f,g,s])el.addEventListener('change',update);
document.getElementById('x2').addEventListener('change',ev=>document.body.classList.toggle('x2',ev.target.checked));
update();});"""

# "key:direction": the script sorts by data-<key>, 1 ascending, -1 descending, ties in run order; FILTERS: data-<key>
SORTS = [("order:1", "run order"), ("score:-1", "score, high first"), ("score:1", "score, low first"),
         ("calls:-1", "most calls"), ("coverage:-1", "zoom IoU with gt"), ("reward:-1", "reward, high first"),
         ("advantage:-1", "advantage, high first"), ("advantage:1", "advantage, low first")]
FILTERS = [("all", "all"), ("right", "right"), ("wrong", "wrong"), ("tools", "used tools"), ("failed", "failed calls")]


def write_page(run):
    """<run>/view.html: every item of the run (read_run), filterable and sortable, with the run's pictures and
    tables on top. Reads only the run folder; images are referenced beside it. -> the page's path."""
    items, bad = read_run(run)
    cards = [_item(run, it, where, k) for k, (it, where) in enumerate(items)]
    groups = list(dict.fromkeys(_group(it) for it, _ in items))  # each once, in run order
    opt = "".join(f'<option value="{esc(v)}">{esc(t)}</option>' for v, t in FILTERS)
    grp = '<option value="">all</option>' + "".join(f'<option value="{esc(g)}">{esc(g)}</option>' for g in groups if g)
    srt = "".join(f'<option value="{esc(v)}">{esc(t)}</option>' for v, t in SORTS)
    # links to the run's other outputs, those it has (eval writes results.*, grpo metrics.jsonl)
    extras = [f'<a href="{f}">{f}</a>' for f in ("results.md", "results.json", "items.jsonl", "metrics.jsonl",
                                                   "run.json") if os.path.isfile(os.path.join(run, f))]
    figures = "".join(f'<img src="{f}" style="max-width:100%">' for f in ("results.png", "curves.png")
                      if os.path.isfile(os.path.join(run, f)))
    table = ""
    if os.path.isfile(os.path.join(run, "results.md")):
        table = f"<pre>{esc(open(os.path.join(run, 'results.md'), encoding='utf-8', errors='replace').read())}</pre>"
    # a line torn by a kill is named, not fatal: the rest of the run is still worth seeing
    note = f'<div class="err">unreadable lines skipped: {esc(", ".join(bad))}</div>' if bad else ""
    title = os.path.basename(os.path.abspath(run))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}: what the model did</title>'
            f"<style>{CSS}</style><script>{SCRIPT}</script></head><body><header><b>{esc(title)}</b> &middot; "
            f"{len(items)} items &middot; show <select id=\"filter\">{opt}</select> of <select id=\"group\">{grp}"
            f"</select> sort <select id=\"sort\">{srt}</select><label><input type=\"checkbox\" id=\"x2\"> images 2x"
            f'</label><span id="shown"></span> &middot; {" ".join(extras)}</header><div id="items">{note}'
            + (f"<details open><summary>pictures and tables</summary>{figures}{table}</details>"
               if figures or table else "")
            + "".join(cards) + "</div></body></html>")
    path = os.path.join(run, "view.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path

# -----------------------------------------------------------------------------
# curves: grpo.py's curves.png, eval.py's results.png


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display (a headless training machine)
        import matplotlib.pyplot as plt
        return plt
    except ImportError:  # a plot is a convenience: a run never fails for want of one
        print("no plot: matplotlib is missing (pip install -r requirements.txt)")
        return None


# (panel title, metrics.jsonl keys): the 2 x 3 panels of curves.png; eval_* keys come from --eval-every; kl_ref (to
# the reference, what --beta penalises) from --beta > 0; kl_old (to the sampling policy) is 0 with one PPO epoch
CURVES = [("reward", ["reward"]), ("accuracy", ["accuracy", "eval_accuracy"]), ("tool-use rate", ["tool_use"]),
          ("response length, tokens", ["response_tokens"]), ("KL / entropy", ["kl_ref", "kl_old", "entropy"]),
          ("clip fraction", ["clip_frac"])]


def plot_curves(metrics_path, png):
    """grpo.py's curves.png: reward, accuracy, tool-use rate, response length, KL and entropy, clip fraction per
    step (each a few prompts, so noisy: faint) with a running mean over 10 steps. -> png, or None (nothing to draw)."""
    from common import read_metrics  # imported here: common imports this module (log_metrics reports through it)
    rows = [r for r in read_metrics(metrics_path) if isinstance(r, dict) and "step" in r]
    plt = _pyplot() if rows else None
    if not rows:
        print(f"no plot: no rows in {metrics_path}")
    if plt is None:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for k in keys:
            v = np.array([r.get(k) for r in rows], dtype=float)  # None (a missing value) -> NaN
            if np.isnan(v).all():
                continue
            # faint per-step line (its mean below carries the trend); eval's points are sparse: dots
            line, = ax.plot(steps, v, alpha=0.3 if len(v) > 1 else 1, marker="o" if k.startswith("eval") else None)
            ok = ~np.isnan(v)
            w = min(10, int(ok.sum()))
            if w > 1 and not k.startswith("eval"):  # the running mean over the last w steps that have a value
                # the sum of the last w values / how many of them there are: a missing step does not pull it to 0
                mean = np.convolve(np.where(ok, v, 0), np.ones(w))[:len(v)] / np.maximum(
                    np.convolve(ok, np.ones(w))[:len(v)], 1)
                ax.plot(steps, np.where(ok, mean, np.nan), color=line.get_color(), label=f"{k} ({w}-step mean)")
            else:
                line.set_label(k)
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)  # no step 2.5 on the axis
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_results(out):
    """eval.py's results.png from <out>/results.json: accuracy and tool use per setting, and where there is a
    ground-truth box, accuracy per coverage bin (eval.COVERAGE_BINS; the items in each over its bar)."""
    with open(os.path.join(out, "results.json")) as f:
        runs = json.load(f)["runs"]
    plt = _pyplot()
    if plt is None:
        return None
    names = list(runs)
    binned = [n for n in names if runs[n].get("coverage")]
    # the coverage panel only where a setting had ground-truth boxes to bin by
    fig, axes = plt.subplots(1, 2 if binned else 1, figsize=(12 if binned else 6, 3.8), squeeze=False)
    ax, x, w = axes[0][0], np.arange(len(names)), 0.38
    for k, (key, label) in enumerate((("accuracy", "accuracy"), ("tool_use", "tool use"))):
        v = [100 * runs[n][key] if runs[n].get(key) is not None else 0 for n in names]
        bars = ax.bar(x + (k - 0.5) * w, v, w, label=label)  # two bars a setting, side by side
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)  # room above 100% for the bar labels
    ax.legend(fontsize=8)
    ax.set_title("per setting")
    if binned:
        ax = axes[0][1]
        bins = list(runs[binned[0]]["coverage"]["bins"])  # the same bins for every setting (eval.COVERAGE_BINS)
        x, w = np.arange(len(bins)), 0.8 / len(binned)
        for k, n in enumerate(binned):
            b = runs[n]["coverage"]["bins"]
            v = [100 * (b[c]["accuracy"] or 0) for c in bins]
            bars = ax.bar(x + (k - (len(binned) - 1) / 2) * w, v, w, label=n)  # a bar per setting, centred on the bin
            ax.bar_label(bars, labels=[f"n={b[c]['n']}" for c in bins], fontsize=7)  # a bin of 3 items says little
        ax.set_xticks(x, [b.replace(" in ", "\nin ") for b in bins], fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=8)
        ax.set_title("accuracy by where it zoomed (the ground-truth box)")
    fig.tight_layout()
    png = os.path.join(out, "results.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png

# -----------------------------------------------------------------------------
# --report-to (TRL's name): the rows metrics.jsonl gets, and grpo.py's sampled completions, to wandb or tensorboard

REPORTERS = {"none": None, "wandb": "wandb", "tensorboard": "tensorboard"}  # -> the package it needs


def report_to(kind):
    """--report-to's type: checked when the flags are parsed, before anything loads."""
    if kind not in REPORTERS:
        raise argparse.ArgumentTypeError(f"{kind!r}: one of {', '.join(REPORTERS)}")
    # looked up, not imported: a missing package fails when the flags are parsed, not at the first log after a load
    if REPORTERS[kind] and importlib.util.find_spec(REPORTERS[kind]) is None:
        raise argparse.ArgumentTypeError(f"{kind}: the {REPORTERS[kind]} package is not installed "
                                         f"(pip install {REPORTERS[kind]})")
    return kind


def add_report_flag(p):
    p.add_argument("--report-to", type=report_to, default="none", metavar="{none,wandb,tensorboard}",
                   help="also log the metrics (and grpo's sampled completions) to wandb (WANDB_PROJECT, "
                        "WANDB_MODE=offline) or tensorboard (<out>/tensorboard)")


_loggers = {}  # (kind, out) -> log(row, table): one wandb run or tensorboard writer per run folder


def _open_logger(kind, args):
    # the run's flags, those a logger can store (a value such as a parsed object is left out)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    if kind == "wandb":
        import wandb  # here, only when asked: not a dependency
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lookagain"), dir=args.out, config=config,
                         name=os.path.basename(os.path.abspath(args.out)))  # the run named as its folder

        def log(row, table):
            run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])  # on the run's own step axis
            if table:
                run.log({"completions": wandb.Table(columns=TABLE_COLUMNS, data=table)}, step=row["step"])
        return log
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(args.out, "tensorboard"))
    # indented 4: tensorboard renders text as markdown, and an indented block stays verbatim
    writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "))

    def log(row, table):
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(k, float(v), row["step"])
        if table:
            # a markdown table's cell: | escaped, a newline as <br>
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            writer.add_text("completions", "\n".join(["| " + " | ".join(TABLE_COLUMNS) + " |",
                                                      "|" + "---|" * len(TABLE_COLUMNS)]
                                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in table]),
                            row["step"])
        writer.flush()  # a run killed later keeps what was logged
    return log


def report(args, row, table=None):
    """common.log_metrics' hook: a metrics row (numbers; None and text left out) and, when given, a table of
    completions (TABLE_COLUMNS), to --report-to's logger, opened on first use."""
    kind = getattr(args, "report_to", "none")
    if kind == "none":
        return
    key = (kind, os.path.abspath(args.out))  # opened once per kind and run folder
    if key not in _loggers:
        _loggers[key] = _open_logger(kind, args)
    # finite numbers only: a NaN or a text field stays in metrics.jsonl, off the charts
    nums = {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and (k == "step" or math.isfinite(float(v)))}
    _loggers[key](dict(nums, step=int(row["step"])), table)  # the step an int: the loggers' x axis
