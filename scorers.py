"""
scorers.py: answer extraction and the benchmarks' scorers; SCORERS (a record's "type" -> its scorer) is the table
rewards.accuracy dispatches on. Read top to bottom:
  1. answer extraction  extract_answer, final_answer, extract_choice (the one extractor of lookagain's own format)
  2. text helpers       levenshtein, vqa_normalize (EvalAI / TextVQA answer normalisation), gl_normalize (Groundlight's)
  3. lookagain's own    vqa_score, anls, soft_score, mra, choice_score, number_score, mathvista_score; score_choice
                        and score_final, which apply them to the answer a dialect extracted
  4. official scorers   each benchmark's own extraction and comparison, behaviour for behaviour (quirks included)
  5. SCORERS            type -> scorer(model output text, record) -> (value in [0, 1], why)

Model text never makes anything here raise: empty, garbled, nested, unicode or enormous text scores 0 with a reason,
in bounded work. A malformed *record* (unknown type, missing options, non-numeric gold) raises ValueError.
"""

import math
import random
import re
import string

import numpy as np

import mathscore

MAX_ANSWER_CHARS = 1000  # untagged text longer than this is reasoning, not an answer (DeepEyes: 1000 too)
LEV_MAX_CHARS = 1000     # levenshtein looks at most at this many characters of each string

# -----------------------------------------------------------------------------
# 1. answer extraction


def split_blocks(text, open_tag, close_tag):
    """text split at its complete open_tag...close_tag blocks (str.find: a lazy regex is quadratic on unclosed tags)."""
    parts, i = [], 0
    while True:
        j = text.find(open_tag, i)
        k = text.find(close_tag, j + len(open_tag)) if j >= 0 else -1
        if k < 0:
            return parts + [text[i:]]
        parts.append(text[i:j])
        i = k + len(close_tag)


def extract_answer(text):
    """Stripped content (maybe '') of the last closed <answer> (innermost if nested), else the last \\boxed{}'s."""
    if not isinstance(text, str) or not text:
        return None
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        start += len("<answer>")
        return text[start:text.find("</answer>", start)].strip()
    box = mathscore.last_boxed(text)
    return box.strip() if box is not None else None


def final_answer(text):
    """The answer a model committed to: extract_answer, else (as ViLaSR's and DeepEyes' scorers do) the untagged
    text after the last </think>, tool calls removed; None if none, inside an unclosed <think>, or too long."""
    ans = extract_answer(text)
    if ans is not None or not isinstance(text, str):
        return ans or None
    tail = text.rpartition("</think>")[2]
    if "<think>" in tail:
        return None
    parts = split_blocks(tail, "<tool_call>", "</tool_call>")
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
    Answer: B, and the option's own text; only letters of the given options count (A-Z without options)."""
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



_GL_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # EvalAI's list whole: nothing took "," and "?" out before


def gl_normalize(text):
    """Groundlight's normalize_answer (r1_vlm tool_use_text_vqa_env.py:189-247): EvalAI's steps without its tokenizing
    first (no "," or "?" taken out up front, no "'s" split off): tabs and newlines as spaces, stripped; a punctuation
    mark dropped where spaced, or anywhere once a digit,digit appears, else made a space; periods not before a digit
    (32 at most); then the lower-cased words, number words, articles, contractions."""
    s = str(text).replace("\n", " ").replace("\t", " ").strip()
    out, drop_all = s, re.search(r"\d,\d", s) is not None  # their commaStrip
    for p in _GL_PUNCT:
        out = out.replace(p, "" if drop_all or p + " " in s or " " + p in s else " ")
    words = [NUMBER_WORDS.get(w, w) for w in _PERIOD.sub("", out, count=32).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in {"a", "an", "the"})  # (their capitalised
    # contractions never fire on lower-cased words, and "let's" and "she's" map to themselves)


# -----------------------------------------------------------------------------
# 3. lookagain's own scorers: (prediction text, ground truth) -> float in [0, 1]. They score the answer a dialect
#    extracted (score_choice, score_final), where section 4's official scorers read the raw output as their code does.


def gold_answers(gold):
    answers = [gold] if isinstance(gold, (str, int, float)) else list(gold or [])
    if not answers:
        raise ValueError("record has an empty answer list")
    return [str(a) for a in answers]


def vqa_score(pred, answers):
    """TextVQA accuracy: mean over the leave-one-out subsets of the answers of min(1, matches / 3)."""
    answers = gold_answers(answers)
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
    answers = gold_answers(answers)
    if not isinstance(pred, str):
        return 0.0
    p = " ".join(pred.strip().lower().split())
    lengths = [max(len(a.upper()), len(pred.upper())) for a in answers]  # the official code measures .upper() lengths
    q = 1 - min(levenshtein(" ".join(a.strip().lower().split()), p) / n if n else 0.0 for a, n in zip(answers, lengths))
    return 0.0 if q < threshold else q


def soft_score(pred, answers):
    """Groundlight's soft score, as their code (get_edit_distance_score): both sides by their normalize_answer
    (gl_normalize), the top-3 similarities 1 - lev / max(len), summed / 3 (1 match: 1/3)."""
    answers = gold_answers(answers)
    if not isinstance(pred, str):
        return 0.0
    p, gts = gl_normalize(pred), [gl_normalize(a) for a in answers]
    sims = [1 - levenshtein(p, g) / max(len(p), len(g)) if p or g else 0.0 for g in gts]  # two '': they say "wrong"
    return min(1.0, sum(sorted(sims, reverse=True)[:3]) / 3)


MRA_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # VSI-Bench's and SPAR's thresholds, float64 (0.8999999999999999 ...)


def _vsi_float(pred):
    """VSI-Bench's prediction parse, stripped first: the first space-separated token, trailing periods dropped, float().
    (Theirs strips last, so ' 4' is no number there; vsi_score keeps that order.)"""
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
    """The gold as an option letter: records give the letter or the option's own text."""
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



def score_choice(pred_text, record, extract=None):
    """multiple_choice: the option extract_choice finds in the output (extract: the answer as a dialect reads it,
    default final_answer) against the gold letter (or option text)."""
    options = record.get("options")
    if not options:
        raise ValueError(f"multiple_choice record {record.get('id')!r} needs 'options'")
    want, got = _gold_letter(record["answer"], options), extract_choice(pred_text, options, extract)
    if got is None:
        return 0.0, "no option letter or option text found"
    return float(got == want), f"chose {got}, answer {want}"


def score_final(pred_text, record, extract=None):
    """number, mra, vqa, anls, text, mathvista: the output's answer (extract: as a dialect reads it, default
    final_answer) against the gold by the type's scorer."""
    kind, gold = record["type"], record["answer"]
    if kind in ("vqa", "anls", "text"):
        gold = gold_answers(gold)
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
# 4. official scorers: each benchmark's own extraction and comparison on the raw model output, quirks kept (named)


def _gold(record):
    return str(record["answer"][0] if isinstance(record["answer"], list) else record["answer"])


def _letters(n):
    return [chr(65 + i) for i in range(n)]


def mmmu_choice(response, choices, rng, pro=False):
    """MMMU's parse_multi_choice_response (mmmu/utils/eval_utils.py), or with pro MMMU-Pro's (mmmu-pro/evaluate.py:
    first one option letter anywhere after the last 'Answer:', then 'X ' without the leading space and 'X.'). Quirks
    kept: lower-case letters never match; several candidates: the latest; none: rng.choice (seeded 42: see
    benchmarks.replay_stream)."""
    letters = _letters(len(choices))
    index2ans = dict(zip(letters, choices))
    if pro and "Answer:" in response:
        rest = response[response.rfind("Answer:") + len("Answer:"):].strip()
        found = [x for x in letters if x in rest]
        if len(found) == 1:
            return found[0]
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    found = [x for x in letters if f"({x})" in response]
    brackets, by_text = bool(found), False
    found = found or [x for x in letters if (f"{x} " if pro else f" {x} ") in response]
    if pro and not found:
        found = [x for x in letters if f"{x}." in response]
    if not found and len(response.split()) > 5:
        found, by_text = [x for x in letters if index2ans[x].lower() in response.lower()], True
    if not found:
        return rng.choice(letters)
    if by_text:
        where = [response.lower().rfind(index2ans[x].lower()) for x in found]
    else:
        where = [response.rfind(f"({x})" if brackets else f" {x} ") for x in found]
    return found[int(np.argmax(where))]


def _mmmu_numbers(s):
    """MMMU's extract_numbers: with commas, scientific, simple (quirk: '2,000,000' also gives 000, '1.5e3' 1 and 3)."""
    return (re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", s) + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s)
            + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", s))


def _mmmu_normalize(s):
    """MMMU's normalize_str: a number -> [its float rounded to 2]; a letter -> [' x', 'x ']; else [lower-cased]."""
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_open(response, golds):
    """MMMU's parse_open_response + eval_open: the shortest text after an indicator word per line (quirk: the
    sentence split runs on lower-cased text, so only newlines split), its numbers; right if a gold string is in a
    predicted string or a predicted number equals a gold number (both rounded to 2)."""
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, line in enumerate(lines):
        shortest = None
        for ind in ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "] + (
                ["="] if i == len(lines) - 1 else []):
            if ind in line and (not shortest or len(line.split(ind)[-1].strip()) < len(shortest)):
                shortest = line.split(ind)[-1].strip()
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    keys = keys or [response]
    preds = {p for s in keys + [n for k in keys for n in _mmmu_numbers(k)] for p in _mmmu_normalize(s)}
    gold = [g for a in golds for g in _mmmu_normalize(str(a))]
    return any(isinstance(p, str) and any(isinstance(g, str) and g in p for g in gold)
               or not isinstance(p, str) and p in gold for p in preds), sorted(map(str, preds))[:4]


def mmmu_score(text, record, rng=None, pro=False):
    """MMMU (and, pro, MMMU-Pro): a multiple-choice item by the parser, an open one by eval_open. rng: the run's one
    random.Random(42) stream (benchmarks.replay_stream); alone, a fresh one (the stream's first draw)."""
    choices = record.get("choices") or []
    if record.get("question_type", "multiple-choice") == "multiple-choice" and choices:
        got = mmmu_choice(text, choices, rng or random.Random(42), pro)
        golds = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
        return float(got in golds), f"parsed {got}"
    right, preds = mmmu_open(text, record["answer"] if isinstance(record["answer"], list) else [record["answer"]])
    return float(right), f"open: {preds}"


def mmmu_pro_score(text, record, rng=None):
    return mmmu_score(text, record, rng, pro=True)


def _float(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def vsi_score(text, record):
    """VSI-Bench (thinking-in-space utils.py): the text before the first space, trailing '.' dropped, then stripped
    (quirks: ' A' and 'A.\n' fail, '3.5m' fails, '3.5 meters' passes); a letter by case-insensitive equality, a
    number by MRA in float64, |p - t| / t <= 1 - theta (quirk: 12 vs 10 scores 0.6, 0.95 vs 1 scores 1.0)."""
    pred, gold = text.split(" ")[0].rstrip(".").strip(), _gold(record)
    if record.get("choices"):
        return float(pred.lower() == gold.lower()), f"first token {pred[:20]!r}"
    p, t = _float(pred), _float(gold)
    if p is None or t is None or not math.isfinite(p):
        return 0.0, f"first token {pred[:20]!r} is no number"
    if t == 0:  # their code divides by it (an uncaught ZeroDivisionError); the data never has it
        return float(p == 0), "gold 0"
    return float(np.mean(abs(p - t) / t <= 1 - MRA_THRESHOLDS)), f"MRA of {p}"


def _spar_mra(pred, target):
    """SPAR's MRA (utils.py): float64 thresholds, <=, the absolute error at a target of 0 (VSI's code divides by it)."""
    rel = abs((pred - target) / target) if target != 0 else abs(pred - target)
    return float(np.mean(rel <= 1 - MRA_THRESHOLDS))


VCI_AXES = (("move_right", "move_left"), ("move_up", "move_down"), ("move_forward", "move_backward"),
            ("rotate_right", "rotate_left"), ("rotate_up", "rotate_down"))


def _vci(s):
    """SPAR's (and ViLaSR's) parse_instruction, the five net movements. Keys are not stripped (quirk: ', move_left:1'
    is lost); an item without exactly one ':' raises ValueError."""
    d = {k: float(v) for k, v in [item.split(":") for item in s.split(",")]}
    return [d.get(a, 0.0) - d.get(b, 0.0) for a, b in VCI_AXES]


SPAR_NA = ("depth_prediction_oc", "depth_prediction_oo", "distance_prediction_oc", "distance_prediction_oo",
           "depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oo_mv", "distance_prediction_oc_mv")


def spar_score(text, record):
    """SPAR-Bench (spar lmms-eval sparbench/utils.py) by task. Multiple choice on the raw output: equal, or the output
    in the gold, or its first character the gold (quirks: an empty output is right, 'Based on ..., C' is B; with
    record["fix"] empty is wrong). Numbers: the first unsigned number (the last for _mv tasks), SPAR's MRA (absolute
    error at a gold of 0). view_change_infer: MRA per movement, normalised by the prediction (quirk: arguments swapped).
    Any error scores 0, as their bare except."""
    task, gold = record.get("category"), _gold(record)
    try:
        if task == "view_change_infer":
            return float(np.mean([_spar_mra(g, p) for g, p in zip(_vci(gold), _vci(text))])), "view change"
        if task in SPAR_NA:
            nums = re.findall(r"(?<!\^)\d+\.\d+|(?<!\^)\d+", text)
            if task.endswith("_mv"):
                nums = nums or ["-1"]  # theirs: no number in a multi-view answer reads as -1 (MRA 0), not an error
            p = float(nums[-1] if task.endswith("_mv") else nums[0])
            return _spar_mra(p, float(gold)), f"MRA of {p}"
        pred, target = text.lower(), gold.lower()
        if not pred and record.get("fix"):
            return 0.0, "empty output (fixed)"
        return float(pred == target or pred in target or pred[0] == target), f"first character {text[:1]!r}"
    except (ValueError, IndexError, ZeroDivisionError, TypeError) as e:
        return 0.0, f"scoring error ({type(e).__name__}), as their bare except"


def mmsi_score(text, record):
    """MMSI-Bench (its VLMEvalKit fork, mmsi_bench.py): the content of ``...`` then `...`, then the first standalone
    capital A-D not followed by a space and a letter (quirks: 'b' and 'I think B is ...' and 'C\nWhy' find nothing)."""
    for pat in (r"``([^`]*)``", r"`([^`]*)`"):
        m = re.search(pat, text)
        text = m.group(1) if m else text
    m = re.search(r"\b[A-D]\b(?!\s[a-zA-Z])", text)
    if m is None:
        return 0.0, "no letter found"
    return float(_gold(record).lower().replace("\n", " ").strip() == m.group().lower()), f"letter {m.group()}"


def mra32(pred, gt, strict=False):
    """ViLaSR's MRA (eval/evaluate.py; strict: gcot.py's training reward) in float32, as torch computes it:
    |p - t| / (|t| + 1e-8) <= 1 - arange(0.5, 0.975, 0.05); the mean comes back as float(float32(k / 10)). float32
    moves the threshold edges: 1.2 for 1 scores 0.6 here, 0.7 in VSI's float64; 14 for 10: 0.2 here, 0.3 there."""
    p, t = np.array(pred, np.float32), np.array(gt, np.float32)
    rel = np.abs(p - t) / (np.abs(t) + np.float32(1e-8))
    one_minus = np.float32(1) - (0.5 + 0.05 * np.arange(10)).astype(np.float32)
    return float(np.float32(np.mean(rel < one_minus if strict else rel <= one_minus)))


def _number(s):
    return _float(s.replace(",", ""))


def _tag_or_all(s):
    m = re.search(r"<answer>\s*(.*?)\s*</answer>", s, re.S)
    return m.group(1).strip() if m else s


def vilasr_score(text, record):
    """ViLaSR's reward_fn (eval/evaluate.py) by record["problem_type"]: the first <answer>...</answer> of the output,
    else all of it; multiple choice by the first character, case-insensitive (quirk: 'Based on ...' is B; an empty
    answer, which crashes their script, scores 0); numerical: both with or without '.'/',', equal at 2 decimals;
    regression: float32 MRA of the whole answer as a number; vci: float32 MRA per movement; other types 0."""
    out, gold, kind = _tag_or_all(text), _tag_or_all(_gold(record)), record.get("problem_type", "").lower()
    try:
        if kind == "multiple choice":
            return float(out.strip()[0].lower() == gold.strip()[0].lower()), f"first character {out.strip()[:1]!r}"
        if kind == "numerical":
            if ("." in gold or "," in gold) != ("." in out or "," in out):
                return 0.0, "decimal point in one only"
            p, g = _number(out), _number(gold)
            return float(p is not None and g is not None and round(g, 2) == round(p, 2)), f"number {p}"
        if kind == "regression":
            p, g = _number(out), _number(gold)
            return (0.0, "not a number") if p is None or g is None else (mra32(p, g), f"MRA of {p}")
        if kind == "vci":
            return float(np.mean([mra32(a, g) for a, g in zip(_vci(out), _vci(gold))])), "view change"
    except (ValueError, IndexError) as e:
        return 0.0, f"scoring error ({type(e).__name__})"
    return 0.0, f"problem type {kind!r} is not scored"


MME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                "The best option is" "The correct option is", "Best answer:" "Best option:"]  # sic: two missing commas
MME_PREFIXES_FIXED = MME_PREFIXES[:4] + ["The best option is", "The correct option is", "Best answer:", "Best option:"]


def mme_realworld_score(text, record):
    """MME-RealWorld's extract_characters_regex (evaluation/eval_your_results.py): answer prefixes removed (quirk: two
    missing commas leave 'Best answer:' in, read as B; record["fix"] removes all eight), over 10 words without a
    capital A-E is no answer, else the first capital A-E anywhere ('Answer: C' is A), else the first option whose text
    holds the lower-cased output (quirk: an empty output is A)."""
    s = text.strip()
    for p in MME_PREFIXES_FIXED if record.get("fix") else MME_PREFIXES:
        s = s.replace(p, "")
    m = re.search(r"[ABCDE]", s)
    if len(s.split()) > 10 and not m:
        got = ""
    elif m:
        got = m.group()
    else:
        got = next((c[1] for c in record.get("choices") or [] if s.lower() in c.lower()), "")  # "(B) ..." -> B
    return float(got == _gold(record)), f"extracted {got!r}"

# -----------------------------------------------------------------------------
# 5. the table: a record's "type" -> its scorer (model output text, record) -> (value, why)

SCORERS = {"multiple_choice": score_choice, **{t: score_final for t in ("number", "mra", "vqa", "anls", "text",
                                                                          "mathvista")},
           "mmmu": mmmu_score, "mmmu_pro": mmmu_pro_score,
           "rethinker": mathscore.rethinker_score, "mathvision": mathscore.mathvision_score,
           "emma": mathscore.emma_score,
           "vsi": vsi_score, "spar": spar_score, "mmsi": mmsi_score, "vilasr": vilasr_score,
           "mme_realworld": mme_realworld_score}
