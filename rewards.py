"""
rewards.py: answer extraction, benchmark scorers and the four methods' reward terms, composable; read top to bottom:
  1. answer extraction  extract_answer, final_answer, extract_choice (the one extractor of the repo)
  2. text helpers       levenshtein, vqa_normalize (EvalAI / TextVQA answer normalisation), iou
  3. scorers            vqa_score, anls, soft_score, mra, choice_score, number_score, mathvista_score; accuracy by type
  4. reward terms       r_* functions, each (traj, record, acc) -> (value, reason); a trajectory from tools.py is
                        {"turns": [assistant turns], "calls": [{"name", "arguments", "ok", "error", "region", "zoom"}],
                         "stop": "answer" | "max_turns" | ..., "rethinks": int (optional)}
  5. presets            PRESETS (one per paper) and reward(traj, record, preset, weights)

Model text never makes anything here raise: empty, garbled, nested, unicode or enormous text scores 0 with a reason,
in bounded work. A malformed *record* (unknown type, missing options, non-numeric gold) raises ValueError.
"""

import math
import re
import string

import numpy as np

MAX_ANSWER_CHARS = 1000  # untagged text longer than this is reasoning, not an answer (DeepEyes: 1000 too)
LEV_MAX_CHARS = 1000     # levenshtein looks at most at this many characters of each string
CORRECT = 0.5            # accuracy at or above this counts as "correct" for the correctness-gated terms

# -----------------------------------------------------------------------------
# 1. answer extraction


def _split_blocks(text, open_tag, close_tag):
    """text split at its complete open_tag...close_tag blocks (str.find: a lazy regex is quadratic on unclosed tags)."""
    parts, i = [], 0
    while True:
        j = text.find(open_tag, i)
        k = text.find(close_tag, j + len(open_tag)) if j >= 0 else -1
        if k < 0:
            return parts + [text[i:]]
        parts.append(text[i:j])
        i = k + len(close_tag)


def _last_boxed(text):
    """Content of the last \\boxed{...} whose braces balance, else None."""
    best, stack = None, []  # stack: per open brace, where its box's content starts (None: a plain brace)
    for m in re.finditer(r"\\boxed\{|[{}]", text):
        if m.group() != "}":
            stack.append(m.end() if m.group() != "{" else None)
        elif stack:
            s = stack.pop()
            if s is not None and (best is None or s > best[0]):
                best = (s, m.start())
    return text[best[0]:best[1]].strip() if best else None


def extract_answer(text):
    """Stripped content (maybe '') of the last closed <answer> (innermost if nested), else _last_boxed(text)."""
    if not isinstance(text, str) or not text:
        return None
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        start += len("<answer>")
        return text[start:text.find("</answer>", start)].strip()
    return _last_boxed(text)


def final_answer(text):
    """The answer a model committed to: extract_answer, else (as ViLaSR's and DeepEyes' scorers do) the untagged
    text after the last </think>, tool calls removed; None if none, inside an unclosed <think>, or too long."""
    ans = extract_answer(text)
    if ans is not None or not isinstance(text, str):
        return ans or None
    tail = text.rpartition("</think>")[2]
    if "<think>" in tail:
        return None
    parts = _split_blocks(tail, "<tool_call>", "</tool_call>")
    tail = "".join(parts[:-1]) + parts[-1].partition("<tool_call>")[0]  # an unclosed call was cut off: drop it
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>"):
        tail = tail.replace(tag, "")
    tail = tail.strip()
    return tail if 0 < len(tail) <= MAX_ANSWER_CHARS else None


def _loose(s):
    return " ".join(str(s).lower().split()).strip(" .")  # case, spacing and a trailing period do not matter


_BARE_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?[.:)]?")
_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*", re.I)


def extract_choice(text, options=None, extract=None):
    """The option letter a (possibly tool-using) output chose, or None. Accepts B, (B), B., b, B) text,
    Answer: B, and the option's own text; only letters of the given options count (A-Z without options).
    extract: how the answer is found in the text (a dialect's own; default final_answer)."""
    letters = string.ascii_uppercase[:len(options)] if options else string.ascii_uppercase
    s = (extract or final_answer)(text)
    if not s:
        return None
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s).replace("**", "").replace("$", "").strip().strip("`").strip()
    s = _PREFIX.sub("", s, count=1).strip()
    m = _BARE_LETTER.fullmatch(s)
    if m:  # B, (B), B., b
        return m.group(1).upper() if m.group(1).upper() in letters else None
    for letter, opt in zip(letters, options or []):  # the option's own text
        if _loose(opt) == _loose(s):
            return letter
    found = [x for x in re.findall(r"(?i:answer|option|choice)\s*(?:is\s*)?[:：]?\s*\(?([A-Z])\)?(?![A-Za-z0-9])", s)
             if x in letters]
    if found:  # "(A) is wrong, so the answer is (C)": the last such phrase
        return found[-1]
    marked = {x for x in re.findall(r"\(([A-Z])\)", s) if x in letters}
    if len(marked) > 1:  # "(A) or (B)": ambiguous
        return None
    m = re.match(r"\(?([A-Z])[).:]\s", s)  # B) text, (B) text, B. text, B: text
    if m and m.group(1) in letters:
        return m.group(1)
    return marked.pop() if marked else None  # a single (X) anywhere

# -----------------------------------------------------------------------------
# 2. text helpers


def levenshtein(a, b, max_chars=LEV_MAX_CHARS):
    """DP edit distance; past max_chars each character counts as one edit (bounded work; such texts score ~0 anyway)."""
    extra = max(0, len(a) - max_chars) + max(0, len(b) - max_chars)
    a, b = a[:max_chars], b[:max_chars]
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] + extra


# EvalAI's contraction table, generated from the full forms: each form with one apostrophe dropped maps back ("dont"
# -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've"); its capitalised "Im" etc. never fire on lowercased text.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, ch in enumerate(w) if ch == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table has this one entry backwards
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
PUNCT = ';/[]"{}()=+\\_-><@`!'  # EvalAI's list also has , and ?, which are already gone by then
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)


def vqa_normalize(text):
    """EvalAI answer normalisation, as the TextVQA evaluator (MMF) and lmms-eval apply it."""
    s = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    out = s = s.replace("\n", " ").replace("\t", " ").strip()
    for p in PUNCT:  # glued punctuation splits words ("coca-cola" -> "coca cola"), spaced one is dropped
        out = out.replace(p, "" if (p + " " in s or " " + p in s) else " ")
    out = _PERIOD.sub("", out, count=32)  # only 32 go: the official code passes re.UNICODE (== 32) as sub()'s count
    words = [NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in {"a", "an", "the"})


def _box(v):
    """[x1, y1, x2, y2] as a tuple of floats with positive area, else None."""
    try:
        x1, y1, x2, y2 = (float(x) for x in v)
    except (TypeError, ValueError):
        return None
    ok = all(math.isfinite(x) for x in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1
    return (x1, y1, x2, y2) if ok else None


def _inter(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    inter = _inter(a, b)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

# -----------------------------------------------------------------------------
# 3. scorers: (prediction text, ground truth) -> float in [0, 1]


def _answers(gold):
    answers = [gold] if isinstance(gold, (str, int, float)) else list(gold or [])
    if not answers:
        raise ValueError("record has an empty answer list")
    return [str(a) for a in answers]


def vqa_score(pred, answers):
    """TextVQA accuracy: mean over the leave-one-out subsets of the answers of min(1, matches / 3)."""
    answers = _answers(answers)
    if not isinstance(pred, str):
        return 0.0
    p, gts = vqa_normalize(pred), [vqa_normalize(a) for a in answers]
    if len(gts) == 1:  # leave-one-out over a single answer would always leave nothing to match
        return float(p == gts[0])
    matches = sum(g == p for g in gts)
    # leaving out a matching answer leaves matches - 1 among the others, any other leaves all matches
    return sum(min(1.0, (matches - (g == p)) / 3) for g in gts) / len(gts)


def anls(pred, answers, threshold=0.5):
    """DocVQA ANLS as the official script computes it: 1 - the least normalised edit distance, 0 below threshold."""
    answers = _answers(answers)
    if not isinstance(pred, str):
        return 0.0
    p = " ".join(pred.strip().lower().split())
    lengths = [max(len(a.upper()), len(pred.upper())) for a in answers]  # the official code measures .upper() lengths
    q = 1 - min(levenshtein(" ".join(a.strip().lower().split()), p) / n if n else 0.0 for a, n in zip(answers, lengths))
    return 0.0 if q < threshold else q


def soft_score(pred, answers):
    """Groundlight's soft score, as their code: the top-3 similarities 1 - lev / max(len), summed / 3 (1 match: 1/3)."""
    answers = _answers(answers)
    if not isinstance(pred, str):
        return 0.0
    p, gts = vqa_normalize(pred), [vqa_normalize(a) for a in answers]
    sims = [1 - levenshtein(p, g) / max(len(p), len(g)) if p or g else 0.0 for g in gts]  # two '': they say "wrong"
    return min(1.0, sum(sorted(sims, reverse=True)[:3]) / 3)


MRA_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _vsi_float(pred):
    """VSI-Bench's prediction parse: the first space-separated token, trailing periods dropped, float()."""
    if isinstance(pred, (int, float)) and not isinstance(pred, bool):
        return float(pred)
    try:
        return float(str(pred).strip().partition(" ")[0].rstrip("."))
    except ValueError:
        return None


def mra(pred, gt):
    """VSI-Bench mean relative accuracy: mean over theta in MRA_THRESHOLDS of [|pred - gt| / gt <= 1 - theta], 0 for
    a non-numeric pred. (We divide by |gt| and define gt == 0, which its data never has and its code cannot handle.)"""
    g = to_number(gt)
    if g is None:
        raise ValueError(f"mra ground truth {gt!r} is not a number")
    p = _vsi_float(pred)
    if p is None or not math.isfinite(p):
        return 0.0
    if g == 0:
        return float(p == 0)
    return float(np.mean(abs(p - g) / abs(g) <= 1 - MRA_THRESHOLDS))


def _gold_letter(answer, options):
    letters = string.ascii_uppercase[:len(options)]
    m = _BARE_LETTER.fullmatch(str(answer).strip())
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    for letter, opt in zip(letters, options):
        if _loose(opt) == _loose(answer):
            return letter
    raise ValueError(f"answer {answer!r} is neither an option letter nor one of the options {options}")


def choice_score(pred, answer, options):
    """1 if the output chose the right option (answer: a letter or the option text), else 0."""
    return float(extract_choice(pred, options) == _gold_letter(answer, options))


def to_number(s):
    """A float from a number or a text holding exactly one number ('1,234', '3.5 cm', 'five'), else None."""
    if isinstance(s, (int, float, np.number)) and not isinstance(s, bool):
        return float(s)
    if not isinstance(s, str):
        return None
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s.strip().lower())  # thousands separators
    word = t.rstrip(".")
    if word in NUMBER_WORDS and word != "none":  # EvalAI's "none" -> 0 is not a count
        return float(NUMBER_WORDS[word])
    found = re.findall(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", t)
    return float(found[0]) if len(found) == 1 else None  # '2 or 3' is no answer


def number_score(pred, gt, rel_tol=1e-4, abs_tol=1e-6):
    """1 if the prediction is numerically close to the ground truth (or any of a list of them), else 0."""
    golds = [to_number(g) for g in (gt if isinstance(gt, (list, tuple)) else [gt])]
    if not golds or None in golds:
        raise ValueError(f"number ground truth {gt!r} is not a number")
    p = to_number(pred)
    return float(p is not None and any(math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol) for g in golds))


def mathvista_score(pred, record):
    """MathVista's normalisation, then ==: a letter or '(X)' picks its option, other text the nearest by edit distance;
    integers via int(float()), floats via round(float(), precision); '' scores 0 (ignore_empty_extractions)."""
    answer = str(record["answer"][0] if isinstance(record["answer"], list) else record["answer"]).strip()
    if not isinstance(pred, str) or not pred.strip():
        return 0.0
    pred = pred.strip()
    choices = [str(c) for c in (record.get("options") or record.get("choices") or [])]
    if choices:
        letters = list(string.ascii_uppercase[:len(choices)])
        if answer in letters and answer not in choices:  # a letter as the gold answer: its option text
            answer = choices[letters.index(answer)]
        found = re.findall(r"\(([a-zA-Z])\)", pred)
        s = found[0].upper() if found else pred
        pick = choices[letters.index(s)] if s in letters else min(choices, key=lambda c: levenshtein(s, c))
        return float(pick == answer)
    kind, precision = record.get("answer_type"), record.get("precision")
    if kind is None:
        kind = "float" if precision is not None else "integer" if re.fullmatch(r"[-+]?\d+", answer) else "text"
    if kind == "float" and precision is None:
        precision = len(answer.partition(".")[2])
    try:
        if kind == "integer":
            pred = str(int(float(pred)))  # truncates: '3.7' counts as 3, as in MathVista
        elif kind == "float":
            pred = str(round(float(pred), int(precision)))
    except (ValueError, OverflowError):
        return 0.0
    return float(pred == answer)


TYPES = ("multiple_choice", "number", "mra", "vqa", "anls", "text", "mathvista")  # data.py checks records against it


def accuracy(pred_text, record, extract=None):
    """(value in [0, 1], reason) of a model output's answer (extract: a dialect's extractor, default final_answer;
    multiple choice: extract_choice) for a record."""
    kind = record.get("type")
    if kind not in TYPES:
        raise ValueError(f"unknown record type {kind!r}; expected one of {', '.join(TYPES)}")
    if "answer" not in record:
        raise ValueError(f"record {record.get('id')!r} has no 'answer'")
    gold = record["answer"]
    if kind == "multiple_choice":
        options = record.get("options")
        if not options:
            raise ValueError(f"multiple_choice record {record.get('id')!r} needs 'options'")
        want, got = _gold_letter(gold, options), extract_choice(pred_text, options, extract)
        if got is None:
            return 0.0, "no option letter or option text found"
        return float(got == want), f"chose {got}, answer {want}"
    if kind in ("vqa", "anls", "text"):
        gold = _answers(gold)
    elif kind in ("number", "mra"):
        number_score(0, gold)  # validates the ground truth, whatever the model said
    ans = (extract or final_answer)(pred_text)
    if not ans:
        return 0.0, "no answer"
    if kind == "number":
        v = number_score(ans, gold, record.get("rel_tol", 1e-4), record.get("abs_tol", 1e-6))
    elif kind == "mra":
        v = mra(ans, gold[0] if isinstance(gold, (list, tuple)) else gold)
    elif kind in ("vqa", "anls"):
        v = (vqa_score if kind == "vqa" else anls)(ans, gold)
    elif kind == "text":
        v = float(vqa_normalize(ans) in {vqa_normalize(a) for a in gold})
    else:
        v = mathvista_score(ans, record)
    return v, f"{kind} {v:.3f} for {ans[:40]!r}"

# -----------------------------------------------------------------------------
# 4. reward terms: (traj, record, acc) -> (value, reason); acc is accuracy() of the final answer


def _turns(traj):
    return [t for t in (traj.get("turns") or []) if isinstance(t, str)]


def _text(traj):
    return "\n".join(_turns(traj))


def _calls(traj):
    return [c for c in (traj.get("calls") or []) if isinstance(c, dict)]


def r_soft(traj, record, acc):
    """Groundlight: soft edit-distance correctness of the final answer."""
    ans = final_answer(_text(traj))
    if not ans:
        return 0.0, "no answer"
    v = soft_score(ans, record["answer"])
    return v, f"soft {v:.3f}"


def r_format_r3(traj, record, acc):
    """VLM-R3: 0.5 if the output ends in a closed <answer>...</answer>."""
    text = _text(traj).rstrip()
    if text.endswith("</answer>") and "<answer>" in text:
        return 0.5, "ends in <answer>...</answer>"
    return 0.0, "does not end in a closed <answer>"


def r_format_vilasr(traj, record, acc):
    """ViLaSR (gcot.py): 1 only if every turn is <think>...</think> then its action (a tool call; in the last turn, and
    only there, the answer) and every operation parses (as in the code, a box outside the image still counts)."""
    turns, calls = _turns(traj), _calls(traj)
    if not turns:
        return 0.0, "no turns"
    for i, t in enumerate(turns):
        last = i == len(turns) - 1
        if not re.fullmatch(r"<think>.*?</think>\s*<(tool_call|answer)>.*", t.strip(), re.S):
            return 0.0, f"turn {i} is not <think>...</think> then an action"
        if last and ("<answer>" not in t or "</answer>" not in t):
            return 0.0, "last turn has no <answer>...</answer>"
        if not last and ("<answer>" in t or "</answer>" in t or "<tool_call>" not in t):
            return 0.0, f"turn {i} answers early or makes no operation"
    bad = sum(c.get("arguments") is None for c in calls)
    if bad:
        return 0.0, f"{bad} of {len(calls)} operations do not parse"
    return 1.0, f"well formed, {len(calls)} operations all parse"


def r_format_groundlight(traj, record, acc):
    """Groundlight (tool_use_text_vqa_env.py), mean over turns of 0.4 (think and exactly one of call or answer), 0.2
    (any of them parses: their "spacing" check), 0.2 (starts with <think>), 0.2 (ends in the call's or answer's tag)."""
    turns = _turns(traj)
    if not turns:
        return 0.0, "no turns"
    score = 0.0
    for t in turns:
        s = t.strip()
        think = "<think>" in s and "</think>" in s
        tool = "<tool_call>" in s and "</tool_call>" in s
        answer = "<answer>" in s and "</answer>" in s
        score += (0.4 * (think and tool + answer == 1) + 0.2 * (think or tool or answer) + 0.2 * s.startswith("<think>")
                  + 0.2 * ((tool and s.endswith("</tool_call>")) or (answer and s.endswith("</answer>"))))
    return score / len(turns), f"graded format {score:.1f} over {len(turns)} turns"


def r_format_deepeyes(traj, record, acc):
    """DeepEyes: -1 for unbalanced <think>, unbalanced <answer> after the last </think>, a 1000+ char answer; else 0."""
    text = _text(traj)
    tail, answer = text.rpartition("</think>")[2], text.split("<answer>")[-1].split("</answer>")[0]  # their slices
    errors = [why for why, bad in [("unbalanced <think>", text.count("<think>") != text.count("</think>")),
                                   ("unbalanced <answer>", tail.count("<answer>") != tail.count("</answer>")),
                                   ("answer of 1000+ characters", len(answer.strip()) >= 1000)] if bad]
    return (-1.0, "; ".join(errors)) if errors else (0.0, "well formed")


def r_tool_success(traj, record, acc):
    """Groundlight: successful / attempted tool calls, 0 if none was attempted."""
    calls = _calls(traj)
    if not calls:
        return 0.0, "no tool calls"
    ok = sum(bool(c.get("ok")) for c in calls)
    return ok / len(calls), f"{ok}/{len(calls)} calls succeeded"


def r_tool_bonus(traj, record, acc):
    """DeepEyes: 1 only when the answer is correct and at least one tool call succeeded."""
    if acc >= CORRECT and any(c.get("ok") for c in _calls(traj)):
        return 1.0, "correct with a successful tool call"
    return 0.0, "answer wrong" if acc < CORRECT else "no successful tool call"


def r_region_valid(traj, record, acc):
    """VLM-R3 (rgrpo.py repeat_reward, gated in vllm_rgrpo_trainer.py): 0.5 if the answer is fully correct
    (accuracy 1), there is a box and every box request parses (the code checks the JSON, not the crop)."""
    calls = _calls(traj)
    if acc < 1.0 or not calls:
        return 0.0, "answer not fully correct" if acc < 1.0 else "no boxes"
    bad = sum(c.get("arguments") is None for c in calls)
    if bad:
        return 0.0, f"{bad} of {len(calls)} boxes do not parse"
    return 0.5, f"{len(calls)} boxes parse"


def r_region_executed(traj, record, acc):
    """Stricter r_region_valid, every box cut (opt in: --weights '{"region_valid": 0, "region_executed": 1}')."""
    calls = _calls(traj)
    if acc < 1.0 or not calls or not all(c.get("ok") for c in calls):
        return 0.0, "answer not fully correct" if acc < 1.0 else "no boxes" if not calls else "a box failed"
    return 0.5, f"{len(calls)} boxes cut"


def r_region_iou(traj, record, acc):
    """Best IoU of the regions the tool calls looked at with the record's ground-truth bbox."""
    if record.get("bbox") is None:
        return 0.0, "record has no bbox"
    gt = _box(record["bbox"])
    if gt is None:
        raise ValueError(f"record bbox {record['bbox']!r} is not [x1, y1, x2, y2] with positive area")
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
    return max([(0.0, 0.0)] + [(iou(b, gt), _inter(b, gt) / ((gt[2] - gt[0]) * (gt[3] - gt[1]))) for b in zooms])


def r_length(traj, record, acc):
    """VLM-R3, as their code: min(0.1, 0.01 x characters of the shortest reasoning segment between the tool calls before
    the first <answer>); empty segments count only at the ends (no reasoning before the first or after the last: 0)."""
    text = re.sub(r"\s+", " ", _text(traj).split("<answer>")[0].replace("<think>", "").replace("</think>", "")).strip()
    segments = [s.strip() for s in _split_blocks(text, "<tool_call>", "</tool_call>")]
    shortest = min(len(s) for n, s in enumerate(segments) if s or n in (0, len(segments) - 1))
    return min(0.1, 0.01 * shortest), f"shortest reasoning segment {shortest} chars"


def rethinker_waits(text):
    """VL-Rethinker's count of self-reflections in a response: 'wait,' + 'wait a' + 'alternatively', lower-cased."""
    t = text.lower()
    return t.count("wait,") + t.count("wait a") + t.count("alternatively")


def r_rethink(traj, record, acc):
    """VL-Rethinker (experience_maker.py: rule_reward, then get_logprobs_and_logs' shaping). Invalid (-0.1): cut by
    the token limit or "wait" more than 5 times (any substring); else 1 correct, 0 wrong; a correct response not forced
    to rethink with n self-reflections (rethinker_waits) gets 1.1 for n in 1-2, max(1 - 0.2 n, -0.1) for n >= 3.
    (Their \\boxed check never fires, an argument-order slip passes None: no answer is valid and wrong, as here.)"""
    text = _text(traj)
    invalid = traj.get("stop") in ("max_tokens", "invalid_token") or text.lower().count("wait") > 5
    shaped, why = ((-0.1, "invalid: cut off or more than 5 waits") if invalid
                   else (1.0, "correct") if acc >= CORRECT else (0.0, "wrong"))
    if acc < CORRECT or traj.get("rethinks"):
        return shaped, why + (" (forced rethink)" if traj.get("rethinks") else "")
    n = rethinker_waits(text)
    if 0 < n < 3:
        return 1.1, f"correct with {n} self-reflection(s)"
    return max(shaped - 0.2 * n, -0.1), f"{why}, {n} self-reflections"


_FIRST_NUMBER = re.compile(r"[-+]?\d*\.?\d+")


def vilasr_accuracy(traj, record, acc):
    """ViLaSR's accuracy (gcot.py) of the last turn's first <answer>...</answer>, else that whole turn: multiple choice
    by stripped ==, number and mra by MRA of the first numbers (strict '<'); other types (none in their data): acc."""
    last = (_turns(traj) or [""])[-1]
    m = re.search(r"<answer>\s*(.*?)\s*</answer>", last, re.S)
    ans = m.group(1) if m else last
    gold = record["answer"][0] if isinstance(record["answer"], list) else record["answer"]
    if record.get("type") == "multiple_choice":
        return float(ans.strip() == str(gold).strip())
    if record.get("type") in ("number", "mra"):
        p, g = _FIRST_NUMBER.search(ans[:MAX_ANSWER_CHARS]), _FIRST_NUMBER.search(str(gold))
        if p is None or g is None:
            return 0.0
        p, g = float(p.group()), float(g.group())
        return float(np.mean(abs(p - g) / (abs(g) + 1e-8) < 1 - MRA_THRESHOLDS))
    return acc


def r_vilasr(traj, record, acc, beta=0.0):
    """ViLaSR: S = 1(acc > beta) x (0.5 acc + 0.5 format), acc by vilasr_accuracy, format by r_format_vilasr."""
    acc = vilasr_accuracy(traj, record, acc)
    fmt, why = r_format_vilasr(traj, record, acc)
    if not acc > beta:
        return 0.0, f"gated off: accuracy {acc:.3f} <= {beta}"
    return 0.5 * acc + 0.5 * fmt, f"0.5 x accuracy {acc:.3f} + 0.5 x format {fmt:.0f} ({why})"


def r_vqa_hard(traj, record, acc):
    """Groundlight's hard score (tool_use_text_vqa_env.py): min(1, normalised matches / 3), no leave-one-out mean."""
    if record.get("type") != "vqa":  # one gold answer: the hard score is plain accuracy
        return acc, "accuracy (not a VQA record)"
    ans = final_answer(_text(traj))
    if not ans:
        return 0.0, "no answer"
    p = vqa_normalize(ans)
    matches = sum(vqa_normalize(a) == p for a in _answers(record["answer"]))
    return min(1.0, matches / 3), f"{matches} of the answers match"


TERMS = {name[2:]: f for name, f in list(globals().items()) if name.startswith("r_") and callable(f)}

# -----------------------------------------------------------------------------
# 5. presets: term -> weight; "accuracy" is accuracy() of the final answer

PRESETS = {
    # R-GRPO: r_acc + r_format (0.5) + r_valid (0.5, if correct) + r_length (<= 0.1), summed
    "vlm_r3": {"accuracy": 1.0, "format_r3": 1.0, "region_valid": 1.0, "length": 1.0},
    "vl_rethinker": {"rethink": 1.0},  # 1 / 0 / -0.1 / 1.1, accuracy already inside
    "vilasr": {"vilasr": 1.0},  # the gated 0.5 acc + 0.5 format, accuracy already inside
    # hard min(1, matches / 3) + soft, graded format 0.1; tool success logged at weight 0 (their training code)
    "groundlight": {"vqa_hard": 0.5, "soft": 0.5, "format_groundlight": 0.1, "tool_success": 0.0},
    # 0.8 acc + 0.2 x (-1 on format error) + 1.2 x (correct and a tool call succeeded)
    "deepeyes": {"accuracy": 0.8, "format_deepeyes": 0.2, "tool_bonus": 1.2},
}


def reward(traj, record, preset="vlm_r3", weights=None):
    """Weighted sum of the preset's terms, `weights` overriding or adding; components always hold "accuracy"."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown reward preset {preset!r}; known presets: {', '.join(PRESETS)}")
    w = {**(PRESETS[preset] if preset else {}), **(weights or {})}
    unknown = [k for k in w if k != "accuracy" and k not in TERMS]
    if unknown:
        raise ValueError(f"unknown reward terms {unknown}; known terms: accuracy, {', '.join(TERMS)}")
    acc, why = accuracy(_text(traj), record, traj.get("extract"))
    components, reasons = {"accuracy": acc}, {"accuracy": why}
    for name in w:
        if name != "accuracy":
            components[name], reasons[name] = TERMS[name](traj, record, acc)
    return float(sum(float(weight) * components[name] for name, weight in w.items())), components, reasons
