"""The Luhn (mod 10) checksum of payment card numbers: the one implementation, for the card detector
(stages/detectors.py) and for the generators that plant valid numbers (examples/generate.py, bench/corpus.py).
Standard library only: examples/generate.py runs before the project is installed."""
from __future__ import annotations


def luhn_ok(digits: str) -> bool:
    """True when a string of ASCII digits passes the Luhn check (its last digit is the check digit).
    On redact's hot path: no validation of the input, digits only."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_check_digit(body: str) -> str:
    """The digit that completes `body` (ASCII digits) into a Luhn-valid number."""
    total = 0
    for i, ch in enumerate(reversed(body)):  # body's last digit sits beside the check digit: it is doubled
        d = ord(ch) - 48
        if not i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)
