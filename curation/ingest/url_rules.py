"""URL and domain blocklists applied before any byte is fetched.

Blocklists are checked at ingestion so that a blocked host is never contacted (URL lists, every
redirect hop) and so that images whose recorded origin is blocked (img2dataset ``url`` metadata
in tar shards, a ``url`` column next to bytes in Parquet) never enter the pool.

Hosts are compared in their canonical spelling (``hosts.canonical_host``) on both sides, so
``127.0.0.1`` in a rule also blocks ``0x7f000001``, ``127.1`` and ``[::ffff:127.0.0.1]``, and
``Example.COM.`` blocks ``example.com``.

Rules, in the order they are checked:

* domains (files and inline): the host or any parent domain is listed, so ``example.com``
  blocks ``img.cdn.example.com`` but not ``badexample.com``. Files accept one domain a line,
  ``#`` comments, and hosts-file lines (``0.0.0.0 example.com``) as many public lists use.
  An IP address matches itself only, in any spelling.
* suffixes: the host name ends with the string (``.xxx`` blocks every host under that TLD).
* regexes (files and inline): ``re.search`` against the whole URL. In regex files only lines
  that *start* with ``#`` are comments, since ``#`` is a valid character in a pattern.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from curation.config import UrlRulesConfig
from curation.ingest.errors import BLOCKED_DOMAIN, BLOCKED_URL, IngestError
from curation.ingest.hosts import canonical_host

_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


@dataclass(frozen=True)
class RuleOrigin:
    """Where a rule came from, reported in the drop details."""

    source: str  # a file path or the config field name
    line: int | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "line": self.line} if self.line is not None else {"source": self.source}


@dataclass(frozen=True)
class Block:
    reason: str
    details: dict


def host_of(url: str) -> str | None:
    """The canonical host of ``url`` (see ``hosts``), or None when it has none."""
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return canonical_host(host) if host else None


class UrlRules:
    """Compiled blocklists; ``check(url)`` returns the first rule that blocks a URL, or None."""

    def __init__(self) -> None:
        self._domains: dict[str, RuleOrigin] = {}
        self._suffixes: list[tuple[str, RuleOrigin]] = []
        self._regexes: list[tuple[re.Pattern, RuleOrigin]] = []

    @property
    def empty(self) -> bool:
        return not (self._domains or self._suffixes or self._regexes)

    @classmethod
    def from_config(cls, cfg: UrlRulesConfig) -> "UrlRules":
        """Load every file and compile every pattern; any problem is an ``IngestError`` that
        names the file and line (or the config field and index)."""
        rules = cls()
        for path in cfg.domain_files:
            for lineno, text in _read_rule_file(Path(path)):
                domain = _domain_from_line(text)
                if domain is None:
                    raise IngestError(f"{path}:{lineno}: not a domain name: {text!r}")
                rules._domains.setdefault(domain, RuleOrigin(str(path), lineno))
        for i, text in enumerate(cfg.domains):
            domain = _domain_from_line(text)
            if domain is None:
                raise IngestError(f"url_rules.domains[{i}]: not a domain name: {text!r}")
            rules._domains.setdefault(domain, RuleOrigin("url_rules.domains"))
        for i, suffix in enumerate(cfg.suffixes):
            suffix = suffix.strip().lower()
            if not suffix:
                raise IngestError(f"url_rules.suffixes[{i}] is empty")
            rules._suffixes.append((suffix, RuleOrigin("url_rules.suffixes")))
        for path in cfg.regex_files:
            for lineno, text in _read_rule_file(Path(path), strip_inline_comments=False):
                rules._regexes.append((_compile(text, f"{path}:{lineno}"), RuleOrigin(str(path), lineno)))
        for i, text in enumerate(cfg.regexes):
            rules._regexes.append((_compile(text, f"url_rules.regexes[{i}]"), RuleOrigin("url_rules.regexes")))
        return rules

    def check(self, url: str) -> Block | None:
        host = host_of(url)
        if host:
            labels = [host] if _is_ip(host) else host.split(".")
            for i in range(len(labels)):
                candidate = ".".join(labels[i:])
                origin = self._domains.get(candidate)
                if origin is not None:
                    return Block(BLOCKED_DOMAIN, {"rule": "domain", "domain": candidate, "host": host, **origin.as_dict()})
            for suffix, origin in self._suffixes:
                if host.endswith(suffix):
                    return Block(BLOCKED_DOMAIN, {"rule": "suffix", "suffix": suffix, "host": host, **origin.as_dict()})
        for pattern, origin in self._regexes:
            if pattern.search(url):
                return Block(BLOCKED_URL, {"rule": "regex", "pattern": pattern.pattern, **origin.as_dict()})
        return None


def _read_rule_file(path: Path, strip_inline_comments: bool = True):
    """Yield (line number, rule text) for the non-empty, non-comment lines of a rule file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IngestError(f"url rules file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"url rules file {path} cannot be read: {e}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if strip_inline_comments:
            stripped = stripped.split("#", 1)[0].strip()
            if not stripped:
                continue
        yield lineno, stripped


def _domain_from_line(text: str) -> str | None:
    """A domain from a blocklist line: ``example.com``, ``*.example.com``, ``0.0.0.0 example.com``."""
    parts = text.split()
    if len(parts) == 2 and _is_ip(parts[0]):
        text = parts[1]
    elif len(parts) != 1:
        return None
    domain = canonical_host(text.removeprefix("*.").lstrip("."))
    if _is_ip(domain):
        return domain
    labels = domain.split(".")
    if not domain or not all(_HOST_LABEL.match(label) for label in labels):
        return None
    return domain


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise IngestError(f"{where}: invalid regular expression {pattern!r}: {e}") from None


# Rules are loaded once per worker process: a blocklist may hold millions of lines.
_CACHE: dict[str, UrlRules] = {}


def rules_for(cfg: UrlRulesConfig) -> UrlRules:
    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    rules = _CACHE.get(key)
    if rules is None:
        rules = _CACHE[key] = UrlRules.from_config(cfg)
    return rules
