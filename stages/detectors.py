"""Text-level PII and secret detectors, and the per-trace placeholder table, for the `redact` stage.

Speed: CPython's `re` is fast (~1 GB/s) only when a pattern starts with a literal; a pattern that
starts with a character class or a lookbehind is tried at every position (~10 ns a char). So no
text is scanned with one. Per text, `bytes.translate` builds a "run" string (token chars -> 'w')
and a "shape" string (digits -> '0', letters -> 'A'/'a'), and literal `find`s on them locate the
few candidates: runs of >= 20 token chars (every vendor token is one), digit spans, IBAN heads.
Keyword detectors start from `find` hits of a few roots (pass, token, key, ...), emails from '@',
URL credentials from '://'. Exact patterns and validators (Luhn, mod-97, `ipaddress`, entropy) run
only there, anchored or bounded, so pathological input stays linear.

Correctness: overlapping findings merge into one span that takes the kind of the highest-priority
detector (DETECTORS order), so nothing is half-replaced. Redaction is idempotent: placeholders
never match, and a rescan catches what a replacement exposes (see `Redactor._settle`).
"""
from __future__ import annotations

import bisect
import collections
import functools
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from stages import families, names
from stages.luhn import luhn_ok

__all__ = ["BATCH_SEP", "DETECTORS", "PLACEHOLDER_RE", "Finding", "Placeholders", "Redactor", "merge_findings",
           "prefilter_database", "rule_sets", "structural_secrets"]


@dataclass(frozen=True, slots=True)
class Finding:
    detector: str  # e.g. "email", "aws_access_key"
    kind: str  # placeholder type, e.g. "EMAIL", "AWS_KEY"
    start: int  # span of the VALUE to replace (for key=value only the value)
    end: int


# detector -> placeholder kind. The order is also the priority when findings overlap: specific
# formats first, then context-based, then generic shapes.
KINDS = {
    "canary": "SECRET",  # a team's declared must-never-appear string (params redact.canaries)
    "private_key": "PRIVATE_KEY",
    "jwt": "JWT",
    "url_password": "PASSWORD",
    "email": "EMAIL",
    "aws_access_key": "AWS_KEY",
    "github_token": "GITHUB_TOKEN",
    "gitlab_token": "GITLAB_TOKEN",
    "slack_token": "SLACK_TOKEN",
    "slack_webhook": "SLACK_WEBHOOK",
    "stripe_key": "STRIPE_KEY",
    "anthropic_key": "ANTHROPIC_KEY",
    "openai_key": "OPENAI_KEY",
    "huggingface_token": "HF_TOKEN",
    "google_api_key": "GOOGLE_API_KEY",
    "ds_artifactory": "ARTIFACTORY_KEY",
    "ds_azure_storage_key": "AZURE_KEY",
    "ds_discord": "DISCORD_TOKEN",
    "ds_mailchimp": "MAILCHIMP_KEY",
    "ds_npm": "NPM_TOKEN",
    "ds_pypi": "PYPI_TOKEN",
    "ds_sendgrid": "SENDGRID_KEY",
    "ds_square_oauth": "SQUARE_SECRET",
    "ds_telegram": "TELEGRAM_TOKEN",
    "ds_twilio": "TWILIO_KEY",
    "provider_token": "TOKEN",  # stages/rules/providers.json, loaded as data
    "webhook": "WEBHOOK",
    "aws_secret_key": "AWS_SECRET",
    "secret_assignment": "SECRET",  # refined by the key name: PASSWORD, API_KEY, TOKEN, SECRET
    "bearer_token": "TOKEN",
    "auth_header": "TOKEN",  # Authorization with any scheme (Basic, Bot, OAuth, Token, Digest)
    "cookie": "COOKIE",
    "signed_url": "SIGNATURE",
    "password_cli": "PASSWORD",  # mysql -pX, sshpass -p X, htpasswd -b u X, curl -u u:X, .netrc, <password>
    "credit_card": "CREDIT_CARD",
    "iban": "IBAN",
    "ssn": "SSN",
    "phone": "PHONE",
    "person_name": "NAME",  # only with params redact.names (stages/names.py)
    "street_address": "ADDRESS",
    "dob": "DOB",
    "passport": "PASSPORT",
    "mac_address": "MAC",
    "geo": "LOCATION",
    "ipv6": "IP",
    "ipv4": "IP",
    "home_path": "HOME",
    "entropy": "SECRET",
    "encoded": "SECRET",  # a base64 or %XX run whose decoded text holds a finding (takes that finding's kind)
}
DETECTORS: tuple[str, ...] = tuple(KINDS)
PRIORITY = {name: i for i, name in enumerate(DETECTORS)}  # detector -> rank when findings overlap (lower wins)

# Kinds are upper-case and the number follows '_', so a placeholder is never a token-run, an
# entropy candidate (no lower case) or an email local part on its own.
PLACEHOLDER_RE = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d+)>")


class Placeholders:
    """Per-trace placeholder table: the same (kind, value) always gets the same `<KIND_n>` within a trace."""

    __slots__ = ("counts", "_ids", "_next", "_taken")

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()  # detector -> replacements
        self._ids: dict[tuple[str, str], str] = {}
        self._next: dict[str, int] = {}
        self._taken: set[str] = set()

    def reserve(self, text: str) -> None:
        """Note placeholder-looking tokens already in the text so new ones never collide."""
        if "<" in text:
            self._taken.update(m.group() for m in PLACEHOLDER_RE.finditer(text))

    def get(self, kind: str, value: str) -> str:
        key = (kind, value)
        ph = self._ids.get(key)
        if ph is None:
            n = self._next.get(kind, 0)
            while True:  # skip numbers the input already uses: they would merge two values
                n += 1
                ph = f"<{kind}_{n}>"
                if ph not in self._taken:
                    break
            self._next[kind] = n
            self._ids[key] = ph
        return ph


# --------------------------------------------------------------------------- shape strings

_TOKEN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_RUN_T = bytes(0x77 if i in _TOKEN_BYTES else 0x20 for i in range(256))
_SHAPE_T = bytes(
    0x30 if 0x30 <= i <= 0x39 else 0x41 if 0x41 <= i <= 0x5A else 0x61 if 0x61 <= i <= 0x7A else i
    for i in range(256)
)
_TOK_T = bytes(0x74 if i in _TOKEN_BYTES or i in b"+/~" else 0x20 for i in range(256))  # base64-ish chars
_LONG_RUN = b"w" * 20  # every vendor token is a run of >= 20 token chars
_DIGIT_SPAN = re.compile(rb"0[0 .()\-]{5,}0")  # >= 7 chars of digits and phone/card/IP separators

# --------------------------------------------------------------------------- token runs

# Every alternative is matched at the start of a run of >= 20 token chars ([A-Za-z0-9_-]).
_MY_TOKENS = {
    "jwt": r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",  # header or payload is a long run
    "aws_access_key": r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}(?![A-Za-z0-9])",
    "github_token": r"gh[pousr]_[A-Za-z0-9]{36,251}(?![A-Za-z0-9])|github_pat_[A-Za-z0-9_]{22,255}(?![A-Za-z0-9_])",
    "gitlab_token": r"(?:glpat|gldt|glft|glsoat|glrtr?|glcbt|glimt|glptt|glagent|gloas|glffct)-[A-Za-z0-9_\-]{20,}|GR1348941[A-Za-z0-9_\-]{20,50}(?![A-Za-z0-9_\-])",
    "slack_token": r"xox[abposre]-[A-Za-z0-9\-]{10,}|xapp-\d-[A-Za-z0-9\-]{10,}",
    "stripe_key": r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,247}(?![A-Za-z0-9])|whsec_[A-Za-z0-9]{24,}",
    "anthropic_key": r"sk-ant-[A-Za-z0-9_\-]{20,}",
    "openai_key": r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",
    "huggingface_token": r"hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9_\-])",
    "google_api_key": r"AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])",
}

# detect-secrets plugins whose denylist regexes we reuse: class name -> (detector, how it is found).
# "run": matched at the start of a long token run; "line": a keyword-gated search in the line.
# Skipped plugins duplicate a detector above (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, JWT,
# private key, basic auth, public IP) or are keyword-context rules that `secret_assignment` covers
# (Cloudant, IBM, SoftLayer, keyword, entropy). Artifactory's `AP[\dA-F]...` password pattern is
# dropped because it fires on ordinary CamelCase identifiers (see the tests).
_DS_PLUGINS = {
    "ArtifactoryDetector": ("ds_artifactory", "run"),
    "AzureStorageKeyDetector": ("ds_azure_storage_key", "line"),
    "DiscordBotTokenDetector": ("ds_discord", "run"),
    "MailchimpDetector": ("ds_mailchimp", "run"),
    "NpmDetector": ("ds_npm", "line"),
    "PypiTokenDetector": ("ds_pypi", "run"),
    "SendGridDetector": ("ds_sendgrid", "run"),
    "SquareOAuthDetector": ("ds_square_oauth", "run"),
    "TelegramBotTokenDetector": ("ds_telegram", "run"),
    "TwilioKeyDetector": ("ds_twilio", "run"),
}
_DS_DROP = (re.compile(r"AP\[\\dABCDEF\]"),)
_DS_EDGES = (r'(?:\s|=|:|"|^)', r'(?:\s|"|$)')  # delimiters we replace with our own run boundary
_DS_LINE_GATES = {"ds_azure_storage_key": b"accountkey=", "ds_npm": b"_authtoken="}


def _ds_patterns() -> dict[str, list[re.Pattern]]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    by_name = {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}
    out: dict[str, list[re.Pattern]] = {}
    for cls_name, (det, _) in _DS_PLUGINS.items():
        pats = [p for p in getattr(by_name.get(cls_name), "denylist", ()) if not any(d.search(p.pattern) for d in _DS_DROP)]
        out[det] = pats
    return out


def _build_token_re(ds: dict[str, list[re.Pattern]]) -> re.Pattern:
    alts = [f"(?P<{name}>{pat})" for name, pat in _MY_TOKENS.items()]
    for det, mode in _DS_PLUGINS.values():
        if mode != "run" or not ds[det]:
            continue
        parts = []
        for p in ds[det]:
            src = p.pattern
            for edge in _DS_EDGES:
                src = src.replace(edge, "")
            if re.compile(src).groups:
                raise ValueError(f"{det}: capturing groups in a run pattern are not supported")
            flags = "i" if p.flags & re.IGNORECASE else ""
            parts.append(f"(?{flags}:{src})" if flags else f"(?:{src})")
        alts.append(f"(?P<{det}>(?:{'|'.join(parts)})(?![A-Za-z0-9]))")
    return re.compile("|".join(alts), re.ASCII)


_DS = _ds_patterns()
_TOKEN_AT = _build_token_re(_DS)
_DS_LINE = {
    det: [re.compile(p.pattern, (p.flags & ~re.U) | re.A) for p in _DS[det]]
    for det, mode in _DS_PLUGINS.values()
    if mode == "line"
}

_SLACK_HOOK = re.compile(r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/+\-]{8,}+", re.A)
_PEM_BEGIN = re.compile(r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----")
# A block cut off before END: take the base64 and header lines that follow (newlines may be escaped).
_PEM_BODY = re.compile(r"(?:(?:\r?\n|\\r\\n|\\n)[ \t]*(?:[A-Za-z0-9+/=]{4,}+|[A-Za-z][A-Za-z\-]*: [^\r\n\\]*+))*+")
_PEM_MAX = 65536

# --------------------------------------------------------------------------- numbers

_SSN = re.compile(r"(?<![\w.\-])(?!000|666|9)\d{3}-(?!00)\d\d-(?!0000)\d{4}(?![\w\-]|\.\d)", re.A)
_PHONE_US = re.compile(
    r"(?<![\w+.\-])(?:\+?1[ .\-]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .\-])[2-9]\d\d[ .\-]\d{4}(?![\w\-]|\.\d)", re.A
)
_PHONE_INTL = re.compile(r"(?<![\w+])\+[2-9]\d{0,2}(?:[ .\-]?\(?\d{1,4}+\)?){2,6}+(?!\w|\.\d)", re.A)
_CARD = re.compile(r"(?<![\w.+\-])\d(?:[ \-]?\d){12,18}(?![\w\-]|\.\d)", re.A)  # backs off a trailing group
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", re.A)
_V6_HINT = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_V6_CHARS = re.compile(r"[0-9A-Fa-f:]*")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)", re.A)
_IBAN = re.compile(r"[A-Z]{2}\d\d(?: ?[A-Z0-9]){11,32}+", re.A)
_IBAN_LEN = dict(
    (e[:2], int(e[2:]))
    for e in (
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18"
        " DO28 EE20 EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23"
        " IS26 IT27 JO30 KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31"
        " MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24"
        " SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20 YE30"
    ).split()
)

# --------------------------------------------------------------------------- emails, URLs, homes

# The local part is read backwards from '@'. A placeholder may be part of it, so that
# `<EMAIL_1>@evil.com` is still an address rather than a way to smuggle one past the redactor.
_LOCAL_REV = re.compile(r"(?:[A-Za-z0-9._%+\-]|>\d+_[A-Z0-9_]*[A-Z]<)+", re.A)
_LOCAL_MAX = 128
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![A-Za-z0-9])", re.A)
_URL_CRED = re.compile(r"[^\s:/?#\[\]@\"'<>]{0,128}:([^\s/?#\[\]@\"'<>]{1,256})@")
_HOME_NIX = re.compile(r"/(?:home|Users)/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}(?![A-Za-z0-9_.\-])", re.A)
_HOME_WIN = re.compile(
    r":(?:\\\\|\\|/)[Uu][Ss][Ee][Rr][Ss](?:\\\\|\\|/)"
    r"(?:[A-Za-z0-9_.\-]{1,64}(?: [A-Za-z0-9_.\-]{1,64}){0,3}(?=[\\/])|[A-Za-z0-9_.\-]{1,64}(?![A-Za-z0-9_.\-]))",
    re.A,
)
# `~name` alone is also Python's bitwise not (`x & ~mask`), so it counts only before '/', a line end or a quote.
_TILDE = re.compile(r"~[a-z_][a-z0-9_\-]{0,31}(?=/|$|[\r\n\"'`:])", re.A | re.M)
_HOME_USER = re.compile(r"(?:~|/(?:home|Users)/|[A-Za-z]:(?:\\\\|\\|/)[Uu][Ss][Ee][Rr][Ss](?:\\\\|\\|/))([^/\\]+)")
_NOT_A_USER = frozenset({"shared", "public", "default", "default user", "all users", "guest"})

# --------------------------------------------------------------------------- keyword contexts

# Under 20 chars only these can start a finding: digits, '@', URL/IPv6/drive colons, paths, keywords.
_SHORT_HINT = re.compile(r"[0-9@:~/]|pass|pwd|secret|token|key|auth|cred|bearer")
_ROOTS = (b"pass", b"pwd", b"secret", b"token", b"key", b"auth", b"cred")
_ROOT_STRS = tuple(r.decode() for r in _ROOTS)
# The last word of a key (root + what may follow it) -> assignment kind; None marks a word that is
# only context for the entropy detector (`key`, `tokens`), since `key: value` is not a secret by itself.
_KEY_WORDS: dict[str, str | None] = {
    **dict.fromkeys(("password", "passwd", "passphrase", "passcode", "pass", "pwd"), "PASSWORD"),
    **dict.fromkeys(("token", "auth"), "TOKEN"),
    **dict.fromkeys(("secret", "secretkey", "secret_key", "secret-key", "credential", "credentials", "creds"), "SECRET"),
    **dict.fromkeys(("key", "keys", "tokens", "secrets", "passwords"), None),
}
_KEY_WORDS_B = frozenset(w.encode() for w in _KEY_WORDS)
# `key` names a secret only after one of these (api_key, apiKey, privateKey); `client_key` may be a path.
_KEY_PREFIXES = {"api": "API_KEY", "access": "SECRET", "private": "SECRET", "signing": "SECRET",
                 "encryption": "SECRET", "master": "SECRET"}
_KEY_PREFIX_SIZES = sorted({len(p) for p in _KEY_PREFIXES}, reverse=True)
_GLUED_OK = frozenset({"password", "passwd", "passphrase", "passcode", "token", "secret", "secretkey", "key",
                       "credentials"})
# Every key key_value can accept holds one of these (secret words, header names, PII words).
_KEY_HINT = re.compile(r"pass|pwd|secret|token|key|auth|cred|cookie|sig|birth|dob|ssn|social|mail")
# JSON keys whose string value is a person's name (checked against the name lists: `names.is_person`).
_PERSON_KEYS = frozenset("""name full_name fullname first_name firstname given_name last_name lastname surname family_name
display_name displayname customer_name customer contact_name contact patient_name patient recipient_name
sender_name author assignee owner_name account_holder cardholder card_holder employee_name user_full_name""".split())
# Header names whose whole value is a credential, as JSON keys: header -> detector.
_HEADER_KEYS = {"authorization": "auth_header", "proxy-authorization": "auth_header", "cookie": "cookie",
                "set-cookie": "cookie", "x-amz-security-token": "auth_header", "x-goog-signature": "signed_url",
                "x-amz-signature": "signed_url"}

_ASSIGN = re.compile(
    r"""(?:\\?["'])?\]?[ \t]*(?:=>|:=|[:=])[ \t]*(?:
        "(?P<dq>[^"\r\n]{1,512})"
      | '(?P<sq>[^'\r\n]{1,512})'
      | \\"(?P<eq>[^"\\\r\n]{1,512})\\"
      | (?P<bare>(?!=)[^\s"'`,;<>(){}\[\]\\|]{1,512}))""",
    re.X,
)
_SIBLING = re.compile(
    r"""\\*["']?[ \t]*(?:,[ \t]*|\r?\n[ \t]*-?[ \t]*|(?:\\+n)[ \t]*-?[ \t]*)\\*["']?(?:value|Value|val|default|secret)\\*["']?[ \t]*[:=][ \t]*"""
    r"""\\*["']?([^"'\\\r\n,}{ ]{1,512})""")
_FLAG = re.compile(r"""[ \t]+(?P<bare>[^\s"'`<>\-$][^\s"'`<>]{0,511})""")
_BEARER = re.compile(r"[ \t]+([A-Za-z0-9\-._~+/]{8,}+=*)", re.A)
_AUTH_HEADER = re.compile(
    r"""\\?["']?[ \t]*[:=][ \t]*\\?["']?(?:(?:[Bb]asic|[Tt]oken)[ \t]+)?([A-Za-z0-9\-._~+/]{8,}+=*)""", re.A
)
_NULLISH = frozenset(
    "none null nil true false undefined yes no on off empty required optional str string bytes int bool"
    " any object secretstr redacted masked hidden".split()
)
_MASK = frozenset("*•xX#.-_ ")
# More lower-case words up to the line's end after a bare password: a passphrase of several words.
_PHRASE = re.compile(r"(?:[ \t]+[a-z]{2,24}){2,7}(?=[ \t]*(?:$|[\r\n\x00.,;\"'`)]))", re.M)
_PROSE_WORDS = frozenset("the a an and or but then for to in on at of with from by is are was be it this that "
                         "run make use try please so if not no yes".split())
_FILLER = re.compile(r"([xX0*#.])\1{7,}")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", re.A)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*", re.A)
_HEXISH = re.compile(r"[0-9a-fA-F\-]+")
_HEX_SECRET = re.compile(r"(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]+|(?=[0-9A-F]*[A-F])(?=[0-9A-F]*[0-9])[0-9A-F]+")


# Only separators (and `is`) between the word and a hex value: `secret sauce: <sha>` is a digest.
_HEX_GAP = re.compile(r"""[ \t"':=>]{0,4}(?:is[ \t]+|was[ \t]+)?""")


_FULL_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}")


def _pii_key(stem: str, value: str) -> tuple[str, str] | None:
    """`{"birthdate": "1990-05-15"}`, `{"passport_no": "X1234567"}`, `{"ssn": "123456789"}`: PII whose
    key names it, as the scan would find it after the word. `{"email": "jd@example.com"}`: an address in a field
    that holds someone's address is theirs, even on a documentation domain (those are kept only in prose, where they
    are examples: the glaive tool-call file signs a user up with one)."""
    if "mail" in stem and _FULL_EMAIL.fullmatch(value):
        return "email", "EMAIL"
    if "birth" in stem or stem in ("dob", "date_of_birth", "birthday", "bday"):
        return ("dob", "DOB") if families.date_value(value) else None
    if "passport" in stem:
        return ("passport", "PASSPORT") if families.passport_value(value) else None
    if stem in ("ssn", "social_security_number", "social_security", "ssn_number"):
        return ("ssn", "SSN") if families.ssn_value(value) else None
    return None


def _strong_key(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in ("token", "secret", "password", "passwd", "apikey", "api_key", "api-key", "signing"))
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _key_kind(key: str, r: int) -> tuple[str | None, bool]:
    """(assignment kind or None, is-context) for `key`, whose root word starts at `r`."""
    k = key.lower()
    word = k[r:].rstrip("0123456789_-")
    if word not in _KEY_WORDS:
        return None, False  # `token_count`, `passed`, `keyboard`
    kind, j = _KEY_WORDS[word], r
    p_end = r - 1 if r and k[r - 1] in "_-" else r  # end of the word before the root
    if word == "key":
        for size in _KEY_PREFIX_SIZES:
            if size <= p_end and (pkind := _KEY_PREFIXES.get(k[p_end - size : p_end])):
                kind, j = pkind, p_end - size
                break
    elif word == "secret" and k.endswith("client", 0, p_end):
        j = p_end - 6  # `clientsecret` is one component
    # The word must start a component: `db_password`, `dbPassword`, `--password`; not `bypass`.
    if j == 0 or k[j - 1] in "_-" or (key[j].isupper() and not key[j - 1].isupper()):
        return kind, True
    # A glued name of one case (`PGPASSWORD`, `VAULTTOKEN`, `XAPIKEY`, `csrftoken`): only strong words,
    # never `pass`/`pwd`/`auth` (`bypass`, `OLDPWD`, `oauth`).
    if kind is not None and word in _GLUED_OK and (key.isupper() or key.islower()) and key[:j].isalpha():
        return kind, True
    return None, False


# Masks that logs and frameworks write in place of a secret (`[FILTERED]`, `<redacted>`, `***`): kept.
_MASK_WORD = re.compile(r"[\[(<{*]*\s*(?:filtered|redacted|masked|hidden|removed|omitted|secret|password|sensitive|"
                        r"scrubbed|censored|elided|private|x+|\*+)\s*[\])>}*]*", re.I)


def _plausible_value(v: str, kind: str, bare: bool, nxt: str) -> bool:
    """False for values that are clearly not a literal secret: refs, masks, code, plain words."""
    if not v or v[0] in "$%{<#@" or PLACEHOLDER_RE.fullmatch(v) or set(v) <= _MASK:
        return False
    if v[0] in "[(*" and _MASK_WORD.fullmatch(v):
        return False
    if v.endswith(("..", "…")) and len(v.rstrip(".…")) <= 8:
        return False  # `sk-...`, `ghp_…`: an elided value in docs or a log
    if len(v) >= 12 and _FILLER.search(v):
        return False  # `ghp_xxxxxxxxxxxx`, `sk-00000000...`: a documentation placeholder
    lv = v.lower()
    if lv in _NULLISH or "environ" in lv or "getenv" in lv or "process.env" in lv:
        return False
    if bare:
        if (nxt and nxt in "([") or _DOTTED.fullmatch(v):
            return False  # a call, subscript or attribute: code, not a literal
        if _IDENT.fullmatch(v) and any(r in lv for r in _ROOT_STRS):
            return False  # `password=password`, `token=auth_token`: a variable passed along
        if kind != "PASSWORD" and v.isdigit():
            return False  # `max_token: 4096`
    if kind != "PASSWORD" and v.isalpha() and v.islower():
        return False  # `auth: basic`, `token: required`
    return True


def _looks_random(v: str) -> bool:
    classes = (
        any(c.isupper() for c in v) + any(c.islower() for c in v) + any(c.isdigit() for c in v)
        + any(not c.isalnum() for c in v)
    )
    return classes >= 2 and not (v.isalpha() and v.islower())


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(s).values())


# --------------------------------------------------------------------------- validators


def _card_brand_ok(d: str) -> bool:
    """Known issuer prefix and length: cuts Luhn's 1-in-10 hit rate on ids and timestamps."""
    n, p2, p3, p4 = len(d), int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if p2 in (36, 38, 39) or 300 <= p3 <= 305:
        return 14 <= n <= 19
    if p2 in (35, 62, 65) or p4 == 6011 or 644 <= p3 <= 649:
        return 16 <= n <= 19
    return False


def _card_ok(s: str) -> bool:
    seps = set(s) & {" ", "-"}
    if len(seps) > 1:
        return False
    if seps:
        groups = [len(g) for g in s.split(seps.pop())]
        if groups not in ([4, 6, 5], [4, 6, 4]) and not (
            len(groups) >= 4 and all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4
        ):
            return False
    d = s.replace(" ", "").replace("-", "")
    return _card_brand_ok(d) and luhn_ok(d)


def _iban_end(text: str, start: int, cand: str) -> int:
    """End of a valid IBAN starting at `start` (trimmed to its country's length), or -1."""
    want = _IBAN_LEN.get(cand[:2])
    compact = cand.replace(" ", "")
    if want is None or len(compact) < want:
        return -1
    code = compact[4:want] + compact[:4]
    if int("".join(str(int(c, 36)) for c in code)) % 97 != 1:
        return -1
    seen, i = 0, start
    while seen < want:
        if text[i] != " ":
            seen += 1
        i += 1
    return -1 if i < len(text) and text[i].isalnum() else i


# A dotted quad right after a numbering word is a section or version number (an eval prediction of SmolLM2 wrote
# `Section 11.8.1.1.` and the leak scan blocked the gate on it).
_SECTION_WORD = re.compile(r"(?i)(?:\bsection|\bsec\.|\bclause|\barticle|\bart\.|§|\bchapter|\bpara(?:graph)?|\bversion|"
                           r"\brule|\bstep|\bitem|\bv)[ \t]*$")


@functools.lru_cache(maxsize=4096)
def _public_ip(addr: str) -> bool:
    """Globally routable unicast; private, loopback, link-local, reserved and documentation ranges are not.

    Cached: the same few addresses (127.0.0.1, 0.0.0.0, a server's) recur across traces.
    """
    ip = ipaddress.ip_address(addr)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def _ends_placeholder(text: str, i: int) -> bool:
    """True when a placeholder ends at `i`: it stands for text that was there in the first pass."""
    return i > 0 and text[i - 1] == ">" and (lt := text.rfind("<", max(0, i - 40), i)) >= 0 and bool(
        PLACEHOLDER_RE.fullmatch(text, lt, i)
    )


def _after_nul(low: bytes, lo: int, i: int) -> int:
    """`lo`, or just past the last NUL in low[lo:i]: context never reaches back into the previous string
    of a batch (`BATCH_SEP` holds a NUL), so a string is redacted the same alone or batched."""
    z = low.rfind(b"\x00", lo, i)
    return lo if z < 0 else z + 1


_DOC_DOMAINS = ("example.com", "example.org", "example.net")
# `icon@2x.png`, `pkg@1.2.3.tgz`: file names, not addresses (none of these is a TLD people mail at)
_FILE_EXTS = frozenset("png jpg jpeg gif svg webp ico bmp pdf txt md js mjs ts tsx jsx css scss html htm json yaml yml "
                       "xml zip gz tgz tar lock log py rb go rs java class jar whl map wasm".split())
_DOC_TLDS = ("example", "test", "invalid", "localhost")


def _doc_domain(domain: str) -> bool:
    """RFC 2606 / 6761 names reserved for documentation and tests: no one's mailbox can be there."""
    d = domain.lower()
    return d in _DOC_DOMAINS or d.endswith(tuple("." + x for x in _DOC_DOMAINS)) or d.rsplit(".", 1)[-1] in _DOC_TLDS


def _in_url_userinfo(text: str, ls: int) -> bool:
    """True when `text[ls:]` starts the password of `scheme://user:PASSWORD@host`."""
    if ls == 0 or text[ls - 1] != ":":
        return False
    i = text.rfind("://", max(0, ls - 260), ls)
    return i >= 0 and not any(c in text[i + 3 : ls - 1] for c in " \t\r\n/@")


# --------------------------------------------------------------------------- the redactor

_Cand = tuple  # (start, end, detector, kind)
# Joins a trace's strings for one scan. Every pattern stops at a newline, and the two that look
# further (PEM END, the entropy window) stop at NUL, so no finding crosses it.
BATCH_SEP = "\n\x00\n"
_MAX_PASSES = 8
_GLUE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+@\\~%")


class Redactor:
    def __init__(
        self,
        *,
        ip_public_only: bool = True,
        entropy_threshold: float = 3.5,
        entropy_min_len: int = 20,
        disabled: frozenset[str] = frozenset(),
        keep_documentation_emails: bool = True,
        names: bool = False,
        use_hyperscan: bool = True,
    ) -> None:
        unknown = sorted(set(disabled) - set(DETECTORS))
        if unknown:
            raise ValueError(f"unknown detector(s) in disabled: {', '.join(unknown)} (known: {', '.join(DETECTORS)})")
        self.ip_public_only = ip_public_only
        self.keep_documentation_emails = keep_documentation_emails
        self.entropy_threshold = entropy_threshold
        self.entropy_min_len = entropy_min_len
        self._on = frozenset(DETECTORS) - frozenset(disabled)
        self.names = names and ("person_name" in self._on or "street_address" in self._on)
        self._long_tok = b"t" * max(1, entropy_min_len)
        self._hs = _hs_database(max(1, entropy_min_len)) if use_hyperscan else None

    # ---------------------------------------------------------------- public API

    def nothing_to_find(self, data: bytes) -> bool:
        """True when no detector can find anything in any string of a record whose compact JSON
        (orjson's output) is `data`: the record needs no scan. False means "maybe" (see the
        clean-record prefilter at the end of this module)."""
        if self.names or not data.isascii():
            return False
        if b"\\" in data:  # JSON's escapes: each must stand for one char of a string (see _unescape)
            data = _unescape(data)
            if data is None:
                return False
        if self._hs is None:
            return self._nothing_to_find_py(data.decode("ascii"))
        db, scratch, terminated = self._hs
        hits: list[int] = []
        try:
            db.scan(data, match_event_handler=_hs_hit, context=hits, scratch=scratch)
        except terminated:  # stopped at the first final condition
            return False
        if hits and (hits[-1] != _HS_IPV4 or self._ipv4_candidate(data)):
            return False
        return "encoded" not in self._on or not _b64_candidate(data)

    @property
    def has_compiled_prefilter(self) -> bool:
        """Whether nothing_to_find runs on Hyperscan (else on the slower pure-Python checks)."""
        return self._hs is not None

    def _nothing_to_find_py(self, text: str) -> bool:
        """nothing_to_find's checks without Hyperscan: literal finds and literal-led patterns."""
        if any(w in text for w in _CASED_LITERALS) or ("@" in text and ("://" in text or _PF_EMAIL.search(text))):
            return False  # `://user:password@`, an email
        low = text.lower()
        if any(w in low for w in _LOWER_LITERALS) or self._keyword_candidate(text, low):
            return False
        if ("password" in low or "authorization" in low or "dob" in low or "born" in low) and _PF_WORDS_RE.search(low):
            return False
        if "?" in text and families._QS.search(text) or "webhook" in low and families._HOOK.search(text):
            return False
        if "::" in text or _V6_HINT.search(text) or _PF_CURL.search(text) or _PF_PCT.search(text):
            return False
        if _PF_MAC.search(text) or _PF_TILDE.search(text):
            return False
        raw = text.encode()
        shape = raw.translate(_SHAPE_T)
        if _PF_SHAPE.search(shape) or (shape.find(b"0.0") >= 0 and self._ipv4_candidate(raw)):
            return False
        out: list[_Cand] = []
        self._runs(text, raw.translate(_RUN_T), out)  # vendor and provider tokens: the scan's own code
        return not out and ("encoded" not in self._on or not _b64_candidate(raw))

    def _keyword_candidate(self, text: str, low: str) -> bool:
        """What `_key_values` could take: `word = value`, a sibling value, a `--word value` flag, or a
        token of >= entropy_min_len chars within 64 chars after the word (`_window`)."""
        tok = None
        for root in _ROOT_STRS:
            i = low.find(root)
            while i >= 0:
                if _KW_AT.match(low, i) or (root == "key" and low.endswith(_KEY_PREFIX_ENDS, 0, i)):
                    return True
                m = _WORD_AT.match(low, i)
                if m:
                    tok = tok or text.encode().translate(_TOK_T)
                    if tok.find(self._long_tok, m.end(), m.end() + 64 + len(self._long_tok)) >= 0:
                        return True
                i = low.find(root, i + 1)
        return "--" in low and _PF_FLAG.search(low) is not None

    def _ipv4_candidate(self, data: bytes) -> bool:
        """Whether `_PUBLIC_V4.finditer` (on ASCII `data`) finds an address that is not private. A match
        starts where a run of digits does (its lookbehind) and holds a `0.0` in its shape where its first
        octet ends, so only those starts are tried: C-level finds instead of the regex at every byte
        (~30 us a record). Matches cannot overlap, so these are exactly finditer's."""
        shape = data.translate(_SHAPE_T)
        i = shape.find(b"0.0")
        while i >= 0:
            s = i
            while s and shape[s - 1] == 0x30:  # back to the first digit of the run
                s -= 1
            m = _PUBLIC_V4_B.match(data, s)
            if m and not (self.ip_public_only and m.group().startswith(_PRIVATE_V4_B)):
                return True
            i = shape.find(b"0.0", i + 1)
        return False

    def key_value(self, key: str, value: str) -> tuple[str, str] | None:
        """(detector, kind) when a JSON object's `key` names a secret and its string `value` plausibly is
        one: the `password=...` rule across the JSON structure, for `{"password": "..."}` in tool-call
        arguments and metadata, where key and value are two strings and no scan of either sees both."""
        if len(key) > 64 or not value:
            return None
        stem = key.lower().rstrip("0123456789_-")
        if not (_KEY_HINT.search(stem) or self.names):
            return None  # most keys name nothing secret: one C-level search rules them out
        if self.names and "person_name" in self._on and stem.replace("-", "_") in _PERSON_KEYS:
            return ("person_name", "NAME") if names.is_person(value, stem) else None
        header = _HEADER_KEYS.get(stem.replace("_", "-"))
        if header is not None:  # `{"Authorization": "Basic ..."}`, `{"Cookie": "sid=..."}` (HAR, fetch args)
            if header in self._on and len(value) >= 6 and _plausible_value(value, "TOKEN", False, "") and (
                    header == "cookie" or _looks_random(value.rsplit(" ", 1)[-1])) and _plausible_value(
                    value.rsplit(" ", 1)[-1], "TOKEN", False, ""):
                return header, KINDS[header]
            return None
        if "secret_assignment" not in self._on:
            return None
        pii = _pii_key(stem, value)
        if pii is not None:
            return pii if pii[0] in self._on else None
        if stem.endswith("private_key_id") and _plausible_value(value, "SECRET", False, ""):
            return "secret_assignment", "SECRET"  # a GCP service-account key's id
        for word in sorted((w for w in _KEY_WORDS if stem.endswith(w)), key=len, reverse=True):
            kind, context = _key_kind(key, len(stem) - len(word))
            if not context:
                continue
            if kind is None or not _plausible_value(value, kind, False, ""):
                return None
            if (len(value) == 40 and "aws_secret_key" in self._on and set(value) <= _B64
                    and any(c.isupper() for c in value) and any(c.islower() for c in value)
                    and ("secret" in stem or "aws" in stem)):
                return "aws_secret_key", KINDS["aws_secret_key"]
            return "secret_assignment", kind
        return None

    def scan(self, text: str) -> list[Finding]:
        """Non-overlapping findings, sorted by start: the text as written, then where normalising
        (NFKC, zero-width chars, homoglyphs) or decoding (base64, %XX) shows more, mapped back so
        that the encoded original is what gets replaced."""
        out = self._scan(text)
        n = len(text)
        if n >= 16 and not text.isascii():
            for folded, idx in families.fold_windows(text):
                for s, e, det, kind in self._scan(folded):
                    out.append((idx[s], idx[e - 1] + 1, det, kind))
        if n >= 16 and "\\" in text:
            out += self._unescaped(text)
        if n >= 16 and "encoded" in self._on:
            for s, e, dec in families.encoded_runs(text, text.encode("latin-1", "replace").translate(_TOK_T)):
                inner = self._resolve(self._scan(dec))
                if inner:
                    out.append((s, e, "encoded", inner[0].kind))
        return self._resolve(out)

    def _unescaped(self, text: str) -> list[_Cand]:
        """JSON text inside a string (a tool result, double-encoded arguments): `\\"` and `\\n` hide the
        quotes and line ends the patterns rely on. Each string of the batch that holds such escapes is
        unescaped (twice at most), scanned, and its findings mapped back."""
        out: list[_Cand] = []
        i = text.find("\\")
        while i >= 0:
            s = text.rfind("\x00", 0, i) + 1
            e = text.find("\x00", i)
            e = len(text) if e < 0 else e
            cur, maps = text[s:e], []
            if '\\"' in cur or "\\n" in cur:
                for _ in range(2):
                    un = families.json_unescape(cur)
                    if un is None:
                        break
                    cur, seg = un
                    maps.append(seg)
                    for fs, fe, det, kind in self._scan(cur):
                        for m in reversed(maps):
                            fs, fe = families.map_back(m, fs), families.map_back(m, fe - 1) + 1
                        out.append((s + fs, s + fe, det, kind))
            i = text.find("\\", e)
        return out

    def _scan(self, text: str) -> list[_Cand]:
        n = len(text)
        if n < 20 and (n < 2 or text.isalpha() or not (_SHORT_HINT.search(low_s := text.lower())
                                                         or (self.names and names.SHORT_HINT.search(low_s)))):
            return []  # too short for any token run; this is most of a trace's strings (keys, roles)
        raw = text.encode("latin-1", "replace")  # one byte per char: offsets match the str
        out: list[_Cand] = []
        self._blocks(text, out)
        run = raw.translate(_RUN_T)
        self._runs(text, run, out)
        shape = raw.translate(_SHAPE_T)
        self._numbers(text, shape, out)
        if "@" in text:
            if "url_password" in self._on and "://" in text:
                self._url_passwords(text, out)
            if "email" in self._on:
                self._emails(text, out)
        low = raw.lower()
        self._keywords(text, raw, low, run, out)
        if "home_path" in self._on:
            self._homes(text, low, out)
        self._more(text, raw, low, out)
        if self.names:
            names.find(text, low, shape, self._adder(text, out))
        return out

    def _adder(self, text: str, out: list[_Cand]):
        def add(start: int, end: int, det: str, kind: str | None = None) -> None:
            # A family's value pattern may also match our own placeholder on a rescan: never a finding.
            if not (text.startswith("<", start) and PLACEHOLDER_RE.fullmatch(text, start, end)):
                self._add(out, start, end, det, kind)
        return add

    def _more(self, text: str, raw: bytes, low: bytes, out: list[_Cand]) -> None:
        """The families of stages/families.py that no root word or digit span leads to, each behind
        one literal find (each costs a pass over the text, so there are few)."""
        add = self._adder(text, out)
        if b"cookie" in low:
            families.cookies(text, low, add)
        if b"curl" in low or b"mysql" in low or b"docker" in low:
            families.commands(text, low, add)
        if "?" in text:
            families.query_secrets(text, add)
        if "PuTTY-User-Key-File" in text:
            families.putty(text, add)
        if b"webhook" in low:
            families.webhooks(text, low, add)
        families.pii(text, low, add)

    def redact_many(self, texts: Sequence[str], table: Placeholders) -> list[str]:
        """`[redact(t, table) for t in texts]` (after reserving all of them), with one scan per batch.

        Every call pays a fixed cost (encode, translate, a dozen finds) before looking at a byte,
        and a trace has many strings, so handing over a whole trace pays it once.
        """
        for t in texts:
            table.reserve(t)
        if len(texts) < 2:
            return [self.redact(t, table) for t in texts]
        return self.settle_many(texts, self.scan(BATCH_SEP.join(texts)), table)

    def settle_many(self, texts: Sequence[str], found: list[Finding], table: Placeholders) -> list[str]:
        """Apply the findings of one scan of `BATCH_SEP.join(texts)` to each text; the rest of `redact_many`.

        Split out so that a caller which built the joined text some cheaper way (stages.redact does
        it from orjson's output, without a Python walk) and found nothing never builds `texts`.
        """
        out = list(texts)
        if not found:
            return out
        found = merge_findings(found)  # callers may add findings of their own (keyed values, canaries)
        starts, pos = [], 0
        for t in texts:
            starts.append(pos)
            pos += len(t) + len(BATCH_SEP)
        by_text: dict[int, list[Finding]] = {}
        for f in found:
            i = bisect.bisect_right(starts, f.start) - 1
            by_text.setdefault(i, []).append(f)
        for i, fs in by_text.items():
            base = starts[i]
            out[i] = self._settle(texts[i], [Finding(f.detector, f.kind, f.start - base, f.end - base) for f in fs], table)
        return out

    def redact(self, text: str, table: Placeholders) -> str:
        """Replace every finding with the table's placeholder for its (kind, value)."""
        table.reserve(text)  # a safety net; the stage reserves every string of the trace first
        return self._settle(text, self.scan(text), table)

    def _settle(self, text: str, found: list[Finding], table: Placeholders) -> str:
        """Apply findings; rescan while a replacement may have exposed a neighbour.

        A neighbour's boundary check saw the secret's edge char and now sees '<' or '>', so it can
        only change where a finding touches a char that continues a token, number or email
        (`a@b.io-----BEGIN ...`). Not '/', the commonest neighbour (`/home/alice/src`): only a home
        path could start there, and it treats a placeholder before it as the name it replaced.
        Each pass replaces at least one original char, so this ends; the bound is only a guard.
        """
        for _ in range(_MAX_PASSES):
            if not found:
                break
            n = len(text)
            glued = any(
                (f.start and text[f.start - 1] in _GLUE) or (f.end < n and text[f.end] in _GLUE) for f in found
            )
            text = self._apply(text, found, table)
            if not glued:
                break
            found = self.scan(text)
        return text

    @staticmethod
    def _apply(text: str, found: list[Finding], table: Placeholders) -> str:
        """`found` must be sorted and non-overlapping (merge_findings): a finding that starts before
        the previous one ended would copy text twice and keep the raw value."""
        parts, pos = [], 0
        for f in found:
            value = text[f.start : f.end]
            if f.kind == "HOME":  # /home/alice, /Users/alice and ~alice are the same person
                m = _HOME_USER.match(value)
                value = m.group(1) if m else value
            elif f.kind == "EMAIL":
                value = value.lower()
            parts.append(text[pos : f.start])
            parts.append(table.get(f.kind, value))
            table.counts[f.detector] += 1
            pos = f.end
        parts.append(text[pos:])
        return "".join(parts)

    # ---------------------------------------------------------------- families

    def _add(self, out: list[_Cand], start: int, end: int, det: str, kind: str | None = None) -> None:
        if det in self._on and end > start:
            out.append((start, end, det, kind or KINDS[det]))

    def _blocks(self, text: str, out: list[_Cand]) -> None:
        """Secrets that do not start a token run: PEM blocks and Slack webhook URLs."""
        if "-----BEGIN" in text:
            pos, end_at = 0, -2
            while (m := _PEM_BEGIN.search(text, pos)) is not None:
                if end_at != -1 and end_at < m.end():  # one forward search for END, shared by all BEGINs
                    end_at = text.find("-----END", m.end())
                fm = (
                    _PEM_END.match(text, end_at)
                    if 0 <= end_at - m.end() <= _PEM_MAX and text.find("\x00", m.end(), end_at) < 0
                    else None
                )
                stop = fm.end() if fm else _PEM_BODY.match(text, m.end()).end()
                if stop > m.end():  # a header quoted in prose, with no key material, is not a key
                    self._add(out, m.start(), stop, "private_key")
                pos = stop
        if "hooks.slack.com/" in text:
            for m in _SLACK_HOOK.finditer(text):
                s = m.start()
                for scheme in ("https://", "http://"):
                    if text.startswith(scheme, s - len(scheme)):
                        s -= len(scheme)
                        break
                self._add(out, s, m.end(), "slack_webhook")

    def _runs(self, text: str, run: bytes, out: list[_Cand]) -> None:
        """Vendor tokens: each is a run of >= 20 token chars that starts with a known prefix."""
        s = run.find(_LONG_RUN)
        while s >= 0:
            self._token_at(text, run, s, out)
            e = run.find(b" ", s)
            s = run.find(_LONG_RUN, e) if e >= 0 else -1

    def _token_at(self, text: str, run: bytes, s: int, out: list[_Cand]) -> None:
        m = _TOKEN_AT.match(text, s)
        if m is None and s > 1 and text[s - 1] in ".:":
            # SendGrid `SG.xxx`, Telegram `123:AAx`, a JWT with a short header: the prefix sits
            # in the short run before, maybe after other chars (`/bot123:AAx`).
            j = run.rfind(b" ", 0, s - 1) + 1
            if s - 26 <= j < s - 1:
                m = _TOKEN_AT.match(text, j)
                k = s - 1
                while m is None and k > j and text[k - 1].isdigit():
                    k -= 1
                if m is None and k < s - 1:
                    m = _TOKEN_AT.match(text, k)
        if m is None:
            # Provider rules (stages/rules/providers.json) at the run's start, or at the short runs
            # before one or two dots that lead into it (`ya29.`, `hvs.`, `dp.pt.`).
            if "provider_token" in self._on:
                add = functools.partial(self._add, out)
                if not families.provider_at(text, s, add):
                    k = s
                    for _ in range(2):
                        if k < 2 or text[k - 1] != ".":
                            break
                        j = run.rfind(b" ", max(0, k - 18), k - 1)
                        if j < 0 and k > 18:
                            break
                        k = j + 1
                        if families.provider_at(text, k, add):
                            break
            return
        det, body = m.lastgroup, m.group()[3:]
        if det == "openai_key" and not (any(c.isdigit() for c in body) and any(c.isalpha() for c in body)):
            return  # `sk-some-long-kebab-name` is not a key
        if det == "huggingface_token" and (body.islower() or body.isupper()):
            return  # `hf_` + an identifier
        if len(set(body)) < 5:
            return  # `ghp_xxxxxxxx...`: a documentation placeholder, not a token
        if det == "slack_token" and not any(c.isdigit() for c in body):
            return  # `xoxo-hugs-and-kisses`: every Slack token carries numeric ids
        if det == "ds_telegram" and m.group().split(":", 1)[-1].islower():
            return  # `20260425:release-candidate-...`: a build tag (a bot token's secret is mixed case)
        self._add(out, m.start(), m.end(), det)

    def _numbers(self, text: str, shape: bytes, out: list[_Cand]) -> None:
        """Phones, SSNs, cards and IPv4 inside digit spans; IBANs from their `AA00` head."""
        on, n = self._on, len(text)
        for m in _DIGIT_SPAN.finditer(shape):
            s, e = m.span()
            digits = shape.count(b"0", s, e)
            dots = shape.count(b".", s, e)
            if digits < 9 and dots < 3:
                continue  # `10:00:00 2026`, `a7c2f90 100644`, `3.11.7`
            if s and text[s - 1] in "+(":
                s -= 1
                if s and text[s - 1] == "+":
                    s -= 1
            stop = min(n, e + 2)  # two chars of lookahead for the boundary checks
            # Literal shape checks pick the exact patterns worth running; each costs a scan of the span.
            if digits >= 9 and "ssn" in on and shape.find(b"000-00-0000", s, e) >= 0:
                for mm in _SSN.finditer(text, s, stop):
                    self._add(out, mm.start(), mm.end(), "ssn")
            if digits >= 9 and "phone" in on:
                before = len(out)
                if digits >= 10 and any(shape.find(t, s, e) >= 0 for t in (b"0-0000", b"0.0000", b"0 0000")):
                    for mm in _PHONE_US.finditer(text, s, stop):
                        self._add(out, mm.start(), mm.end(), "phone")
                if text[s] == "+":
                    for mm in _PHONE_INTL.finditer(text, s, stop):
                        if 9 <= sum(c.isdigit() for c in mm.group()) <= 15:
                            self._add(out, mm.start(), mm.end(), "phone")
                if len(out) == before and digits <= 13 and dots < 2:
                    families.national_phone(text, s, e, functools.partial(self._add, out))  # digits only
            if digits >= 13 and "credit_card" in on:
                for mm in _CARD.finditer(text, s, stop):
                    if _card_ok(mm.group()):
                        self._add(out, mm.start(), mm.end(), "credit_card")
            if dots >= 3 and "ipv4" in on:
                for mm in _IPV4.finditer(text, s, stop):
                    if _SECTION_WORD.search(text, max(0, mm.start() - 12), mm.start()):
                        continue  # `Section 11.8.1.1`, `clause 2.3.4.1`, `v1.2.3.4`: numbering, not a host
                    if not self.ip_public_only or _public_ip(mm.group()):
                        self._add(out, mm.start(), mm.end(), "ipv4")
        if "iban" in on:
            h = shape.find(b"AA00")
            while h >= 0:
                if not (h and shape[h - 1] in b"Aa0"):
                    mm = _IBAN.match(text, h)
                    if mm and (end := _iban_end(text, h, mm.group())) > 0:
                        self._add(out, h, end, "iban")
                h = shape.find(b"AA00", h + 1)
        if "ipv6" in on and ":" in text:
            self._ipv6(text, out)
        if "geo" in on and b"0.0000" in shape:
            families.latlon(text, shape, functools.partial(self._add, out))

    def _ipv6(self, text: str, out: list[_Cand]) -> None:
        n, pos = len(text), 0
        while (h := _V6_HINT.search(text, pos)) is not None:
            pos = h.end()
            i = h.start()
            if h.group() == "::":  # `std::vector`, `Foo::bar`: a letter outside hex touches the colons
                before = text[i - 1] if i else " "
                after = text[i + 2] if i + 2 < n else " "
                if (before.isalnum() and before not in "0123456789abcdefABCDEF") or (
                    after.isalnum() and after not in "0123456789abcdefABCDEF"
                ):
                    continue
            back = _V6_CHARS.match(text[max(0, i - 39) : i][::-1]).end()
            m = _IPV6.match(text, i - back)
            if m is None:
                continue
            pos = max(pos, m.end())
            cand = m.group()
            try:
                public = ":" in cand and _public_ip(cand)
            except ValueError:
                if "mac_address" in self._on:
                    families.mac_at(text, m.start(), functools.partial(self._add, out))
                continue  # not an address: `10:00:00`, a MAC, `de:ad:be:ef`
            if public if self.ip_public_only else sum(1 for g in cand.split(":") if g) >= 2:  # `[::2]` is a slice
                self._add(out, m.start(), m.end(), "ipv6")

    def _url_passwords(self, text: str, out: list[_Cand]) -> None:
        i = text.find("://")
        while i >= 0:
            if i and text[i - 1].isalnum():
                m = _URL_CRED.match(text, i + 3)
                if m and _plausible_value(m.group(1), "PASSWORD", False, ""):
                    self._add(out, m.start(1), m.end(1), "url_password")
            i = text.find("://", i + 3)

    def _emails(self, text: str, out: list[_Cand]) -> None:
        at = text.find("@")
        while at >= 0:
            prev = text[at - 1] if at else " "
            if prev.isalnum() or prev in "._%+->":
                dom = _DOMAIN.match(text, at + 1)
                if dom:
                    lm = _LOCAL_REV.match(text[max(0, at - _LOCAL_MAX - 1) : at][::-1])
                    if lm and lm.end() <= _LOCAL_MAX:
                        ls = at - lm.end()
                        while text[ls] == ".":
                            ls += 1
                        local = text[ls:at]
                        # `git@github.com:org/repo` is a service account, and user:pass@host is a URL.
                        if (ls < at and local != "git" and not _in_url_userinfo(text, ls)
                                and not (self.keep_documentation_emails and _doc_domain(dom.group()))
                                and dom.group().rsplit(".", 1)[-1].lower() not in _FILE_EXTS):
                            self._add(out, ls, dom.end(), "email")
            at = text.find("@", at + 1)

    def _keywords(self, text: str, raw: bytes, low: bytes, run: bytes, out: list[_Cand]) -> None:
        on = self._on
        occ = []
        for root in _ROOTS:
            i = low.find(root)
            while i >= 0:
                occ.append(i)
                i = low.find(root, i + len(root))
        if occ:
            self._key_values(text, raw, low, run, sorted(occ), out)
        if "bearer_token" in on:
            i = low.find(b"bearer")
            while i >= 0:
                self._bearer(text, i, i + 6, _BEARER, out)
                i = low.find(b"bearer", i + 6)
        for det, gate in _DS_LINE_GATES.items():
            if det in on and gate in low:
                self._ds_lines(text, low, det, gate, out)

    def _key_values(self, text: str, raw: bytes, low: bytes, run: bytes, occ: list[int], out: list[_Cand]) -> None:
        """`key = value` assignments and high-entropy tokens shortly after a secret-ish word."""
        n, done, tok = len(text), -1, None
        want_assign = "secret_assignment" in self._on
        want_window = "entropy" in self._on or "aws_secret_key" in self._on
        add = None
        for i in occ:
            if i < done:
                continue  # another root of a key already handled (`secret_key`)
            j = run.find(b" ", i, i + 64)
            ke = j if j >= 0 else min(n, i + 64)
            if low.startswith(b"pass", i) and "password_cli" in self._on:  # sshpass, htpasswd, .netrc, <password>
                families.pass_context(text, low, i, add := add or self._adder(text, out))
            word = low[i:ke].rstrip(b"0123456789_-")
            if word not in _KEY_WORDS_B:  # `passed`, `token_count`, `Author`: the cheap, common rejection
                if word == b"authorization":
                    if "bearer_token" in self._on:
                        self._bearer(text, i, ke, _AUTH_HEADER, out)
                    families.authorization_at(text, i, add := add or self._adder(text, out))
                continue
            lo = max(0, i - 64)
            j = run.rfind(b" ", lo, i)
            ks = j + 1 if j >= 0 else lo
            if ks and text[ks - 1] == "<" and text.startswith(">", ke) and PLACEHOLDER_RE.fullmatch(text, ks - 1, ke + 1):
                continue  # `<API_KEY_1>` is our own placeholder, not a key name
            key = text[ks:ke]
            if text.find("-----", i, ke + 5) >= 0:
                continue  # `-----BEGIN PUBLIC KEY-----`: a PEM header, not a key name
            kind, context = _key_kind(key, i - ks)
            if not context:
                continue  # a later root may still end this key: `auth_token`
            done = ke
            if kind and want_assign:
                m = _ASSIGN.match(text, ke) or (_FLAG.match(text, ke) if key.startswith("--") else None)
                if m:
                    g = m.lastgroup
                    nxt = text[m.end()] if m.end() < n else ""
                    v = m.group(g)
                    trim = 1 if g == "bare" and len(v) > 1 and v[-1] in ".!?" and (not nxt or nxt.isspace()) else 0
                    v = v[:len(v) - trim]  # `your new password: x9Kq2. Please...`: the full stop ends the sentence
                    if _plausible_value(v, kind, g == "bare", nxt):
                        end = m.end(g) - trim
                        if kind == "PASSWORD" and g == "bare" and v.isalpha() and v.islower() and (
                                w := _PHRASE.match(text, end)) and not set(w.group().split()) & _PROSE_WORDS:
                            end = w.end()  # `passphrase: correct horse battery staple`
                        self._add(out, m.start(g), end, "secret_assignment", kind)
                        if self._aws_secret(v, key, low, ks, ke):
                            self._add(out, m.start(g), m.end(g), "aws_secret_key")
                        continue  # the value is covered; the window would only find it again
                else:  # the name in one field, the value in its sibling: `{"name": "DB_PASSWORD", "value": "..."}`
                    m = _SIBLING.match(text, ke)
                    if m and _plausible_value(m.group(1), kind, False, ""):
                        self._add(out, m.start(1), m.end(1), "secret_assignment", kind)
                        if self._aws_secret(m.group(1), key, low, ks, ke):
                            self._add(out, m.start(1), m.end(1), "aws_secret_key")
                        continue
            if want_window:
                if tok is None:
                    tok = raw.translate(_TOK_T)
                self._window(text, low, tok, key, ks, ke, out)

    def _aws_secret(self, tok: str, key: str, low: bytes, ks: int, ke: int) -> bool:
        """A 40-char base64 secret after an aws/secret word (AWS never prefixes its secret keys)."""
        return (
            len(tok) == 40
            and "aws_secret_key" in self._on
            and set(tok) <= _B64
            and any(c.isupper() for c in tok)
            and any(c.islower() for c in tok)
            and ("secret" in key.lower() or low.find(b"aws", _after_nul(low, max(0, ks - 32), ks), ke) >= 0)
        )

    def _window(self, text: str, low: bytes, tok: bytes, key: str, ks: int, ke: int, out: list[_Cand]) -> None:
        """Tokens of >= entropy_min_len chars that start within 64 chars after a secret-ish word."""
        n, size = len(text), len(self._long_tok)
        stop = min(n, ke + 64)
        if (nul := text.find("\x00", ke, stop)) >= 0:
            stop = nul  # the batch separator: context never reaches into the next string
        pos = ke
        while (s := tok.find(self._long_tok, pos, stop + size - 1)) >= 0:
            if (lt := text.find("<", pos, s)) >= 0 and PLACEHOLDER_RE.search(text, lt, s):
                # Stop at a placeholder: up to there the text is what the first pass saw, so a
                # second pass decides the same (past it, shrunken secrets pull new text in).
                return
            e = tok.find(b" ", s)
            e = n if e < 0 else e
            if text.startswith("=", e):  # base64 padding
                e += 2 if text.startswith("==", e) else 1
            pos = e
            t = text[s:e]
            if self._aws_secret(t, key, low, ks, ke):
                self._add(out, s, e, "aws_secret_key")
            elif (
                "entropy" in self._on
                and any(c.isupper() for c in t)
                and any(c.islower() for c in t)
                and any(c.isdigit() for c in t)
                and not _HEXISH.fullmatch(t)
                and len(set(t)) >= 12
                and _entropy(t) >= self.entropy_threshold
            ):
                self._add(out, s, e, "entropy")
            elif ("entropy" in self._on and 32 <= len(t) <= 128 and _HEX_SECRET.fullmatch(t)
                  and (_strong_key(key) or low.endswith((b"api ", b"access ", b"secret ", b"signing "), 0, ks))
                  and _HEX_GAP.fullmatch(text, ke, s)):
                # a hex secret after a secret word (`twilio auth token 3f9a...`, `webhook secret: ...`);
                # only after token/secret/password/api key, never after a bare `key` (a cache key, a SHA)
                self._add(out, s, e, "entropy")

    def _bearer(self, text: str, i: int, after: int, rx: re.Pattern, out: list[_Cand]) -> None:
        """`Bearer <token>` anywhere, and `Authorization: [Basic|Token|Digest] <token>`."""
        if i and text[i - 1].isalnum():
            return
        m = rx.match(text, after)
        if m and _looks_random(m.group(1)):
            self._add(out, m.start(1), m.end(1), "bearer_token")

    def _ds_lines(self, text: str, low: bytes, det: str, gate: bytes, out: list[_Cand]) -> None:
        i = low.find(gate)
        while i >= 0:
            ls = max(text.rfind("\n", 0, i) + 1, i - 2048)
            le = text.find("\n", i)
            le = len(text) if le < 0 else min(le, i + 2048)
            for rx in _DS_LINE[det]:
                for m in rx.finditer(text, ls, le):
                    s, e = m.span(1) if rx.groups else m.span()
                    if not rx.groups and "=" in m.group():
                        s = m.start() + m.group().index("=") + 1  # `AccountKey=...`: keep the key name
                    self._add(out, s, e, det)
            i = low.find(gate, le)

    def _homes(self, text: str, low: bytes, out: list[_Cand]) -> None:
        if "/home/" in text or "/Users/" in text:
            for m in _HOME_NIX.finditer(text):
                s = m.start()
                prev = text[s - 1] if s else " "
                if prev.isalnum() or prev in "_.-~" or _ends_placeholder(text, s):
                    continue  # `src/home/views.py` is a repo path, not a home directory
                if m.group().rsplit("/", 1)[1].lower() in _NOT_A_USER:
                    continue
                self._add(out, s, m.end(), "home_path")
        if b"users" in low:
            for m in _HOME_WIN.finditer(text):
                s = m.start() - 1  # the drive letter
                if s < 0 or not text[s].isalpha() or not text[s].isascii() or (s and text[s - 1].isalnum()):
                    continue
                if _HOME_USER.match(text, s).group(1).lower() in _NOT_A_USER:
                    continue
                self._add(out, s, m.end(), "home_path")
        i = text.find("~")
        while i >= 0:
            prev = text[i - 1] if i else " "
            if not (prev.isalnum() or prev in "~/._-\\"):
                m = _TILDE.match(text, i)
                if m:
                    self._add(out, i, m.end(), "home_path")
            i = text.find("~", i + 1)

    @staticmethod
    def _resolve(cands: list[_Cand]) -> list[Finding]:
        return _merge(cands)


def merge_findings(found: Sequence[Finding]) -> list[Finding]:
    """Findings from several sources (scan, keyed values, canaries) as sorted, non-overlapping spans.

    Overlapping or touching-inside spans merge into their union, which takes the kind of the
    highest-priority detector, so a value is never half-replaced and no raw char survives."""
    return _merge([(f.start, f.end, f.detector, f.kind) for f in found])


def _merge(cands: list[_Cand]) -> list[Finding]:
    """Merge overlapping candidates; the merged span takes the highest-priority detector's kind."""
    if not cands:
        return []
    cands.sort()
    merged: list[list] = []
    for s, e, det, kind in cands:
        if merged and s < merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], e)
            if PRIORITY[det] < PRIORITY[last[2]]:
                last[2], last[3] = det, kind
        else:
            merged.append([s, e, det, kind])
    return [Finding(det, kind, s, e) for s, e, det, kind in merged]


# --------------------------------------------------------------------------- structure

# A field that names a value held by a sibling field: `{"name": "DB_PASSWORD", "value": "..."}`.
_NAME_FIELDS = ("name", "key", "header", "variable", "env", "field", "param", "label", "Name", "Key")
_VALUE_FIELDS = ("value", "Value", "val", "default", "secret", "data", "stringValue", "string_value")
_VALUE_SET = frozenset(_VALUE_FIELDS)
# Tool-schema members whose strings are sample values of the property that holds them.
_SCHEMA_FIELDS = ("default", "example", "examples", "const", "enum")


def structural_secrets(obj: object, redactor: "Redactor") -> list[tuple[str, str, str]]:
    """(value, detector, kind) for secrets whose name is not their own key: a sibling name field
    (env lists, k8s env, HAR headers) or the schema property that holds a `default`/`example`.
    Also the plain `"password": "..."` members, so that the leaks stage can re-derive every keyed
    value from an artifact's structure (any such value that is not a placeholder is a leak)."""
    out: list[tuple[str, str, str]] = []
    _walk(obj, redactor, out)
    return out


def _walk(obj: object, r: "Redactor", out: list) -> None:
    if isinstance(obj, list):
        for v in obj:
            if not isinstance(v, str):
                _walk(v, r, out)
        return
    if not isinstance(obj, dict):
        return
    name = None
    if obj.keys() & _VALUE_SET:  # a sibling-name pair needs a value field first: most objects have none
        name = next((obj[f] for f in _NAME_FIELDS if isinstance(obj.get(f), str)), None)
    if name is not None and len(name) <= 64:
        for f in _VALUE_FIELDS:
            v = obj.get(f)
            if isinstance(v, str) and f != "key" and (hit := r.key_value(name, v)):
                out.append((v, *hit))
    for k, v in obj.items():
        if isinstance(v, str):
            if (hit := r.key_value(k, v)) is not None:
                out.append((v, *hit))
            continue
        if k.lower() == "cookies" and isinstance(v, list) and "cookie" in r._on:  # HAR: [{"name", "value"}]
            for c in v:
                cv = c.get("value") if isinstance(c, dict) else None
                if isinstance(cv, str) and len(cv) >= 8 and _looks_random(cv) and _plausible_value(cv, "TOKEN", False, ""):
                    out.append((cv, "cookie", "COOKIE"))
        if isinstance(v, dict):
            for f in _SCHEMA_FIELDS:
                sv = v.get(f)
                for s in (sv if isinstance(sv, list) else [sv]):
                    if isinstance(s, str) and (hit := r.key_value(k, s)):
                        out.append((s, *hit))
        _walk(v, r, out)


def rule_sets() -> dict[str, dict[str, object]]:
    """The rule sets the detectors load as data, with their versions (for metrics/redact.json)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "missing"

    head, by_head = families.provider_rules()
    n = len({rid for rules in by_head.values() for rid, _, _ in rules})
    return {
        "detect_secrets": {"version": ver("detect-secrets"), "plugins": len(_DS_PLUGINS)},
        "providers": {"file": "stages/rules/providers.json", "version": head["version"], "rules": n},
        "phonenumbers": {"version": ver("phonenumbers")},
    }


# --------------------------------------------------------------------------- the clean-line prefilter

# About 95% of traces hold nothing to redact. `nothing_to_find` proves that of a whole record from its
# compact JSON (orjson's output, in which every string of the record appears as a JSON literal):
# each alternative below is a NECESSARY condition of some detector, written so that it matches
# wherever that detector could find anything (a superset: a match only sends the record through the
# full scan). Conditions are local to one string, as the detectors are (context stops at BATCH_SEP).
# What the literals cannot show goes to the full path before any pattern runs: non-ASCII (NFKC,
# zero-width and homoglyph folding), a backslash in a string (`\"`, `\n`, `\/`, `\uXXXX` inside the
# text: the scan unescapes it) and control chars (`\u00XX`). Names (params redact.names) disable it.
_KIND_WORDS = sorted((w for w, k in _KEY_WORDS.items() if k), key=len, reverse=True)
_ALL_WORDS = sorted(_KEY_WORDS, key=len, reverse=True)
_NOT_TOKEN = r"(?![A-Za-z0-9_\-])"  # where a root word's run ends (detectors read it off `run`)


# Literals whose presence alone sends a record to the full scan (the families that start from them).
_CASED_LITERALS = ("-----BEGIN", "hooks.slack.com/", "Private-Lines:", "/home/", "/Users/")
_LOWER_LITERALS = ("sshpass", "htpasswd", "bearer", "accountkey=", "_authtoken=", "cookie", "mysql", "birth", "passport", "ssn", "social sec", " dot ", "[at]",
                   "(at)", ":/users/", "signature", "bday", "social_sec",
                   "private_key_id")  # key_value's GCP key-id rule: `"private_key_id": "<any plausible value>"`
_KIND_RE = "|".join(map(re.escape, _KIND_WORDS))
# At a root word's position: a secret word that ends its run, then an assignment or a sibling value
# (`_key_values`); or any secret word (`key`, `tokens` too): the entropy window is checked after it.
_KW_AT = re.compile(rf"(?:{_KIND_RE})[0-9_\-]*(?:{_NOT_TOKEN}(?:[\"']?\]?[ \t]*[:=]|[\"']?[ \t]*(?:[,}}\]]|\r?\n))"
                    rf"|[0-9_\-]{{40}})")
_WORD_AT = re.compile(rf"(?:{'|'.join(map(re.escape, _ALL_WORDS))})[0-9_\-]*(?:{_NOT_TOKEN}|[0-9_\-]{{40}})")
_KEY_PREFIX_ENDS = tuple(p + sep for p in _KEY_PREFIXES for sep in ("", "_", "-"))
# Words that lead to a family only in some contexts (families.pass_context, authorization_at, pii).
_PF_WORDS = (r"<[\w.\-:]{0,62}password|(?:machine|default)[\s\S]{0,400}password[ \t]"
             r"|password(?: for [\w.@\-]{1,64})?(?: is| was| will be| would be| became|:)"
             r"|authorization[\"']?[ \t]*[:=,]|(?:^|[^a-z])(?:dob|born)(?:[^a-z]|$)")
_PF_WORDS_RE = re.compile(_PF_WORDS)
# Each starts with a literal, so `re` skips ahead at C speed; most run only behind a cheaper find.
_PF_FLAG = re.compile(rf"--[a-z0-9_\-]{{0,64}}(?:{_KIND_RE})[0-9_\-]*[ \t]")
_PF_CURL = re.compile(r"-(?:u[ \t]*|-user[ \t=]+|-proxy-user[ \t=]+)['\"]?[^\s:'\"@]{1,128}:[^\s'\"]|-b[ \t]")
_PF_EMAIL = re.compile(r"[A-Za-z0-9._%+\->]@[A-Za-z0-9]")
_PF_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_PF_MAC = re.compile(r"-[0-9A-Fa-f]{2}-[0-9A-Fa-f]{2}-[0-9A-Fa-f]{2}-[0-9A-Fa-f]{2}-[0-9A-Fa-f]{2}")
_PF_TILDE = re.compile(r"~[a-z_]")
# On the shape string (digits -> 0, letters -> A / a): the number families by what their patterns need.
_PF_SHAPE = re.compile(rb"0(?:[ .()\-]*0){8}|AA00(?: ?[A0]){11}|0\.0{4}|0\.0{1,2}\.0{1,3}\.0")
_PUBLIC_V4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}", re.A)
_PRIVATE_V4 = ("127.", "10.", "0.", "192.168.")
_PUBLIC_V4_B = re.compile(_PUBLIC_V4.pattern.encode(), re.A)  # the same on bytes (ASCII: the same matches)
_PRIVATE_V4_B = tuple(p.encode() for p in _PRIVATE_V4)


_JSON_ESC = ((b"\\n", b"\n"), (b"\\r", b"\r"), (b"\\t", b"\t"), (b'\\"', b'"'), (b"\\b", b"\b"), (b"\\f", b"\f"))
_UNESC = {esc[1]: ch for esc, ch in _JSON_ESC}  # the byte after a backslash -> the char it stands for


def _unescape(data: bytes) -> bytes | None:
    r"""orjson's output with its one-char escapes (`\n`, `\"`...) decoded; None when a string holds an
    escaped backslash or a `\u` escape (a control char): what those hide is left to the full scan.

    One split on the backslash (C speed) instead of a search per escape: a two-byte search costs about
    1 ns a byte, ten of them were half of nothing_to_find's time."""
    parts = data.split(b"\\")
    out = [parts[0]]
    for part in parts[1:]:
        ch = _UNESC.get(part[0]) if part else None  # empty: two backslashes in a row, an escaped one
        if ch is None:
            return None
        out.append(ch)
        out.append(part[1:])
    return b"".join(out)


_B64_RUN_B = re.compile(families._B64_RUN.pattern.encode())


def _b64_candidate(data: bytes) -> bool:
    """A run that families.encoded_runs would decode (its decoded text is scanned)."""
    tok = data.translate(_TOK_T)
    pos = 0
    while (s := tok.find(b"t" * 16, pos)) >= 0:
        e = tok.find(b" ", s)
        e = len(data) if e < 0 else e
        pos = e
        # The base64 chars from s (up to a `~`, the one token char outside base64) are what _B64_RUN_B
        # takes; b64_text decodes nothing shorter than 16 or in one case: most runs (hex ids, snake_case
        # names) end here, without the match, the decode and the call (ASCII: bytes.lower is str.lower).
        body = data[s:e]
        tilde = body.find(b"~")
        if tilde >= 0:
            body = body[:tilde]
        if len(body) < 16 or body.lower() == body or body.upper() == body:
            continue
        m = _B64_RUN_B.match(data, s, e + 2)
        if m and families.b64_text(m.group().decode("ascii")) is not None:
            return True
    return False


# The same conditions for Hyperscan (Vectorscan), which runs them all in one pass over the record: a
# few us against the ~40 us of the pure-Python checks above. Compiled in prefilter mode (lookarounds
# and other unsupported constructs become supersets), so a match still only means "maybe". Used
# when the package is installed; `nothing_to_find` falls back to the Python checks otherwise, and
# both only decide between two paths that give the same bytes (tests/test_redact_fast.py).
_HS_IPV4 = 0  # an IPv4 match is reported, not final: only a public address can be found


def _hs_patterns(min_len: int) -> list[tuple[str, bool]]:
    """(pattern, caseless) for every condition; the first is IPv4's."""
    kind = "|".join(map(re.escape, _KIND_WORDS)) + "|(?:" + "|".join(_KEY_PREFIXES) + ")[_-]?key"
    words = "|".join(map(re.escape, _ALL_WORDS))
    tok = r"[A-Za-z0-9_\-+/~]"
    _, by_head = families.provider_rules()
    providers = sorted({rx.pattern for rules in by_head.values() for _, _, rx in rules})
    cased = [
        rf"{_OCTET}(?:\.{_OCTET}){{3}}",
        re.sub(r"\(\?P<\w+>", "(?:", _TOKEN_AT.pattern), *providers,
        *map(re.escape, _CASED_LITERALS), families._HOOK.pattern,
        r"[0-9]{3}-[0-9]{2}-[0-9]{4}",  # SSN
        r"[0-9](?:\) ?|[ .\-])[2-9][0-9]{2}[ .\-][0-9]{4}",  # US phone
        r"\+[2-9](?:[ .()\-]*[0-9]){8}",  # international phone
        # national phone: the trunk 0 is the first digit of its span (what _DIGIT_SPAN can start at)
        r"(?:^|[^0-9 .()\-])[ .()\-]*0(?:[1-9]|[ .()\-]+[0-9])(?:[ .()\-]*[0-9]){7}",
        r"[0-9](?:[ \-]?[0-9]){12}",  # card
        r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11}",  # IBAN
        r"[0-9]\.[0-9]{4}",  # coordinates
        # IPv6 (and colon MACs): `::` only where no letter outside hex touches it (`std::vector`)
        r"(?:^|[^G-Zg-z])::(?:[^G-Zg-z]|$)", _V6_HINT.pattern.split("|", 1)[1],
        r"[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}",
        r"[A-Za-z0-9._%+\->]@[A-Za-z0-9]", r"://.*@|@.*://",  # emails, URL passwords
        r"%[0-9A-Fa-f]{2}", r"~[a-z_]", _PF_CURL.pattern,
    ]
    caseless = [
        families._QS.pattern,
        rf"(?:{kind})[0-9_\-]*(?:[\"']?\]?[ \t]*[:=]|[\"']?[ \t]*(?:[,}}\]]|\r?\n))", rf"(?:{kind})[0-9_\-]{{40}}",
        rf"(?:{words})[0-9_\-]*(?:[^A-Za-z0-9_\-].{{0,63}}{tok}{{{min_len}}}|[+/~]{tok}{{{min_len - 1}}})",
        rf"(?:{words})[0-9_\-]{{40}}", _PF_FLAG.pattern, _PF_WORDS, *map(re.escape, _LOWER_LITERALS), r"docker[ \t]+login",
    ]
    return [(p, False) for p in cased] + [(p, True) for p in caseless]


def prefilter_database(min_len: int):
    """The compiled Hyperscan database for Redactor(entropy_min_len=min_len), or None without the package.
    Compiling takes ~0.15 s: a caller that forks workers compiles it first, so that they share it."""
    return _hs_database(max(1, min_len))


@functools.lru_cache(maxsize=8)
def _hs_database(min_len: int):
    """The compiled Hyperscan database, or None when the package is missing."""
    try:
        import hyperscan
    except ImportError:
        return None
    pats = _hs_patterns(max(1, min_len))
    base = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_DOTALL
    db = hyperscan.Database()
    db.compile(expressions=[p.encode() for p, _ in pats], ids=list(range(len(pats))),
               flags=[base | (hyperscan.HS_FLAG_CASELESS if c else 0) for _, c in pats])
    return db, hyperscan.Scratch(db), hyperscan.ScanTerminated


def _hs_hit(pid: int, start: int, end: int, flags: int, hits: list[int]) -> bool | None:
    """Hyperscan's match callback: note the condition; stop at the first that is final."""
    hits.append(pid)
    return pid != _HS_IPV4 or None
