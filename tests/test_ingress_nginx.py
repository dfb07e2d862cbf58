"""ingress-nginx's own e2e annotation tests (../shared/ingress-nginx/cases.yaml) against a
real `mesh run` and real Envoy, through the runner `python -m tests.ingress_nginx`.

Every case must pass, and every case of the data must have been run with every request
judged: a runner that silently runs nothing must not look green.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.ingress_nginx import judge
from tests.ingress_nginx.cases import DEFAULT_DATA, EXPECT_KEYS, load, parse_case
from tests.ingress_nginx.runner import report, run


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_DATA / "cases.yaml").exists(),
                    reason="the ingress-nginx cases live in ../shared/ingress-nginx beside the "
                    "repo (cases.yaml is absent)")
def test_ingress_nginx_cases() -> None:
    lines: list[str] = []
    result = run(log=lines.append)
    print("\n".join(lines))
    print(report(result))
    failed = [r.line() for r in result.results if r.outcome != "PASS"]
    assert not failed, "\n".join(failed)
    in_data = [c.id for c in load()]
    assert len(in_data) == len(set(in_data)) > 0
    assert [r.case.id for r in result.results] == in_data, "not every case was run"
    for r in result.results:
        sent = sum(req.repeat for s in r.case.steps for req in s.requests)
        assert r.judged == sent > 0, f"{r.case.id}: {r.judged} of {sent} requests judged"
    assert not result.notes, result.notes


# -- the judge, without Envoy: each expectation accepts the right answer, refuses a wrong one --

def _answer(status: int = 200, headers: list[tuple[str, str]] | None = None,
            echo: dict[str, Any] | None = None) -> judge.Answer:
    body = json.dumps({"pod": "main-1", "path": "/", "host": "foo", "headers": {},
                       **(echo or {})}).encode() if echo is not None else b"not the echo"
    now = time.time()
    return judge.Answer(status, headers or [], body, now, now)


def test_every_expectation_of_the_schema_is_judged() -> None:
    now = time.time()
    expires = judge.expires_strings(judge.Answer(200, [], b"", now, now), 3600)[0]
    good = _answer(200, [("Location", "https://x"), ("Access-Control-Allow-Methods", "POST,GET"),
                         ("Set-Cookie", f"SERVERID=abc; {expires} GMT; Path=/; Secure")],
                   {"pod": "canary-1", "path": "/foo/bar?x=1", "host": "bar",
                    "headers": {"X-Real-Ip": ["1.2.3.4"]}})
    cases: dict[str, tuple[Any, Any]] = {  # key -> (met by `good`, missed by `good`)
        "status": (200, 301),
        "backend": ("canary", "main"),
        "path_startswith": ("/foo", "/bar"),
        "headers_equal": ({"location": "https://x"}, {"Location": "https://x/"}),
        "headers_list_equal": ({"Access-Control-Allow-Methods": "POST, GET"},
                               {"Access-Control-Allow-Methods": "GET, POST"}),
        "headers_present": (["Location"], ["Vary"]),
        "headers_absent": (["Vary"], ["Location"]),
        "set_cookie_contains": (["SERVERID=", "; Secure"], ["Domain="]),
        "set_cookie_not_contains": (["; Domain"], ["Path=/"]),
        "set_cookie_empty": (False, True),
        "set_cookie_expires_in": (3600, 7200),
        "backend_host": ("bar", "foo"),
        "backend_header_equal": ({"x-real-ip": "1.2.3.4"}, {"X-Real-IP": "1.2.3.5"}),
        "backend_header_absent": (["X-Forwarded-Prefix"], ["X-Real-IP"]),
    }
    assert set(cases) == EXPECT_KEYS - {"distribution"}
    for key, (met, missed) in cases.items():
        assert judge.judge({key: met}, good) is None, key
        assert judge.judge({key: missed}, good) is not None, key
    # Without a Set-Cookie, set_cookie_empty holds; the backend's side needs the echo.
    assert judge.judge({"set_cookie_empty": True}, _answer(echo={})) is None
    for key in ("backend", "path_startswith", "backend_host", "backend_header_absent"):
        assert judge.judge({key: cases[key][0]}, _answer(503)) is not None, key
    # A header sent twice is two values, not the first.
    twice = _answer(headers=[("Access-Control-Allow-Origin", "*"),
                             ("Access-Control-Allow-Origin", "*")], echo={})
    assert judge.judge({"headers_equal": {"Access-Control-Allow-Origin": "*"}}, twice)


def test_cookies_are_captured_and_sent_as_go_does() -> None:
    captured: dict[str, str] = {}
    answer = _answer(headers=[("Set-Cookie", 'aff="Cg8x"; Path=/; HttpOnly')], echo={})
    assert judge.capture(answer, "aff", captured) is None and captured == {"aff": "Cg8x"}
    assert judge.capture(answer, "other", captured) is not None
    req = parse_case({"id": "x", "ingresses": [{"name": "a", "host": "h", "path": "/",
                                                "backend": "main"}],
                      "requests": [{"path": "/", "cookies": {"aff": "${aff}", "b": "1"},
                                    "expect": {"status": 200}}]}).steps[0].requests[0]
    assert judge.cookie_header(req, captured) == "aff=Cg8x; b=1"
    with pytest.raises(judge.MissingCookie):
        judge.cookie_header(req, {})


def test_unknown_keys_fail_the_case_instead_of_passing_it() -> None:
    case = parse_case({"id": "x", "ingresses": [{"name": "a", "host": "h", "path": "/",
                                                 "backend": "main", "new_field": 1}],
                       "requests": [{"path": "/", "expect": {"status": 200, "new_check": 1}}]})
    assert len(case.problems) == 2, case.problems
    assert parse_case({"id": "y", "ingresses": []}).problems == ["the case sends no request"]
