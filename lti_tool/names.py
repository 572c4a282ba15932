"""How a person is shown to a teacher when their registration shares no name.

Moodle's privacy settings per tool type decide whether launches and rosters carry names and
emails. When they do not, the class page must neither show Moodle's internal user id as if
it were a name ("user 7") nor fall back on a name another registration of the same site
shared. It shows a short label derived from a keyed hash of (issuer, user id): stable for a
person, meaningless outside Labpool, and not the platform's id (which the teacher can still
read on hover).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Iterable

LABEL_DIGITS = 4  # "Student 4f2a"; widened where two members of one class would collide
WIDE_DIGITS = 8


def label_digest(key: str, issuer: str, sub: str) -> str:
    """A hex digest of the person, keyed with the tool's secret (so nobody outside the tool
    can compute a label from a Moodle user id, or the other way round)."""
    message = b"labpool display label\0" + issuer.encode() + b"\0" + sub.encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def short_labels(key: str, issuer: str, subs: Iterable[str]) -> dict[str, str]:
    """The hex part of each person's label within one class: four digits, eight for those
    whose four would be the same as someone else's in the class."""
    digests = {sub: label_digest(key, issuer, sub) for sub in subs}
    counts = Counter(d[:LABEL_DIGITS] for d in digests.values())
    return {
        sub: d[:LABEL_DIGITS] if counts[d[:LABEL_DIGITS]] == 1 else d[:WIDE_DIGITS]
        for sub, d in digests.items()
    }
