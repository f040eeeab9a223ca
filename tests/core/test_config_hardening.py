"""Configuration hardening: hostile or odd input is a problem at its key path (exit 2), never a hang or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import field_validator

from podmeter.component import ComponentID, Factory, registry
from podmeter.config import ComponentConfig, ConfigError, _parse_endpoint, load, parse_duration

HERE = os.path.dirname(__file__)
PLUGINS = os.path.join(HERE, "plugins.py")

GOOD = """
receivers:
  counter:
    collection_interval: 1s
processors:
  tag:
exporters:
  record:
extensions:
  health_check:
    endpoint: 127.0.0.1:13133
service:
  extensions: [health_check]
  pipelines:
    metrics:
      receivers: [counter]
      processors: [tag]
      exporters: [record]
"""


class ShapesConfig(ComponentConfig):
    value: str | int | float | bool = ""
    labels: dict[str, str] = {}
    items: list[str] = []
    pattern: str = ""

    @field_validator("pattern")
    @classmethod
    def _overflow(cls, v: str) -> str:
        if v == "overflow":
            raise OverflowError("repetition count too large")  # as re.compile("a{4294967296}") does
        return v


@pytest.fixture(autouse=True)
def plugins():
    from core import plugins

    plugins.register()
    registry().register(Factory("processor", "shapes", ShapesConfig, lambda settings, config: None))


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path, text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load([write(tmp_path, text)], env=env or {})
    return info.value.problems


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PLUGINS, *args], capture_output=True, text=True, timeout=60)


def with_shapes(settings: str) -> str:
    return GOOD.replace("processors:\n  tag:", f"processors:\n  tag:\n  shapes:\n    {settings}")


# -- 1. an env value is text: only a YAML list or mapping becomes structure -------------------------------------


@pytest.mark.parametrize("value", ["0755", "1:30", "1.20", "12345", "true", "null", "a: b"])
def test_env_value_keeps_its_text_in_a_string_field(tmp_path, value):
    config = load([write(tmp_path, GOOD.replace("processors:\n  tag:", "processors:\n  tag:\n    value: ${env:V}"))],
                  env={"V": value})
    assert next(iter(config.processors.values())).value == value


def test_env_values_still_convert_for_typed_fields(tmp_path):
    text = (GOOD.replace("collection_interval: 1s", "collection_interval: ${env:IVAL}\n    pods: ${env:PODS}")
            .replace("  record:\n", "  record:\n    delay: ${env:DELAY}\n    fail: ${env:FAIL}\n"))
    config = load([write(tmp_path, text)], env={"IVAL": "10s", "PODS": "10", "DELAY": "0.5", "FAIL": "true"})
    rcv, exp = next(iter(config.receivers.values())), next(iter(config.exporters.values()))
    assert (rcv.collection_interval, rcv.pods, exp.delay, exp.fail) == (10.0, 10, 0.5, True)


def test_env_structured_values(tmp_path):
    text = with_shapes("labels: ${env:LABELS}\n    items: ${env:ITEMS}")
    config = load([write(tmp_path, text)], env={"LABELS": "{a: b}", "ITEMS": "[x, y]"})
    shapes = config.processors[ComponentID("shapes")]
    assert (shapes.labels, shapes.items) == ({"a": "b"}, ["x", "y"])


# -- 2. alias bombs, self-reference, deep nesting, size ----------------------------------------------------------


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 8):  # 9**7 values once expanded
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    text = GOOD + "x-bomb:\n" + "\n".join("  " + line for line in lines) + "\n"
    started = time.monotonic()
    found = problems(tmp_path, text)
    assert time.monotonic() - started < 5
    assert any("too large after expanding YAML aliases" in p for p in found), found


@pytest.mark.parametrize("text,path", [
    ("receivers:\n  counter:\n    extra: &a [lo, *a]\n", "receivers::counter::extra::1"),
    ("receivers: &r\n  counter: *r\n", "receivers::counter"),
])
def test_self_reference_names_the_path(tmp_path, text, path):
    found = problems(tmp_path, text)
    assert any(p.startswith(f"{path}: contains itself") for p in found), found


@pytest.mark.parametrize("text", ["receivers:\n  counter:\n    extra: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "receivers:\n  counter:\n    extra: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"])
def test_deep_nesting_is_a_problem_naming_the_file(tmp_path, text):
    path = write(tmp_path, text)
    result = cli("validate", "--config", path)
    assert result.returncode == 2, result.stderr
    assert f"{path}: at line 3" in result.stderr and "nests deeper than" in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def test_large_config_with_20000_ids_loads(tmp_path):
    ids = [f"counter/r{i}" for i in range(20_000)]
    items = "\n".join(f"      - eth{i}" for i in range(60_000))
    text = ("receivers:\n" + "".join(f"  {i}: {{}}\n" for i in ids) + f"processors:\n  shapes:\n    items:\n{items}\n"
            "exporters:\n  record:\nservice:\n  pipelines:\n    metrics:\n"
            f"      receivers: [{', '.join(ids)}]\n      processors: [shapes]\n      exporters: [record]\n")
    config = load([write(tmp_path, text)], env={})
    assert len(config.receivers) == 20_000
    assert len(config.processors[ComponentID("shapes")].items) == 60_000


# -- 3. durations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [("87600h", 87600 * 3600), ("1us", 1e-6), ("1\u00b5s", 1e-6),
                                          ("1\u03bcs", 1e-6), ("1h1us", 3600.000001)])
def test_duration_limits_and_microseconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["87601h", "3000000h", "9" * 400 + "s", "\u0661\u0660s", "\uff11\uff10s", "1\u0660s"])
def test_durations_too_long_or_not_ascii(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_too_long_duration_names_the_key(tmp_path):
    found = problems(tmp_path, GOOD.replace("collection_interval: 1s", "collection_interval: 1s\n    initial_delay: 3000000h"))
    assert any(p.startswith("receivers::counter::initial_delay: invalid duration '3000000h': longer than the maximum, "
                            "87600h (10 years)") for p in found), found


# -- 4. encoding -----------------------------------------------------------------------------------------------


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"receivers:\n  counter: {}\n  \xe9t\xe9: {}\n")
    result = cli("validate", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}: not UTF-8: byte 0xe9 at offset 27 (line 3)" in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def test_endless_file_is_refused_without_reading_it_all():
    # `--config /dev/zero` (or a log file given by mistake) used to be read whole: MemoryError, "internal error"
    result = cli("validate", "--config", "/dev/zero")
    assert result.returncode == 2, result.stderr
    assert "/dev/zero: larger than 16 MiB" in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


# -- 5. duplicate keys -----------------------------------------------------------------------------------------


def test_duplicate_component_key(tmp_path):
    found = problems(tmp_path, GOOD.replace("  counter:\n    collection_interval: 1s",
                                            "  counter:\n    collection_interval: 1s\n  counter:\n    pods: 2"))
    assert any(p.startswith("receivers::counter: duplicate key") and "at line 5 (first at line 3)" in p
               for p in found), found


def test_duplicate_section(tmp_path):
    found = problems(tmp_path, GOOD + "receivers:\n  counter:\n")
    assert any(p.startswith("receivers: duplicate key") for p in found), found


def test_merge_key_may_override(tmp_path):
    text = GOOD.replace("  counter:\n    collection_interval: 1s",
                        "  counter: &c\n    collection_interval: 1s\n  counter/b:\n    <<: *c\n    collection_interval: 2s")
    config = load([write(tmp_path, text)], env={})
    assert config.receivers[ComponentID("counter", "b")].collection_interval == 2.0


# -- 6. component and pipeline ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["counter/", " counter ", "counter/my name", "counter/a/b", "/x", "counter/\t",
                                 "1counter", "coun-ter", "counter/a+b"])
def test_invalid_component_ids(tmp_path, cid):
    text = GOOD.replace("  counter:\n", f"  counter:\n  \"{cid}\":\n")
    found = problems(tmp_path, text)
    assert any(p.startswith(f"receivers::{cid}: invalid component id") for p in found), found


def test_ids_do_not_collapse():
    assert ComponentID.parse("counter/é") == ComponentID("counter", "é")
    for text in ("counter/", " counter", "counter ", "counter/" + "x" * 1025, "c" * 64):
        with pytest.raises(ValueError):
            ComponentID.parse(text)


@pytest.mark.parametrize("pid", ["metrics/", "metrics/a/b", "metrics/ x"])
def test_invalid_pipeline_ids(tmp_path, pid):
    text = GOOD + f"    \"{pid}\":\n      receivers: [counter]\n      exporters: [record]\n"
    found = problems(tmp_path, text)
    assert any(p.startswith(f"service::pipelines::{pid}: invalid pipeline id") for p in found), found


# -- 7. ${...} references --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref,says", [("${env:UNCLOSED", "no closing }"), ("${env:A-B}", "'A-B' is not a variable name"),
                                      ("${env:FOO:default}", "${env:FOO:-default}"),
                                      ("${file:/etc/passwd}", 'unsupported scheme "file"; podmeter supports env only'),
                                      ("${ env:HOME }", "is not a variable name"), ("${}", "names no variable"),
                                      ("x-${1}", "'1' is not a variable name")])
def test_malformed_references(tmp_path, ref, says):
    found = problems(tmp_path, GOOD.replace("processors:\n  tag:", f"processors:\n  tag:\n    value: \"{ref}\""),
                     env={"HOME": "/h", "FOO": "x"})
    assert any(p.startswith("processors::tag::value: invalid reference") and says in p and "$$" in p
               for p in found), found


@pytest.mark.parametrize("text,expected", [("${env:NOPE:-${env:HOME}}", "/h"), ("$${1}", "${1}"),
                                           ("x.$${what}.$1", "x.${what}.$1"), ("$$$${env:HOME}", "$${env:HOME}"),
                                           ("${env:NOPE:-a:b}", "a:b"), ("${HOME}-$HOME-$", "/h-$HOME-$")])
def test_references_that_work(tmp_path, text, expected):
    config = load([write(tmp_path, GOOD.replace("processors:\n  tag:", f"processors:\n  tag:\n    value: \"{text}\""))],
                  env={"HOME": "/h"})
    assert next(iter(config.processors.values())).value == expected


def test_undefined_variable_in_a_default(tmp_path):
    found = problems(tmp_path, GOOD.replace("processors:\n  tag:", "processors:\n  tag:\n    value: ${env:A:-${env:B}}"))
    assert found == ["processors::tag::value: environment variable B is not defined and has no default "
                     "(write ${env:B:-default} to give one)"]


# -- 8. endpoints ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [":8888", "127.0.0.1:1", "localhost:9464", "[::1]:9464", "0.0.0.0:65535",
                                      "my-host.example.com:80", "[fe80::1%eth0]:80"])
def test_good_endpoints(endpoint):
    assert _parse_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("endpoint,says", [("http://127.0.0.1:19404", "drop http://"), ("::1", "in brackets"),
                                           ("a b:80", "not a hostname"), ("[::1:80", "in brackets"),
                                           ("a:b:c:80", "in brackets"), ("[zz]:80", "not an IPv6 address"),
                                           ("300.1.1.1:80", "not an IPv4 address"), ("-a:80", "not a hostname"),
                                           ("host:\u0663", "expected host:port"), ("host:0", "out of range")])
def test_bad_endpoints(endpoint, says):
    with pytest.raises(ValueError, match=says):
        _parse_endpoint(endpoint)


def test_liveness_path_must_differ_from_path(tmp_path):
    found = problems(tmp_path, GOOD.replace("endpoint: 127.0.0.1:13133", "endpoint: 127.0.0.1:13133\n    path: /h\n"
                                                                        "    liveness_path: /h"))
    assert any(p.startswith("extensions::health_check::liveness_path:") and "paths of their own" in p
               for p in found), found


def test_bad_endpoint_names_the_key(tmp_path):
    found = problems(tmp_path, GOOD.replace("127.0.0.1:13133", "http://127.0.0.1:13133"))
    assert any(p.startswith("extensions::health_check::endpoint: invalid endpoint") and "drop http://" in p
               for p in found), found


# -- 9. messages name key paths that exist -----------------------------------------------------------------------


def test_union_mismatch_is_one_problem(tmp_path):
    found = problems(tmp_path, with_shapes("value: {x: 1}"))
    assert found == ["processors::shapes::value: expected one of string, integer, number, boolean"]


def test_mapping_keys_are_not_taken_for_union_branches(tmp_path):
    """Keys of a user's mapping (`A`, `B`) look like the names pydantic gives union branches; two bad values under
    them are two problems at their own paths, not one union."""
    found = problems(tmp_path, with_shapes("labels: {A: 1, B: 1}"))
    assert found == ["processors::shapes::labels::A: Input should be a valid string (got 1)",
                     "processors::shapes::labels::B: Input should be a valid string (got 1)"]


def test_non_string_map_key(tmp_path):
    found = problems(tmp_path, with_shapes("labels: {1: x, a: b}"))
    assert found == ["processors::shapes::labels::1: keys must be strings (got 1)"]


def test_any_exception_from_a_validator_is_a_problem(tmp_path):
    found = problems(tmp_path, with_shapes("pattern: overflow"))
    assert found == ["processors::shapes: invalid settings: OverflowError: repetition count too large"]


# -- 10, 11. CLI -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["\u00b2", "\u0663"])
def test_inspect_pid_needs_ascii_digits(pid):
    result = cli("inspect", "pid", pid)
    assert result.returncode == 2, result.stderr
    assert "PID must be a positive integer" in result.stderr and "Traceback" not in result.stderr


def test_interrupt_while_parsing_arguments_is_quiet(monkeypatch):
    from podmeter import cli as cli_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "build_parser", interrupted)
    try:
        assert cli_module.main(["validate"]) == 130
    except KeyboardInterrupt:  # escaping would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped main()")


# -- 12. sections and service references -------------------------------------------------------------------------


@pytest.mark.parametrize("section,value", [("exporters", "false"), ("processors", '""'), ("extensions", "0")])
def test_section_must_be_a_mapping(tmp_path, section, value):
    text = "receivers:\n  counter:\n" + f"{section}: {value}\n" + "service:\n  pipelines:\n    metrics: {}\n"
    found = problems(tmp_path, text)
    assert any(p.startswith(f"{section}: must be a mapping") for p in found), found


def test_service_not_a_mapping_is_one_problem(tmp_path):
    found = problems(tmp_path, GOOD.split("service:")[0] + "service: [a]\n")
    assert found == ["service: must be a mapping, not list"]


def test_extension_listed_twice(tmp_path):
    found = problems(tmp_path, GOOD.replace("extensions: [health_check]", "extensions: [health_check, health_check]"))
    assert found == ['service::extensions::1: extension "health_check" is listed twice']


def test_dangling_reference_has_its_index(tmp_path):
    found = problems(tmp_path, GOOD.replace("receivers: [counter]", "receivers: [counter, countr]"))
    assert found == ['service::pipelines::metrics::receivers::1: references receiver "countr" which is not configured '
                     '(did you mean "counter"?)']


# -- 13. plain scalars read as the collector's YAML library reads them (YAML 1.2 core, not 1.1) --------------------


@pytest.mark.parametrize("text,expected", [
    ("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("NO", "NO"),  # 1.1 booleans: strings in go-yaml v3
    ("12:30", "12:30"), ("1:30.5", "1:30.5"),  # 1.1 sexagesimal numbers (750, 90.5)
    ("2024-01-01", "2024-01-01"),  # a 1.1 timestamp
    ("true", True), ("FALSE", False), ("0x1f", 31), ("0o17", 15), ("1_000", 1000), ("-.5", -0.5), ("1.5", 1.5),
])
def test_plain_scalars_are_typed_as_the_collector_types_them(tmp_path, text, expected):
    config = load([write(tmp_path, with_shapes(f"value: {text}\n    labels: {{country: {text}}}"
                                               if isinstance(expected, str) else f"value: {text}"))], env={})
    settings = config.processors[ComponentID("shapes")]
    assert settings.value == expected and type(settings.value) is type(expected)
    if isinstance(expected, str):  # a dict[str, str] takes it, where a boolean or a date was refused
        assert settings.labels == {"country": text}


@pytest.mark.parametrize("text", ["on", "yes", "true", "On"])
def test_a_boolean_field_still_takes_the_yaml_1_1_words(tmp_path, text):
    config = load([write(tmp_path, GOOD.replace("  tag:\n", f"  tag:\n    fail: {text}\n"))], env={})
    assert config.processors[ComponentID("tag")].fail is True


# -- 14. log levels in any case, as the collector's ------------------------------------------------------------------


@pytest.mark.parametrize("level,expected", [("INFO", "info"), ("WARN", "warn"), ("Debug", "debug"), ("error", "error")])
def test_log_level_in_any_case(tmp_path, level, expected):
    text = GOOD.replace("service:\n", f"service:\n  telemetry:\n    logs:\n      level: {level}\n", 1)
    assert load([write(tmp_path, text)], env={}).service.telemetry.logs.level == expected


def test_log_level_flag_in_any_case(tmp_path):
    out = cli("run", "--log-level", "WARN", "--config", write(tmp_path, "receivers: {}\n"))
    assert out.returncode == 2 and "invalid configuration" in out.stderr and "invalid choice" not in out.stderr
