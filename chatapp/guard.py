"""The faithfulness guard: an answer's checkable claims must be in the evidence or the conversation.

A small model's fluent wrong answer ("the standard refund is $12") is worse than a handoff, and the claims that hurt a
shop are the checkable ones: amounts, percentages, durations, counts, membership levels and offers (free, discount),
and a policy's yes or no (a sentence of the evidence repeated with its "not" dropped or added).
Each is parsed to a canonical value ("$8", "$8.00", "8 dollars" and "eight dollars" are all money 8; "6 months" and
"六个月" are 180 days) and looked up among the claims of the evidence the prompt quoted and of the conversation. An
answer with any unsupported claim is not shown as the bot's own: `Bot` replaces it with the evidence itself, quoted
with its citation (`evidence.extractive_answer`), or with a handoff offer when there is no evidence.

While an answer streams, `StreamGuard` releases text up to the first risky word of the sentence being written (a
number, an amount, a level, an offer); the rest of that sentence is shown once the sentence is complete and checked.
So a replaced answer never showed its unsupported claim, and claim-free text streams without delay.

A small model also declines answers it has the evidence for ("I'm not sure about that, would you like a person?"
when the quoted bullet says exactly what to do): measured on the shop questions, that was half of the shipped
adapter's wrong answers. With evidence quoted, `StreamGuard(hold_declines=True)` shows nothing until the answer's
first substantive sentence; if a decline comes first, the answer is `declined` and `Bot` shows the evidence quoted
with its citation and the offer of a person instead, so the customer gets both the article and the way to a person.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Iterable

from chatapp.evidence import STOP

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "a": 1, "an": 1, "single": 1,
}
ZH_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
DAYS = {"minute": 1 / 1440, "hour": 1 / 24, "day": 1, "business day": 1, "week": 7, "month": 30, "year": 365,
        "分钟": 1 / 1440, "小时": 1 / 24, "天": 1, "日": 1, "周": 7, "星期": 7, "个月": 30, "月": 30, "年": 365}
LEVELS = {"gold": "gold", "silver": "silver", "bronze": "bronze", "guest": "guest",
          "金卡": "gold", "银卡": "silver", "铜卡": "bronze"}
OFFERS = {"free": "free", "free of charge": "free", "no charge": "free", "no cost": "free", "waive": "free",
          "waived": "free", "免费": "free", "不收费": "free",
          "discount": "discount", "coupon": "discount", "折扣": "discount", "打折": "discount"}

_NUM = r"\d+(?:[.,]\d+)?"
_WORD = "|".join(sorted((w for w in NUMBER_WORDS if len(w) > 2), key=len, reverse=True))
_ZH = r"[零一二两三四五六七八九十百]+"
_UNIT_EN = r"(minute|hour|business day|day|week|month|year)s?"
_UNIT_ZH = r"(分钟|小时|个月|天|日|周|星期|月|年)"
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("money", re.compile(rf"[$€£]\s?({_NUM})|({_NUM})\s?(?:dollars?|usd|bucks|美元|元|块)"
                         rf"|\b({_WORD})\s+dollars?\b|({_ZH})\s?(?:美元|元|块)", re.I)),
    ("percent", re.compile(rf"({_NUM})\s?(?:%|percent\b|per cent\b)|\b({_WORD})\s+percent\b|百分之({_ZH}|{_NUM})",
                           re.I)),
    ("duration", re.compile(rf"({_NUM})(?:\s|-)?{_UNIT_EN}\b|\b({_WORD}|a|an)(?:\s|-){_UNIT_EN}\b"
                            rf"|({_NUM}|{_ZH})\s?(?:个)?{_UNIT_ZH}", re.I)),
    ("number", re.compile(rf"(?<![\w$€£.]){_NUM}(?![\w%])|(?<![\w])({_WORD})(?=\s+(?:items?|times?|pieces?|"
                          r"pairs?|orders?|people|customers?|members?|codes?|questions?|levels?)\b)", re.I)),
    ("level", re.compile(r"\b(gold|silver|bronze|guest)\b|金卡|银卡|铜卡", re.I)),
    ("offer", re.compile(r"\b(free of charge|free|no charge|no cost|waived?|discount|coupon)\b|免费|不收费|折扣|打折",
                         re.I)),
]
RISKY = re.compile(rf"[\d$€£%]|\b({_WORD}|gold|silver|bronze|guest|free|no charge|no cost|discount|coupon|percent)\b"
                   r"|[零一二两三四五六七八九十百]|免费|折扣|金卡|银卡|铜卡", re.I)
# A reply that gives no answer: unsure, would rather not guess, offers a person, has no details
DECLINE = re.compile(r"\b(?:i'?m not sure|i am not sure|(?:i'd|i would) rather not guess|connect you with|"
                     r"i (?:do not|don't) (?:have|know)\b|i (?:can ?not|can't) (?:help|answer)|"
                     r"(?:no|any) (?:specific )?(?:details|information) (?:available|about|on)\b)"
                     r"|我不确定|我不清楚|无法回答|没有(?:相关|找到)(?:的)?(?:资料|信息)|不想乱猜", re.I)
# Polarity: a small model repeats a policy's sentence with its "not" dropped or added ("Bronze and Guest members can get
# an extension" from "... cannot get an extension"). A clause of the answer that says what a clause of the references
# says, word for word (POLARITY_SHARE of its content words, at least POLARITY_WORDS), but with the opposite negation
# and no reference clause of its own polarity, is an unsupported claim. Whole sentences are compared as well as their
# clauses ("once it is in transit, the date can be changed"), and a reference sentence that mixes both polarities
# ("Gold members get it at once; other members do not") has a clause of each to match. English only: a Chinese answer paraphrases
# the English evidence, so its words cannot be matched.
NEGATION = re.compile(r"\b(?:not|never|cannot|no longer|nothing|neither|nor|unable)\b|n't\b", re.I)
CLAUSE = re.compile(r"[;:,.!?]+(?:\s+|$)|\s+(?:but|while|whereas|although|though)\s+", re.I)
CONTENT_WORD = re.compile(r"[a-z0-9$%]+")
CONTRACTED = frozenset("can won don doesn isn aren didn wasn weren haven hasn couldn shouldn wouldn".split())
POLARITY_WORDS = 3
POLARITY_SHARE = 0.8
SUBSTANTIVE_WORDS = 6  # a sentence this long that does not decline is an answer ("We're happy to help!" is not)
SUBSTANTIVE_CJK = 10  # ... and in Chinese, this many characters
SUBSTANTIVE_CHARS = 40  # ... or this long at all (text without spaces)
SENTENCE = re.compile(r"(?:[^.!?。！？\n]|\.(?=\d))*(?:[.!?。！？]+(?=\s|$)|[。！？]|\n)")


@dataclass(frozen=True)
class Claim:
    kind: str  # money | percent | duration | number | level | offer | polarity
    value: float | str  # money/percent/number: the amount; duration: days; level/offer: its name
    text: str  # as written

    def __str__(self) -> str:
        return self.text


@dataclass
class Verdict:
    """What the guard found in one answer; stored with the turn (`TurnRecord.guard`)."""

    claims: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    action: str = "kept"  # kept | replaced_extractive | replaced_handoff | replaced_declined
    declined: bool = False  # the answer declined before saying anything (see `declines`)

    @property
    def supported(self) -> bool:
        return not self.unsupported

    def to_dict(self) -> dict:
        return {"claims": self.claims, "unsupported": self.unsupported, "action": self.action,
                "declined": self.declined}


def zh_number(text: str) -> float | None:
    """十 10, 十五 15, 二十 20, 三十五 35, 一百 100, 六 6 (small numerals, as prices and periods are written)."""
    if not text or any(c not in ZH_DIGITS and c not in "十百" for c in text):
        return None
    total, current = 0, 0
    for char in text:
        if char == "百":
            total += (current or 1) * 100
            current = 0
        elif char == "十":
            total += (current or 1) * 10
            current = 0
        else:
            current = current * 10 + ZH_DIGITS[char]
    return float(total + current)


def _value(text: str | None) -> float | None:
    if not text:
        return None
    low = text.lower().replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", text or "") else text.lower()
    if low in NUMBER_WORDS:
        return float(NUMBER_WORDS[low])
    try:
        return float(low.replace(",", "."))
    except ValueError:
        return zh_number(text)


def claims(text: str) -> list[Claim]:
    """Every checkable claim in `text`; a span already read as money, a percentage or a duration is not read again
    as a bare number."""
    found: list[Claim] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in PATTERNS:
        for match in pattern.finditer(text or ""):
            start, end = match.span()
            if any(s < end and start < e for s, e in taken):
                continue
            groups = [g for g in match.groups() if g]
            if kind in ("level", "offer"):
                key = match.group(0).lower()
                value: float | str | None = (LEVELS if kind == "level" else OFFERS).get(key, key)
                value = "free" if kind == "offer" and key.startswith("waive") else value
            elif kind == "duration":
                unit = next((g for g in groups if g.lower() in DAYS or g in DAYS), None)
                number = next((g for g in groups if g is not unit), None)
                amount = _value(number)
                value = None if amount is None or unit is None else amount * DAYS[unit.lower() if unit.lower() in DAYS
                                                                                  else unit]
            else:
                value = _value(groups[0] if groups else match.group(0))
            if value is None:
                continue
            found.append(Claim(kind, value, match.group(0).strip()))
            taken.append((start, end))
    return found


def _matches(claim: Claim, reference: Claim) -> bool:
    if claim.kind in ("level", "offer") or reference.kind in ("level", "offer"):
        return claim.kind == reference.kind and claim.value == reference.value
    if claim.kind == "duration":  # "4 days" is not supported by "four membership levels"
        return reference.kind == "duration" and abs(float(claim.value) - float(reference.value)) < 1e-6
    if reference.kind == "duration":  # a bare "30" in the answer may well be the "30 days" of the evidence
        return claim.kind == "number" and abs(float(claim.value) - float(reference.value)) < 1e-6
    return abs(float(claim.value) - float(reference.value)) < 1e-6  # money/percent/number: the amount is the claim


def _content(clause: str) -> frozenset[str]:
    words = CONTENT_WORD.findall(NEGATION.sub(" ", clause.lower()))
    return frozenset(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words
                     if w not in STOP and w not in CONTRACTED)


def _sentences(text: str) -> list[str]:
    return [m.group(0).strip() for m in SENTENCE.finditer((text or "") + "\n") if m.group(0).strip()]


def _clauses(sentence: str) -> list[str]:
    parts = [c.strip() for c in CLAUSE.split(sentence) if c.strip()]
    return parts if len(parts) > 1 else []


def polarity_clauses(texts: Iterable[str]) -> list[tuple[frozenset[str], bool]]:
    """Each sentence and clause of the texts as (content words, negated)."""
    return [(_content(part), bool(NEGATION.search(part)))
            for text in texts for sentence in _sentences(text) for part in [sentence, *_clauses(sentence)]]


def flipped(answer: str, references: list[tuple[frozenset[str], bool]]) -> list[Claim]:
    """The answer's sentences (or, failing that, clauses) that repeat a reference with the opposite negation."""
    def flips(part: str) -> bool:
        words = _content(part)
        if len(words) < POLARITY_WORDS:
            return False
        same = [n for ref, n in references if len(words & ref) >= POLARITY_SHARE * len(words)]
        return bool(same) and bool(NEGATION.search(part)) not in same

    found = []
    for sentence in _sentences(answer):
        parts = [sentence] if flips(sentence) else [c for c in _clauses(sentence) if flips(c)]
        found += [Claim("polarity", "flipped", part.rstrip(".!?;:, ")) for part in parts]
    return found


def reference_texts(evidence: Iterable, hits: Iterable, conversation: Iterable[dict | str]) -> list[str]:
    """What an answer's claims may rest on: the quoted evidence, the cited passages and the conversation. A heading
    is a text of its own: "My promo code is not valid" must not join the sentence after it."""
    texts = [part for e in evidence for part in (e.title, e.text)]
    texts += [part for h in hits for part in (h.title, h.text, h.answer or "")]
    return texts + [str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in conversation]


class References:
    """The reference texts read once: their claims and their clauses, for every check of one answer."""

    def __init__(self, texts: Iterable[str]):
        self.texts = list(texts)
        self.claims = [c for text in self.texts for c in claims(text)]
        self.clauses = polarity_clauses(self.texts)

    def unsupported(self, text: str) -> tuple[list[Claim], list[Claim]]:
        """(all claims of `text`, those found in no reference)."""
        mine = claims(text)
        return mine, [c for c in mine if not any(_matches(c, k) for k in self.claims)] + flipped(text, self.clauses)


def unsupported(answer: str, references: Iterable[str]) -> tuple[list[Claim], list[Claim]]:
    """(all claims of the answer, those found in no reference text)."""
    return References(references).unsupported(answer)


def _sentence_declines(sentence: str, complete: bool = True) -> bool | None:
    """True: a decline; False: a substantive answer; None: neither yet (a greeting, "Sure!"). A sentence still being
    written must be longer to count ("Would you like me to connect" may go on "... you with a person?")."""
    if DECLINE.search(sentence):
        return True
    scale = 1 if complete else 2
    long = len(sentence.split()) >= SUBSTANTIVE_WORDS * scale or len(sentence) >= SUBSTANTIVE_CHARS * scale or \
        len(re.findall(r"[\u3400-\u9fff]", sentence)) >= SUBSTANTIVE_CJK * scale
    return False if long else None


def declines(answer: str) -> bool:
    """Whether the answer declines before it says anything substantive."""
    for match in SENTENCE.finditer(answer + "\n"):
        said = _sentence_declines(match.group(0))
        if said is not None:
            return said
    return False


def check(answer: str, references: Iterable[str] | References) -> Verdict:
    refs = references if isinstance(references, References) else References(references)
    mine, missing = refs.unsupported(answer)
    return Verdict(claims=[c.text for c in mine], unsupported=[c.text for c in missing])


class StreamGuard:
    """Releases a streaming answer's text as far as it is safe to show; `failed` once a finished sentence makes an
    unsupported claim (the caller then stops generating and shows a replacement)."""

    def __init__(self, references: Iterable[str], hold_declines: bool = False):
        self.references = References(references)
        self.failed: list[str] = []
        self.declined = False  # with hold_declines: a decline came before any substantive sentence
        self.hold_declines = hold_declines
        self._answering = not hold_declines  # a substantive sentence has been seen: stream as usual
        self._checked = 0  # characters of complete, checked sentences

    def _check(self, sentence: str) -> None:
        self.failed += [c.text for c in self.references.unsupported(sentence)[1]]
        if not self._answering:
            self._judge(sentence)

    def _judge(self, sentence: str, complete: bool = True) -> None:
        """Before the first substantive sentence: does this one decline, answer, or neither yet?"""
        said = _sentence_declines(sentence, complete)
        self.declined = said is True
        self._answering = said is False

    def feed(self, text: str) -> str:
        """The prefix of `text` that may be shown now."""
        for match in SENTENCE.finditer(text, self._checked):
            if match.end() <= self._checked or not match.group(0):
                continue
            if match.start() != self._checked:
                break
            self._check(match.group(0))
            if self.failed or self.declined:
                break  # the failed sentence is never shown
            self._checked = match.end()
        if not self._answering and not self.declined and not self.failed:
            self._judge(text[self._checked:], complete=False)  # a long sentence need not end first
        if self.declined or not self._answering:
            return ""  # nothing until the answer is known not to decline
        if self.failed:
            return text[:self._checked]
        partial = text[self._checked:]
        risky = RISKY.search(partial)
        if risky:
            return text[:self._checked + risky.start()]
        cut = max(partial.rfind(" "), partial.rfind("\n"))
        if re.search(r"[\u3400-\u9fff]", partial[-1:] or ""):
            cut = len(partial) - 1  # Chinese has no spaces: hold the last character (it may start a numeral)
        return text[:self._checked + max(cut, 0)]

    def finish(self, text: str) -> Verdict:
        """The whole answer's verdict (its last sentence may lack a full stop)."""
        verdict = check(text, self.references)
        verdict.unsupported = list(dict.fromkeys(self.failed + verdict.unsupported))
        verdict.declined = self.hold_declines and (self.declined or declines(text))
        return verdict
