"""URL and domain blocklists: what they block, what they leave alone, and how bad rules fail."""

from __future__ import annotations

import pytest

from curation.config import IngestConfig, UrlRulesConfig
from curation.ingest import IngestError, SourceSpec, plan_units
from curation.ingest.url_rules import UrlRules


@pytest.fixture
def rules(tmp_path) -> UrlRules:
    domains = tmp_path / "domains.txt"
    domains.write_text(
        "# adult and spam hosts\n"
        "bad.example\n"
        "\n"
        "0.0.0.0 tracker.example.net   # hosts-file style line\n"
        "*.wild.example\n"
    )
    regexes = tmp_path / "patterns.txt"
    regexes.write_text("# query strings that mark private pages\n[?&]token=\n/watermark/\n")
    return UrlRules.from_config(
        UrlRulesConfig(domain_files=[domains], domains=["Inline.Example."], suffixes=[".xxx"], regex_files=[regexes], regexes=[r"\.svg$"])
    )


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://bad.example/a.jpg", "blocked_domain"),
        ("https://img.cdn.bad.example/a.jpg", "blocked_domain"),  # subdomains too
        ("http://BAD.EXAMPLE./a.jpg", "blocked_domain"),  # case and trailing dot
        ("http://tracker.example.net/p.gif", "blocked_domain"),
        ("http://x.wild.example/a.jpg", "blocked_domain"),
        ("http://inline.example:8080/a.jpg", "blocked_domain"),
        ("http://site.xxx/a.jpg", "blocked_domain"),
        ("http://ok.example/a.jpg?size=2&token=abc", "blocked_url"),
        ("http://ok.example/watermark/a.jpg", "blocked_url"),
        ("http://ok.example/logo.svg", "blocked_url"),
    ],
)
def test_blocked(rules, url, reason):
    block = rules.check(url)
    assert block is not None and block.reason == reason


@pytest.mark.parametrize(
    "url",
    [
        "http://notbad.example/a.jpg",  # a different domain that merely ends with the same letters
        "http://bad.example.org/a.jpg",
        "http://example.net/a.jpg",  # the parent of a blocked domain is not blocked
        "http://xxx.example/a.jpg",
        "http://ok.example/a.jpg?tokens=1",
        "http://ok.example/logo.svg.jpg",
    ],
)
def test_not_blocked(rules, url):
    assert rules.check(url) is None


def test_details_name_the_matching_rule_and_its_line(rules, tmp_path):
    block = rules.check("http://a.tracker.example.net/x.jpg")
    assert block.details == {
        "rule": "domain", "domain": "tracker.example.net", "host": "a.tracker.example.net",
        "source": str(tmp_path / "domains.txt"), "line": 4,
    }
    block = rules.check("http://ok.example/watermark/1.jpg")
    assert block.details == {"rule": "regex", "pattern": "/watermark/", "source": str(tmp_path / "patterns.txt"), "line": 3}


def test_invalid_regex_in_a_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "patterns.txt"
    bad.write_text("ok\n# comment\n([unclosed\n")
    with pytest.raises(IngestError, match=r"patterns\.txt:3: invalid regular expression"):
        UrlRules.from_config(UrlRulesConfig(regex_files=[bad]))


def test_invalid_inline_regex_names_its_index():
    with pytest.raises(IngestError, match=r"url_rules\.regexes\[1\]"):
        UrlRules.from_config(UrlRulesConfig(regexes=["fine", "*bad"]))


def test_missing_blocklist_file_is_an_error(tmp_path):
    with pytest.raises(IngestError, match="not found: .*nope.txt"):
        UrlRules.from_config(UrlRulesConfig(domain_files=[tmp_path / "nope.txt"]))


def test_a_line_that_is_not_a_domain_names_the_file_and_line(tmp_path):
    bad = tmp_path / "domains.txt"
    bad.write_text("good.example\nhttp://not a domain/\n")
    with pytest.raises(IngestError, match=r"domains\.txt:2: not a domain name"):
        UrlRules.from_config(UrlRulesConfig(domain_files=[bad]))


def test_plan_units_refuses_bad_rules_before_any_work(tmp_path, jpeg_factory):
    (tmp_path / "a.jpg").write_bytes(jpeg_factory(0))
    cfg = IngestConfig(url_rules=UrlRulesConfig(regexes=["(oops"]))
    with pytest.raises(IngestError, match="invalid regular expression"):
        plan_units([SourceSpec(str(tmp_path), "pool", "pool")], cfg)


# One address has many spellings; a rule written in any of them blocks all of them.
LOOPBACK_SPELLINGS = ["127.0.0.1", "0x7f000001", "2130706433", "127.1", "0177.0.0.1", "127.0.0.1.",
                      "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "\uff11\uff12\uff17.\uff10.\uff10.\uff11"]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_a_domain_rule_on_an_address_blocks_every_spelling_of_it(spelling):
    rules = UrlRules.from_config(UrlRulesConfig(domains=["127.0.0.1", "localhost"]))
    block = rules.check(f"http://{spelling}:8080/a.jpg")
    assert block is not None and block.reason == "blocked_domain" and block.details["domain"] == "127.0.0.1"


@pytest.mark.parametrize("rule", ["0x7f000001", "[::ffff:127.0.0.1]", "127.1"])
def test_an_address_rule_in_another_spelling_blocks_the_dotted_form(rule):
    assert UrlRules.from_config(UrlRulesConfig(domains=[rule])).check("http://127.0.0.1/a.jpg") is not None


def test_host_names_match_across_case_trailing_dots_and_idna():
    rules = UrlRules.from_config(UrlRulesConfig(domains=["Bücher.example", "localhost"]))
    for url in ("http://xn--bcher-kva.example/a.jpg", "http://BÜCHER.example./a.jpg", "http://LOCALHOST./a.jpg",
                "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/a.jpg"):
        assert rules.check(url) is not None, url


def test_an_address_rule_does_not_block_its_neighbours():
    rules = UrlRules.from_config(UrlRulesConfig(domains=["10.0.0.1"]))
    assert rules.check("http://10.0.0.10/a.jpg") is None and rules.check("http://0.1/a.jpg") is None
