"""Configuration: every class of bad input exits 2 naming the offending key path, never with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from podmeter.config import ConfigError, load, merge_maps, parse_duration

HERE = os.path.dirname(__file__)
PLUGINS = os.path.join(HERE, "plugins.py")

GOOD = """
receivers:
  counter:
    collection_interval: 1s
processors:
  tag:
exporters:
  debug:
    verbosity: basic
extensions:
  health_check:
    endpoint: 127.0.0.1:13133
service:
  extensions: [health_check]
  pipelines:
    metrics:
      receivers: [counter]
      processors: [tag]
      exporters: [debug]
"""


@pytest.fixture(autouse=True)
def plugins():
    from core import plugins

    plugins.register()


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PLUGINS, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def problems(tmp_path, text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load([write(tmp_path, text)], env=env or {})
    return info.value.problems


def test_good_config_loads(tmp_path):
    config = load([write(tmp_path, GOOD)], env={})
    assert [str(k) for k in config.receivers] == ["counter"]
    assert config.receivers[next(iter(config.receivers))].collection_interval == 1.0


BROKEN = {
    "unknown receiver type": (GOOD.replace("  counter:\n    collection_interval: 1s", "  countr:\n    collection_interval: 1s"),
                              'receivers::countr: unknown receiver type "countr" (did you mean "counter"?)'),
    "dangling reference": (GOOD.replace("exporters: [debug]", "exporters: [debug, prometheus/x]"),
                           'service::pipelines::metrics::exporters::1: references exporter "prometheus/x" which is not configured'),
    "unknown key": (GOOD.replace("collection_interval: 1s", "colection_interval: 1s"),
                    'receivers::counter::colection_interval: unknown key (did you mean "collection_interval"?)'),
    "top-level typo": (GOOD.replace("processors:\n  tag:", "procesors:\n  tag:"),
                       'procesors: unknown top-level key (did you mean "processors"?)'),
    "bad duration": (GOOD.replace("collection_interval: 1s", "collection_interval: often"),
                     "receivers::counter::collection_interval: invalid duration 'often'"),
    "negative duration": (GOOD.replace("collection_interval: 1s", "collection_interval: -5s"),
                          "receivers::counter::collection_interval: invalid duration '-5s': must not be negative"),
    "port out of range": (GOOD.replace("127.0.0.1:13133", "127.0.0.1:99999"),
                          "extensions::health_check::endpoint: invalid endpoint '127.0.0.1:99999': port 99999 is out of range"),
    "wrong type": (GOOD.replace("collection_interval: 1s", "collection_interval: 1s\n    pods: many"),
                   "receivers::counter::pods: Input should be a valid integer"),
    "bad enum": (GOOD.replace("verbosity: basic", "verbosity: loud"),
                 "exporters::debug::verbosity: Input should be 'basic', 'normal' or 'detailed'"),
    "traces pipeline": (GOOD.replace("    metrics:\n", "    traces:\n"),
                        "service::pipelines::traces: podmeter carries metrics only"),
    "no exporters": (GOOD.replace("      exporters: [debug]", "      exporters: []"),
                     "service::pipelines::metrics: must have at least one exporter"),
    "no receivers": (GOOD.replace("      receivers: [counter]", "      receivers: []"),
                     "service::pipelines::metrics: must have at least one receiver"),
    "undefined env": (GOOD.replace("verbosity: basic", "verbosity: ${env:PODMETER_TEST_UNSET}"),
                      "exporters::debug::verbosity: environment variable PODMETER_TEST_UNSET is not defined"),
    "unknown extension": (GOOD.replace("extensions: [health_check]", "extensions: [health]"),
                          'service::extensions::0: references extension "health" which is not configured'),
    "missing service": (GOOD.split("service:")[0], "service: missing"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_names_the_key(tmp_path, case):
    text, expected = BROKEN[case]
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_at_once(tmp_path):
    text = (GOOD.replace("collection_interval: 1s", "collection_interval: often\n    bogus: 1")
            .replace("verbosity: basic", "verbosity: loud").replace("exporters: [debug]", "exporters: [debug, nope]"))
    found = problems(tmp_path, text)
    assert len(found) == 4, found


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    found = problems(tmp_path, "receivers:\n  counter: {\nservice: [\n")
    assert "YAML syntax error at line" in found[0] and "column" in found[0]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    found = problems(tmp_path, text)
    assert "empty" in found[0] or "no configuration" in found[0]


def test_env_expansion(tmp_path):
    text = GOOD.replace("verbosity: basic", "verbosity: ${env:VERB}").replace(
        "collection_interval: 1s", "collection_interval: ${env:IVAL:-3s}").replace(
        "processors:\n  tag:", "processors:\n  tag:\n    value: $$HOME-${NAME}")
    config = load([write(tmp_path, text)], env={"VERB": "detailed", "NAME": "x"})
    assert next(iter(config.exporters.values())).verbosity == "detailed"
    assert next(iter(config.receivers.values())).collection_interval == 3.0
    assert next(iter(config.processors.values())).value == "$HOME-x"


def test_env_whole_value_keeps_type(tmp_path):
    text = GOOD.replace("collection_interval: 1s", "collection_interval: 1s\n    pods: ${env:PODS}")
    config = load([write(tmp_path, text)], env={"PODS": "7"})
    assert next(iter(config.receivers.values())).pods == 7


def test_merge_in_order(tmp_path):
    base = write(tmp_path, GOOD, "a.yaml")
    override = write(tmp_path, """
        receivers:
          counter:
            collection_interval: 5s
            pods: 3
        exporters:
          debug/verbose:
            verbosity: detailed
        service:
          pipelines:
            metrics:
              exporters: [debug/verbose]
        """, "b.yaml")
    config = load([base, override], env={})
    rcv = next(iter(config.receivers.values()))
    assert (rcv.collection_interval, rcv.pods) == (5.0, 3)
    assert config.service.pipelines["metrics"].exporters == ["debug/verbose"]  # lists are replaced
    assert config.service.pipelines["metrics"].receivers == ["counter"]  # untouched keys kept


def test_config_uris_as_the_collector_takes_them(tmp_path):
    """`--config file:PATH`, `env:VAR` and `yaml:...` (keys as `::` paths), as the collector's confmap providers
    take them in a DaemonSet's args; they were read as file names ("file:/conf/c.yaml: cannot read")."""
    base = write(tmp_path, GOOD, "a.yaml")
    env = {"PODMETER_CONFIG": "receivers:\n  counter:\n    pods: 3\n"}
    config = load([f"file:{base}", "env:PODMETER_CONFIG", "yaml:receivers::counter::collection_interval: 5s",
                   "yaml:exporters::debug::verbosity: detailed"], env=env)
    rcv = next(iter(config.receivers.values()))
    assert (rcv.collection_interval, rcv.pods) == (5.0, 3)
    assert next(iter(config.exporters.values())).verbosity == "detailed"
    assert config.service.pipelines["metrics"].processors == ["tag"]  # the rest of the file kept
    with pytest.raises(ConfigError) as info:
        load([base, "env:NOT_SET_ANYWHERE"], env={})
    assert info.value.problems == ["env:NOT_SET_ANYWHERE: the environment variable NOT_SET_ANYWHERE is not set"]
    with pytest.raises(ConfigError) as info:
        load(["file:", "env:"], env={})
    assert info.value.problems == ["file:: nothing after file: (expected file:/path/to/config.yaml)",
                                   "env:: nothing after env: (expected env:VARIABLE)"]
    out = cli("validate", "--config", f"file:{base}", "--config", "yaml:exporters::debug::verbosity: [")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "yaml:exporters::debug::verbosity: [: YAML syntax error" in out.stderr, out.stderr


def test_set_flag_as_the_collector_reads_it(tmp_path):
    """`--set=a.b.c=VALUE` (the collector's flag, common in DaemonSet args) wins over every --config; it was an
    unrecognized argument."""
    base = write(tmp_path, GOOD, "a.yaml")
    out = cli("validate", "--config", base, "--set=exporters.debug.verbosity=detailed",
              "--set", "receivers.counter.collection_interval = 5s")
    assert out.returncode == 0, out.stderr
    out = cli("validate", "--config", base, "--set=receivers.counter.collection_interval=banana")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "receivers::counter::collection_interval: invalid duration 'banana'" in out.stderr, out.stderr
    assert "--set" in out.stderr.splitlines()[0]
    out = cli("validate", "--config", base, "--set=verbosity")
    assert out.returncode == 2 and "expected KEY.PATH=VALUE" in out.stderr, out.stderr
    from podmeter.cli import build_parser

    args = build_parser().parse_args(["validate", "--set=exporters.debug.verbosity=detailed", "--set=a.b=1"])
    assert args.sets == ["yaml:exporters::debug::verbosity: detailed", "yaml:a::b: 1"]
    assert build_parser().parse_args(["validate"]).sets is None  # nothing shared between parses
    config = load([base, *args.sets[:1]])
    assert next(iter(config.exporters.values())).verbosity == "detailed"


def test_merge_maps_replaces_lists():
    assert merge_maps({"a": {"b": [1], "c": 1}}, {"a": {"b": [2]}}) == {"a": {"b": [2], "c": 1}}


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("1m30s", 90), ("250ms", 0.25), ("1h", 3600), (0, 0), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["often", "-5s", "10", 10, "5x", "", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("case", ["unknown receiver type", "unknown key", "bad duration", "port out of range",
                                  "wrong type", "undefined env", "top-level typo", "dangling reference"])
def test_cli_validate_exits_2_without_traceback(tmp_path, case):
    text, expected = BROKEN[case]
    result = cli("validate", "--config", write(tmp_path, text))
    assert result.returncode == 2, result.stderr
    assert expected.split(":")[0] in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_validate_yaml_error_and_missing_file(tmp_path):
    bad = write(tmp_path, "receivers: [\n")
    for path in (bad, str(tmp_path / "missing.yaml")):
        result = cli("validate", "--config", path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert path in result.stderr


def test_cli_validate_ok(tmp_path):
    result = cli("validate", "--config", write(tmp_path, GOOD))
    assert result.returncode == 0, result.stderr
