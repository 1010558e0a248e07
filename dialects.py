"""
dialects.py: the formats models are spoken to in, one entry of DIALECTS each. lookagain's own format is the default,
and every released checkpoint of the methods we implement gets its own, reproduced from its released code: the prompt
(character for character), how a tool call is written and parsed, the coordinate frame and image numbering of a call,
the observation a tool's result comes back as, the stop strings, the answer extractor, what is trained.

A dialect is a dict of plain functions over an episode (tools.py) and a few values:
    prompt(ep)         -> the opening messages (model.py's conversation: role, parts, closed); tools.py adds the open
                          assistant message, starting with `prefill`
    prefill            the text the first assistant message starts with ("" for most)
    stops, keep_stop   the stop strings of a model call, and whether the text keeps them (the rest of it is cut)
    read(ep, text, reason) -> what one model call did: calls (requests for tools.run_tool), answered, tail (harness
                          text appended to the assistant message), again (go on in the same message), end (a stop
                          reason the dialect decides)
    observe(ep, calls, final) -> what the results come back as: messages after the assistant message (closed), or
                          parts inline in it, and the next assistant message's prefill
    answer(text)       -> the final answer of a transcript (the text of its turns), for scoring
    trained_text       harness text inside the assistant message is trained too (VLM-R3)
A request (what read() asks tools.run_tool to run): name and arguments as the model wrote them, tool (a tools.TOOLS
row) and args (its checked arguments in lookagain's frame: image_index, pixels of that image as shown), or error.
Adding a dialect is adding one entry (and its test); README's table says what each reproduces.
"""
import json
import re

import rewards as R

# -----------------------------------------------------------------------------
# lookagain: Qwen2.5's function calling with our four tools

NUMBERS, OBJECTS = ({"type": "array", "items": {"type": t}} for t in ("number", "object"))
JSON_TYPES = {"integer": {"type": "integer"}, "box": NUMBERS, "point": NUMBERS, "boxes": OBJECTS, "lines": OBJECTS}


def system_prompt(tools, compact=False, boxed=False):
    """Qwen2.5's function-calling system prompt for the enabled tools (tools: {name: its row of tools.TOOLS}; boxed:
    the question asks for \\boxed{} as VL-Rethinker's does). compact (toy models): one line per tool, as a random
    2M-parameter model did not learn to copy a word from the question behind the ~300-token tool prompt in 300 steps,
    and did in 100 without."""
    s = "You are a helpful assistant." + ("" if boxed else " Think inside <think></think>, then either call a tool "
                                          "or give the final answer inside <answer></answer>.")
    if not tools:
        return s
    if compact:
        return s + " Tools: " + "; ".join(f"{n}({', '.join(t['params'])})" for n, t in tools.items()) + "."
    s += ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
          "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
    for name, tool in tools.items():
        params = tool["params"]
        props = {k: {**JSON_TYPES[t], "description": d} for k, (t, d) in params.items()}
        schema = {"type": "function", "function": {"name": name, "description": tool["doc"], "parameters": {
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
        raise ValueError(f"{what} must be a number in [-1e6, 1e6], got {_show(v)}")
    return float(v)


def _check(kind, v, what):
    """One argument checked by its spec type, normalised."""
    if kind == "string":
        if not isinstance(v, str) or len(v) > 64:
            raise ValueError("label must be a string of at most 64 characters")
        return v
    if kind == "integer":
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ValueError(f"{what} must be an integer")
        return int(v)
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
            if not isinstance(op, dict) or set(op) != set(keys):
                raise ValueError(f"{what}[{i}] must have exactly the keys {sorted(keys)}")
            out.append({k: _check(t, op[k], f"{what}[{i}].{k}") for k, t in keys.items()})
        return out
    raise AssertionError(kind)


def parse_call(text, tools):
    """A turn's first <tool_call>, parsed strictly (never raises, never evals); tools: {name: its tools.TOOLS row}.
    -> (name, args, None) or (name or None, None, error)"""
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
    params = tools[name]["params"]
    if not isinstance(args, dict):
        return name, None, "arguments must be an object"
    if set(args) != set(params):
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




FINAL_TURN = "This is your last turn: you cannot call a tool again. Answer the question now."
BOXED = "Please reason step by step, and put your final answer within \\boxed{}."


def place_images(question, n):
    """The user turn's parts: image i at the i-th `<image>` of the question when it has one per image (benchmarks.py
    writes them where a benchmark puts its images), else all images first, then the question (Qwen's processor
    template, and most released harnesses)."""
    pieces = question.split("<image>")
    if n and len(pieces) == n + 1:
        return [x for i, p in enumerate(pieces) for x in ([i - 1] if i else []) + ([p] if p else [])]
    return list(range(n)) + [question]


def lookagain_prompt(ep):
    boxed = ep["cfg"]["answer_format"] == "boxed"
    question = question_text(ep["record"]) + ("\n\n" + BOXED if boxed else "")
    return [dict(role="system", parts=[system_prompt(ep["specs"], compact=ep["compact"], boxed=boxed)], closed=True),
            dict(role="user", parts=place_images(question, len(ep["images"])), closed=True)]


def lookagain_read(ep, text, reason):
    """A turn with a <tool_call> is a call (the first, parsed strictly); else it answered if it has an answer."""
    if "<tool_call>" not in text:
        return dict(answered=R.extract_answer(text) is not None)
    name, args, err = parse_call(text, ep["specs"])
    return dict(calls=[dict(name=name, arguments=args, tool=name if err is None else None, args=args, error=err)])


def lookagain_observe(ep, calls, final):
    """Qwen's tool-response turn: the new image and a line saying which it is, or the error."""
    c = calls[0]
    obs = RESULT.format(i=c["new_image"], w=c["size"][0], h=c["size"][1], j=c["image"]) if c["ok"] else f"Error: {c['error']}"
    obs += " " + FINAL_TURN if final and ep["cfg"]["final_answer_turn"] else ""
    parts = ["<tool_response>\n"] + ([c["new_image"]] if c["ok"] else []) + [obs + "\n</tool_response>"]
    return dict(messages=[dict(role="user", parts=parts, closed=True)])


# -----------------------------------------------------------------------------
# the table

DIALECTS = {
    "lookagain": dict(prompt=lookagain_prompt, prefill="", stops=("</tool_call>", "</answer>"), keep_stop=True,
                      read=lookagain_read, observe=lookagain_observe, answer=R.final_answer, trained_text=False,
                      checkpoints="(lookagain's own format: new training)"),
}
