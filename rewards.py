"""
rewards.py: the four methods' reward terms, composable, and accuracy (a record scored by its type's scorer:
scorers.SCORERS). Read top to bottom:
  1. accuracy           accuracy(pred_text, record) -> (value, reason), dispatched on record["type"]
  2. region helpers     iou, coverage
  3. reward terms       r_* functions, each (traj, record, acc) -> (value, reason); a trajectory from tools.py is
                        {"turns": [assistant turns], "calls": [{"name", "arguments", "ok", "error", "region", "zoom"}],
                         "stop": "answer" | "max_turns" | ..., "rethinks": int (optional), "dialect": the name of
                         the format the turns are in (optional: lookagain's)}; a term reads its method's own format
                         under its method's dialect, and stands in for it on lookagain's tags otherwise
  4. presets            PRESETS (one per paper) and reward(traj, record, preset, weights)

Model text never makes anything here raise; a malformed *record* (unknown type, missing options, non-numeric gold)
raises ValueError.
"""

import ast
import json
import math
import re

from scorers import (SCORERS, final_answer, gl_normalize, gold_answers, mra32, score_choice, score_final, soft_score,
                     split_blocks)

CORRECT = 0.5            # accuracy at or above this counts as "correct" for the correctness-gated terms
# the harness text a method's reward reads besides the model's, as dialects.py writes it (rewards.py stands on
# scorers.py alone; test_rewards_harness_texts_are_the_dialects checks these against dialects.py):
GL_PREFILLS = ("\n<think> Let me think step by step.", "<think>")  # Groundlight's: before the first step, each later
DE_USER = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>...</think>"
           "  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")  # DeepEyes' USER_PROMPT_V2
TYPES = tuple(SCORERS)   # data.py checks records against it

# -----------------------------------------------------------------------------
# 1. accuracy


def accuracy(pred_text, record, extract=None, cut=False):
    """(value in [0, 1], reason) of a model output for a record, by the scorer of its type (scorers.SCORERS).
    extract: how the answer is found in the text, a dialect's own (default final_answer); lookagain's own scorers use
    it, a benchmark's official scorer reads the raw output as its own code does. cut: the output was cut at a limit
    and has no <|im_end|> (VL-Rethinker's scorer reads one at the end of an output that ended)."""
    kind = record.get("type")
    if kind not in SCORERS:
        raise ValueError(f"unknown record type {kind!r}; expected one of {', '.join(SCORERS)}")
    if "answer" not in record:
        raise ValueError(f"record {record.get('id')!r} has no 'answer'")
    if SCORERS[kind] in (score_choice, score_final):  # lookagain's own scorers: the answer where the dialect puts it
        return SCORERS[kind](pred_text, record, extract)
    if kind == "rethinker" and cut:  # their scorer reads a response cut at its cap without the <|im_end|>
        return SCORERS[kind](pred_text, record, eos="")
    return SCORERS[kind](pred_text, record)  # a benchmark's official scorer finds its answer in the raw text itself

# -----------------------------------------------------------------------------
# 2. region helpers (coverage, further down, sits beside the region terms)


def _box(v):
    """[x1, y1, x2, y2] as a tuple of floats with positive area, else None."""
    try:
        x1, y1, x2, y2 = (float(x) for x in v)
    except (TypeError, ValueError):
        return None
    ok = all(math.isfinite(x) for x in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1  # iou() divides by the area
    return (x1, y1, x2, y2) if ok else None


def _inter(a, b):  # the overlap's area; each side floored at 0: two negative sides would multiply to a positive area
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    inter = _inter(a, b)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

# -----------------------------------------------------------------------------
# 3. reward terms: (traj, record, acc) -> (value, reason); acc is accuracy() of the final answer


def _dialect(traj):  # the format the turns are written in (tools.trajectory); a hand-built or replayed one: ours
    return traj.get("dialect") or "lookagain"


def _turns(traj):  # a malformed entry is skipped, never raised on (model output never raises here)
    return [t for t in (traj.get("turns") or []) if isinstance(t, str)]


def _text(traj):  # the whole output, turns joined, as the methods score one response string; VLM-R3's turns are
    # pieces of one assistant message (its harness writes each crop into it): joined as they stand
    return ("" if _dialect(traj) == "vlm_r3" else "\n").join(_turns(traj))


def _calls(traj):
    return [c for c in (traj.get("calls") or []) if isinstance(c, dict)]


def _between(text, open_tag, close_tag):
    """The text between the first open_tag and the first close_tag after it, or None: what XMLParser's regex
    <tag>\\s*(.*?)\\s*</tag> (verifiers xml_parser.py:252) finds once stripped, by str.find (the lazy regex is
    quadratic on many unclosed tags)."""
    i = text.find(open_tag)
    j = text.find(close_tag, i + len(open_tag)) if i >= 0 else -1
    return text[i + len(open_tag):j].strip() if j >= 0 else None


def _gl_answer(traj):
    """The answer Groundlight's rubric reads under its dialect (check_correctness, get_edit_distance_score: XMLParser's
    first <answer> of the last message, else none, so no untagged fallback); else final_answer of the whole output."""
    if _dialect(traj) == "groundlight":
        return _between((_turns(traj) or [""])[-1], "<answer>", "</answer>")
    return final_answer(_text(traj))


def r_soft(traj, record, acc):
    """Groundlight: soft edit-distance correctness of the final answer (scorers.soft_score: their normalisation)."""
    ans = _gl_answer(traj)
    if ans is None:
        return 0.0, "no answer"
    v = soft_score(ans, record["answer"])
    return v, f"soft {v:.3f}"


def r_format_r3(traj, record, acc):
    """VLM-R3: 0.5 if the output ends in a closed <answer>...</answer>."""
    text = _text(traj).rstrip()  # their format_reward (rgrpo.py): fullmatch of .*?<answer>.*?</answer>\s*
    if text.endswith("</answer>") and "<answer>" in text:
        return 0.5, "ends in <answer>...</answer>"
    return 0.0, "does not end in a closed <answer>"


_VILASR_TURN = re.compile(r"<think>(.*?)</think>\s*Action:\s*(.*?)(?=\n|$)", re.S)  # gcot.py format_reward:78


def _json_blocks(text):
    """gcot.py's parse_json (:24-34): after each line that is ```json once stripped, the lines up to the next ```
    (else to the end), joined by "\n"; the scan stops at the next ```json line at the latest (it holds ```)."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == "```json":
            j = i + 1
            while j < len(lines) and "```" not in lines[j]:
                j += 1
            blocks.append("\n".join(lines[i + 1:j] + ([lines[j].split("```")[0]] if j < len(lines) else [])))
    return blocks


def _vilasr_ops_parse(text):
    """gcot.py's parse_bbox_and_movement (:45-61): every block a Python literal (None counts as failing) whose every
    item holds "bbox_2d" and "label" (a box) or "start_point_2d", "end_point_2d" and "label" (a line), tested with
    `in` as theirs (a key of a dict, a substring of a string); no index, coordinate or image is checked."""
    for body in _json_blocks(text):
        try:
            block = ast.literal_eval(body)
            if block is None or not all(("bbox_2d" in it and "label" in it)
                                        or ("start_point_2d" in it and "end_point_2d" in it and "label" in it)
                                        for it in block):
                return False
        # theirs catches ValueError and SyntaxError (the block fails); the rest (an int block, an item `in` cannot
        # search) raise out of their reward: a failure here
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return False
    return True


def r_format_vilasr(traj, record, acc):
    """ViLaSR (gcot.py format_reward): 1 only if every turn is <think>...</think> then its action and the answer tags
    are in the last turn, and only there, and every operation parses (as in the code, a box outside the image still
    counts). Under its dialect as gcot.py: each assistant message, unstripped, fullmatches its pattern (it starts
    with <think>, "Action:" follows a </think>), the ```json blocks of all turns hold only boxes and lines."""
    turns, calls, native = _turns(traj), _calls(traj), _dialect(traj) == "vilasr"
    if not turns:
        return 0.0, "no turns"
    for i, t in enumerate(turns):
        last, tags = i == len(turns) - 1, ("<answer>" in t, "</answer>" in t)
        # lookagain's stand-in: the action is our tag, one of <tool_call> or <answer>
        if not (_VILASR_TURN.fullmatch(t) if native
                else re.fullmatch(r"<think>.*?</think>\s*<(tool_call|answer)>.*", t.strip(), re.S)):
            return 0.0, f"turn {i} is not <think>...</think> then {'Action:' if native else 'an action'}"
        if last and not all(tags):
            return 0.0, "last turn has no <answer>...</answer>"
        if not last and (any(tags) or not native and "<tool_call>" not in t):
            return 0.0, f"turn {i} answers early" + ("" if native else " or makes no operation")
    if native:  # every block of the whole output (theirs joins the turns with nothing between them)
        ok = _vilasr_ops_parse("".join(turns))
        return (1.0, "well formed, every operation parses") if ok else (0.0, "a ```json block is not boxes and lines")
    bad = sum(c.get("arguments") is None for c in calls)  # arguments None: the call did not parse (dialects.py)
    if bad:
        return 0.0, f"{bad} of {len(calls)} operations do not parse"
    return 1.0, f"well formed, {len(calls)} operations all parse"


def r_format_groundlight(traj, record, acc):
    """Groundlight (tool_use_text_vqa_env.py format_reward_func, :376-461), the mean over the assistant messages of
    0.4 (think and exactly one of tool and answer, each found by XMLParser), 0.2 (their "spacing" check: it parses
    with and without strip by the same regex, so it always passes, a message without any tag too), 0.2 (starts with
    <think>), 0.2 (ends in the closing tag of the tool or answer it holds). Under its dialect the tool tag is <tool>
    and a message is a model call after its prefill (preprocess_messages, multistep_vision_env.py:309-384, merges
    them: the first after the dialect's, each later one after "<think>"); else each turn, lookagain's <tool_call>."""
    turns = _turns(traj)
    if not turns:
        return 0.0, "no turns"
    native = _dialect(traj) == "groundlight"
    tool = "tool" if native else "tool_call"
    if native:
        turns = [GL_PREFILLS[i > 0] + t for i, t in enumerate(turns)]
    score = 0.0
    for t in turns:  # each message scored alone
        s = t.strip()
        think, call, answer = (_between(t, f"<{k}>", f"</{k}>") is not None for k in ("think", tool, "answer"))
        score += (0.4 * (think and call != answer) + 0.2 + 0.2 * s.startswith("<think>")
                  + 0.2 * ((call and s.endswith(f"</{tool}>")) or (answer and s.endswith("</answer>"))))
    return score / len(turns), f"graded format {score:.1f} over {len(turns)} messages"


# what follows each crop in the response DeepEyes' reward reads (visual_toolbox_v2.py:102-105: the instruction again,
# its own <think>...</think> and <answer>...</answer> in it), after the model's <|im_end|>
DE_OBS = ("<|im_end|>\n<|im_start|>user\n<tool_response><|vision_start|><|image_pad|><|vision_end|>" + DE_USER
          + "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def _deepeyes_text(traj):
    """The response as vl_agent.py compute_score reads it: under DeepEyes' dialect decoded with its observations (a
    failed call ends the episode there, so each turn but the last made one crop), else the turns."""
    if _dialect(traj) != "deepeyes":
        return _text(traj)
    turns, crops = _turns(traj), sum(bool(c.get("ok")) for c in _calls(traj))
    return "".join(t + (DE_OBS if i < crops else "") for i, t in enumerate(turns))


def _deepeyes_answer(text):  # their slice (vl_agent.py:209): after the last <answer>, to the next </answer>
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def r_format_deepeyes(traj, record, acc):
    """DeepEyes (vl_agent.py compute_score, :190-262): -1 for unbalanced <think>, unbalanced <answer> after the last
    </think>, a 1000+ char answer; else 0. Under its dialect the text holds the observations' tags too."""
    text = _deepeyes_text(traj)
    tail = text.rpartition("</think>")[2]  # their split('</think>')[-1]
    # (their check that each <|vision_start|><|image_pad|> is closed always passes here: the crops' tokens are)
    errors = [why for why, bad in [("unbalanced <think>", text.count("<think>") != text.count("</think>")),
                                   ("unbalanced <answer>", tail.count("<answer>") != tail.count("</answer>")),
                                   ("answer of 1000+ characters", len(_deepeyes_answer(text)) >= 1000)] if bad]
    return (-1.0, "; ".join(errors)) if errors else (0.0, "well formed")


def r_tool_success(traj, record, acc):
    """Groundlight: successful / attempted tool calls, 0 if none was attempted."""
    calls = _calls(traj)
    if not calls:
        return 0.0, "no tool calls"
    ok = sum(bool(c.get("ok")) for c in calls)  # theirs: no "Error:" in the turn after the call
    return ok / len(calls), f"{ok}/{len(calls)} calls succeeded"


def _deepeyes_long(traj):  # vl_agent.py:255-258: an answer of 1000+ characters is judged 0 (and a format error)
    return len(_deepeyes_answer(_deepeyes_text(traj))) >= 1000


def r_accuracy_deepeyes(traj, record, acc):
    """DeepEyes' accuracy term (vl_agent.py compute_score): the judged accuracy (rule-based here: acc), set to 0 for
    an answer of 1000+ characters (:255-257, against hacking the judge); the answer is their slice after the last
    <answer>, so a response without one is measured whole."""
    if _deepeyes_long(traj):
        return 0.0, "answer of 1000+ characters (judged 0)"
    return acc, "accuracy"


def r_tool_bonus(traj, record, acc):
    """DeepEyes (vl_agent.py:255-261): 1 only when the judged accuracy is above 0.5 (strictly: a graded 0.5 is not),
    the answer is under 1000 characters (else judged 0) and at least one tool call succeeded (an image came back)."""
    if _deepeyes_long(traj):
        return 0.0, "answer of 1000+ characters (judged 0)"
    if acc > 0.5 and any(c.get("ok") for c in _calls(traj)):
        return 1.0, "correct with a successful tool call"
    return 0.0, "answer wrong" if acc <= 0.5 else "no successful tool call"


def _braces(text):
    """re.findall(r"\\{.*?\\}", text, re.S) by str.find: each { to the first } after it (the lazy regex is quadratic
    on many unclosed braces)."""
    found, i = [], text.find("{")
    while i >= 0 and (j := text.find("}", i + 1)) >= 0:
        found.append(text[i:j + 1])
        i = text.find("{", j + 1)
    return found


def r_region_valid(traj, record, acc):
    """VLM-R3 (rgrpo.py repeat_reward, :456-498, gated in vllm_rgrpo_trainer.py:1113-1121): 0.5 if the answer is fully
    correct (accuracy 1), there is a box and every box request parses (the code checks the JSON, not the crop). Under
    its dialect as their code reads the text: each {...} (to its first }) that mentions "bbox" must load as JSON
    with a bbox_2d key, and there must be one; else lookagain's calls stand in."""
    if acc < 1.0:  # a partly right answer (a VQA or MRA score below 1) earns nothing here
        return 0.0, "answer not fully correct"
    if _dialect(traj) == "vlm_r3":
        boxes = [j for j in _braces(_text(traj)) if "bbox" in j]
        for j in boxes:
            try:
                json.loads(j)["bbox_2d"]
            except (ValueError, KeyError, TypeError, RecursionError):  # their `except Exception`: one spoils all
                return 0.0, f"{j[:40]!r} does not parse to a bbox_2d"
        return (0.5, f"{len(boxes)} boxes parse") if boxes else (0.0, "no boxes")
    calls = _calls(traj)
    if not calls:
        return 0.0, "no boxes"
    bad = sum(c.get("arguments") is None for c in calls)  # one box that does not parse spoils all, as their break
    if bad:
        return 0.0, f"{bad} of {len(calls)} boxes do not parse"
    return 0.5, f"{len(calls)} boxes parse"


def r_region_executed(traj, record, acc):
    """Stricter r_region_valid, every box cut (opt in: --weights '{"region_valid": 0, "region_executed": 1}')."""
    calls = _calls(traj)
    if acc < 1.0 or not calls or not all(c.get("ok") for c in calls):  # ok: parsed and cut (tools.run_tool)
        return 0.0, "answer not fully correct" if acc < 1.0 else "no boxes" if not calls else "a box failed"
    return 0.5, f"{len(calls)} boxes cut"


def r_region_iou(traj, record, acc):
    """Best IoU of the regions the tool calls looked at with the record's ground-truth bbox."""
    if record.get("bbox") is None:
        return 0.0, "record has no bbox"
    gt = _box(record["bbox"])
    if gt is None:  # the record is wrong, not the model: say so (data.py should have caught it)
        raise ValueError(f"record bbox {record['bbox']!r} is not [x1, y1, x2, y2] with positive area")
    # region: original pixels (tools.run_tool), the bbox's frame too; a drawing's region is the image drawn on
    regions = [b for b in (_box(c.get("region")) for c in _calls(traj) if c.get("ok")) if b]
    if not regions:
        return 0.0, "no region looked at"
    best = max(iou(b, gt) for b in regions)
    return best, f"best IoU {best:.3f} of {len(regions)} regions"


def coverage(traj, record):
    """Where the model looked (VLM-R3's accuracy-vs-localisation analysis; not a reward term: eval.py bins accuracy by
    it, grpo.py logs its mean): (IoU, share of the bbox held) of the successful zoom (call["zoom"], from tools.execute)
    best by IoU, then share; `region` is in original pixels: a zoom on a zoom counts where it really looked."""
    if record.get("bbox") is None:
        return None, None
    gt = _box(record["bbox"])
    if gt is None:
        raise ValueError(f"record bbox {record['bbox']!r} is not [x1, y1, x2, y2] with positive area")
    zooms = [b for b in (_box(c.get("region")) for c in _calls(traj) if c.get("ok") and c.get("zoom")) if b]
    # tuples compare IoU first, then the share held; (0, 0) when it never zoomed
    return max([(0.0, 0.0)] + [(iou(b, gt), _inter(b, gt) / ((gt[2] - gt[0]) * (gt[3] - gt[1]))) for b in zooms])


_R3_BOX = re.compile(r'\{"bbox_2d":\s*\[[^\]]*\]\}')  # rgrpo.py length_reward:428: the box VLM-R3's format writes


def r_length(traj, record, acc):
    """VLM-R3, as their code: min(0.1, 0.01 x characters of the shortest reasoning segment between the tool calls before
    the first <answer>); empty segments count only at the ends (no reasoning before the first or after the last: 0)."""
    # their length_reward (rgrpo.py:419-450): before the first <answer>, think tags out, whitespace runs as one space
    text = re.sub(r"\s+", " ", _text(traj).split("<answer>")[0].replace("<think>", "").replace("</think>", "")).strip()
    # split at the calls: under its dialect at each bare {"bbox_2d": [...]} as its harness leaves it (it writes "]}"
    # back at each stop; a '{ "bbox_2d"' with a space is no split), else at lookagain's <tool_call> blocks
    segments = [s.strip() for s in (_R3_BOX.split(text) if _dialect(traj) == "vlm_r3"
                                    else split_blocks(text, "<tool_call>", "</tool_call>"))]
    shortest = min(len(s) for n, s in enumerate(segments) if s or n in (0, len(segments) - 1))
    return min(0.1, 0.01 * shortest), f"shortest reasoning segment {shortest} chars"


def rethinker_waits(text):
    """VL-Rethinker's count of self-reflections in a response: 'wait,' + 'wait a' + 'alternatively', lower-cased."""
    t = text.lower()  # three phrases, not every 'wait' (r_rethink's validity check counts every 'wait')
    return t.count("wait,") + t.count("wait a") + t.count("alternatively")


def r_rethink(traj, record, acc):
    """VL-Rethinker (experience_maker.py: rule_reward, then get_logprobs_and_logs' shaping). Invalid (-0.1): cut by
    the token limit or "wait" more than 5 times (any substring); else 1 correct, 0 wrong; a correct response not forced
    to rethink with n self-reflections (rethinker_waits) gets 1.1 for n in 1-2, max(1 - 0.2 n, -0.1) for n >= 3.
    (Their \\boxed check never fires, an argument-order slip passes None: no answer is valid and wrong, as here.)"""
    text = _text(traj)
    # cut off: their rule_reward finds no EOS in the text; 'wait' counted as any substring, unlike rethinker_waits
    invalid = traj.get("stop") in ("max_tokens", "invalid_token") or text.lower().count("wait") > 5
    shaped, why = ((-0.1, "invalid: cut off or more than 5 waits") if invalid
                   else (1.0, "correct") if acc >= CORRECT else (0.0, "wrong"))
    if acc < CORRECT or traj.get("rethinks"):  # the shaping below rewards reflection the model chose, not a forced one
        return shaped, why + (" (forced rethink)" if traj.get("rethinks") else "")
    n = rethinker_waits(text)
    if 0 < n < 3:
        return 1.1, f"correct with {n} self-reflection(s)"
    return max(shaped - 0.2 * n, -0.1), f"{why}, {n} self-reflections"


_FIRST_NUMBER = re.compile(r"[-+]?\d*\.?\d+")  # gcot.py's first number: 3.5, -2, .5; '1,000' reads as 1
VILASR_QT = ("multiple choice", "numerical", "regression", "free-form")  # their RL rows' question_type, lower-cased
_VILASR_OURS = {"multiple_choice": "multiple choice", "number": "numerical", "mra": "numerical"}  # ours -> theirs


def _vilasr_type(record):
    """The question_type gcot.py would be given: a row of theirs keeps its own as written (convert.py vilasr_rl; their
    reward compares it case-sensitively, gcot_reward.py:59 passes it raw), any other record's type mapped to theirs."""
    qt = record.get("question_type")
    return qt if isinstance(qt, str) and qt.lower() in VILASR_QT else _VILASR_OURS.get(record.get("type"))


def vilasr_accuracy(traj, record, acc):
    """ViLaSR's accuracy (gcot.py accuracy_reward, :190-267) of the last turn's first <answer>...</answer>, else that
    whole turn, by question type (_vilasr_type): multiple choice by stripped ==, numerical and regression by MRA of
    the first numbers (strict '<', in float32: scorers.mra32); any other question_type of a row of theirs 0
    (:262-263), free-form among them. A record of ours with no question_type and another type (text, vqa: the
    synthetic tasks, our benchmarks) is in no data of theirs: the shared accuracy `acc`, so their preset still
    trains on it (README's drawing command: --preset vilasr on synthetic:boxes)."""
    last = (_turns(traj) or [""])[-1]  # theirs scores the last assistant message only
    ans = _between(last, "<answer>", "</answer>")  # their extract_answer: the first, stripped, else all of it
    ans = last.strip() if ans is None else ans
    gold = record["answer"][0] if isinstance(record["answer"], list) else record["answer"]
    qt = _vilasr_type(record)
    if qt == "multiple choice":  # the whole string: '(B)' or 'B. left' is wrong for B
        return float(ans == str(gold).strip())
    if qt in ("numerical", "regression"):  # convert.py maps both to mra: both MRA here
        p, g = _FIRST_NUMBER.search(ans), _FIRST_NUMBER.search(str(gold))
        if p is None or g is None:
            return 0.0
        # relative error < 1 - theta, theta 0.5..0.95, in float32 as gcot.py's torch (1e-8: a gold of 0): on a
        # boundary 12 for 10 scores 0.6 (float64 would give 0.7), 15 for 10 scores 0 (float64: 0.1)
        return mra32(float(p.group()), float(g.group()), strict=True)
    if record.get("question_type") is None:  # ours, of a type their reward has no rule for
        return acc
    return 0.0  # gcot.py:262-263 `else: reward = 0.0`: a free-form row earns nothing, its format gated off with it


def r_vilasr(traj, record, acc, beta=0.0):
    """ViLaSR: S = 1(acc > beta) x (0.5 acc + 0.5 format), acc by vilasr_accuracy, format by r_format_vilasr."""
    acc = vilasr_accuracy(traj, record, acc)
    fmt, why = r_format_vilasr(traj, record, acc)
    if not acc > beta:  # gcot_compute_score: format counts only once the answer scores (format alone earns nothing)
        return 0.0, f"gated off: accuracy {acc:.3f} <= {beta}"
    return 0.5 * acc + 0.5 * fmt, f"0.5 x accuracy {acc:.3f} + 0.5 x format {fmt:.0f} ({why})"


def r_vqa_hard(traj, record, acc):
    """Groundlight's hard score (tool_use_text_vqa_env.py check_correctness): min(1, normalised matches / 3), no
    leave-one-out mean."""
    if record.get("type") != "vqa":  # one gold answer: the hard score is plain accuracy
        return acc, "accuracy (not a VQA record)"
    ans = _gl_answer(traj)
    if ans is None:
        return 0.0, "no answer"
    p = gl_normalize(ans)  # their normalize_answer on both sides (EvalAI's steps, not its tokenizing first)
    matches = sum(gl_normalize(a) == p for a in gold_answers(record["answer"]))
    return min(1.0, matches / 3), f"{matches} of the answers match"


# every r_* function above, by its name without the prefix: a new term is one function, no registry to edit
TERMS = {name[2:]: f for name, f in list(globals().items()) if name.startswith("r_") and callable(f)}

# -----------------------------------------------------------------------------
# 4. presets: term -> weight; "accuracy" is accuracy() of the final answer

PRESETS = {
    # R-GRPO: r_acc + r_format (0.5) + r_valid (0.5, if correct) + r_length (<= 0.1), summed
    "vlm_r3": {"accuracy": 1.0, "format_r3": 1.0, "region_valid": 1.0, "length": 1.0},
    "vl_rethinker": {"rethink": 1.0},  # 1 / 0 / -0.1 / 1.1, accuracy already inside
    "vilasr": {"vilasr": 1.0},  # the gated 0.5 acc + 0.5 format, accuracy already inside
    # hard min(1, matches / 3) + soft, graded format 0.1; tool success logged at weight 0 (their training code)
    "groundlight": {"vqa_hard": 0.5, "soft": 0.5, "format_groundlight": 0.1, "tool_success": 0.0},
    # 0.8 acc (0 for a 1000+ char answer) + 0.2 x (-1 on format error) + 1.2 x (correct and a tool call succeeded)
    "deepeyes": {"accuracy_deepeyes": 0.8, "format_deepeyes": 0.2, "tool_bonus": 1.2},
}


def reward(traj, record, preset="vlm_r3", weights=None):
    """Weighted sum of the preset's terms, `weights` overriding or adding; components always hold "accuracy"."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown reward preset {preset!r}; known presets: {', '.join(PRESETS)}")
    w = {**(PRESETS[preset] if preset else {}), **(weights or {})}  # --weights overrides a preset's weight or adds one
    unknown = [k for k in w if k != "accuracy" and k not in TERMS]  # a typo in --weights fails here, not silently
    if unknown:
        raise ValueError(f"unknown reward terms {unknown}; known terms: accuracy, {', '.join(TERMS)}")
    acc, why = accuracy(_text(traj), record, traj.get("extract"), traj.get("cut", False))  # once: gated terms read it
    components, reasons = {"accuracy": acc}, {"accuracy": why}  # logged even at weight 0 (eval and grpo report it)
    for name in w:
        if name != "accuracy":
            components[name], reasons[name] = TERMS[name](traj, record, acc)
    return float(sum(float(weight) * components[name] for name, weight in w.items())), components, reasons
