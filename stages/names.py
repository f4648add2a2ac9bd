"""Person names and street addresses (params `redact.names`), for stages/detectors.py.

Offline and CPU-only, and gated on context so that redact stays fast:
- A name is two or three capitalised words whose first is a first name or whose last is a surname
  in the US Census name lists (shipped by the `names` package, MIT: 5,494 first names, 88,799
  surnames; only the 20,000 most frequent surnames are used, since the long tail holds ordinary words),
  and only right after a cue: `my name is`, `Name:`, `Dear`, `Mr./Ms./Dr.`, `customer`,
  `patient`, `contact`, `regards,` (after `my name is`, `Name:`, `Dear` and a title any capitalised
  words count). A JSON member whose key names a person (`full_name`, `customer_name`,
  `first_name`...) is checked against the same lists (detectors.Redactor.key_value).
- A street address is a house number, one to four capitalised words and a street suffix (USPS
  Publication 28's common suffixes and UK ones), then optionally a unit, a city, a state and ZIP or a
  UK postcode. Candidates come from a literal find of `0 Aa` in the text's shape string (a digit, a
  space, a capitalised word), so the text is never scanned with a pattern that starts with a class.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable

Add = Callable[..., None]

_SURNAMES_KEPT = 20_000
# Capitalised words that are also common first names or surnames, and start sentences.
_STOP = frozenset("""the a an and or but if then this that these those it its my your our their his her we you they
i he she me us them to from in on at by for with of as is are was were be been will would can could should may
might must do does did done have has had not no yes ok okay please thanks thank hi hello dear mr mrs ms dr sir
madam team all new old good great best kind regards sincerely cheers monday tuesday wednesday thursday friday
saturday sunday january february march april may june july august september october november december
north south east west street road avenue lane drive court way place error warning info debug true false none null
order invoice ticket customer support service server client user admin api http https json file data
""".split())


@functools.lru_cache(maxsize=1)
def lists() -> tuple[frozenset[str], frozenset[str]]:
    """(first names, surnames), lower case, from the Census files the `names` package ships."""
    import names as census  # data only: its random-name functions are not used

    root = Path(census.__file__).parent

    def read(name: str, limit: int | None = None) -> frozenset[str]:
        out = []
        with open(root / name, encoding="ascii") as fh:
            for line in fh:
                w = line.split(" ", 1)[0].strip().lower()
                if w:
                    out.append(w)
                if limit and len(out) >= limit:
                    break
        return frozenset(out) - _STOP

    return read("dist.male.first") | read("dist.female.first"), read("dist.all.last", _SURNAMES_KEPT)


# Each cue costs a pass over the text: the few that most often precede a name in agent traces.
_CUES = (b"name", b"dear ", b"mr", b"ms", b"dr.", b"regards", b"customer", b"patient", b"contact", b"holder")
# A string under 20 chars holds a name only after one of the cues (digits, for addresses, are
# already a hint of the detectors' own).
SHORT_HINT = re.compile(r"name|dear|mr|ms|dr\.|regards|customer|patient|contact|holder")
_CUE_RX = re.compile(
    r"(?:my name is|name is|names?\\*[\"']?[ \t]*[:=]|full name|dear|hi|hello|mr\.?|mrs\.?|ms\.?|dr\.?|regards,?|sincerely,?|"
    r"customer|patient|contact|holder|signed,?|from:|cc:|attn:?|assignee:?|author:?)[\s\\\"':=,]{0,6}", re.I)
_STRONG = re.compile(r"(?:(?:my name is|name is|full name|dear|mr|mrs|ms|dr)\b|names?\\*[\"']?[ \t]*[:=]|holder)", re.I)
_NAME = re.compile(r"([A-Z][a-z]+(?:[-'][A-Z][a-z]+)?)(?:[ \t]+([A-Z]\.|[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?)){1,2}")
_ONE = re.compile(r"[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?")

_SUFFIX = (r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Ter|"
           r"Close|Crescent|Cres|Parkway|Pkwy|Highway|Hwy|Square|Sq|Circle|Cir|Trail|Trl|Row|Mews|Gardens|Grove|"
           r"Hill|Walk|Plaza|Alley|Loop|Pike|Run|Crossing|Park")
_ADDRESS = re.compile(
    rf"\d{{1,6}}[A-Za-z]?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Z][a-z]+\.?[ \t]+){{1,4}}(?:{_SUFFIX})\b\.?"
    r"(?:[ \t]+(?:NW|NE|SW|SE|N|S|E|W)\b)?"
    r"(?:,?[ \t]+(?:Apt|Suite|Ste|Unit|Flat|#)\.?[ \t]*[A-Za-z0-9\-]+)?"
    r"(?:,[ \t]*[A-Z][a-z]+(?:[ \t][A-Z][a-z]+){0,2})?"
    r"(?:,?[ \t]*[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?)?"
    r"(?:,?[ \t]*[A-Z]{1,2}\d[A-Z\d]?[ \t]*\d[A-Z]{2})?")


# Keys that also name things (`name` of a tool, `owner` team, `author` bot): the lists must agree.
_AMBIGUOUS_KEYS = frozenset("name display_name displayname customer contact patient author assignee owner_name".split())


def is_person(value: str, key: str = "") -> bool:
    """A JSON value under a person-naming key: one to four capitalised words, from the lists."""
    words = value.split()
    if not 1 <= len(words) <= 4 or not all(_ONE.fullmatch(w) or re.fullmatch(r"[A-Z]\.", w) for w in words):
        return False
    first, last = lists()
    k = key.lower()
    if len(words) == 1:
        w = words[0].lower()
        return (w in first) if "first" in k or "given" in k else (w in last) if "last" in k or "sur" in k else False
    low = [w.lower().rstrip(".") for w in words]
    if set(low) & _STOP:
        return False
    # a key that can only hold a person (`full_name`, `customer_name`) takes any capitalised name
    return k not in _AMBIGUOUS_KEYS or low[0] in first or low[-1] in last


def find(text: str, low: bytes, shape: bytes, add: Add) -> None:
    _names(text, low, add)
    _addresses(text, shape, add)


def _names(text: str, low: bytes, add: Add) -> None:
    first, last = lists()
    seen = -1
    for cue in _CUES:
        i = low.find(cue)
        while i >= 0:
            if i > seen and (cue == b"holder" or not (i and low[i - 1:i].isalpha())):
                m = _CUE_RX.match(text, i)
                if m:
                    n = _NAME.match(text, m.end())
                    if n:
                        words = [w.lower() for w in n.group().split()]
                        strong = _STRONG.match(m.group())  # `my name is`, `Name:`, `Dear`, `Mr.`: any name
                        if not set(words) & _STOP and (strong or words[0] in first or words[-1] in last):
                            add(n.start(), n.end(), "person_name")
                            seen = n.end()
            i = low.find(cue, i + len(cue))


def _addresses(text: str, shape: bytes, add: Add) -> None:
    for head in (b"0 Aa", b"0A Aa"):  # `1600 Pennsylvania Ave`, `221B Baker Street`
        h = shape.find(head)
        while h >= 0:
            s = h
            while s > 0 and shape[s - 1] == 0x30:
                s -= 1
            if not (s and text[s - 1].isalnum()):
                m = _ADDRESS.match(text, s)
                if m:
                    add(m.start(), m.end(), "street_address")
                    h = shape.find(head, m.end())
                    continue
            h = shape.find(head, h + len(head))
