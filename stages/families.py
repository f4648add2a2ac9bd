"""More detector families for stages/detectors.py (issue 10): the secrets and PII real agent traces
carry beyond vendor tokens and `key=value`.

Same speed rule as detectors.py: no whole text is scanned with a pattern that starts with a character
class. A family starts where detectors.py already is (a token run's start for provider rules, a
`pass`/`auth` root hit for password syntax and Authorization, a digit span for national phone
numbers, an IPv6-looking colon group for MAC addresses) or from one literal `find` on the lower-cased
bytes (`cookie`, `mysql`, `passport`, ` dot `...), and runs its exact pattern only there, bounded to
the line or a short window that never crosses the batch separator's NUL. Findings go through the
Redactor's `_add`, so disabled detectors and the overlap merge work as for the others.

Provider tokens with no pattern in detectors.py come from a rule file loaded as data
(stages/rules/providers.json: id, prefixes, regex), tried only where a token starts with a prefix.
Encodings: `fold_windows` (NFKC, zero-width characters, homoglyphs), `json_unescape` (JSON text held in
a string) and `encoded_runs` (base64 and `%XX`) give text to scan again with offsets mapped back.
"""
from __future__ import annotations

import base64
import binascii
import bisect
import functools
import json
import re
import unicodedata
from pathlib import Path
from typing import Callable

Add = Callable[..., None]  # Redactor._add bound to an output list: add(start, end, detector, kind=None)

RULES_FILE = Path(__file__).with_name("rules") / "providers.json"


# --------------------------------------------------------------------------- provider rules (data)

@functools.lru_cache(maxsize=1)
def provider_rules() -> tuple[dict, dict[str, list[tuple[str, tuple[str, ...], re.Pattern]]]]:
    """(the file's header, {first two lower-case chars: [(rule id, prefixes, compiled regex)]})."""
    doc = json.loads(RULES_FILE.read_text(encoding="utf-8"))
    by_head: dict[str, list] = {}
    for r in doc["rules"]:
        prefixes = tuple(r["prefixes"])
        rule = (r["id"], prefixes, re.compile(r["regex"]))
        for head in sorted({p[:2] for p in prefixes}):
            by_head.setdefault(head, []).append(rule)
    return {k: v for k, v in doc.items() if k != "rules"}, by_head


def provider_at(text: str, s: int, add: Add) -> bool:
    """A provider token starting at `s` (the start of a token run), per the rule file."""
    rules = provider_rules()[1].get(text[s:s + 2].lower())
    if not rules:
        return False
    for _rid, prefixes, rx in rules:
        if text[s:s + 16].lower().startswith(prefixes):
            m = rx.match(text, s)
            if m and (s == 0 or not text[s - 1].isalnum()):
                add(*m.span(1), "provider_token")
                return True
    return False


# --------------------------------------------------------------------------- auth, cookies, URLs

_LINE_END = re.compile(r"[\r\n\x00]")


def _line_end(text: str, i: int) -> int:
    m = _LINE_END.search(text, i, i + 4096)
    return m.start() if m else min(len(text), i + 4096)


_COOKIE_ATTRS = frozenset("path domain expires max-age samesite httponly secure priority partitioned version comment".split())
_COOKIE_HEAD = re.compile(r"(?:set-)?cookie\\?[\"']?[ \t]*[:=][ \t]*\\?[\"']?|cookie[ \t]+|cookie\b[^\r\n]{0,20}?[ \t]\\?[\"']", re.I)
_CURL_B = re.compile(r"(?:^|[ \t])(?:-b|--cookie)[ \t]+[\"']?", re.M)
_PAIR = re.compile(r"[ \t]*([A-Za-z0-9_.\-$!#%&'*+^`|~]{1,128})=([^;\"'\r\n\\ ]{4,4096})")


def cookies(text: str, low: bytes, add: Add) -> None:
    """`Cookie: a=b; c=d`, `Set-Cookie: sid=...; Path=/`: every cookie value (not the attributes)."""
    i = low.find(b"cookie")
    while i >= 0:
        m = _COOKIE_HEAD.match(text, i)
        if m and not (i and text[i - 1].isalnum() and low[i - 4:i] != b"set-"):
            _pairs(text, m.end(), add)
        i = low.find(b"cookie", i + 6)


def _pairs(text: str, pos: int, add: Add) -> None:
    end = _line_end(text, pos)
    while pos < end:
        m = _PAIR.match(text, pos, end)
        if not m:
            return
        v = m.group(2)
        # a value, not a preference: `theme=dark`, `lang=en` are not credentials
        if m.group(1).lower() not in _COOKIE_ATTRS and len(v) >= 8 and (any(c.isdigit() for c in v) or not v.islower()):
            add(m.start(2), m.end(2), "cookie")
        pos = m.end()
        if pos < end and text[pos] == ";":
            pos += 1
        else:
            return


_AUTH_ANY = re.compile(r"""\\*["']?[ \t]*(?:[:=]|,[ \t]*\\*["']?value\\*["']?[ \t]*:)[ \t]*\\*["']?"""
                      r"""([A-Za-z][A-Za-z0-9\-]{1,20})[ \t]+([^\r\n"'\\]{6,2048})""", re.I)
_DIGEST_RESPONSE = re.compile(r"""response=\\*["']?([0-9a-fA-F]{16,128})""")


def authorization_at(text: str, i: int, add: Add) -> None:
    """`Authorization: <scheme> <credentials>` for any scheme but Bearer/Basic/Token (detectors.py's
    bearer_token has those): Bot, OAuth, Digest, SSWS, AWS4-HMAC-SHA256, SharedKey..."""
    m = _AUTH_ANY.match(text, i + 13)
    if m and m.group(1).lower() == "digest":  # the response hash proves the password: take it
        r = _DIGEST_RESPONSE.search(text, m.start(2), _line_end(text, m.start(2)))
        if r:
            add(*r.span(1), "auth_header")
        return
    if m and m.group(1).lower() not in ("bearer", "basic", "token"):
        cred = m.group(2).rstrip()
        if any(c.isdigit() for c in cred) and len(cred) >= 8 and not cred.startswith(("$", "<", "{")):
            add(m.start(2), m.start(2) + len(cred), "auth_header")


# Query parameters that carry a credential in a URL (signed URLs, SAS tokens, OAuth redirects).
_QS = re.compile(
    r"[?&;]((?:x-(?:amz|goog|ms)-)?(?:sig|signature|credential|security-token|code|"
    r"access_token|id_token|refresh_token|token|api_key|apikey|api-key|key|secret|client_secret|auth|"
    r"session|sessionid|sid|password|pwd|pass))=([^&\s\"'#<>\\)\]]{6,4096})", re.I)
_QS_SIGNED = frozenset({"sig", "signature", "x-amz-signature", "x-goog-signature", "x-amz-credential",
                        "x-goog-credential", "x-amz-security-token", "credential", "security-token"})
_URL_TAIL = re.compile(r"[^\s\"'<>]*")


def query_secrets(text: str, add: Add) -> None:
    q = text.find("?")
    while q >= 0:
        stop = _URL_TAIL.match(text, q).end()
        if stop - q > 8 and "=" in text[q:stop]:
            for m in _QS.finditer(text, q, stop):
                name, v = m.group(1).lower(), m.group(2)
                if v.lower() in ("true", "false", "null", "none") or v.startswith(("$", "{", "<")):
                    continue
                signed = name in _QS_SIGNED
                add(m.start(2), m.end(2), "signed_url" if signed else "secret_assignment",
                    "SIGNATURE" if signed else "TOKEN")
        q = text.find("?", max(stop, q + 1))


_HOOK = re.compile(r"(?:discord(?:app)?\.com/api/webhooks|webhook\.office\.com/webhookb2|"
                   r"outlook\.office\.com/webhook)/([A-Za-z0-9@/_\-.?=&%]{16,512})", re.A)


def webhooks(text: str, low: bytes, add: Add) -> None:
    i = low.find(b"webhook")
    while i >= 0:  # the host sits at most 20 chars before the word
        m = _HOOK.search(text, max(0, i - 20), min(len(text), i + 560))
        if m:
            add(m.start(1), m.end(1), "webhook")
        i = low.find(b"webhook", max(i + 7, m.end() if m else 0))


_PUTTY = re.compile(r"Private-Lines:[ \t]*\d+((?:(?:\r?\n|\\+r\\+n|\\+n)[A-Za-z0-9+/=]{4,})+)(?:(?:\r?\n|\\+r\\+n|\\+n)Private-MAC:[ \t]*([0-9a-fA-F]+))?")


def putty(text: str, add: Add) -> None:
    """A PuTTY .ppk private key: the Private-Lines block and its MAC."""
    for m in _PUTTY.finditer(text):
        add(m.start(1), m.end(2) if m.group(2) else m.end(1), "private_key")


# --------------------------------------------------------------------------- password syntax

_MYSQL = re.compile(r"(?:mysql|mysqldump|mysqladmin|mysqlsh|mysqlimport)\b[^\r\n|;&]{0,256}?[ \t]-p([^\s'\"]{2,256}|'[^'\r\n]{1,256}'|\"[^\"\r\n]{1,256}\")")
_DOCKER = re.compile(r"docker[ \t]+login\b[^\r\n|;&]{0,256}?[ \t](?:-p|--password)[ \t=]+('[^'\r\n]{1,256}'|\"[^\"\r\n]{1,256}\"|[^\s'\"]{1,256})")
_SSHPASS = re.compile(r"sshpass[ \t]+(?:-[a-oq-zA-Z][ \t]+\S+[ \t]+)*-p[ \t]*('[^'\r\n]{1,256}'|\"[^\"\r\n]{1,256}\"|[^\s'\"]{1,256})")
_HTPASSWD = re.compile(r"htpasswd[ \t]+-[a-zA-Z]*b[a-zA-Z]*(?:[ \t]+-[a-zA-Z]+)*[ \t]+\S+[ \t]+\S+[ \t]+('[^'\r\n]{1,256}'|\"[^\"\r\n]{1,256}\"|[^\s'\"]{1,256})")
_CURL_U = re.compile(r"(?:[ \t]-u[ \t]*|[ \t]--user[ \t=]+|[ \t]--proxy-user[ \t=]+)['\"]?([^\s:'\"@]{1,128}):([^\s'\"]{1,256})")
_NETRC = re.compile(r"(?:machine\s+\S{1,253}|default)(?:\s+(?:login|account|port)\s+\S{1,256}){0,3}\s+password\s+(\S{1,256})")
_NETRC_HEAD = re.compile(r"(?:machine|default)\b", re.I)
_XML = re.compile(r"<((?:[A-Za-z_][\w.\-]{0,40}:)?[A-Za-z_]{0,20}pass(?:word|wd|phrase)?[\w.\-]{0,20})(?:[ \t][^<>]{0,200})?>([^<\r\n]{1,512})</\1>", re.I)
# A password in prose that runs to several words: `my password is "correct horse battery staple"`
_PROSE_PW = re.compile(r"password(?: for [\w.@\-]{1,64})?(?: is| was| will be|:)[ \t]+(?:\"([^\"\r\n]{2,128})\"|'([^'\r\n]{2,128})'|`([^`\r\n]{2,128})`)", re.I)


_PROSE_PW_WORD = re.compile(r"password(?: for [\w.@\-]{1,64})?(?: is| was| will be| would be| is now| became)[ \t]+([^\s\"'`,;]{4,64}?)[.,;:!?)]?(?=\s|$)", re.I)
_PW_WORDS = frozenset("wrong incorrect correct invalid expired required missing empty blank null none weak strong "
                      "changed reset same different".split())


def _unquote(m: re.Match, g: int) -> tuple[int, int]:
    s, e = m.span(g)
    if e - s >= 2 and m.group(g)[0] in "'\"" and m.group(g)[-1] == m.group(g)[0]:
        return s + 1, e - 1
    return s, e


def commands(text: str, low: bytes, add: Add) -> None:
    """`mysql -pX`, `docker login -p X`, `curl -u user:X`, `curl -b 'sid=X'`."""
    if b"docker" in low:
        for m in _DOCKER.finditer(text):
            if not m.group(1).startswith(("$", "<")):
                add(*_unquote(m, 1), "password_cli")
    if b"mysql" in low:
        for m in _MYSQL.finditer(text):
            if not (m.start() and text[m.start() - 1].isalnum()):
                add(*_unquote(m, 1), "password_cli")
    if b"curl" in low:
        for m in _CURL_U.finditer(text):
            if not m.group(2).startswith(("$", "<")):
                add(m.start(2), m.end(2), "password_cli")
        for m in _CURL_B.finditer(text):
            _pairs(text, m.end(), add)


def pass_context(text: str, low: bytes, i: int, add: Add) -> None:
    """At a `pass` root: `sshpass -p X`, `htpasswd -b file user X`, a .netrc `password X`,
    `<password>X</password>`, and a quoted password of several words in prose."""
    if low.startswith(b"ssh", i - 3):
        m = _SSHPASS.match(text, i - 3)
        if m:
            add(*_unquote(m, 1), "password_cli")
        return
    if low.startswith(b"ht", i - 2):
        m = _HTPASSWD.match(text, i - 2)
        if m:
            add(*_unquote(m, 1), "password_cli")
        return
    if not low.startswith(b"password", i):
        return
    lt = text.rfind("<", max(0, i - 64), i)
    if lt >= 0 and (m := _XML.match(text, lt)) and m.end(1) > i:
        v = m.group(2)
        if not v.startswith(("$", "<", "{")) and v.strip("*xX. "):
            add(m.start(2), m.end(2), "password_cli")
        return
    if text.startswith(" ", i + 8) or text.startswith("\t", i + 8):
        for h in _NETRC_HEAD.finditer(text, max(0, i - 400), i):
            m = _NETRC.match(text, h.start())
            if m and m.start(1) > i and not m.group(1).startswith(("$", "<")):
                add(m.start(1), m.end(1), "password_cli")
                return
    m = _PROSE_PW.match(text, i)
    if m:
        g = m.lastindex or 1
        v = m.group(g)
        if " " in v.strip() and not v.startswith(("$", "<", "{")):  # one word is secret_assignment's
            add(m.start(g), m.end(g), "password_cli")
        return
    m = _PROSE_PW_WORD.match(text, i)  # `the password is hunter2`, `my password was Tr0ub4dor`
    if m:
        v = m.group(1)
        if (any(c.isdigit() for c in v) or not v.isalnum() or (not v.islower() and not v.istitle())) and \
                not v.startswith(("$", "<", "{", "*", "[")) and v.lower() not in _PW_WORDS:
            add(m.start(1), m.end(1), "password_cli")


# --------------------------------------------------------------------------- PII

# Context windows never cross the batch separator's NUL: what is found in a string depends on that
# string alone (stages.redact's clean cache and batched scans rest on it).
def _ahead(text: str, i: int, n: int) -> int:
    z = text.find("\x00", i, i + n)
    return min(len(text), i + n) if z < 0 else z


def _behind(text: str, i: int, n: int) -> int:
    z = text.rfind("\x00", max(0, i - n), i)
    return max(0, i - n) if z < 0 else z + 1


_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]{0,6}\.?"
_DATE = re.compile(
    rf"(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{2,4}}|\d{{1,2}}(?:st|nd|rd|th)?[ \t]+{_MONTHS}[ \t,]+\d{{4}}|{_MONTHS}[ \t]+\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]+\d{{4}})",
    re.I)
_WORD = re.compile(r"[a-z]+")
_DOB_GAP = frozenset("on is was date day of birth dob in the".split())
_PASSPORT = re.compile(r"[A-Z0-9]{6,9}(?![A-Za-z0-9])")
_SSN_PLAIN = re.compile(r"(?<!\d)(?!000|666|9)\d{3}[ ]?(?!00)\d{2}[ ]?(?!0000)\d{4}(?!\d)")
_MAC = re.compile(r"(?<![0-9A-Fa-f:\-])[0-9A-Fa-f]{2}([:\-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}(?![0-9A-Fa-f:\-])")
_LATLON = re.compile(r"(-?\d{1,2}\.\d{4,})°?[ \t]*[NS]?[ \t]*,[ \t]*(-?\d{1,3}\.\d{4,})°?")
_OBF_AT = re.compile(r"[ \t]*(?:\[at\]|\(at\)|\{at\}|<at>|\[@\]|\(@\)|at)[ \t]*", re.I)
_OBF_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9\-]{1,63}[ \t]*(?:\[dot\]|\(dot\)|\{dot\}|<dot>|[ \t]dot[ \t]|\.)[ \t]*){1,4}"
    r"(?:com|org|net|io|co|uk|de|fr|edu|gov|info|biz|me|us|ca|au|in|nl|es|it|jp|ch|se|dev|app|ai)(?![A-Za-z0-9])", re.I)
_OBF_LOCAL = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}(?:[ \t]+dot[ \t]+|[ \t]*[\[({<]dot[\])}>][ \t]*))*"
                        r"[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}$", re.I)
_OBF_MARKS = (b" at ", b"[at]", b"(at)", b"{at}", b"<at>", b"[@]", b"(@)")
_NOT_LOCAL = frozenset("look looking the a an this that it me us them him her you we they".split())


def pii(text: str, low: bytes, add: Add) -> None:
    """PII that only its context makes personal: a date after DOB/born/birth, a number after
    passport or SSN, a MAC address near `mac`, an address spelt out (`jane at acme dot com`)."""
    for w in (b"dob", b"born", b"birth"):
        i = low.find(w)
        while i >= 0:
            j = i + len(w)
            # a word of its own (`DOB:`, `born`, `birth date`), not `dobrba`, `stubborn`
            if not (i and low[i - 1:i].isalpha()) and not (w != b"birth" and low[j:j + 1].isalpha()):
                m = _DATE.search(text, j, _ahead(text, j, 40))
                # only a few words may sit between: `DOB: x`, `born on x`, `date of birth is x`
                if m and set(_WORD.findall(low[j:m.start()].decode("latin-1"))) <= _DOB_GAP:
                    add(m.start(), m.end(), "dob")
            i = low.find(w, j)
    i = low.find(b"passport")
    while i >= 0:
        for m in _PASSPORT.finditer(text, i + 8, _ahead(text, i + 8, 40)):
            if any(c.isdigit() for c in m.group()):
                add(m.start(), m.end(), "passport")
                break
        i = low.find(b"passport", i + 8)
    for w in (b"ssn", b"social sec"):
        i = low.find(w)
        while i >= 0:
            m = _SSN_PLAIN.search(text, i + len(w), _ahead(text, i + len(w), 32))
            if m:
                add(m.start(), m.end(), "ssn")
            i = low.find(w, i + len(w))
    i = low.find(b"mac")
    while i >= 0:  # `aa-bb-cc-dd-ee-ff` near mac/macaddress (the colon form is found without a word)
        for m in _MAC.finditer(text, i, _ahead(text, i, 80)):
            add(m.start(), m.end(), "mac_address")
        i = low.find(b"mac", i + 3)
    if b" dot " in low or b"[at]" in low or b"(at)" in low:
        for mark in _OBF_MARKS:
            i = low.find(mark)
            while i >= 0:
                _obfuscated_email(text, i + (1 if mark == b" at " else 0), mark != b" at ", add)
                i = low.find(mark, i + len(mark))


def date_value(v: str) -> bool:
    return len(v) <= 40 and _DATE.fullmatch(v.strip()) is not None


def passport_value(v: str) -> bool:
    v = v.strip()
    return _PASSPORT.fullmatch(v) is not None and any(c.isdigit() for c in v)


def ssn_value(v: str) -> bool:
    return _SSN_PLAIN.fullmatch(v.strip()) is not None or re.fullmatch(r"\d{3}-\d{2}-\d{4}", v.strip()) is not None


def mac_at(text: str, i: int, add: Add) -> bool:
    """A colon-separated MAC address around `i` (where the IPv6 detector found colon groups)."""
    m = _MAC.search(text, max(0, i - 3), min(len(text), i + 20))
    if m:
        add(m.start(), m.end(), "mac_address")
        return True
    return False


def _obfuscated_email(text: str, i: int, bracketed: bool, add: Add) -> None:
    """`jane at acme dot com`, `bob [at] corp [dot] io` with the marker at `i`."""
    j = i
    while j > 0 and text[j - 1] in " \t":
        j -= 1
    lm = _OBF_LOCAL.search(text, max(0, j - 100), j)
    if lm is None or lm.group().lower() in _NOT_LOCAL:
        return
    at = _OBF_AT.match(text, lm.end())
    dom = _OBF_DOMAIN.match(text, at.end()) if at else None
    if dom is None:
        return
    d = dom.group().lower()
    if not bracketed and "dot" not in d:
        return  # `meet at example.com` is a site, not an obfuscated address
    add(lm.start(), dom.end(), "email")


# Four decimals (~10 m) locate a person only with a personal context; five or more always do.
_GEO_WORDS = re.compile(r"gps|seen at|located at|lives|my location|current location|last known|whereabouts", re.I)


_HEMI = re.compile(r"[ \t]*[EW]\b")  # `37.7749 N, 122.4194 W`: a hemisphere letter says it is a place
_MAP_WORDS = re.compile(r"lat|lon|lng|loc|coord|gps|position|geo|map|place|@|ll=|q=", re.I)


def latlon(text: str, shape: bytes, add: Add) -> None:
    """`51.50735, -0.12776`: two decimal degrees with >= 4 decimals each, in range."""
    h = shape.find(b"0.0000")
    while h >= 0:
        s = h
        while s > 0 and text[s - 1].isdigit():
            s -= 1
        if s and text[s - 1] == "-":
            s -= 1
        m = _LATLON.match(text, s)
        if m and abs(float(m.group(1))) <= 90 and abs(float(m.group(2))) <= 180 and (s == 0 or not text[s - 1].isalnum()) and (
                _GEO_WORDS.search(text, _behind(text, s, 40), s) or "°" in m.group() or _HEMI.match(text, m.end()) or (
                    min(len(m.group(1).split(".")[1]), len(m.group(2).split(".")[1])) >= 5
                    # `0.734512,0.812345` in a CSV of losses is not a place: written without a space,
                    # a pair needs a map context (`"loc":`, `@`, `ll=`, `coords`)
                    and (" " in m.group() or "°" in m.group() or _MAP_WORDS.search(text, _behind(text, s, 24), s)))):
            add(m.start(), m.end(), "geo")
            h = shape.find(b"0.0000", m.end())
            continue
        h = shape.find(b"0.0000", h + 6)


_PHONE_WORDS = re.compile(r"phone|tel\b|tel:|mobile|cell|call|fax|whatsapp|sms|text me|ring|contact|number", re.I)
_SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}")
_REGIONS = ("GB", "DE", "FR", "IN", "AU", "US", "IT", "ES", "NL", "BR", "JP", "IE", "CA", "MX", "ZA", "NG")


@functools.lru_cache(maxsize=1)
def _pn():
    import phonenumbers  # Google's libphonenumber port: every region's numbering plan

    return phonenumbers


def national_phone(text: str, s: int, e: int, add: Add) -> None:
    """A digit span that the US/international patterns did not take: a national-format number
    (`07700 900123`, `030 1234567`) when libphonenumber says it is a possible number of a region and
    either a phone word precedes it or it is written the national way (leading 0, grouped)."""
    if (s and text[s - 1].isalnum()) or (e < len(text) and text[e].isalnum()):
        return  # glued to a word: `rollout-2026-11-01T08-52-00-90083fa6` (a file name), a hex id, a version
    cand = text[s:e].strip(" .-()")
    digits = sum(c.isdigit() for c in cand)
    # National formats start with the trunk 0 (`07700 900123`, `030 1234567`); others are left to the
    # US and international patterns. `00` starts an international prefix, `000-12-3456` an SSN shape.
    if not 9 <= digits <= 13 or cand[0] != "0" or cand[1] == "0" or _SSN_SHAPE.fullmatch(cand):
        return
    grouped = any(c in cand for c in " -")
    lo = max(0, s - 40)
    if (z := text.rfind("\x00", lo, s)) >= 0:
        lo = z + 1  # context never reaches into the previous string of a batch
    if not grouped and not _PHONE_WORDS.search(text, lo, s):
        return
    pn = _pn()
    for region in _REGIONS:
        try:
            num = pn.parse(cand, region)
        except pn.NumberParseException:
            continue
        if pn.is_valid_number(num) or (grouped and pn.is_possible_number(num)):
            st = text.index(cand, s)
            add(st, st + len(cand), "phone")
            return


# --------------------------------------------------------------------------- encodings

# Zero-width and bidi marks: dropped before scanning. NBSP, fullwidth forms and other compatibility
# characters are folded by NFKC; Cyrillic and Greek letters that look Latin, by this table.
_ZW = frozenset("\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e")
_HOMO = str.maketrans("аеорсхуіѕјԁһӏАВЕКМНОРСТХУІЅЈοαερτυνκΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
                      "aeopcxyisjdhlABEKMHOPCTXYISJoaeptuvkABEZHIKMNOPTYX")
_SUSPECT = re.compile("[\u00a0\u00ad\u200b-\u200f\u2060-\u2064\ufeff\uff01-\uff5e\u180e]|"
                      "[A-Za-z][\u0370-\u03ff\u0400-\u04ff]|[\u0370-\u03ff\u0400-\u04ff][A-Za-z]")
_WINDOW = 512


def fold_windows(text: str) -> list[tuple[str, list[int]]]:
    """(folded window, original index of each of its chars, plus the window's end) around each place
    where zero-width chars, NBSP, fullwidth forms or Latin-looking Cyrillic/Greek letters touch the
    text. Windows stop at a line end (so at the batch separator too): a string folds the same alone
    or batched."""
    if text.isascii():
        return []
    out, pos = [], 0
    while (m := _SUSPECT.search(text, pos)) is not None:
        i = m.start()
        s = max(text.rfind("\n", max(0, i - _WINDOW), i) + 1, i - _WINDOW, 0)
        e = text.find("\n", i, i + _WINDOW)
        e = min(len(text), i + _WINDOW) if e < 0 else e
        chars, idx = [], []
        for j in range(s, e):
            c = text[j]
            if c in _ZW:
                continue
            n = c if c.isascii() else unicodedata.normalize("NFKC", c).translate(_HOMO)
            for ch in n:
                chars.append(ch)
                idx.append(j)
        idx.append(e)
        out.append(("".join(chars), idx))
        pos = e + 1
    return out


_B64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{16,8192}={0,2}")
_PCT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~+\-=&:/@!$'()*,;])*%[0-9A-Fa-f]{2}(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~+\-=&:/@!$'()*,;])*")


def b64_text(run: str) -> str | None:
    """The text a base64 (or base64url) run decodes to, when it is printable text; else None."""
    body = run.rstrip("=")
    if len(body) % 4 == 1 or body.lower() == body or body.upper() == body:
        return None  # base64 of text has both cases; identifiers in one case are not base64
    pad = "=" * (-len(body) % 4)
    try:
        raw = (base64.urlsafe_b64decode if ("-" in body or "_" in body) else base64.b64decode)(body + pad)
        dec = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if len(dec) < 8 or sum(c.isprintable() or c in "\n\t\r" for c in dec) < 0.95 * len(dec):
        return None
    return dec


def encoded_runs(text: str, tok: bytes, min_len: int = 16) -> list[tuple[int, int, str]]:
    """(start, end, decoded) for base64 runs that decode to text and `%XX` runs that hold escapes."""
    out = []
    pos = 0
    needle = b"t" * min_len
    while (s := tok.find(needle, pos)) >= 0:
        e = tok.find(b" ", s)
        e = len(text) if e < 0 else e
        pos = e
        m = _B64_RUN.match(text, s, e + 2)
        if m and (dec := b64_text(m.group())) is not None:
            out.append((m.start(), m.end(), dec))
    if "%" in text:
        from urllib.parse import unquote

        i = text.find("%")
        while i >= 0:
            st = i
            while st > 0 and (text[st - 1].isalnum() or text[st - 1] in "._~+-=&:/@"):
                st -= 1
            m = _PCT_RUN.match(text, st)
            if m and m.end() > i:
                dec = unquote(m.group())
                if dec != m.group():
                    out.append((m.start(), m.end(), dec))
                i = text.find("%", m.end())
            else:
                i = text.find("%", i + 1)
    return out


_ESC = re.compile(r'\\(["\\/bfnrt])')
_ESC_MAP = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def json_unescape(text: str) -> tuple[str, list[tuple[int, int]]] | None:
    """`text` with one level of JSON string escapes undone, and the segments [(unescaped start,
    original start)] that map offsets back; None when there is nothing to undo."""
    parts, segs, pos, out_len = [], [(0, 0)], 0, 0
    for m in _ESC.finditer(text):
        chunk = text[pos:m.start()]
        parts.append(chunk)
        out_len += len(chunk)
        parts.append(_ESC_MAP[m.group(1)])
        segs.append((out_len, m.start()))  # the unescaped char comes from the two-char escape
        out_len += 1
        segs.append((out_len, m.end()))
        pos = m.end()
    if pos == 0:
        return None
    parts.append(text[pos:])
    return "".join(parts), segs


def map_back(segs: list[tuple[int, int]], i: int) -> int:
    """An offset in unescaped text -> the offset in the text it came from."""
    k = bisect.bisect_right(segs, (i, float("inf"))) - 1
    new, orig = segs[k]
    return orig + (i - new)
