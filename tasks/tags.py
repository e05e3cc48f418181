"""Tags: labels a job is submitted with (``batch-7``, ``customer:acme``), to find and cancel a batch.

One rule for every front door: the API's schema uses the same pattern, the service checks it for
the CLI and any other caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tasks.errors import InvalidTag

TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,63}$"
MAX_TAGS = 16
_TAG = re.compile(TAG_PATTERN)


def check_tags(tags: Iterable[str]) -> list[str]:
    """The tags, each once, in the order given; InvalidTag names the first one that breaks the rule."""
    unique = list(dict.fromkeys(tags))
    for tag in unique:
        if not _TAG.fullmatch(tag):
            raise InvalidTag(f"invalid tag {tag!r}: 1-64 characters, letters, digits and _ . : / @ -, "
                             "starting with a letter or digit")
    if len(unique) > MAX_TAGS:
        raise InvalidTag(f"{len(unique)} tags: at most {MAX_TAGS} per job")
    return unique
