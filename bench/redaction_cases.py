"""The labelled redaction fixture: tests/fixtures/redaction/labelled.jsonl is generated from this file.

    python -m bench.redaction_cases [--out tests/fixtures/redaction/labelled.jsonl] [--check]

One case a line, ids stable, keys sorted:

    {"id": "email-tp-01", "category": "email", "kind": "tp", "location": "message",
     "text": "...", "labels": [{"category": "email", "value": "jane.doe@example.com"}], "note": "..."}

- category: a detector name from stages/detectors.py (DETECTORS), or "benign_code" for the group of
  code-like text that must stay untouched.
- kind: "tp" (has labels), "fp" (a benign look-alike for that detector: no labels) or "benign".
- location: "message" (a chat message's content), "tool_args" (a tool call's arguments, as the JSON
  text the agent sent) or "review_note" (the human review's notes).
- labels: the exact substrings that MUST be redacted, each with the detector family it belongs to.
  For tool_args a value is a substring of one of the decoded JSON strings (a key or a value).
  Labels are the truth, not what the detectors happen to do: a case a detector gets wrong stays,
  with its true label, and shows up in metrics/redaction_quality.json.

Every value is fake: AWS's documented example keys, Luhn-valid test card numbers, example.com /
example.org addresses, documentation-range-free public resolver IPs, random bodies from a seeded
generator. In the written JSONL the second character of each vendor prefix (gh*_, xox*-, sk_live_, ...)
is written as a JSON \\u escape so that secret scanners and push protection do not flag the fixture;
`json.loads` gives the real text back.
"""
from __future__ import annotations

import argparse
import base64
import json
import random
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "redaction" / "labelled.jsonl"
SEED = 20261122
LOCATIONS = ("message", "assistant", "system", "tool_args", "tool_args_nested", "tool_result", "tool_result_json",
             "tool_result_double", "tool_schema", "metadata", "dict_key", "review_note")
# The families of issue 10 are data: one seed a line (a value, the prose and the JSON it sits in),
# expanded here into every placement a trace has.
FAMILIES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "redaction" / "families.jsonl"

_rng = random.Random(SEED)
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
UPPER32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
LOWHEX = "0123456789abcdef"
LOWALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def rnd(n: int, alphabet: str = ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def mixed(n: int, alphabet: str = ALNUM) -> str:
    """Random token of length n that surely has an upper-case letter, a lower-case letter and a digit."""
    body = list("aZ9" + rnd(n - 3, alphabet))
    _rng.shuffle(body)
    if body[0] in "-_":
        body[0] = "Q"
    return "".join(body)


def args(**kw) -> str:
    """A tool call's arguments as the JSON text an agent sends."""
    return json.dumps(kw)


def b64url(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


def jwt(payload: dict) -> str:
    return b64url({"alg": "HS256", "typ": "JWT"}) + "." + b64url(payload) + "." + rnd(43, ALNUM + "-_")


def pem_body(lines: int, width: int = 64) -> str:
    return "\n".join(rnd(width, ALNUM + "+/") for _ in range(lines))


# Vendor prefixes, spelt in pieces so that this file itself is not flagged either.
GHP, GHO, GHPAT = "gh" + "p_", "gh" + "o_", "github" + "_pat_"
GLPAT, GLDT = "glp" + "at-", "gld" + "t-"
XOXB, XOXP, XAPP = "xo" + "xb-", "xo" + "xp-", "xa" + "pp-"
SKLIVE, SKTEST, RKLIVE, WHSEC = "sk" + "_live_", "sk" + "_test_", "rk" + "_live_", "wh" + "sec_"
SKANT, SKPROJ, SK = "sk" + "-ant-", "sk" + "-proj-", "sk" + "-"
HF, AIZA = "h" + "f_", "AI" + "za"
AKC, SG, SQ = "AK" + "C", "S" + "G.", "sq0" + "csp-"
PYPI = "pypi" + "-AgEIcHlwaS5vcmc"
PYPI_TEST = "pypi" + "-AgENdGVzdC5weXBpLm9yZw"
NPM = "npm" + "_"
HOOKS = "hooks.slack" + ".com/"
BEGIN, END = "-----BEGIN ", "-----END "
AKIA_EX, AKIA_EX2 = "AKIA" + "IOSFODNN7EXAMPLE", "AKIA" + "I44QH8DHBEXAMPLE"  # AWS's documented examples
AWS_SECRET_EX = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret
AWS_SECRET_EX2 = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"
# What the JSONL shields: the second char of each becomes a \u escape.
SHIELD = ("dap" + "i", "do" + "p_v1_", "shp" + "at_", "hv" + "s.", "ya" + "29.", "HR" + "KU-", "EA" + "AA",
          "dis" + "cord.com/api/webhooks", GHP, GHO, GHPAT, GLPAT, GLDT, XOXB, XOXP, XAPP, "xo" + "xo-", SKLIVE, SKTEST, RKLIVE, WHSEC, SKANT,
          SKPROJ, HF, AIZA, AKC, SG, SQ, "pypi" + "-AgE", NPM, HOOKS, "AKIA", "ASIA", BEGIN, "Account" + "Key=",
          "_auth" + "Token=")

_cases: list[dict] = []
_counters: dict[tuple[str, str], int] = {}


def _add(category: str, kind: str, location: str, text: str, labels: list[tuple[str, str]], note: str) -> None:
    assert location in LOCATIONS, location
    n = _counters[(category, kind)] = _counters.get((category, kind), 0) + 1
    _cases.append({
        "id": f"{category}-{kind}-{n:02d}", "category": category, "kind": kind, "location": location,
        "text": text, "labels": [{"category": c, "value": v} for v, c in labels], "note": note,
    })


def tp(category: str, location: str, text: str, *secrets: str | tuple[str, str], note: str = "") -> None:
    """A true-positive case: each secret (a value, or (value, category) for another family) must go."""
    labels = [(s, category) if isinstance(s, str) else s for s in secrets]
    assert labels, "a tp case needs a label"
    _add(category, "tp", location, text, labels, note)


def fp(category: str, location: str, text: str, note: str = "") -> None:
    """A benign look-alike for `category`: nothing in it may be redacted."""
    _add(category, "fp", location, text, [], note)


def benign(location: str, text: str, note: str = "") -> None:
    """Code-like text an agent trace is full of: it must come out byte-identical."""
    _add("benign_code", "benign", location, text, [], note)


def build() -> list[dict]:
    _rng.seed(SEED)
    _cases.clear()
    _counters.clear()

    # ------------------------------------------------------------------ private_key
    b1, b2, b3, b4 = pem_body(4), pem_body(3, 70), pem_body(2), pem_body(3)
    tp("private_key", "message", f"here is the deploy key:\n{BEGIN}RSA PRIVATE KEY-----\n{b1}\n{END}RSA PRIVATE KEY-----\nthanks", b1)
    tp("private_key", "tool_args", args(path="~/.ssh/id_ed25519", content=f"{BEGIN}OPENSSH PRIVATE KEY-----\n{b2}\n{END}OPENSSH PRIVATE KEY-----\n"), b2,
       note="a write_file call with the key as content (real newlines once decoded)")
    tp("private_key", "review_note", f"agent pasted {BEGIN}EC PRIVATE KEY-----\\n{b3}\\n{END}EC PRIVATE KEY----- into the ticket", b3,
       note="escaped newlines inside one line")
    tp("private_key", "message", f"$ head -4 server.key\n{BEGIN}PRIVATE KEY-----\n{b4}", b4, note="cut off before END")
    tp("private_key", "tool_args", args(stdin=f"{BEGIN}ENCRYPTED PRIVATE KEY-----\n{b1[:130]}\n{END}ENCRYPTED PRIVATE KEY-----"), b1[:130])
    fp("private_key", "message", f"the public half:\n{BEGIN}PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE{rnd(52, ALNUM + '+/')}\n{END}PUBLIC KEY-----",
       note="a public key is not a secret")
    fp("private_key", "review_note", f"{BEGIN}CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIE{rnd(40, ALNUM + '+/')}\n{END}CERTIFICATE-----",
       note="a certificate is public")
    fp("private_key", "message", "the file must start with -----BEGIN RSA PRIVATE KEY----- or ssh-keygen rejects it",
       note="a header quoted in prose, no key material")
    fp("private_key", "tool_args", args(pattern="PRIVATE KEY", path="src/"), note="grep for the words")

    # ------------------------------------------------------------------ jwt
    j1 = jwt({"sub": "1234567890", "name": "Jane Doe", "iat": 1516239022})
    j2 = jwt({"sub": "user_42", "role": "admin", "exp": 1893456000})
    j3 = jwt({"iss": "https://auth.example.com", "aud": "api", "sub": "svc"})
    j4 = jwt({"sid": "abc", "scope": "read write"})
    tp("jwt", "message", f"curl -H 'Authorization: Bearer {j1}' https://api.example.com/me", j1)
    tp("jwt", "tool_args", args(url="https://api.example.com/v1/orders", headers={"Authorization": f"Bearer {j2}"}), j2)
    tp("jwt", "review_note", f"session cookie in the log was {j3}; rotate it", j3)
    tp("jwt", "tool_args", args(id_token=j4), j4, note="bare token as a value")
    tp("jwt", "message", f"set-cookie: access_token={j1}; HttpOnly; Secure", j1)
    tp("jwt", "message", f"GET /callback?state=xyz&id_token={j3}&scope=openid", j3, note="in a query string")
    fp("jwt", "message", "a JWT is three base64url parts: header.payload.signature, and eyJ is just base64 for '{\"'",
       note="prose about the format")
    fp("jwt", "review_note", "header eyJhbGciOiJIUzI1NiJ9 only, no payload or signature", note="a lone header")
    fp("jwt", "tool_args", args(query="jwt decode error eyJ"), note="prefix only")

    # ------------------------------------------------------------------ url_password
    tp("url_password", "message", "DATABASE_URL=postgres://app:Tr0ub4dor3@db.example.com:5432/main", "Tr0ub4dor3")
    tp("url_password", "tool_args", args(dsn="mysql://admin:S3cretPw9@mysql.example.com/shop"), "S3cretPw9")
    tp("url_password", "review_note", "the clone url had creds in it: https://jdoe:gitPassw0rd@git.example.com/org/repo.git", "gitPassw0rd")
    tp("url_password", "tool_args", args(command="redis-cli -u redis://:hunter2cache@cache.example.com:6379/0 ping"), "hunter2cache")
    tp("url_password", "message", "amqp://guest:Rabb1tMQ!x@mq.example.net:5672/vhost is what prod uses", "Rabb1tMQ!x")
    fp("url_password", "message", "mirror at ftp://anonymous@ftp.example.org/pub/ has a user but no password", note="anonymous FTP: userinfo without a password")
    fp("url_password", "tool_args", args(url="postgres://app:${DB_PASSWORD}@db.example.com/main"), note="an environment reference")
    fp("url_password", "review_note", "postgres://app:<PASSWORD_1>@db.example.com/main was already redacted", note="our own placeholder")
    fp("url_password", "message", "open http://localhost:8080/api/v1/items?page=2 in the browser", note="host:port, no userinfo")
    fp("url_password", "tool_args", args(url="ssh://git@github.com:22/org/repo.git"), note="a service account, no password")

    # ------------------------------------------------------------------ email
    tp("email", "message", "please reply to jane.doe@acme-mail.com before Friday", "jane.doe@acme-mail.com")
    tp("email", "tool_args", args(to="bob.smith+orders@acme-mail.org", subject="Your invoice", body="Hi Bob"), "bob.smith+orders@acme-mail.org")
    tp("email", "review_note", "customer (carol_w@mail.example.co.uk) asked for a refund", "carol_w@mail.example.co.uk")
    tp("email", "tool_args", args(recipients=["ops@acme-mail.com", "dana.lee@acme-mail.net"]), "ops@acme-mail.com", "dana.lee@acme-mail.net")
    tp("email", "message", "From: \"Eve Adams\" <EVE.ADAMS@ACME-MAIL.COM>\nSubject: hello", "EVE.ADAMS@ACME-MAIL.COM")
    tp("email", "message", "git log shows Author: Frank Ng <frank.ng@acme-mail.com>", "frank.ng@acme-mail.com")
    tp("email", "tool_args", args(**{"jane.roe@acme-mail.com": "owner", "team": "billing"}), "jane.roe@acme-mail.com",
       note="an address as a JSON key")
    tp("email", "tool_args", json.dumps(args(to="grace.h@acme-mail.com", body="Hello")), "grace.h@acme-mail.com",
       note="double-encoded arguments (a JSON string holding the JSON text)")
    fp("email", "message", "@pytest.fixture\ndef client():\n    return app.test_client()", note="a decorator")
    fp("email", "tool_args", args(command="git clone git@github.com:org/repo.git"), note="a service account")
    fp("email", "review_note", "npm install @types/node@18.11.9 fixed it", note="an npm scope and version")
    fp("email", "message", "the retina asset is icon@2x.png and logo@3x.png", note="iOS asset names look like addresses")
    fp("email", "tool_args", args(image="python@sha256:4f0a1e2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a"), note="an image digest")
    fp("email", "review_note", "ping @alice and @bob on the thread, and reply to <EMAIL_1>", note="handles and a placeholder")

    # ------------------------------------------------------------------ aws_access_key
    asia = "ASIA" + rnd(16, UPPER32)
    tp("aws_access_key", "message", f"AWS_ACCESS_KEY_ID={AKIA_EX}", AKIA_EX)
    tp("aws_access_key", "tool_args", args(access_key_id=AKIA_EX2, region="us-east-1"), AKIA_EX2)
    tp("aws_access_key", "review_note", f"agent printed the temporary key {asia} in the output", asia)
    tp("aws_access_key", "tool_args", args(command=f"aws configure set aws_access_key_id {AKIA_EX}"), AKIA_EX)
    fp("aws_access_key", "message", "long-term keys start with AKIA and temporary ones with ASIA", note="prefixes in prose")
    fp("aws_access_key", "review_note", "IAM user id AIDACKCEVSQ6C2EXAMPLE is not a key", note="21-char IAM unique id")
    fp("aws_access_key", "tool_args", args(arn="arn:aws:iam::123456789012:user/deploy-bot"), note="an ARN")

    # ------------------------------------------------------------------ aws_secret_key
    tp("aws_secret_key", "message", f'aws_secret_access_key = "{AWS_SECRET_EX}"', AWS_SECRET_EX)
    tp("aws_secret_key", "review_note", f"AWS secret is {AWS_SECRET_EX2} (rotate it)", AWS_SECRET_EX2)
    tp("aws_secret_key", "tool_args", args(command=f"export AWS_SECRET_ACCESS_KEY={AWS_SECRET_EX}"), AWS_SECRET_EX)
    tp("aws_secret_key", "tool_args", args(aws_secret_access_key=AWS_SECRET_EX2, aws_access_key_id=AKIA_EX2),
       AWS_SECRET_EX2, (AKIA_EX2, "aws_access_key"), note="the secret's key name is a separate JSON string")
    tp("aws_secret_key", "message", f"[default]\naws_access_key_id = {AKIA_EX}\naws_secret_access_key = {AWS_SECRET_EX}\n",
       AWS_SECRET_EX, (AKIA_EX, "aws_access_key"))
    fp("aws_secret_key", "message", "aws s3 cp s3://example-bucket/reports/2026/q3-summary.csv .", note="an S3 path")
    fp("aws_secret_key", "review_note", "sha1 of the aws secret config file: 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12", note="hex digest near the words")
    fp("aws_secret_key", "tool_args", args(secret_name="prod/aws/secret-access-key-rotation-lambda"), note="a secret's name, not its value")

    # ------------------------------------------------------------------ github_token
    g1, g2, g3, g4 = GHP + mixed(36), GHPAT + mixed(22) + "_" + mixed(59), GHO + mixed(36), GHP + mixed(36)
    tp("github_token", "message", f"export GH_TOKEN={g1}", g1)
    tp("github_token", "tool_args", args(token=g2, repo="org/repo"), g2)
    tp("github_token", "review_note", f"the agent echoed {g3} into the CI log", g3)
    tp("github_token", "tool_args", args(command=f"git clone https://x-access-token:{g4}@github.com/org/repo.git"), g4,
       note="inside URL userinfo")
    fp("github_token", "message", f"tokens look like {GHP}... and {GHPAT}...", note="prefixes only")
    fp("github_token", "tool_args", args(branch="gh_pages_deploy_workflow_settings"), note="an identifier")
    fp("github_token", "review_note", f"docs say: export GH_TOKEN={GHP}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", note="an all-x documentation placeholder")

    # ------------------------------------------------------------------ gitlab_token
    l1, l2, l3 = GLPAT + mixed(20), GLDT + mixed(24), GLPAT + mixed(20)
    tp("gitlab_token", "message", f"{l1} expires next month", l1)
    tp("gitlab_token", "tool_args", args(private_token=l2, project_id=42), l2)
    tp("gitlab_token", "review_note", f"deploy token leaked: {l3}", l3)
    tp("gitlab_token", "tool_args", args(command=f'curl --header "PRIVATE-TOKEN: {l1}" https://gitlab.example.com/api/v4/projects'), l1)
    fp("gitlab_token", "message", f"personal access tokens are prefixed {GLPAT} since 14.5", note="prefix only")
    fp("gitlab_token", "tool_args", args(text=f"{GLPAT}<your token>"), note="a documentation placeholder")

    # ------------------------------------------------------------------ slack_token
    s1 = XOXB + "1234567890-1234567890123-" + rnd(24)
    s2 = XOXP + "12345-67890-" + rnd(32, LOWHEX)
    s3 = XAPP + "1-A0123BCDEF-1234567890123-" + rnd(64, LOWHEX)
    tp("slack_token", "message", f"SLACK_BOT_TOKEN={s1}", s1)
    tp("slack_token", "tool_args", args(token=s2, channel="#general", text="deploy done"), s2)
    tp("slack_token", "review_note", f"socket mode app token {s3} was in the trace", s3)
    fp("slack_token", "message", f"bot tokens start with {XOXB} and user tokens with {XOXP}", note="prefixes only")
    fp("slack_token", "review_note", "signed xo" + "xo-hugs-and-kisses-from-ana", note="'xoxo' sign-off that is long enough to be a token run")
    fp("slack_token", "tool_args", args(channel="#xox-team-announcements"), note="a channel name")

    # ------------------------------------------------------------------ slack_webhook
    w1 = HOOKS + "services/T0A1B2C3D/B0A1B2C3D/" + rnd(24)
    w2 = HOOKS + "workflows/T0123ABCD/A0456EFGH/789012345/" + rnd(20)
    w3 = HOOKS + "services/T9Z8Y7X6W/B1C2D3E4F/" + rnd(24)
    tp("slack_webhook", "message", f"POST https://{w1} with the payload", w1)
    tp("slack_webhook", "tool_args", args(url=f"https://{w2}", json={"text": "hi"}), w2)
    tp("slack_webhook", "review_note", f"webhook https://{w3} must be rotated", w3)
    fp("slack_webhook", "message", "see https://api.slack.com/messaging/webhooks for incoming webhooks", note="docs URL")
    fp("slack_webhook", "tool_args", args(url="https://hooks.example.com/services/build-status"), note="another host")

    # ------------------------------------------------------------------ stripe_key
    k1, k2, k3, k4 = SKLIVE + mixed(24), RKLIVE + mixed(30), WHSEC + mixed(32), SKTEST + mixed(24)
    tp("stripe_key", "message", f"stripe.api_key = '{k1}'", k1)
    tp("stripe_key", "tool_args", args(api_key=k2), k2)
    tp("stripe_key", "review_note", f"webhook signing secret {k3} in plain text", k3)
    tp("stripe_key", "tool_args", args(command=f"curl https://api.stripe.com/v1/charges -u {k4}:"), k4)
    fp("stripe_key", "message", "pk_live_" + mixed(24) + " is the publishable key used in checkout.js", note="publishable keys are public")
    fp("stripe_key", "tool_args", args(name="task_test_runner_configuration_v2"), note="'sk_test_' inside an identifier")
    fp("stripe_key", "review_note", f"secret keys begin with {SKLIVE} in live mode", note="prefix only")

    # ------------------------------------------------------------------ anthropic_key
    a1, a2, a3 = SKANT + "api03-" + mixed(93) + "AA", SKANT + "admin01-" + mixed(60), SKANT + "api03-" + mixed(93) + "AA"
    tp("anthropic_key", "message", f"x-api-key: {a1}", a1)
    tp("anthropic_key", "tool_args", args(env={"ANTHROPIC_API_KEY": a2}), a2)
    tp("anthropic_key", "review_note", f"leaked admin key {a3}", a3)
    fp("anthropic_key", "message", f"keys are prefixed {SKANT}api03-", note="prefix only")
    fp("anthropic_key", "tool_args", args(algorithm="risk-ant-colony-optimization-v2"), note="'sk-ant-' inside a word")

    # ------------------------------------------------------------------ openai_key
    o1, o2, o3 = SKPROJ + mixed(48), SK + mixed(20) + "T3BlbkFJ" + mixed(20), SK + "svcacct-" + mixed(40)
    tp("openai_key", "message", f"OPENAI_API_KEY={o1}", o1)
    tp("openai_key", "tool_args", args(api_key=o2, model="gpt-4o"), o2)
    tp("openai_key", "review_note", f"service account key {o3} in the trace", o3)
    tp("openai_key", "tool_args", args(command=f'curl -H "Authorization: Bearer {o1}" https://api.openai.com/v1/models'), o1)
    fp("openai_key", "message", "pip install scikit-learn; the sk-learn-pipeline-configuration-loader module", note="kebab-case name")
    fp("openai_key", "tool_args", args(text="set OPENAI_API_KEY=sk-..."), note="elided")
    fp("openai_key", "review_note", "task-runner-with-a-very-long-kebab-case-name", note="'sk-' inside a word")

    # ------------------------------------------------------------------ huggingface_token
    h1, h2, h3 = HF + "aBcD" + rnd(30), HF + "XyZw" + rnd(30, ALNUM[:52]), HF + "Qm3" + rnd(31)
    tp("huggingface_token", "message", f"huggingface-cli login --token {h1}", h1)
    tp("huggingface_token", "tool_args", args(token=h2, repo_id="org/model"), h2)
    tp("huggingface_token", "review_note", f"HF_TOKEN={h3} was printed by the agent", h3)
    fp("huggingface_token", "message", "hf_hub_download(repo_id) and hf_transfer_enabled_for_large_files", note="identifiers")
    fp("huggingface_token", "tool_args", args(code="from huggingface_hub import hf_hub_download_with_retries"), note="identifier")

    # ------------------------------------------------------------------ google_api_key
    gk1, gk2, gk3 = AIZA + "Sy" + rnd(33, ALNUM + "_-"), AIZA + "Sy" + mixed(33), AIZA + "Sy" + mixed(33)
    tp("google_api_key", "message", f"https://maps.googleapis.com/maps/api/geocode/json?address=x&key={gk1}", gk1)
    tp("google_api_key", "tool_args", args(api_key=gk2, query="coffee"), gk2)
    tp("google_api_key", "review_note", f"firebase config had apiKey: \"{gk3}\"", gk3)
    fp("google_api_key", "message", f"browser keys start with {AIZA}Sy and are restricted by referrer", note="prefix only")
    fp("google_api_key", "tool_args", args(text=AIZA + "SyShortOne"), note="too short")

    # ------------------------------------------------------------------ ds_artifactory
    af1, af2, af3 = AKC + "p" + mixed(69), AKC + mixed(40), AKC + "p" + mixed(60)
    tp("ds_artifactory", "message", f"X-JFrog-Art-Api: {af1}", af1)
    tp("ds_artifactory", "tool_args", args(artifactory_api_key=af2), af2)
    tp("ds_artifactory", "review_note", f'artifactory "{af3}" in settings.xml', af3)
    fp("ds_artifactory", "message", "class AKCDogShowRegistrationHandlerFactory(BaseFactory): ...", note="a CamelCase class name")
    fp("ds_artifactory", "tool_args", args(team="AKC", count=3), note="the acronym alone")

    # ------------------------------------------------------------------ ds_azure_storage_key
    z1, z2, z3 = rnd(86, ALNUM + "+/") + "==", "Zq9" + rnd(83, ALNUM + "+/") + "==", rnd(86, ALNUM + "+/") + "=="
    tp("ds_azure_storage_key", "message", f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={z1};EndpointSuffix=core.windows.net", z1)
    tp("ds_azure_storage_key", "tool_args", args(connection_string=f"AccountName=logs;AccountKey={z2}"), z2)
    tp("ds_azure_storage_key", "review_note", f"conn = 'AccountKey={z3}'", z3)
    fp("ds_azure_storage_key", "message", "AccountKey=${AZURE_STORAGE_KEY} comes from the vault", note="env reference")
    fp("ds_azure_storage_key", "tool_args", args(connection_string="AccountName=devstoreaccount1;AccountKey=<AZURE_KEY_1>"), note="placeholder")

    # ------------------------------------------------------------------ ds_discord
    d1 = "MT" + rnd(22) + "." + rnd(6) + "." + rnd(27)
    d2 = "OD" + rnd(23) + "." + rnd(6) + "." + rnd(27)
    d3 = "Nz" + rnd(22) + "." + rnd(6, ALNUM + "_-") + "." + rnd(27, ALNUM + "_-")
    tp("ds_discord", "message", f"bot.run('{d1}')", d1)
    tp("ds_discord", "tool_args", args(env={"DISCORD_TOKEN": d2}), d2)
    tp("ds_discord", "review_note", f"discord bot token {d3} posted in chat", d3)
    fp("ds_discord", "message", "call OrgExampleServiceLocator.config.loadDefaultsFromEnvironment() first",
       note="a dotted Java call whose parts happen to be 24.6.27 chars")
    fp("ds_discord", "tool_args", args(text="MTA.abc.def"), note="short")

    # ------------------------------------------------------------------ ds_mailchimp
    mc1, mc2, mc3 = rnd(32, LOWHEX) + "-us12", rnd(32, LOWALNUM) + "-us6", rnd(32, LOWHEX) + "-us21"
    tp("ds_mailchimp", "message", f"MAILCHIMP_API_KEY={mc1}", mc1)
    tp("ds_mailchimp", "tool_args", args(apikey=mc2, list_id="a1b2c3"), mc2)
    tp("ds_mailchimp", "review_note", f"mc key {mc3} in the export", mc3)
    fp("ds_mailchimp", "message", "cache key 5d41402abc4b2a76b9719d911017c592-us-east-1", note="md5 + a region")
    fp("ds_mailchimp", "tool_args", args(region="us-east-1", bucket="logs-us12"), note="region names")

    # ------------------------------------------------------------------ ds_npm
    n1, n2, n3 = NPM + mixed(36), "a1b2c3d4-e5f6-4a5b-8c9d-0e1f2a3b4c5d", NPM + mixed(36)
    tp("ds_npm", "message", f"//registry.npmjs.org/:_authToken={n1}", n1)
    tp("ds_npm", "tool_args", args(path=".npmrc", content=f"//npm.example.com/:_authToken={n2}\n"), n2)
    tp("ds_npm", "review_note", f".npmrc line: //registry.npmjs.org/:_authToken={n3}", n3)
    fp("ds_npm", "message", "//registry.npmjs.org/:_authToken=${NPM_TOKEN}", note="env reference")
    fp("ds_npm", "tool_args", args(command="npm config get registry"), note="no token")

    # ------------------------------------------------------------------ ds_pypi
    p1, p2, p3 = PYPI + rnd(80, ALNUM + "-_"), PYPI_TEST + rnd(72, ALNUM + "-_"), PYPI + rnd(90, ALNUM + "-_")
    tp("ds_pypi", "message", f"password = {p1}", p1)
    tp("ds_pypi", "tool_args", args(env={"TWINE_PASSWORD": p2}), p2)
    tp("ds_pypi", "review_note", f"twine upload used {p3}", p3)
    fp("ds_pypi", "message", "pip install pypi-simple-index-mirror-tool", note="a package name")
    fp("ds_pypi", "tool_args", args(username="__token__", password="${PYPI_TOKEN}"), note="env reference")

    # ------------------------------------------------------------------ ds_sendgrid
    sg1 = SG + rnd(22) + "." + rnd(43)
    sg2 = SG + rnd(22, ALNUM + "-_") + "." + rnd(43, ALNUM + "-_")
    sg3 = SG + rnd(22) + "." + rnd(43)
    tp("ds_sendgrid", "message", f"SENDGRID_API_KEY={sg1}", sg1)
    tp("ds_sendgrid", "tool_args", args(api_key=sg2), sg2)
    tp("ds_sendgrid", "review_note", f"sg = '{sg3}'", sg3)
    fp("ds_sendgrid", "message", "SG.Config.loadTemplate() reads the template id", note="short dotted call")
    fp("ds_sendgrid", "tool_args", args(security_group="SG.web-tier"), note="security group label")

    # ------------------------------------------------------------------ ds_square_oauth
    q1, q2, q3 = SQ + rnd(43), SQ + rnd(43, ALNUM + "-_"), SQ + rnd(43)
    tp("ds_square_oauth", "message", f"square secret {q1}", q1)
    tp("ds_square_oauth", "tool_args", args(client_secret=q2), q2)
    tp("ds_square_oauth", "review_note", f"SQUARE_OAUTH_SECRET={q3}", q3)
    fp("ds_square_oauth", "message", "application id sq0idp-" + rnd(22) + " is public", note="the app id is public")
    fp("ds_square_oauth", "tool_args", args(text=f"{SQ}..."), note="prefix only")

    # ------------------------------------------------------------------ ds_telegram
    t1 = "123456789:AA" + rnd(33)
    t2 = "9876543210:AA" + rnd(33, ALNUM + "_-")
    t3 = "55512345:AA" + rnd(33)
    tp("ds_telegram", "message", f"https://api.telegram.org/bot{t1}/getMe", t1)
    tp("ds_telegram", "tool_args", args(bot_token=t2, chat_id=-100123), t2)
    tp("ds_telegram", "review_note", f"TG_BOT={t3}", t3)
    fp("ds_telegram", "message", "tag build 20260425:release-candidate-pipeline-v2-final", note="a build tag: 8 digits, ':' and 35 chars")
    fp("ds_telegram", "tool_args", args(time="12:30:45", chat_id=123456789), note="numbers and a time")

    # ------------------------------------------------------------------ ds_twilio
    tw1, tw2, tw3 = "AC" + rnd(32, LOWHEX), "SK" + rnd(32, LOWHEX), "AC" + rnd(32, LOWHEX)
    tp("ds_twilio", "message", f"TWILIO_ACCOUNT_SID={tw1}", tw1)
    tp("ds_twilio", "tool_args", args(api_key_sid=tw2), tw2)
    tp("ds_twilio", "review_note", f"account {tw3} in the log", tw3)
    fp("ds_twilio", "message", "ACCESS_CONTROL_ALLOW_ORIGIN_HEADERS_VALUE and SKIP_EXPENSIVE_INTEGRATION_TESTS", note="constants")
    fp("ds_twilio", "tool_args", args(sku="SKU-2026-000042"), note="a SKU")

    # ------------------------------------------------------------------ secret_assignment
    tp("secret_assignment", "message", "DB_PASSWORD=hunter2 ./run.sh", "hunter2")
    tp("secret_assignment", "message", 'config = {"api_key": "abc123XYZ", "timeout": 30}', "abc123XYZ")
    tp("secret_assignment", "message", "mysql --user root --password Opensesame1 shop", "Opensesame1")
    tp("secret_assignment", "tool_args", args(command="export DB_PASSWORD='s3cr3t!Pass' && ./migrate.sh"), "s3cr3t!Pass")
    tp("secret_assignment", "tool_args", args(password="correct-horse-battery-9", username="admin"), "correct-horse-battery-9",
       note="the secret's key name is a separate JSON string")
    tp("secret_assignment", "tool_args", args(api_key="k_9fQ2xLm7Rt", endpoint="https://api.example.com"), "k_9fQ2xLm7Rt",
       note="the secret's key name is a separate JSON string")
    tp("secret_assignment", "tool_args", args(path=".env", content="SECRET_KEY=django-insecure-7h3k!x9\nDEBUG=false\n"), "django-insecure-7h3k!x9")
    at = mixed(32)
    tp("secret_assignment", "tool_args", args(auth_token=at, user_id=42), at,
       note="the secret's key name is a separate JSON string")
    tp("secret_assignment", "tool_args", args(path="config/db.yaml", content="host: db.example.com\npassword: Hunter22x\n"), "Hunter22x")
    tp("secret_assignment", "review_note", "client_secret: 'x9Kq2LmN' was pasted into the ticket", "x9Kq2LmN")
    tp("secret_assignment", "review_note", "user wrote password: Winter2026! in the chat", "Winter2026!")
    tp("secret_assignment", "message", "GITHUB_TOKEN: tok_live_51", "tok_live_51")
    tp("secret_assignment", "message", 'dbPassword = "s3cr3t!"', "s3cr3t!")
    fp("secret_assignment", "message", "key = get_api_key()", note="a call")
    fp("secret_assignment", "message", "token=None; password: ********; api_key=$OPENAI_API_KEY", note="null, mask, env")
    fp("secret_assignment", "tool_args", args(code='password="${DB_PASSWORD}"\nsecret = os.environ["X"]'), note="references")
    fp("secret_assignment", "tool_args", args(max_tokens=4096, auth="basic"), note="config words")
    fp("secret_assignment", "review_note", "the password reset issue is about the token limit", note="prose")
    fp("secret_assignment", "message", "connect(user=user, password=password)", note="a variable passed along")
    fp("secret_assignment", "review_note", "api_key: <API_KEY_1>", note="placeholder")

    # ------------------------------------------------------------------ bearer_token
    tp("bearer_token", "message", "Authorization: Bearer abcDEF123456.xyz", "abcDEF123456.xyz")
    tp("bearer_token", "tool_args", args(headers={"Authorization": "Bearer ya29.a0AfH6SMBx-Opaque_Token"}), "ya29.a0AfH6SMBx-Opaque_Token")
    tp("bearer_token", "review_note", "curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA==' was in the log", "dXNlcjpwYXNzd29yZA==")
    tp("bearer_token", "tool_args", args(command="curl -H 'Authorization: Bearer 7fQk2LmNx9Rt4Vb8' https://api.example.com"), "7fQk2LmNx9Rt4Vb8")
    fp("bearer_token", "message", "Authorization: Bearer $TOKEN", note="env reference")
    fp("bearer_token", "review_note", "Bearer authentication is described in RFC 6750", note="prose")
    fp("bearer_token", "tool_args", args(headers={"Authorization": "Bearer <TOKEN_1>"}), note="placeholder")

    # ------------------------------------------------------------------ credit_card
    tp("credit_card", "message", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111")
    tp("credit_card", "tool_args", args(card_number="5555555555554444", exp="12/29"), "5555555555554444")
    tp("credit_card", "review_note", "customer read out 3782-822463-10005 over the phone", "3782-822463-10005")
    tp("credit_card", "tool_args", args(note="charge amex=378282246310005 for the order"), "378282246310005")
    tp("credit_card", "message", "mc 5105-1051-0510-5100.", "5105-1051-0510-5100")
    tp("credit_card", "review_note", "paid with 4111-1111-1111-1111, exp 01/30", "4111-1111-1111-1111")
    tp("credit_card", "message", "test card 4242424242424242 declined", "4242424242424242")
    fp("credit_card", "message", "card 4111 1111 1111 1112 fails Luhn", note="Luhn-invalid")
    fp("credit_card", "tool_args", args(timestamp_ns=1714000000123456789), note="a long number")
    fp("credit_card", "review_note", "tracking number 1Z999AA10123456784, order 4000000000000002X", note="ids")

    # ------------------------------------------------------------------ iban
    tp("iban", "message", "pay to GB82 WEST 1234 5698 7654 32 please", "GB82 WEST 1234 5698 7654 32")
    tp("iban", "tool_args", args(iban="DE89370400440532013000", amount="120.00"), "DE89370400440532013000")
    tp("iban", "review_note", "refund to FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606")
    tp("iban", "message", "IBAN: NL91ABNA0417164300", "NL91ABNA0417164300")
    fp("iban", "message", "IBAN GB00 WEST 1234 5698 7654 32 has a bad checksum", note="bad mod-97")
    fp("iban", "tool_args", args(sku="DE12ABCDEFGHIJKLM"), note="IBAN-shaped SKU")

    # ------------------------------------------------------------------ ssn
    tp("ssn", "message", "SSN 078-05-1120 on file", "078-05-1120")
    tp("ssn", "tool_args", args(ssn="123-45-6789", name="Jane Doe"), "123-45-6789")
    tp("ssn", "review_note", "applicant's social security number is 219-09-9999", "219-09-9999")
    fp("ssn", "message", "ssn 666-12-3456, 000-12-3456, 900-12-3456 are never issued", note="invalid areas")
    fp("ssn", "tool_args", args(version="2026-04-25", part="123-45-67890"), note="a date and a part number")

    # ------------------------------------------------------------------ phone
    tp("phone", "message", "call (415) 555-0132 now", "(415) 555-0132")
    tp("phone", "tool_args", args(phone="+1 415 555 0132", name="Dana"), "+1 415 555 0132")
    tp("phone", "review_note", "customer's mobile is 415-555-0199", "415-555-0199")
    tp("phone", "message", "London office +44 20 7946 0958.", "+44 20 7946 0958")
    tp("phone", "tool_args", args(to="+49 30 901820", text="Your code is ready"), "+49 30 901820")
    tp("phone", "review_note", "the Paris office is +33 1 42 68 53 00", "+33 1 42 68 53 00")
    tp("phone", "message", "text me at 415.555.0176 or +1-415-555-0177", "415.555.0176", "+1-415-555-0177")
    fp("phone", "message", "phone 123-456-7890 is not a NANP number, 555-0132 too short", note="invalid NANP")
    fp("phone", "tool_args", args(version="10.0.19045.3693", build="2026.04.25"), note="version numbers")
    fp("phone", "review_note", "run 212 passed, 3 failed in 14.22s", note="test counts")

    # ------------------------------------------------------------------ ipv4
    tp("ipv4", "message", "ssh root@8.8.8.8", "8.8.8.8")
    tp("ipv4", "tool_args", args(host="93.184.216.34", port=443), "93.184.216.34")
    tp("ipv4", "review_note", "login came from 203.0.114.7 at night", "203.0.114.7")
    tp("ipv4", "message", "resolver 1.1.1.1:53 answered", "1.1.1.1")
    tp("ipv4", "tool_args", args(command="dig @8.8.4.4 example.com +short"), "8.8.4.4")
    fp("ipv4", "message", "connect to 10.0.0.5, 192.168.1.1 or 127.0.0.1", note="private and loopback")
    fp("ipv4", "tool_args", args(host="203.0.113.10"), note="documentation range TEST-NET-3")
    fp("ipv4", "review_note", "bump to 1.2.3.4 of the SDK? no, 1.2.3 then 2.0.0", note="version numbers")

    # ------------------------------------------------------------------ ipv6
    tp("ipv6", "message", "dns 2001:4860:4860::8888 ok", "2001:4860:4860::8888")
    tp("ipv6", "tool_args", args(url="http://[2606:4700:4700::1111]:443/"), "2606:4700:4700::1111")
    tp("ipv6", "review_note", "client address 2607:f8b0:4005:80a::200e was logged", "2607:f8b0:4005:80a::200e")
    fp("ipv6", "message", "2001:db8::1 is documentation, fe80::1 link-local, ::1 loopback", note="non-public")
    fp("ipv6", "tool_args", args(code="std::vector<int> v; Foo::bar(); x[::2]"), note="C++ and slices")
    fp("ipv6", "review_note", "magic de:ad:be:ef and time 10:00:00.123", note="hex words and a time (a MAC address is now PII: mac_address)")

    # ------------------------------------------------------------------ home_path
    tp("home_path", "message", "open /home/alice/proj/a.py", "/home/alice")
    tp("home_path", "tool_args", args(path="/Users/bob.m/code/x.py"), "/Users/bob.m")
    tp("home_path", "review_note", r"log at C:\Users\carol\AppData\x.log", r"C:\Users\carol")
    tp("home_path", "tool_args", args(command="ls ~erin/notes"), "~erin")
    tp("home_path", "message", 'File "/home/dmitri/.venv/lib/python3.11/site-packages/x.py", line 3', "/home/dmitri")
    tp("home_path", "tool_args", args(path="C:\\Users\\dana\\Desktop\\report.docx"), "C:\\Users\\dana")
    tp("home_path", "tool_args", "ls -la /home/frank/projects", "/home/frank", note="arguments that are not JSON at all")
    fp("home_path", "message", "src/home/views.py and ./home/x and /var/home/alice", note="repo paths")
    fp("home_path", "tool_args", args(path="/home/shared/data.csv"), note="a shared folder")
    fp("home_path", "review_note", "mask = x & ~valid; cp ~/.bashrc; HEAD~3", note="tilde operators and the own home")

    # ------------------------------------------------------------------ entropy
    e1, e2, e3 = "aB3dE5fG7hJ9kL1mN3pQ5rS7", "Zx8Qw2Er5Ty7Ui9Op1As3Df6Gh", mixed(32)
    tp("entropy", "message", f"my secret is {e1}", e1)
    tp("entropy", "review_note", f"the signing key: {e2}", e2)
    tp("entropy", "tool_args", args(text=f"here's the token {e3} for the staging API"), e3)
    tp("entropy", "message", f"use this access token {e3} until friday", e3)
    fp("entropy", "message", "the token is in the TokenCounterConfiguration class", note="camel-case identifier")
    fp("entropy", "tool_args", args(text="secret sauce: 9fceb02d0ae598e95dc970b74767f19372d61af8"), note="hex SHA")
    fp("entropy", "review_note", "key rotation runbook: a_very_long_snake_case_identifier_name_here", note="identifier")

    # ------------------------------------------------------------------ benign code-like text
    for loc, text, note in (
        ("message", "src/stages/redact.py:142: in redact_fields", "repo path with a line number"),
        ("message", 'File "/usr/lib/python3.11/json/__init__.py", line 346, in loads', "traceback"),
        ("message", "commit 9fceb02d0ae598e95dc970b74767f19372d61af8\nAuthor: Dev Bot\nDate:   Sat Apr 25 10:00:00 2026 +0200", "git log entry"),
        ("message", "fixed in a1b2c3d, reverted by 9fceb02", "short SHAs"),
        ("message", 'request_id = "550e8400-e29b-41d4-a716-446655440000"', "UUID in code"),
        ("message", "bump to 1.2.3, then v2.0.0-rc1; needs python 3.11.7", "versions"),
        ("message", "released 2026-04-25, deployed 2026-04-25T10:00:00Z, invoiced 04/25/2026 at 10:00:00", "dates"),
        ("message", "order #48213, ORD-2026-00042, order 1234567", "order numbers"),
        ("message", "costs $1,299.00, 450k users, €12.50 each", "prices"),
        ("message", "see https://docs.python.org/3/library/re.html and https://huggingface.co/docs/trl", "docs URLs"),
        ("message", "placeholders <EMAIL_1>, <AWS_KEY_2>, <HOME_1>/proj and <PHONE_12> stay", "placeholders"),
        ("message", "server listening on http://127.0.0.1:8000 and 0.0.0.0:8080", "localhost"),
        ("message", "-rw-r--r--  1 dev dev   4096 Apr 25 10:00 params.yaml", "ls -l"),
        ("message", "212 passed, 4 skipped in 41.30s", "pytest summary"),
        ("message", "def password_reset_handler(request): return token_count", "keywords in identifiers"),
        ("message", "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "digest"),
        ("message", "docker pull ghcr.io/org/app:1.4.2 && kubectl rollout status deploy/app -n prod", "images"),
        ("message", "SELECT id, email_verified, created_at FROM users WHERE id = 42 LIMIT 10;", "SQL with column names"),
        ("message", "pip install 'torch>=2.4,<2.15' transformers==4.46.3", "pins"),
        ("message", "x = a_very_long_snake_case_identifier_name_here + AnotherVeryLongCamelCaseIdentifier2", "identifiers"),
        ("message", "héllo wörld 日本語テキスト 🙂", "unicode"),
        ("message", "CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 train.py --lr 2e-4", "env and flags"),
        ("message", "Traceback (most recent call last):\n  File \"stages/export.py\", line 88, in <module>\nKeyError: 'token'", "traceback with a key name"),
        ("message", "the function returns {'tokens': 512, 'passed': True, 'key': 'workflow'}", "dict with keyword keys"),
        ("message", "coordinates 52.5200, 13.4050 and ratio 0.8134", "floats"),
        ("tool_args", args(path="src/stages/redact.py", start_line=120, end_line=180), "read_file"),
        ("tool_args", args(command="git log --oneline -5 && git diff HEAD~1 -- stages/"), "git command"),
        ("tool_args", args(command="pytest tests/test_detectors.py -q -k 'not slow'"), "pytest command"),
        ("tool_args", args(sha="9fceb02d0ae598e95dc970b74767f19372d61af8", ref="refs/heads/main"), "SHA"),
        ("tool_args", args(id="550e8400-e29b-41d4-a716-446655440000", status="closed"), "UUID"),
        ("tool_args", args(url="https://docs.github.com/en/rest/issues/issues#list-repository-issues", method="GET"), "docs URL"),
        ("tool_args", args(version="3.11.7", python_requires=">=3.10"), "versions"),
        ("tool_args", args(date="2026-04-25", due="2026-05-01T17:00:00+02:00"), "dates"),
        ("tool_args", args(order_id="ORD-2026-00042", amount=1299.0, currency="EUR"), "order and price"),
        ("tool_args", args(to="<EMAIL_1>", cc=["<EMAIL_2>"]), "placeholders"),
        ("tool_args", args(host="localhost", port=5432, db="app_test"), "localhost db"),
        ("tool_args", args(host="192.168.1.20", gateway="10.0.0.1"), "private IPs"),
        ("tool_args", args(query="token limit exceeded", max_results=20), "keyword in a query"),
        ("tool_args", args(max_tokens=4096, temperature=0.2, top_p=0.95), "sampling params"),
        ("tool_args", args(file_path="tests/fixtures/redaction/labelled.jsonl", mode="r"), "fixture path"),
        ("tool_args", args(pattern=r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b", flags="g"), "a regex"),
        ("tool_args", args(code="for i in range(10):\n    print(i ** 2)\n"), "code"),
        ("tool_args", args(password_min_length=12, token_ttl_seconds=3600), "keyword config keys with numbers"),
        ("tool_args", args(key="workflow", value="triage"), "key/value pair"),
        ("review_note", "Looks good; the fix in stages/export.py (line 88) handles the KeyError.", "review prose with a path"),
        ("review_note", "edited: changed version to 2.1.0 and the date to 2026-04-25", "version and date"),
        ("review_note", "see https://docs.example.com/guide#section-3 for the policy", "docs URL"),
        ("review_note", "order 48213 refunded $45.00 on 2026-04-25", "order and price"),
        ("review_note", "commit a1b2c3d4e5f6 fixes the token_count bug", "SHA and identifier"),
        ("review_note", "ok: answer matched <PHONE_1> and <EMAIL_1> placeholders", "placeholders"),
        ("review_note", "the agent used 127.0.0.1:5000 for the local server", "localhost"),
        ("review_note", "reviewer: approved after checking README.md and CHANGELOG.md", "file names"),
        ("review_note", "rating 4/5; latency 1.2s; 3 retries", "numbers"),
        ("review_note", "Author: Dev Bot", "a key word that is not a secret key"),
        ("message", "python -c 'import secrets; print(secrets.token_hex(32))'", "code about secrets"),
        ("message", "uuid4 123e4567-e89b-12d3-a456-426614174000 and epoch 1714000000", "UUID and epoch"),
        ("tool_args", args(cidr="0.0.0.0/0", ports=[443, 8443]), "any-address CIDR"),
        ("review_note", "base64 of 'hello world' is aGVsbG8gd29ybGQ=", "short base64"),
        ("tool_args", args(sql="UPDATE users SET password_hash = NULL WHERE id = 7"), "SQL with a keyword column"),
    ):
        benign(loc, text, note)

    _families()
    return list(_cases)


def _fill(obj, v: str):
    if isinstance(obj, str):
        return obj.replace("{v}", v)
    if isinstance(obj, dict):
        return {_fill(k, v): _fill(x, v) for k, x in obj.items()}
    if isinstance(obj, list):
        return [_fill(x, v) for x in obj]
    return obj


def placements(seed: dict) -> dict[str, str]:
    """location -> the case text for one seed of families.jsonl."""
    v = seed["value"] or ""
    prose = seed["prose"].replace("{v}", v)
    obj = _fill(seed["args"], v) if seed["args"] is not None else {"text": prose}
    dump = lambda o: json.dumps(o, ensure_ascii=False)  # noqa: E731
    if seed["schema"]:
        schema = {"type": "object", "properties": {k: {"type": "string", "default": x}
                                                   for k, x in _fill(seed["schema"], v).items()}}
    else:
        schema = {"type": "object", "properties": {"input": {"type": "string", "description": prose}}}
    return {
        "message": prose, "assistant": prose, "system": prose, "review_note": prose, "tool_result": prose,
        "tool_args": dump(obj), "tool_args_nested": dump({"request": {"steps": [obj], "retries": 1}}),
        "tool_result_json": dump(obj), "tool_result_double": dump(dump(obj)), "tool_schema": dump(schema),
        "metadata": dump(obj), "dict_key": dump({prose: "seen"}),
    }


def _families() -> None:
    for line in FAMILIES.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        seed = json.loads(line)
        for loc, text in placements(seed).items():
            if seed["kind"] == "tp":
                tp(seed["category"], loc, text, seed["value"], note=seed["note"] or f"placement: {loc}")
            else:
                fp(seed["category"], loc, text, note=seed["note"] or f"placement: {loc}")


def shield(line: str) -> str:
    """Write the second char of each vendor prefix as a JSON \\u escape (same text once decoded)."""
    for p in SHIELD:
        line = line.replace(p, p[0] + f"\\u{ord(p[1]):04x}" + p[2:])
    return line


def render(cases: list[dict]) -> str:
    lines = []
    for c in cases:
        line = shield(json.dumps(c, sort_keys=True, ensure_ascii=False))
        assert json.loads(line) == c, c["id"]
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if --out differs from what this script writes")
    a = ap.parse_args(argv)
    text = render(build())
    if a.check:
        same = a.out.exists() and a.out.read_text(encoding="utf-8") == text
        print(f"{a.out}: {'up to date' if same else 'out of date; run python -m bench.redaction_cases'}")
        return 0 if same else 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} cases to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
