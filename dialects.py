"""
dialects.py: the formats models are spoken to in, one entry of DIALECTS each: lookagain's own (the default), and one
per released checkpoint of the methods we implement, reproduced from its released code: the prompt (character for
character), how a call is written and parsed, its coordinate frame and image numbering, the observation a result
comes back as, the stop strings, the answer extractor, what is trained. A dialect is a dict of plain functions over an
episode (tools.py) and a few values:
    prompt(ep)         -> the opening messages (model.py's: role, parts, closed); tools.py opens the assistant one
    prefill            the text the first assistant message starts with ("" for most)
    stops, keep_stop   the stop strings of a model call, and whether the text keeps them (the rest of it is cut)
    read(ep, text, reason) -> what one model call did: calls (requests for tools.run_tool), answered, tail (harness
                          text appended to the assistant message), again (go on in the same message), end (a stop
                          reason the dialect decides)
    observe(ep, calls, final) -> messages after the assistant message (closed), or parts inline in it; the next prefill
    answer(text)       -> the final answer of a transcript (the text of its turns), for scoring
    trained_text       harness text inside the assistant message is trained too (VLM-R3)
    trained_eos        the end-of-turn token the model samples is trained (RL; False: ViLaSR's, sft.py trains it)
    last_call_runs     the last allowed model call's call runs (False: VLM-R3's); optional: errors_end, max_calls
A request (what read() asks tools.run_tool to run): name and arguments as the model wrote them, tool (a tools.TOOLS
row) and args (checked, in lookagain's frame: image_index, pixels of that image as shown), or error. Adding a dialect
is adding one entry (and its test); docs/dialects.md's table says what each reproduces.
"""
import ast
import json
import re

import mathscore
import scorers

# -----------------------------------------------------------------------------
# lookagain: Qwen2.5's function calling with our four tools

NUMBERS, OBJECTS = ({"type": "array", "items": {"type": t}} for t in ("number", "object"))
JSON_TYPES = {"integer": {"type": "integer"}, "box": NUMBERS, "point": NUMBERS, "boxes": OBJECTS, "lines": OBJECTS}


def system_prompt(tools, compact=False, boxed=False):
    """Qwen2.5's function-calling system prompt for the enabled tools (tools: {name: its row of tools.TOOLS}; boxed:
    the question asks for \\boxed{} as VL-Rethinker's does). compact (toy models): the tools' signatures alone (a toy
    learns fast behind a short prompt, and SFT's step time follows the tokens: the demo's sequences are 20% shorter)."""
    if compact:
        sigs = "; ".join(f"{n}({', '.join(t['params'])})" for n, t in tools.items())
        return f"Tools: {sigs}." if tools else "No tools."
    s = "You are a helpful assistant." + ("" if boxed else " Think inside <think></think>, then either call a tool "
                                          "or give the final answer inside <answer></answer>.")
    if not tools:
        return s
    s += ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"  # Qwen2.5's
          "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
    for name, tool in tools.items():
        params = tool["params"]
        props = {k: {**JSON_TYPES[t], "description": d} for k, (t, d) in params.items()}
        schema = {"type": "function", "function": {"name": name, "description": tool["doc"], "parameters": {
            "type": "object", "properties": props, "required": list(params)}}}
        s += "\n" + json.dumps(schema)  # one a line, as Qwen2.5's chat template writes them
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
        raise ValueError(f"{what} must be a number in [-1e6, 1e6], got {_show(v)}")
    return float(v)


def _check(kind, v, what):
    """One argument checked by its spec type, normalised."""
    if kind == "string":
        if not isinstance(v, str) or len(v) > 64:  # a label is drawn on the image
            raise ValueError("label must be a string of at most 64 characters")
        return v
    if kind == "integer":
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ValueError(f"{what} must be an integer")
        return int(v)  # 2.0 reads as 2
    if kind in ("box", "point"):
        n = 4 if kind == "box" else 2
        if not isinstance(v, list) or len(v) != n:
            raise ValueError(f"{what} must be a list of {n} numbers")
        return [_number(x, what) for x in v]
    if kind in ("boxes", "lines"):  # several drawing operations in one call (ViLaSR)
        keys = {"boxes": {"bbox_2d": "box", "label": "string"},
                "lines": {"start_point_2d": "point", "end_point_2d": "point", "label": "string"}}[kind]
        if not isinstance(v, list) or not 1 <= len(v) <= 16:
            raise ValueError(f"{what} must be a list of 1 to 16 objects")
        out = []
        for i, op in enumerate(v):
            if not isinstance(op, dict) or set(op) != set(keys):  # a misspelt key: an error
                raise ValueError(f"{what}[{i}] must have exactly the keys {sorted(keys)}")
            out.append({k: _check(t, op[k], f"{what}[{i}].{k}") for k, t in keys.items()})
        return out
    raise AssertionError(kind)  # a tools.TOOLS type unknown here: a bug, not model text


def parse_call(text, tools):
    """A turn's first <tool_call>, parsed strictly (never raises, never evals); tools: {name: its tools.TOOLS row}.
    -> (name, args, None) or (name or None, None, error)"""
    start = text.find("<tool_call>")  # the first: one call a turn, a second is ignored
    end = text.find("</tool_call>", start + 1)
    if start < 0 or end < 0:
        return None, None, "no <tool_call>" if start < 0 else "unclosed <tool_call>"
    try:
        call = json.loads(text[start + len("<tool_call>"):end])  # strict JSON, never evaluated
    except (ValueError, RecursionError) as e:
        return None, None, f"invalid JSON in tool call ({str(e)[:60]})"
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:  # as Qwen2.5 writes a call
        return None, None, 'a tool call must be {"name": ..., "arguments": {...}}'
    name, args = call["name"], call["arguments"]
    if not isinstance(name, str) or name not in tools:  # echo at most 40 characters of what the model wrote
        return None, None, f"unknown tool {_show(name)}; available: {', '.join(tools)}"
    params = tools[name]["params"]
    if not isinstance(args, dict):
        return name, None, "arguments must be an object"  # (the name kept: the record says which tool)
    if set(args) != set(params):  # all required (the schema says so), none extra
        missing, extra = set(params) - set(args), set(args) - set(params)
        return name, None, (f"missing argument(s) {sorted(missing)}" if missing
                            else f"unexpected argument(s) {[k[:40] for k in sorted(extra)[:5]]}")
    try:
        return name, {k: _check(t, args[k], k) for k, (t, _) in params.items()}, None
    except ValueError as e:
        return name, None, str(e)


RESULT = "Image {i} ({w}x{h}), from image {j}."  # the observation of a successful call


def render_call(name, arguments):
    """What Qwen2.5's chat template appends to an assistant turn's text for a tool call (sft.py's demos too)."""
    return "\n<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"




FINAL_TURN = "This is your last turn: you cannot call a tool again. Answer the question now."  # final_answer_turn
BOXED = "Please reason step by step, and put your final answer within \\boxed{}."  # VL-Rethinker's trigger


def place_images(question, n):
    """The user turn's parts: image i at the i-th `<image>` of the question when it has one per image (benchmarks.py
    writes them where a benchmark puts its images), else all images first, then the question (Qwen's processor
    template, and most released harnesses)."""
    pieces = question.split("<image>")
    if n and len(pieces) == n + 1:  # one <image> per image: each image where the question has it
        return [x for i, p in enumerate(pieces) for x in ([i - 1] if i else []) + ([p] if p else [])]
    return list(range(n)) + [question]


def lookagain_prompt(ep):
    """Our system prompt with the tools' schemas; the images and the question (with a benchmark's own instruction,
    where benchmarks.py kept one apart: the other dialects write their harness's instead)."""
    boxed, r = ep["cfg"]["answer_format"] == "boxed", ep["record"]  # boxed: \boxed{} in place of <answer>
    question = (question_text(r) + (f"\n{r['instruction']}" if r.get("instruction") else "")
                + ("\n\n" + BOXED if boxed else ""))  # "\n\n" + trigger, as VL-Rethinker's
    return [dict(role="system", parts=[system_prompt(ep["specs"], compact=ep["compact"], boxed=boxed)], closed=True),
            dict(role="user", parts=place_images(question, len(ep["images"])), closed=True)]


def lookagain_read(ep, text, reason):
    """A turn with a <tool_call> is a call (the first, parsed strictly); else it answered if it has an answer."""
    if "<tool_call>" not in text:  # an <answer> or a \boxed{} answers; neither: no action
        return dict(answered=scorers.extract_answer(text) is not None)
    name, args, err = parse_call(text, ep["specs"])  # args: in the frame of image k as shown (ours)
    return dict(calls=[dict(name=name, arguments=args, tool=name if err is None else None, args=args, error=err)])


def lookagain_observe(ep, calls, final):
    """Qwen's tool-response turn: the new image and a line saying which it is, or the error."""
    c = calls[0]
    obs = (RESULT.format(i=c["new_image"], w=c["size"][0], h=c["size"][1], j=c["image"]) if c["ok"]
           else f"Error: {c['error']}")  # the size as shown: the frame of the next call on it
    obs += " " + FINAL_TURN if final and ep["cfg"]["final_answer_turn"] else ""  # the last turn told so
    parts = ["<tool_response>\n"] + ([c["new_image"]] if c["ok"] else []) + [obs + "\n</tool_response>"]
    return dict(messages=[dict(role="user", parts=parts, closed=True)])


# -----------------------------------------------------------------------------
# shared pieces of the released formats


def options(record, fmt):
    """A multiple-choice record's options, each formatted by fmt(letter, text) ("" when it has none)."""
    return "".join(fmt(chr(65 + i), o) for i, o in enumerate(record.get("options") or []))


def vstar_text(record):
    """A question as V*'s test_questions.jsonl writes it (the `text` several harnesses pass on as it is): the question,
    "(A) ..." lines, the instruction."""
    if not record.get("options"):
        return record["question"]
    return (record["question"] + options(record, lambda k, o: f"\n({k}) {o}")
            + "\nAnswer with the option's letter from the given choices directly.")  # V*'s own instruction


def _literal(s):
    """A Python literal (JSON or Python syntax) in model text, or ValueError; never evaluated as code."""
    if len(s) > 100_000:  # bounds literal_eval's work on model text
        raise ValueError("too long")
    try:
        return ast.literal_eval(s.strip())  # JSON or Python (what DeepEyes' eval() reads), never run
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"not a literal ({type(e).__name__})") from None


def request(name, arguments, tool=None, args=None, error=None, **extra):
    """What a dialect's read() asks tools.run_tool to run (see the module docstring)."""
    return dict(name=name, arguments=arguments, tool=tool if error is None else None, args=args, error=error, **extra)


def to_view(ep, k, x, y, frame):
    """A point in a call's frame -> pixels of image k as shown. frame "view": already; "original": pixels of the
    original image k shows; (w, h): pixels of an image of that size showing the same rectangle."""
    w, h = ep["images"][k]["img"].size  # image k as shown
    if frame == "view":
        return x, y
    if frame == "original":
        x0, y0, x1, y1 = ep["images"][k]["box"]  # the rectangle of the original it shows, original px
        return (x - x0) * w / (x1 - x0), (y - y0) * h / (y1 - y0)
    return x * w / frame[0], y * h / frame[1]  # (w, h): scaled to the size shown


def boxed_answer(text):
    """VL-Rethinker's (and Pixel-Reasoner's) answer: the last \\boxed{}, else the first <answer>...</answer>, else the
    text after the last "Answer:", else the whole text (its verifier tries them in that order)."""
    b = mathscore.last_boxed(text)  # braces balanced: \boxed{\frac{1}{2}} whole
    if b is not None:
        return b
    m = re.search("<answer>(.*?)</answer>", text)  # no re.S: one line, as handle_boxed's regex
    if m:
        return m.group(1).strip()
    return text.rpartition("Answer:")[2].strip() if "Answer:" in text else (text.strip() or None)


def first_answer(text):
    """The first <answer>...</answer> (Groundlight's and Mini-o3's parsers), else final_answer's reading."""
    m = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.S)  # XMLParser's pattern: the first, across lines
    return m.group(1).strip() if m else scorers.final_answer(text)


# -----------------------------------------------------------------------------
# VL-Rethinker (TIGER-AI-Lab/VL-Rethinker@dd2c17d): no tools, one turn, \boxed{}. openrlhf/datasets/prompts_dataset.py
# ("default" trigger, no system message: Qwen's default applies), experience_maker.py handle_placeholders (an image
# block before the system turn unless the question has <image>), rule_reward / handle_boxed.

VLR_TRIGGER = "Please reason step by step, and put your final answer within \\boxed{}."


def vl_rethinker_prompt(ep):
    q, n = question_text(ep["record"]) + "\n\n" + VLR_TRIGGER, len(ep["images"])
    if n and q.count("<image>") == n:  # handle_placeholders puts an image block at each <image>
        return [dict(role="user", parts=place_images(q, n), closed=True)]
    return [dict(role=None, parts=list(range(n)), closed=True), dict(role="user", parts=[q], closed=True)]


def one_turn_read(ep, text, reason):
    return dict(end="max_tokens") if reason == "length" else dict(answered=True)  # cut: no EOS, their invalid


# -----------------------------------------------------------------------------
# DeepEyes (Visual-Agent/DeepEyes@6c5e796, eval/eval_vstar.py): Qwen's <tool_call> JSON for image_zoom_in_tool, the
# box in original pixels of the question's image; a failed call ends the episode (no error is shown at eval); the
# crop comes back in a <tool_response> user turn with the instruction again.

DE_SYSTEM = ('You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user '
             'query.\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
             '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region '
             'of an image by cropping it based on a bounding box (bbox) and an optional object label.",'
             '"parameters":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},'
             '"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], '
             'where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},'
             '"label":{"type":"string","description":"The name or label of the object in the specified bounding box '
             '(optional)."}},"required":["bbox"]}}}\n</tools>\n\n# How to call a tool\nReturn a json object with '
             'function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
             '<function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n**Example**:  \n<tool_call>  \n'
             '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the '
             'desk"}}  \n</tool_call>')  # "required": ["bbox"] (sic)
DE_USER = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think> "
           " <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")


def deepeyes_prompt(ep):
    r = ep["record"]
    text = (f"Question: {r['question']}\nOptions: \n" + options(r, lambda k, o: f"{k}. {o}\n") + "\n" + DE_USER
            if r.get("options") else f"Question: {r['question']}\n" + DE_USER)  # (no template for open questions)
    return [dict(role="system", parts=[DE_SYSTEM], closed=True),  # eval_vstar.py's, a tool schema of its own
            dict(role="user", parts=list(range(len(ep["images"]))) + [text], closed=True)]


def deepeyes_read(ep, text, reason):
    """An answer ends it; else the FIRST <tool_call> (eval; their training reads the last) is the call."""
    if "</answer>" in text:  # first: a turn with a call and an answer ends (their loop's condition)
        return dict(answered=True)
    if "<tool_call>" not in text:  # neither ends it (theirs re-sends the request, which repeats at T 0)
        return {}
    body = text.split("<tool_call>")[1].split("</tool_call>")[0].strip()  # an unclosed call: the rest of the text
    try:
        call = _literal(body)  # their eval(), without running code
        name, args = call["name"], call["arguments"]  # the name is not checked, the label ignored (theirs)
        box = _check("box", args["bbox_2d"], "bbox_2d")  # 4 finite numbers, as floats
        x1, y1 = to_view(ep, 0, box[0], box[1], "original")  # always the question's image, in original px
        x2, y2 = to_view(ep, 0, box[2], box[3], "original")
        return dict(calls=[request(name, args, "zoom_in", dict(image_index=0, bbox_2d=[x1, y1, x2, y2]))])
    except (ValueError, KeyError, TypeError, IndexError) as e:  # any failure ends the episode (errors_end)
        return dict(calls=[request(None, None, error=f"{type(e).__name__}: {str(e)[:60]}")])


def deepeyes_observe(ep, calls, final):
    return dict(messages=[dict(role="user",  # the crop, then the instruction again, inside <tool_response>
                               parts=["<tool_response>", calls[0]["new_image"], DE_USER + "</tool_response>"],
                               closed=True)])


# -----------------------------------------------------------------------------
# VLM-R3 (justgogorunrun/VLM-R3@841adca, src/model/r3_vllm.py): a bare {"bbox_2d": [...]} in the reasoning, in pixels
# of the question's image as shown; a call stops at "]}" (not kept: "]}\n" is written back); the crop goes INTO the
# assistant turn as the next call starts (:249-263): none after the last allowed one. No system prompt (Qwen's applies).

R3_PROMPT = ('\nYou need to first think about the reasoning process in your mind, and then provide the answer. When '
             'thinking, you should call the "crop" tool (format: {"bbox_2d": [x1, y1, x2, y2]}) to focus on the key '
             'areas in the image. The reasoning process and the answer are included in the <think> </think> and '
             '<answer> </answer> tags respectively.')


def vlm_r3_prompt(ep):
    q = vstar_text(ep["record"]).replace("Answer with the option's letter from the given choices directly.", "").strip()
    return [dict(role="user", parts=list(range(len(ep["images"]))) + [q + R3_PROMPT], closed=True)]


def vlm_r3_read(ep, text, reason):
    """Its harness after each model call (r3_vllm.py:302-364): "</answer>\n" when an answer is left open; the end at
    <|im_end|> or an answer; "]}\n" after a box; then the last {...}: none that parses, nothing; one without a
    bbox_2d, or a box that fails, "Invalid operation!"; an empty box or one that crops nothing (their silent None),
    "```\n" where ```json was written and the last crop again; else the crop (the box mapped to the original with
    int(), cut inclusively) and "```\n" where ```json was written."""
    parts = ep["messages"][-1]["parts"]  # the open assistant message: its text, crops and tails
    k = max((i for i, p in enumerate(parts) if isinstance(p, dict)), default=0)  # this call's ids
    if k and parts[k - 1] == "\n":  # each later call's prompt ends in "\n" (its <|im_end|>\n cut to \n, :268-269),
        del parts[k - 1]  # after a crop or text alike; the message itself never holds it
    tail = "</answer>\n" if "<answer>" in text and "</answer>" not in text else ""  # the stop was cut
    if reason == "eos" or "</answer>" in text + tail:  # <|im_end|> or an answer: the episode ends
        return dict(tail=tail, answered="<answer>" in text, end=None if "<answer>" in text else "no_action")
    tail += "]}\n" if "bbox_2d" in text else ""  # whichever stop fired ("]}", "]\n}", "] }"), or none (the cap)
    found = re.findall(r"\{.*?\}", text + tail, re.S)  # their _extract_fields: the last {...}, a box or not
    try:
        op = json.loads(found[-1]) if found else None  # strict JSON, as theirs: a {...} parses to a dict
    except ValueError:
        op = None
    if not op:  # their `if op:` skips the rest: generation goes on in the message
        return dict(tail=tail, again="\n") if "bbox_2d" not in text else \
            dict(tail=tail, calls=[request("crop", op, error="no box parses")])
    fence = "```\n" if "```json" in text else ""  # theirs closes a fence after a crop that did not raise
    W, H = ep["originals"][0].size  # original px
    w, h = ep["images"][0]["img"].size  # as shown: the box's frame
    try:
        if not op["bbox_2d"]:  # _crop_and_save_region's `if not bbox`: None, silent (no key: their KeyError)
            return dict(tail=tail + fence, calls=[request("crop", op, error="empty box", silent=True)])
        x1, y1, x2, y2 = _check("box", op["bbox_2d"], "bbox_2d")
        x1, y1 = max(0, int(x1 * W / w)), max(0, int(y1 * H / h))  # bbox_transform's int(): truncated
        x2, y2 = min(W - 1, int(x2 * W / w)), min(H - 1, int(y2 * H / h))  # clamped as get_img_crop
    except (ValueError, KeyError, TypeError) as e:  # their exception path (a missing key, a wrong length)
        return dict(tail=tail + "Invalid operation!", calls=[request("crop", op, error=str(e))])
    if x1 >= x2 or y1 >= y2:  # get_img_crop's None: silent, no error text
        return dict(tail=tail + fence, calls=[request("crop", op, error="degenerate box", silent=True)])
    box = [*to_view(ep, 0, x1, y1, "original"), *to_view(ep, 0, x2 + 1, y2 + 1, "original")]  # x2, y2 inclusive
    return dict(tail=tail + fence, calls=[request("crop", op, "zoom_in", dict(image_index=0, bbox_2d=box))])


def vlm_r3_observe(ep, calls, final):
    """The crop inline, then "\n" (at generation, after any call); after a silent failure the last crop made comes
    again (their crop_flag re-adds the latest crop file, r3_vllm.py:253-263, 344)."""
    c = calls[0]
    shown = c["new_image"] if c["ok"] else None if not c.get("silent") else \
        next((p["new_image"] for p in reversed(ep["calls"][:-1]) if p["ok"]), None)
    return dict(inline=([shown] if shown is not None else []) + ["\n"])  # (read() drops that "\n" next call)


def vlm_r3_answer(text):
    """The last <answer>...</answer>, else the last line (test_vstar_r3.py)."""
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)  # acc_verifier's: the last, across lines
    return found[-1].strip() if found else (text.strip().split("\n")[-1] or None)


# -----------------------------------------------------------------------------
# ViLaSR (AntResearchNLP/ViLaSR@61669c0, eval/infer.py, utils/edit_image.py): drawing. "<think> ... </think> Action:
# Object Mapper" and a ```json list of boxes / lines on image `index` (1-based), in pixels of that image as shown; one
# new image per image drawn on; a call that does not parse ends the episode (the model is never shown an error).

VILASR_SYSTEM = (
    '### Guidance:\nYou are a spatial reasoning assistant with access to two powerful visualization tools.\nYour task '
    'is to break down complex spatial problems and iteratively refine your solution through visualization feedback.\n\n'
    '### Available tools:\nYou can use the following two tools to visualize. After each tool usage, you must wait for '
    'and analyze the visualization feedback before proceeding.\n\n1. **Object Mapper**\n- Purpose: Identifies and maps '
    'key items in the space\n- Input format: JSON\n```json\n[{{\n    "index": i, # Image index\n    "bbox_2d": [x1, '
    'y1, x2, y2],\n    "label": "object name/description"\n}}]\n```\n- Output: Generates bounding boxes for visual '
    'inspection of the i-th image\n\n2. **Path Tracer**\n- Purpose: Plots movement or connections between points\n- '
    'Input format: JSON\n```json\n[{{\n    "index": i, # Image index\n    "start_point_2d": [x1, y1],\n    '
    '"end_point_2d": [x2, y2],\n    "label": "trace_description"\n}}]\n```\n- Output: Generates visual paths for '
    'verification of the i-th image\n\n### Required Output Format:\nFor each reasoning step, you must structure your '
    'response as follows:\n<think> [Your detailed reasoning process] </think> Action: [Object Mapper/Path Tracer]\n'
    '```json\n[JSON format coordinates]\n```\n\nAfter your reasoning and iteratively refine your solution through '
    'visualization feedback, you should arrive at a final answer and structure your response as follows:\n<think> '
    '[Your detailed reasoning process] </think> Action: Answer\n<answer> [Your final answer] </answer>\n\n### Please '
    'NOTE the following reasoning techniques:\n1. Initial Analysis\n   - Break down the spatial problem\n   - Plan '
    'your approach\n\n2. Iterative Reasoning for Each Step\n   - Choose appropriate tool\n   - Provide absolute '
    'coordinates in JSON format (The top-left corner of the image is (0, 0) and the bottom-right corner is ({width}, '
    '{height}))\n   - Observe the visualization output\n   - Reflect on the visualization:\n     * Is the '
    'placement/path accurate?\n     * Does it align with your reasoning?\n     * What adjustments are needed?\n   - '
    'Backtrack and Adjust:\n'
    '     * If errors found, backtrack to previous step to modify actions or decisions as needed')
VILASR_QUESTION = ("\n### Question:\n{question}\n\nBegin your reasoning. After each tool use, critically evaluate the "
                   "visualization and adjust if needed:\n")
VILASR_TYPE = {"multiple_choice": "\nAnswer with the option's letter from the given choices directly.",
               "number": "\nPlease answer the question using a single word or phrase (e.g., 42 or 3.14).",
               "mra": "\nPlease answer the question using a single word or phrase (e.g., 42 or 3.14)."}
VILASR_NEXT = ("The index of the given image is {i} (width: {w}, height: {h}). Continue your reasoning. After each "
               "tool use, critically evaluate the visualization and adjust if needed:")
VILASR_LAST = ("The index of the given image is {i} (width: {w}, height: {h}). Then, you can not invoke the Object "
               "Mapper or Path Tracer tool. Please answer the initial question and structure your response as "
               "required:")


def vilasr_prompt(ep):
    r, n = ep["record"], len(ep["images"])
    w, h = ep["images"][0]["img"].size  # image 1 as shown: the size its system prompt states
    q = r["question"] + ("\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(r["options"]))
                         if r.get("options") else "")
    if n == 1:  # infer.py's single-image datasets (maze, SpatialEval, SPAR / MMSI single view)
        parts = [0, VILASR_QUESTION.format(question=q + "\nThe index of the given image is 1."
                                                    + VILASR_TYPE.get(r.get("type"), ""))]
    else:       # its multi-view ones: each image with its index line (the first image's size, as theirs)
        parts = [x for i in range(n)
                 for x in (i, f"The index of the given image is {i + 1} (width: {w}, height: {h}).\n")]
        parts.append(VILASR_QUESTION.format(question=q + VILASR_TYPE.get(r.get("type"), "")))
    return [dict(role="system", parts=[VILASR_SYSTEM.format(width=w, height=h)], closed=True),
            dict(role="user", parts=parts, closed=True)]


def vilasr_read(ep, text, reason):
    """An answer (both tags, at <|im_end|>) ends it; else every ```json block's operations, grouped by image."""
    if "<answer>" in text and "</answer>" in text and reason == "eos":  # its _is_finished; calls in it are ignored
        return dict(answered=True)
    lines, ops = text.split("\n"), []
    for i, line in enumerate(lines):
        if line.strip() == "```json":
            body = "\n".join(lines[i + 1:])
            body = body.split("```")[0] if "```" in body else body.split("</think>")[0].strip()  # unclosed: to </think>
            try:
                block = _literal(body)
            except ValueError:
                continue
            for op in block if isinstance(block, list) else []:
                if isinstance(op, dict) and "label" in op and ("bbox_2d" in op  # a box, or a line; both need a label
                                                               or "start_point_2d" in op and "end_point_2d" in op):
                    ops.append(op)
    if not ops or any("index" not in op for op in ops):  # their "ToolError" / "ToolGenError": the episode ends
        return {} if "```json" not in text else dict(calls=[request("Object Mapper", None, error=(
            "no box or line operation parses (each needs a label)" if not ops else "an operation has no index"))])
    groups = {}
    for op in ops:
        groups.setdefault(op["index"], []).append(op)  # one new image per image drawn on
    calls = []
    for index, group in groups.items():
        try:
            if isinstance(index, bool) or not isinstance(index, int) or index < 1:  # 1-based (out of range: run_tool)
                raise ValueError(f"index {str(index)[:20]} is not an image number (1-based)")
            clean = [{k: _check("box" if k == "bbox_2d" else "point" if k.endswith("_2d") else "string", op[k], k)
                      for k in ("bbox_2d", "label") if k in op} if "bbox_2d" in op else
                     {k: _check("point" if k.endswith("_2d") else "string", op[k], k)
                      for k in ("start_point_2d", "end_point_2d", "label")} for op in group]
            calls.append(request("Object Mapper" if "bbox_2d" in group[0] else "Path Tracer", group, "draw_box",
                                 dict(image_index=index - 1, boxes=clean)))  # draw_box draws lines too (tools._draw)
        except ValueError as e:
            calls.append(request("Object Mapper", group, error=str(e)))
    return dict(calls=calls)


def vilasr_observe(ep, calls, final):
    # the last round, or the image cap reached: told to answer (infer.py: final_prompt)
    prompt = VILASR_LAST if final or len(ep["images"]) + 1 >= ep["cfg"]["max_images"] else VILASR_NEXT
    lines = [(c["new_image"], c["size"]) for c in calls]
    if len(lines) == 1:
        (k, (w, h)), = lines
        parts = [k, "\n" + prompt.format(i=k + 1, w=w, h=h) + "\n"]  # 1-based; a "\n" after the image here only
    else:
        parts = [x for k, (w, h) in lines[:-1]
                 for x in (k, f"The index of the given image is {k + 1} (width: {w}, height: {h}).\n")]
        (k, (w, h)) = lines[-1]
        parts += [k, prompt.format(i=k + 1, w=w, h=h) + "\n\n"]
    return dict(messages=[dict(role="user", parts=parts, closed=True)])


def last_answer(text):
    """The last <answer>...</answer> (ViLaSR's scorer reads the last turn's), else final_answer's reading."""
    found = re.findall(r"<answer>\s*(.*?)\s*</answer>", text, re.S)  # (the last turn's is the transcript's last)
    return found[-1].strip() if found else scorers.final_answer(text)


# -----------------------------------------------------------------------------
# Groundlight (groundlight/r1_vlm@d87e650: tools/zoom.py, tool_prompts.py, environments/tool_vision_env.py,
# multistep_vision_env.py; their verifiers fork's XMLParser): a <tool> block of "key: value" lines, a keypoint in the
# pixels of the image as stated in the prompt; one zoom, then a last step shaped by a regex. The prefill and each model
# call are assistant messages of their own.

GL_SYSTEM = (
    "You may call any of the tools exactly one time. You have access to the following tools to help solve problems: \n"
    "\nzoom: Returns the image zoomed in on the specified keypoint.\nThis is useful to see a region of interest with "
    "higher clarity, like for reading text or identifying objects.\n\nArguments:\n  - keypoint: list[int], the [x, y] "
    "coordinates of the point to center the zoom on. Must be within the image boundaries.\n\nExamples:\n  <tool>\n  "
    "name: zoom\n  keypoint: [500, 400]\n  </tool>\n  <tool>\n  name: zoom\n  keypoint: [23, 44]\n  </tool>\n  <tool>\n"
    "  name: zoom\n  keypoint: [723, 461]\n  </tool>\n\nFor each step:\n1. Start by thinking through your reasoning "
    "inside <think> tags. Then either return your answer inside <answer> tags, or use a tool inside <tool> tags.\n2. "
    "If needed, use a tool by writing its arguments inside <tool> tags. Use one line for each argument in the format "
    "'key: value'. The first line must be 'name: <tool_name>'.\n3. You will see the tool's output inside <result> "
    "tags.\n4. Continue until you can give the final answer inside <answer> tags.\n\nTools expect specific arguments. "
    "Follow the examples carefully for the required keys and expected value formats.\nDo not make up tools or "
    "arguments that aren't listed. \n")
GL_INSTRUCTION = (
    "\n    The image size is {size}.\n    Please thoroughly think through the question and refine your answer while "
    "thinking. You should try to collect the visual evidence you need to support your answer. Then, provide your "
    "answer. The answer (which you will provide in the <answer> </answer> tags) should be a single word or phrase "
    "directly answering the question.\n    Question: {question}\n    ")
GL_PLAIN = ("You are a helpful assistant. You first think and reason about the question, then provide the user with "
            "the answer. Show your work in <think> </think> tags and return the answer in <answer> </answer> tags.")
GL_GUIDE = ["</think>", "<answer>", "</answer>"]  # ([^<]*)</think>([^<]*)<answer>([^<]*)</answer>
GL_NEXT = "<think>"  # the assistant message env_response adds after its user turn, prefilling the next step


def stated_size(ep):
    """The size Groundlight's prompt states: the question's image, its long side cut to --view-max-side (int())."""
    W, H = ep["originals"][0].size
    # their resize_image: training's long side 1024; 0 (their V* / HR-Bench eval): the original's size
    s = min(1.0, ep["cfg"]["view_max_side"] / max(W, H)) if ep["cfg"]["view_max_side"] else 1.0
    return int(W * s), int(H * s)


def groundlight_prompt(ep):
    text = GL_INSTRUCTION.format(size=stated_size(ep), question=vstar_text(ep["record"]))
    if not ep["tools"]:  # their tool-free run (datasets/text_vqa/text_vqa_r1.py): R1's system, no size line
        return [dict(role="system", parts=[GL_PLAIN], closed=True),
                dict(role="user", parts=["<image_name> input_image </image_name>", 0, text[text.index("\n    P"):]],
                     closed=True)]
    return [dict(role="system", parts=[GL_SYSTEM], closed=True),
            dict(role="user", parts=["<image_name> input_image </image_name>", 0, text], closed=True)]


def groundlight_read(ep, text, reason):
    if re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.S):  # is_completed: an answer wins over a tool
        return dict(answered=True)
    if reason == "eos":
        return dict(end="no_action")  # "ended early": <|im_end|> in the text completes the episode
    m = re.search(r"<tool>\s*(.*?)\s*</tool>", text, re.S)  # XMLParser: the first, stripped
    if not m:  # neither: observe() says so (their env_response), the step goes on
        return dict(calls=[], respond=True)
    # their _general_parse_key_value: a line without ": " (colon, space) is skipped
    kv = dict(line.strip().split(": ", 1) for line in m.group(1).strip().split("\n") if ": " in line.strip())
    kv = {k.strip(): v.strip() for k, v in kv.items()}
    name = kv.get("name")
    if name is None:
        return dict(calls=[request(None, kv, error="Error: Tool call must specify 'name' in key-value format.")])
    if name != "zoom":
        return dict(calls=[request(name, kv, error=f"Error: Unknown tool '{name}' specified. Valid tools are: zoom")])
    err = None
    missing, extra = {"name", "keypoint"} - set(kv), set(kv) - {"name", "keypoint"}  # parse_zoom_args (zoom.py)
    W, H = stated_size(ep)  # the keypoint's frame: the size the prompt states
    if missing:
        err = f"Missing required arguments for zoom tool: {', '.join(sorted(missing))}"
    elif extra:
        err = f"Unexpected arguments for zoom tool: {', '.join(sorted(extra))}"
    else:
        try:
            kp = json.loads(kv["keypoint"])
        except (ValueError, RecursionError):
            kp, err = None, f"Error: Invalid JSON format for 'keypoint': '{kv['keypoint']}'"
        if err is None and not (isinstance(kp, list) and len(kp) == 2):
            err = "Error: 'keypoint' must be a JSON list of two elements."
        elif err is None and not all(isinstance(v, int) for v in kp):  # a bool passes, as theirs
            err = "Error: Both elements in 'keypoint' list must be integers."
        elif err is None and not (0 <= kp[0] < W and 0 <= kp[1] < H):  # calculate_crop_coordinates' bounds
            err = f"Error: keypoint [{kp[0]}, {kp[1]}] is outside the image boundaries (width={W}, height={H})"
    if err is not None:  # call_tool wraps every ValueError so
        return dict(calls=[request(name, kv, error=f"Error: Parsing arguments for tool 'zoom': {err}")])
    return dict(calls=[request(name, dict(keypoint=kp), "zoom_point", dict(image_index=0, point_2d=kp, frame=(W, H)))])


def groundlight_observe(ep, calls, final):
    """The zoom as a user turn named tool_result_1, or the error in <result> tags; then the "<think>" prefill and
    the last step, shaped by the regex."""
    c = calls[0] if calls else None
    parts = (["Error: No tool call or answer found in your last message."] if c is None else  # (not in <result>)
             ["<image_name> tool_result_1 </image_name>", c["new_image"]] if c["ok"]  # named, no other text
             else [f"<result>\n{c['error']}\n</result>"])  # XMLParser.format of the error
    return dict(messages=[dict(role="user", parts=parts, closed=True)], prefill=GL_NEXT, guide=GL_GUIDE)


# -----------------------------------------------------------------------------
# Mini-o3 (Mini-o3/Mini-o3@8654dbf: verl/trainer/constants.py, vllm_async_engine.py, function_tools.py):
# <grounding>{"bbox_2d": [...], "source": ...}</grounding>, the box normalized to [0, 1] of the source image
# ("original_image" or "observation_k", the k-th crop), the stop kept; errors come back as text.

MO3_SYSTEM = (
    "You are a helpful assistant. Answer the user's question based on the image provided. Output your thinking process "
    "within the <think> and </think> tags. Whenever you find anything unclear, you can zoom in a specific region in "
    'the given image to see more clearly by outputing <grounding>{"bbox_2d": [x0, y0, x1, y1], "source": '
    '"original_image"}</grounding>, where (x0, y0) and (x1, y1) are the top-left and bottom-right coordinates of the '
    "region that you want to zoom in, respectively (suppose the width and height of the image are 1.0), and 'source' "
    "refers to the image that you zoom in and could be either 'original_image' or 'observation_i'. Once the final "
    "answer is confirmed, put it within <answer> and </answer>.")  # "outputing" (sic)
MO3_NEXT = (".\nContinue your reasoning process inside <think> and </think>. If needed, you can continue to zoom in on "
            "the original image or any of the observations, by outputting <grounding> and </grounding> as before. If "
            "the final answer is confirmed, put your final answer inside <answer> and </answer>.")
MO3_ERROR = ("Please analyze the error information obtained from the function tool and adjust your response. Countinue "
             "your reasoning process inside <think> and </think>.")  # "Countinue" (sic)
MO3_CALL = re.compile(r'.*<grounding>{"bbox_2d": (.*),.*"source": [\',"](.*)[\',"]}</grounding>', re.S)


def mini_o3_prompt(ep):
    return [dict(role="system", parts=[MO3_SYSTEM], closed=True),
            dict(role="user", parts=place_images(question_text(ep["record"]), len(ep["images"])), closed=True)]


def mini_o3_read(ep, text, reason):
    if not re.findall(r"<grounding>(.*?)</grounding>", text, re.S):  # no call: the answer turn, the episode ends
        return dict(answered=bool(re.search(r"<answer>.*</answer>", text, re.S)))
    m = MO3_CALL.match(text)  # the last <grounding> of the turn, exact spacing
    try:
        if m is None:
            raise ValueError("'NoneType' object has no attribute 'group'")  # their error text, shown to the model
        box, source = _literal(m.group(1)), m.group(2)  # their eval(), without running code
        if not (isinstance(box, list) and len(box) == 4):
            raise ValueError("")  # a bare assert: its message is empty
        box = _check("box", box, "bbox_2d")
        k = 0 if source == "original_image" else re.match("observation_([0-9]*)", source)
        if k is None:
            raise ValueError(f"The 'source' argument \"{source}\" does not match the pattern 'observation_([0-9]*)'.")
        k = k if isinstance(k, int) else int(k.group(1) or -1)  # observation_k is image k (the k-th crop)
        if not 0 <= k < len(ep["images"]):
            raise ValueError(f'Error in predicting the source observation: "{source}".')
        x0, y0, x1, y1 = ep["images"][k]["box"]
        w, h = x1 - x0, y1 - y0  # the source at its own resolution: the original, or the crop as cut
        px = [min(max(int(v * s), 0), int(s) - 1) for v, s in zip(box, (w, h, w, h))]  # int(), clamped (theirs)
        if not px[0] <= px[2] - 1:  # PIL's right edge is exclusive: at least a pixel
            raise ValueError(f"The bounding box is not valid in width: {px}")
        if not px[1] <= px[3] - 1:
            raise ValueError(f"The bounding box is not valid in height: {px}")
        view = [*to_view(ep, k, px[0], px[1], (w, h)), *to_view(ep, k, px[2], px[3], (w, h))]
        return dict(calls=[request("grounding", dict(bbox_2d=box, source=source), "zoom_in",
                                   dict(image_index=k, bbox_2d=view))])
    except ValueError as e:
        return dict(calls=[request("grounding", None, error=str(e))])


def mini_o3_observe(ep, calls, final):
    c, t = calls[0], len(ep["turns"]) - 1  # the action's number: the model call's, from 0
    # (after a failed call the numbers run ahead of the crops' observation_k, as in their harness)
    parts = ([f"After the above Action {t}, here is the the zoom-in image (Observation {t + 1}):\n", c["new_image"],
              MO3_NEXT] if c["ok"]
             else [f"ERROR occurs during grounding. Error Information: {c['error']}.\n" + MO3_ERROR])
    return dict(messages=[dict(role="user", parts=parts, closed=True)])


# -----------------------------------------------------------------------------
# Pixel-Reasoner (TIGER-AI-Lab/Pixel-Reasoner@a3a6c3a, curiosity_driven_rl/openrlhf/trainer/ppo_utils/
# experience_maker.py; the system prompt as Qwen-Agent renders its two tools): crop_image_normalized in a
# <tool_call> that must end the turn, the box normalized to target_image (1-based), padded by 0.1.

PR_SYSTEM = (
    'You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", '
    '"function": {"name": "crop_image_normalized", "description": "Zoom in on the image based on the bounding box '
    'coordinates. It is useful when the object or text in the image is too small to be seen.", "parameters": {"type": '
    '"object", "properties": {"bbox_2d": {"type": "array", "description": "coordinates for bounding box of the area '
    'you want to zoom in. Values should be within [0.0,1.0].", "items": {"type": "number"}}, "target_image": {"type": '
    '"number", "description": "The index of the image to crop. Index from 1 to the number of images. Choose 1 to '
    'operate on original image."}}, "required": ["bbox_2d", "target_image"]}}}\n{"type": "function", "function": '
    '{"name": "select_frames", "description": "Select frames from a video.", "parameters": {"type": "object", '
    '"properties": {"target_frames": {"type": "array", "description": "List of frame indices to select from the video '
    '(no more than 8 frames in total).", "items": {"type": "integer", "description": "Frame index from 1 to 16."}}}, '
    '"required": ["target_frames"]}}}\n</tools>\n\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\n</tool_call>')
PR_TRIGGER = ("\n\n\n\nGuidelines: Understand the given visual information and the user query. Determine if it is "
              "beneficial to employ the given visual operations (tools). For a video, we can look closer by "
              "`select_frames`. For an image, we can look closer by `crop_image`. Reason with the visual information "
              "step by step, and put your final answer within \\boxed{}.")


def pixel_reasoner_prompt(ep):
    return [dict(role="system", parts=[PR_SYSTEM], closed=True),
            dict(role="user", parts=list(range(len(ep["images"]))) + [question_text(ep["record"]) + PR_TRIGGER],
                 closed=True)]


def pixel_reasoner_read(ep, text, reason):
    """A turn is a call only if it ends in </tool_call> (the last one is read); anything else is the answer."""
    if not text.endswith("</tool_call>"):
        return dict(answered=True)
    try:
        call = json.loads(text.split("<tool_call>")[-1].split("</tool_call>")[0])  # the last call, strict JSON
        name, args = call["name"], call["arguments"]
        if name != "crop_image_normalized":
            raise KeyError(name)  # theirs: a KeyError in its operations table
        t, box = args["target_image"], [float(v) for v in args["bbox_2d"][:4]]  # a 5th number is ignored
        if not isinstance(t, int) or not 1 <= t <= len(ep["images"]):  # 1-based; 1.0 fails in theirs too
            raise ValueError("Execution Error: Incorrect `target_image` argument in `crop_image_normalized` operation. "
                             f"You can only pick an image within [1,{len(ep['images'])}]")
        w, h = ep["images"][t - 1]["img"].size  # the target as shown: theirs crops the processed image
        if not all(v < 1 for v in box):  # pixels, not fractions
            box = [box[0] / w, box[1] / h, box[2] / w, box[3] / h]
        box = [min(max(v + d, 0.0), 1.0) for v, d in zip(box, (-0.1, -0.1, 0.1, 0.1))]  # padded by 0.1, clamped
        px = [box[0] * w, box[1] * h, box[2] * w, box[3] * h]  # floats: PIL's crop rounds them
        if not (round(px[2]) - round(px[0]) > 28 and round(px[3]) - round(px[1]) > 28):  # their assert, strict
            raise ValueError(f"Cropped image is too small: {round(px[2]) - round(px[0])}x{round(px[3]) - round(px[1])}")
        return dict(calls=[request(name, args, "zoom_in", dict(image_index=t - 1, bbox_2d=px))])
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as e:  # shown: "\nExecution error:\n..."
        return dict(calls=[request(None, None, error=str(e) if not isinstance(e, KeyError) else repr(e.args[0]))])


def pixel_reasoner_observe(ep, calls, final):
    c = calls[0]
    # the size as shown (theirs states the crop's size after its resize)
    parts = ([f"\nHere is the cropped image (Image Size: {c['size'][0]}x{c['size'][1]}):", c["new_image"]] if c["ok"]
             else [f"\nExecution error:\n{c['error']}\n"])
    return dict(messages=[dict(role="user", parts=parts, closed=True)])


# -----------------------------------------------------------------------------
# the table: adding a format is adding an entry (and its test; the table in docs/dialects.md)

DIALECTS = {
    "lookagain": dict(prompt=lookagain_prompt, prefill="", stops=("</tool_call>", "</answer>"), keep_stop=True,
                      read=lookagain_read, observe=lookagain_observe, answer=scorers.final_answer,
                      checkpoints="(lookagain's own format: new training)"),
    "vl_rethinker": dict(prompt=vl_rethinker_prompt, prefill="", stops=(), keep_stop=True, read=one_turn_read,  # EOS
                         observe=None, answer=boxed_answer, checkpoints="TIGER-Lab/VL-Rethinker-7B, -72B"),
    "deepeyes": dict(prompt=deepeyes_prompt, prefill="", stops=(), keep_stop=True, read=deepeyes_read,
                     observe=deepeyes_observe, answer=first_answer, errors_end=True,  # as its eval: no error shown
                     checkpoints="ChenShawn/DeepEyes-7B"),
    "vlm_r3": dict(prompt=vlm_r3_prompt, prefill="", stops=("]}", "]\n}", "] }", "</answer>"), keep_stop=False,
                   read=vlm_r3_read, observe=vlm_r3_observe, answer=vlm_r3_answer, trained_text=True,  # its RL mask
                   checkpoints="lh-hyr/VLM-R3-7b-rl-v1", last_call_runs=False),  # at most max_turns - 1 crops
    "vilasr": dict(prompt=vilasr_prompt, prefill="", stops=(), keep_stop=True, read=vilasr_read,
                   observe=vilasr_observe, answer=last_answer, errors_end=True,  # a failed call ends it, never shown
                   trained_eos=False,  # its RL mask (_get_multi_turn_mask) zeroes every <|im_end|>
                   checkpoints="AntResearchNLP/ViLaSR, ViLaSR-cold-start"),
    "groundlight": dict(prompt=groundlight_prompt, prefill="\n<think> Let me think step by step.", split_prefill=True,
                        stops=("</tool>", "</answer>"), keep_stop=True, read=groundlight_read,
                        observe=groundlight_observe, answer=first_answer, checkpoints="(none released)"),
    "mini_o3": dict(prompt=mini_o3_prompt, prefill="", stops=("</grounding>",), keep_stop=True, read=mini_o3_read,
                    observe=mini_o3_observe, answer=first_answer, checkpoints="Mini-o3/Mini-o3-7B-v1, -7B-SFT"),
    "pixel_reasoner": dict(prompt=pixel_reasoner_prompt, prefill="", stops=(), keep_stop=True,
                           read=pixel_reasoner_read, observe=pixel_reasoner_observe, answer=boxed_answer, max_calls=4,
                           checkpoints="TIGER-Lab/PixelReasoner-RL-v1, -WarmStart"),  # max_calls: the 5th not run
}
DIALECTS = {k: {"trained_text": False, "trained_eos": True, "last_call_runs": True, **d} for k, d in DIALECTS.items()}
