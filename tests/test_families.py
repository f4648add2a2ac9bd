"""The issue-10 families on realistic strings written apart from the fixture: what each must redact,
and the look-alike beside it that must survive."""
from __future__ import annotations

import pytest

from stages.detectors import Placeholders, Redactor, structural_secrets

R = Redactor()

# (text, the secret that must be gone)
CAUGHT = [
    ("export PGPASSWORD='s3cr3tPG' && psql -h db", "s3cr3tPG"),
    ("MYSQL_PWD=abc123x mysql -u app", "abc123x"),
    ("docker login -u ci -p Dk9xQw42 registry.acme.io", "Dk9xQw42"),
    ("mysql -u root -p'abc 12' shop", "abc 12"),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/s3/aws4_request, "
     "Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024", "fe5f80f77d5fa3be"),
    ("X-API-Key: 8f3k2Lm9Qz7Xw1", "8f3k2Lm9Qz7Xw1"),
    ("twilio auth token 3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c", "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"),
    ("the api key is 3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c", "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"),
    ("Date of birth: March 12, 1984", "March 12, 1984"),
    ("phone (020) 7946 0958", "7946 0958"),
    ("lat/long 48.85837, 2.29448", "48.85837"),
    ("reach me at jane dot doe at acme dot com", "doe at acme"),
    ("Cookie: _ga=GA1.2.3; session=eyJhbGciOiJIUzI1NiJ9.abc.def; csrftoken=aB3dE5fG7hJ9kL1m", "aB3dE5fG7hJ9kL1m"),
    ("the password is hunter2", "hunter2"),
    ("my password was Tr0ub4dor&3 yesterday", "Tr0ub4dor&3"),
    ("passphrase: correct horse battery staple", "horse battery staple"),
    ("pass\u200bword=ZeroWidth9", "ZeroWidth9"),
    ("password\uff1dFullwidth9", "Fullwidth9"),
    ('{\\"name\\": \\"DB_PASSWORD\\", \\"value\\": \\"db-8Wc3C6f9a4Z6\\"}', "db-8Wc3C6f9a4Z6"),
]
# (text) that must come out unchanged
KEPT = [
    "the cache key 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "secret sauce: 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "the password is wrong",
    "password is required",
    "password: \"[FILTERED]\" and token=********",
    "mail ops@example.com or jane@docs.example.org",
    "coords: 48.8583, 2.2944",
    "step,loss\n1,0.734512,0.812345",
    "the job was born out of need on 2026-01-03",
    "order 0123456789 shipped",
    "see https://docs.example.com/api/webhooks",
    "Cookie: theme=dark; lang=en",
    "mysql -u root -p shop",
    "look at the dot com bubble",
]


@pytest.mark.parametrize("text,secret", CAUGHT)
def test_caught(text, secret):
    out = R.redact(text, Placeholders())
    assert secret not in out, out


@pytest.mark.parametrize("text", KEPT)
def test_kept(text):
    assert R.redact(text, Placeholders()) == text


def test_a_passphrase_does_not_swallow_the_sentence():
    assert R.redact("password=abc123 then run make test", Placeholders()) == "password=<PASSWORD_1> then run make test"


def test_structure_names_secrets_that_their_own_key_does_not():
    har = {"log": {"entries": [{"request": {"cookies": [{"name": "sid", "value": "aB3dE5fG7hJ9k"}],
                                            "headers": [{"name": "Authorization", "value": "Basic dXNlcjpwYXNzd29yZA=="}]}}]}}
    gcp = {"type": "service_account", "private_key_id": "0123456789abcdef0123456789abcdef01234567"}
    schema = {"properties": {"api_key": {"type": "string", "default": "k_9f8e7d6c5b4a3f2e"}}}
    env = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}]
    found = {v for v, _, _ in structural_secrets([har, gcp, schema, env], R)}
    assert found == {"aB3dE5fG7hJ9k", "Basic dXNlcjpwYXNzd29yZA==", "0123456789abcdef0123456789abcdef01234567",
                     "k_9f8e7d6c5b4a3f2e", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
    masked = {"password": "[FILTERED]", "token": "********", "api_key": "<redacted>", "name": "DB_PASSWORD", "value": "${DB_PASSWORD}"}
    assert structural_secrets(masked, R) == []


def test_rule_sets_report_their_versions():
    from stages.detectors import rule_sets

    rs = rule_sets()
    assert rs["providers"]["rules"] >= 20 and rs["providers"]["version"]
    assert rs["phonenumbers"]["version"] != "missing" and rs["detect_secrets"]["version"] != "missing"


def test_context_never_crosses_from_one_string_to_the_next():
    """A context word ending one string (a dict key) never makes the next string (its value) a finding:
    what is found in a string depends on that string alone (the clean cache and batched scans rest on it)."""
    from stages.detectors import BATCH_SEP

    pairs = [("birthdate", "1990-05-15"), ("dob", "03/12/1984"), ("passport", "X1234567"), ("ssn", "123456789"),
             ("mac", "3c-22-fb-12-ab-9e"), ("gps location", "51.5074, -0.1278"), ("phone", "0123456789"),
             ("my name is", "Priya Raman"), ("password", "hunter22"), ("twilio auth token", "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c")]
    for names in (False, True):
        r = Redactor(names=names)
        for a, b in pairs:
            joined = BATCH_SEP.join([a, b])
            assert [f for f in r.scan(joined) if f.start >= len(a)] == [], (a, b)


def test_a_digit_run_glued_to_a_word_is_no_national_phone():
    """A Codex rollout's file name (`rollout-<date>T08-52-00-<uuid>`) reached the leak scan as a phone: a
    national number stands on its own, never glued to letters or hex."""
    from stages.detectors import Redactor

    r = Redactor()
    assert r.scan("traces/codex/rollout-2026-11-01T08-52-00-90083fa6-8ba5-42a7.jsonl") == []
    assert r.scan("build x07700 900123") == []
    assert [f.detector for f in r.scan("call me on 07700 900123 today")] == ["phone"]


def test_a_numbered_section_is_no_ip_address():
    """SmolLM2's baseline wrote `Section 11.8.1.1.` in an eval prediction and the leak scan blocked the gate."""
    from stages.detectors import Redactor

    r = Redactor()
    for text in ("Section 11.8.1.1.", "see clause 9.4.1.2 here", "v1.2.3.4", "§ 12.3.4.5"):
        assert r.scan(text) == [], text
    for text in ("server at 8.8.8.8 now", "ip: 93.184.216.34"):
        assert [f.detector for f in r.scan(text)] == ["ipv4"], text
