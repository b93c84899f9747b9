"""When a pack or adopt keeps too little to be a dataset: fail, say why, say what may fix it."""

from __future__ import annotations

import re
from collections import Counter

from shard_tools import labels


def reason_kind(reason: str) -> str:
    """A reason without what is particular to one sample (parenthesised details, numbers,
    quoted values), so that equal reasons are counted together."""
    kind = re.sub(r"\([^)]*\)", "", reason)
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", kind)
    kind = re.sub(r"\d[\d,]*", "N", kind)
    return " ".join(kind.split()).rstrip(" :;,")


def evidence(samples) -> Counter:
    """What tar samples without a .cls carry that could label or describe them: fields of
    their .json (``json:FIELD``) and .txt members (``txt``). The first 10,000 are looked at."""
    seen: Counter = Counter()
    for sample in samples[:10_000]:
        meta = sample.meta()
        if isinstance(meta, dict):
            seen.update(f"json:{k}" for k in meta if k in labels.LABEL_HINT_FIELDS)
        if any(m.ext.lower() == "txt" for m in sample.members):
            seen["txt"] += 1
    return seen


def hints(seen: Counter) -> list[str]:
    """What to try, from evidence() totals."""
    out = [f"{n:,} samples have .json members with a {k[5:]!r} field: did you mean --label {k}?"
           for k, n in seen.most_common() if k.startswith("json:")][:2]  # fmt: skip
    if seen.get("txt"):
        out.append(f"{seen['txt']:,} samples have .txt members (captions?): image-text data "
                   "is packed or adopted with --unlabelled")  # fmt: skip
    return out


def check(kept: int, rejected: list[tuple[str, str]], max_fraction: float, fixes: list[str],
          *, what: str, error: type[Exception]) -> None:  # fmt: skip
    """Raise ERROR when KEPT is 0 or more than MAX_FRACTION of the inputs were rejected,
    with the three commonest reasons and FIXES."""
    total = kept + len(rejected)
    if kept and len(rejected) <= max_fraction * total:
        return
    top = "; ".join(f"{n:,} x {r}" for r, n in
                    Counter(reason_kind(r) for _, r in rejected).most_common(3))  # fmt: skip
    head = (f"kept 0 of {total:,} samples" if not kept else
            f"rejected {len(rejected):,} of {total:,} samples ({len(rejected) / total:.0%}, more "
            f"than --max-reject-fraction {max_fraction:g})")  # fmt: skip
    fix = f" | {' '.join(fixes)}" if fixes else ""
    raise error(f"{what}: {head}: {top or 'no input'}{fix}; nothing was published (no manifest)")
