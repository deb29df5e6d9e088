"""Personal-data redaction for exported feedback.

Training data leaves the machine (or at least the database), so by default every exported text goes through
`Redactor`: checksummed numbers are validated (Luhn for cards, mod-97 for IBANs, libphonenumber for phones) so that
order numbers and prices are not mistaken for them, and each redaction is counted so the operator can see what went.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Candidates only; the checksum decides. An IBAN is 2 letters, 2 check digits, then 11-30 letters/digits,
# often printed in groups of four.
IBAN_CANDIDATE = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]){11,30}\b")
CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
HAS_PHONE_DIGITS = re.compile(r"\d(?:\D{0,3}\d){6,}")  # cheap pre-check: libphonenumber is slow on every text
STREET_SUFFIX = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Terr|Square|Sq|"
    r"Parkway|Pkwy|Highway|Hwy|Close|Crescent|Cres|Gardens|Gdns|Grove|Row|Walk|Hill|Mews|Circle|Cir|Trail|Trl|"
    r"Alley|Plaza|Broadway"
)
_STREET_WORD = r"(?:[A-Z][A-Za-z'.-]*|\d{1,3}(?:st|nd|rd|th))"  # "Baker", "St.", "5th"
ADDRESS = re.compile(
    # "221B Baker Street", "1600 Pennsylvania Ave NW": capitalised street words keep ordinary prose out
    rf"(?:\b\d{{1,5}}[A-Za-z]?(?:-\d{{1,5}})?,?\s+(?:{_STREET_WORD}\s+){{0,4}}(?:{STREET_SUFFIX})\b\.?"
    r"|\b\d{1,5}\s+(?:[a-z]+\s+){1,2}(?:street|avenue|road|boulevard|lane|drive)\b)"
    r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b\.?)?"
    r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl)\.?\s*#?[A-Za-z0-9-]+|,?\s+#\s*[A-Za-z0-9-]+)?"
    # ", City, ST 12345" / ", City ST" / ", City NW1 6XE": a town only when a state, ZIP or postcode follows
    r"(?:,\s*[A-Z][A-Za-z .'-]{1,30}?(?:(?:,\s*[A-Z]{2})?\s+\d{5}(?:-\d{4})?\b|,\s*[A-Z]{2}\b"
    r"|\s+[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}\b))?"
    r"|\b(?i:p\.?\s?o\.?\s+box)\s+\d+\b"
)


class Redactor:
    """Replaces personal data in text with ``[KIND]`` placeholders and counts each kind it replaced.

    ``extra_patterns`` maps a kind (e.g. ``order_id``) to a regular expression; if the expression has a group,
    only the group is replaced (so ``order #12345`` becomes ``order #[ORDER_ID]``).
    """

    def __init__(self, extra_patterns: Mapping[str, str] | None = None, phone_regions: Iterable[str] = ("US", "GB")):
        self.extra = {kind: re.compile(pattern) for kind, pattern in (extra_patterns or {}).items()}
        self.phone_regions = tuple(phone_regions)
        self.counts: Counter[str] = Counter()
        self._cache: dict[str, tuple[str, Counter[str]]] = {}

    def __call__(self, text: str | None) -> str | None:
        """Redacted copy of ``text``; counts are added to ``self.counts`` on every call (cached or not)."""
        if not text:
            return text
        hit = self._cache.get(text)
        if hit is None:
            found: Counter[str] = Counter()
            redacted = self._redact(text, found)
            hit = (redacted, found)
            if len(self._cache) < 200_000:  # histories repeat across a session's turns
                self._cache[text] = hit
        self.counts.update(hit[1])
        return hit[0]

    def _redact(self, text: str, found: Counter[str]) -> str:
        text = _sub(EMAIL, text, "email", found)
        text = _sub(IBAN_CANDIDATE, text, "iban", found, _iban_span)
        text = _sub(CARD_CANDIDATE, text, "card", found, _card_span)
        text = self._phones(text, found)
        text = _sub(ADDRESS, text, "address", found)
        for kind, pattern in self.extra.items():
            text = _sub(pattern, text, kind, found, _group_span)
        return text

    def _phones(self, text: str, found: Counter[str]) -> str:
        if not HAS_PHONE_DIGITS.search(text):
            return text
        spans: list[tuple[int, int]] = []
        for region in self.phone_regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                if not any(start < match.end and match.start < end for start, end in spans):
                    spans.append((match.start, match.end))
        return _replace_spans(text, sorted(spans), "phone", found)


def _sub(pattern: re.Pattern[str], text: str, kind: str, found: Counter[str], pick=None) -> str:
    """Replace every match of ``pattern`` (narrowed by ``pick(match) -> span | None``) with ``[KIND]``."""
    spans = []
    for match in pattern.finditer(text):
        span = pick(match) if pick else match.span()
        if span is not None:
            spans.append(span)
    return _replace_spans(text, spans, kind, found)


def _replace_spans(text: str, spans: list[tuple[int, int]], kind: str, found: Counter[str]) -> str:
    if not spans:
        return text
    parts, last = [], 0
    for start, end in spans:
        parts += [text[last:start], f"[{kind.upper()}]"]
        last = end
    found[kind] += len(spans)
    return "".join(parts) + text[last:]


def _card_span(match: re.Match[str]) -> tuple[int, int] | None:
    digits = re.sub(r"\D", "", match.group())
    return match.span() if 13 <= len(digits) <= 19 and luhn.is_valid(digits) else None


def _iban_span(match: re.Match[str]) -> tuple[int, int] | None:
    """The longest prefix of the candidate that is a valid IBAN (the pattern may run into the next word)."""
    raw = match.group()
    for end in range(len(raw), 14, -1):
        if raw[end - 1] != " " and stdnum_iban.is_valid(raw[:end].upper()):
            return match.start(), match.start() + end
    return None


def _group_span(match: re.Match[str]) -> tuple[int, int]:
    return match.span(1) if match.re.groups >= 1 and match.group(1) is not None else match.span()
