"""``X-Robots-Tag`` opt-outs: a site that says ``noai`` / ``noimageai`` is not used for training.

A header holds comma-separated directives, optionally for one crawler only
(``X-Robots-Tag: otherbot: noai`` concerns ``otherbot``, ``curation: noai`` concerns us), and may
appear several times. The rule is img2dataset's: a directive applies when it names no user agent
or names ours (the product token of ``HttpConfig.user_agent``, ``curation`` by default).
"""

from __future__ import annotations

from collections.abc import Iterable


def user_agent_token(user_agent: str) -> str:
    """``curation/0.1 (+https://...)`` -> ``curation``."""
    return user_agent.strip().split("/", 1)[0].split(None, 1)[0].lower() if user_agent.strip() else ""


def opt_out_directive(header_values: Iterable[str], token: str, directives: Iterable[str]) -> str | None:
    """The first of ``directives`` that the ``X-Robots-Tag`` values apply to us, or None."""
    wanted = {d.strip().lower() for d in directives}
    for value in header_values:
        target, sep, rest = value.partition(":")
        if sep and target.strip() and "," not in target and target.strip().lower() not in wanted:
            if target.strip().lower() != token:
                continue  # a directive for another crawler
            value = rest
        for directive in value.split(","):
            directive = directive.strip().lower()
            if directive in wanted:
                return directive
    return None
