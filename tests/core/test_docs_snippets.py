"""Every YAML snippet users may copy from the docs validates with podmeter's own config loader (`podmeter validate`).

Checked: each fenced ```yaml block in README.md, docs/*.md and the component READMEs (receivers/, processors/,
exporters/, podmeter/extensions/, k8s/), plus examples/*.yaml and k8s/base/pipelines.yaml. A block is, by its
top-level keys:

- a whole config (has `service:`): validated as it is;
- component definitions only (`receivers:` / `processors:` / `exporters:` / `extensions:`): validated as a second
  `--config` over the shipped podmeter/pipelines.yaml, the way users layer files, with a third layer adding its
  components to the metrics pipeline (and extensions to service::extensions) so each is wired in as a user would;
- a bare component body (just the keys of one component): validated under that component, which is the README's own
  component when the block is in a component README that documents exactly one, or the one named by a marker;
- Kubernetes or other non-podmeter YAML (manifests with apiVersion/kind, kustomize patches and fields, RBAC rules,
  Prometheus configs, Helm values): recognized and passed over.

Markers, an HTML comment on the last non-blank line before the fence (invisible in rendered Markdown):

    <!-- not-a-config -->                       the block is not podmeter configuration: passed over
    <!-- config: processors::k8sattributes -->  the block is a bare body of that component (key path as in
                                                podmeter's problems: section::type[/name])

A block that is none of the above fails: give it a marker or fix it. A commented-out setting in a block
(`# proc_root: /host/proc`, a line users uncomment) is checked too: the block with that line uncommented validates.
`${env:VAR}` references without a default get a test environment with each such variable set. Paths in snippets (TLS files, sockets, queue directories) need not exist: validation checks
their form only, and opening them is left to run time, where a missing one is reported by the component.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

import pytest
import yaml

from podmeter.component import registry
from podmeter.config import TOP_LEVEL, ConfigError, default_config_path, load
from podmeter.docs import readme_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("receivers", "processors", "exporters", "extensions")

MARKDOWN = ["README.md", "docs/*.md", "receivers/*/README.md", "processors/*/README.md", "exporters/*/README.md",
            "podmeter/extensions/README.md", "podmeter/extensions/*/README.md", "k8s/**/*.md"]
WHOLE_FILES = ["examples/*.yaml", "k8s/base/pipelines.yaml"]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*(not-a-config|config:\s*(\S+))\s*-->\s*$")
# `    # key: value`: a setting left commented out for users to turn on (prose comments start with a capital or a
# word that is not followed by a colon, and uncommenting them would not even parse as YAML)
_COMMENTED_SETTING = re.compile(r"^(\s*)#\s?([a-z_][A-Za-z0-9_.]*:(?:\s.*)?)$")
_ENV_REF = re.compile(r"\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)\}")  # no default: the user must set it

# Top-level keys of YAML that is not podmeter's, where nothing else in the block says so
_KUSTOMIZE = {"images", "resources", "patches", "patchesStrategicMerge", "patchesJson6902", "configMapGenerator",
              "secretGenerator", "namePrefix", "nameSuffix", "commonLabels", "labels", "components", "replicas",
              "generatorOptions"}
_PROMETHEUS = {"scrape_configs", "global", "rule_files", "remote_write", "remote_read", "alerting", "groups"}
_HELM = {"image", "imagePullSecrets", "nodeSelector", "tolerations", "affinity", "podAnnotations", "serviceAccount",
         "securityContext", "podSecurityContext", "fullnameOverride", "nameOverride", "mode", "presets"}


@dataclass
class Block:
    path: str  # relative to ROOT
    line: int  # of the opening fence (1 for a whole file)
    text: str
    marker: str | None  # "not-a-config", "config: <key path>" or None
    first: int = 1  # line of the file that holds the block's first line of text

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def _markdown_files() -> list[str]:
    found: set[str] = set()
    for pattern in MARKDOWN:
        found.update(glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def yaml_blocks(rel: str, text: str) -> list[Block]:
    """The ```yaml / ```yml fenced blocks of one Markdown text, dedented to their fence's indentation."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, start = m.group("fence"), len(m.group("indent")), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and not lines[i].strip().strip(fence[0])):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        if m.group("info").lower() not in ("yaml", "yml"):
            continue
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        mm = _MARKER.match(before)
        marker = None if not mm else ("not-a-config" if mm.group(1) == "not-a-config" else f"config: {mm.group(2)}")
        blocks.append(Block(rel, start + 1, "\n".join(body) + "\n", marker, start + 2))
    return blocks


def all_blocks() -> list[Block]:
    blocks: list[Block] = []
    for rel in _markdown_files():
        with open(os.path.join(ROOT, rel)) as f:
            blocks.extend(yaml_blocks(rel, f.read()))
    for pattern in WHOLE_FILES:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path) as f:
                blocks.append(Block(os.path.relpath(path, ROOT), 1, f.read(), None))
    return blocks


def foreign(doc) -> str | None:
    """Why a YAML document is not podmeter configuration, or None if nothing says it is something else."""
    if isinstance(doc, dict):
        keys = set(doc)
        if {"apiVersion", "kind"} & keys:
            return "a Kubernetes manifest"
        if keys & set(TOP_LEVEL):
            return None
        for name, known in (("a kustomization", _KUSTOMIZE), ("a Prometheus config", _PROMETHEUS),
                            ("Helm values", _HELM)):
            if keys & known:
                return name
        return None
    if isinstance(doc, list) and doc and all(isinstance(item, dict) for item in doc):
        if all({"target", "patch"} <= set(item) for item in doc):
            return "kustomize patches"
        if all({"apiGroups", "resources", "verbs"} <= set(item) for item in doc):
            return "Kubernetes RBAC rules"
        if all({"op", "path"} <= set(item) for item in doc):
            return "a JSON patch"
    return None


def readme_components() -> dict[str, list[tuple[str, str]]]:
    """README path (relative to ROOT) -> the (section, type) of each built-in component it documents."""
    reg = registry().load_all()
    out: dict[str, list[tuple[str, str]]] = {}
    for kind in ("receiver", "processor", "exporter", "extension"):
        for type_ in reg.types(kind):
            path = os.path.relpath(readme_path(reg.get(kind, type_)), ROOT)
            if not path.startswith(".."):
                out.setdefault(path, []).append((kind + "s", type_))
    return out


def snippet_env(text: str) -> dict[str, str]:
    """Each variable the snippet references without a default, set (a reference with a default keeps it)."""
    return {name: "podmeter-test" for name in _ENV_REF.findall(text)}




def _pipeline_layer(shipped: dict, fragment: dict) -> dict:
    """A layer that adds the fragment's components to the shipped metrics pipeline (lists are replaced, not merged)."""
    pipeline = shipped["service"]["pipelines"]["metrics"]
    wired: dict = {}
    for section in ("receivers", "processors", "exporters"):
        ids = list(pipeline.get(section) or [])
        new = [cid for cid in (fragment.get(section) or {}) if cid not in ids]
        if new:
            wired[section] = ids + new
    layer: dict = {"service": {"pipelines": {"metrics": wired}}} if wired else {}
    extensions = list(shipped["service"].get("extensions") or [])
    new_ext = [cid for cid in (fragment.get("extensions") or {}) if cid not in extensions]
    if new_ext:
        layer.setdefault("service", {})["extensions"] = extensions + new_ext
    return layer


def check(block: Block, tmp_path) -> str | None:
    """Validate one block; returns why it was skipped, None when it was validated. Fails with podmeter's problems."""
    if block.marker == "not-a-config":
        return "marked <!-- not-a-config -->"
    try:
        docs = [d for d in yaml.safe_load_all(block.text) if d is not None]
    except yaml.YAMLError as exc:
        pytest.fail(f"{block.id}: not valid YAML: {exc}")
    if not docs:
        pytest.fail(f"{block.id}: an empty yaml block")
    reasons = [foreign(d) for d in docs]
    if block.marker is None and all(reasons):
        return ", ".join(dict.fromkeys(reasons))
    if len(docs) > 1:
        pytest.fail(f"{block.id}: several YAML documents in one block; podmeter reads one per --config "
                    "(mark it <!-- not-a-config --> if it is not podmeter configuration)")
    doc = docs[0]
    text = block.text
    if block.marker is not None:  # config: section::type
        section, _, cid = block.marker.removeprefix("config: ").partition("::")
        assert section in SECTIONS and cid, f"{block.id}: bad marker {block.marker!r}; expected config: section::id"
        doc, text = {section: {cid: doc}}, yaml.safe_dump({section: {cid: doc}}, sort_keys=False)
    elif not (isinstance(doc, dict) and set(doc) & set(TOP_LEVEL)):
        owners = readme_components().get(block.path, [])
        if not isinstance(doc, dict) or len(owners) != 1:
            pytest.fail(f"{block.id}: neither podmeter configuration nor recognized as anything else; if it is a "
                        "bare component body mark it <!-- config: section::type -->, else <!-- not-a-config -->")
        section, type_ = owners[0]
        doc, text = {section: {type_: doc}}, yaml.safe_dump({section: {type_: doc}}, sort_keys=False)

    env = snippet_env(block.text)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(text)
    if "service" in doc:
        paths = [str(snippet)]
    else:
        with open(default_config_path()) as f:
            shipped = yaml.safe_load(f)
        paths = [default_config_path(), str(snippet)]
        layer = _pipeline_layer(shipped, doc)
        if layer:
            wiring = tmp_path / "wiring.yaml"
            wiring.write_text(yaml.safe_dump(layer))
            paths.append(str(wiring))
    try:
        load(paths, env=env)
    except ConfigError as exc:
        pytest.fail(f"{block.id}: `podmeter validate` rejects this snippet:\n  " + "\n  ".join(exc.problems))
    return None


def uncommented(block: Block) -> list[Block]:
    """The block once per commented-out setting, with that line uncommented; lines that then do not parse are prose."""
    lines = block.text.splitlines()
    out: list[Block] = []
    for n, line in enumerate(lines):
        m = _COMMENTED_SETTING.match(line)
        if not m:
            continue
        text = "\n".join(lines[:n] + [m.group(1) + m.group(2)] + lines[n + 1:]) + "\n"
        try:
            list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            continue
        out.append(Block(block.path, block.first + n, text, block.marker, block.first))
    return out


BLOCKS = all_blocks()
COMMENTED = [variant for block in BLOCKS for variant in uncommented(block)]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_snippet_validates(block, tmp_path):
    # a block recognized as not podmeter's YAML (a manifest, RBAC rules, a marker) passes as recognized: under
    # CI=true nothing here may skip
    check(block, tmp_path)


@pytest.mark.parametrize("block", COMMENTED, ids=[b.id for b in COMMENTED])
def test_commented_out_setting_validates(block, tmp_path):
    """`block.line` is the line of the commented-out setting."""
    check(block, tmp_path)


def test_snippets_are_found():
    """The collection itself works: a regression here would let every snippet pass unchecked."""
    paths = {b.path for b in BLOCKS}
    assert "README.md" in paths and "k8s/base/pipelines.yaml" in paths and "examples/dcgm-compat.yaml" in paths
    assert any(p.startswith("receivers/") for p in paths) and any(p.startswith("exporters/") for p in paths)
    # the shapes the checker tells apart
    md = ("x\n<!-- not-a-config -->\n\n```yaml\na: 1\n```\n\n  ```yml\n  receivers: {}\n  ```\n"
          "```sh\nls\n```\n")
    found = yaml_blocks("x.md", md)
    assert [(b.line, b.marker, b.text) for b in found] == [(4, "not-a-config", "a: 1\n"), (8, None, "receivers: {}\n")]
    assert foreign({"apiVersion": "v1", "kind": "Pod"}) and foreign([{"target": {}, "patch": ""}])
    assert foreign({"receivers": {}}) is None and foreign({"collection_interval": "10s"}) is None


def test_a_wrong_snippet_fails(tmp_path):
    """A snippet with a mistake is caught, with podmeter's problem text."""
    bad = Block("x.md", 1, "processors:\n  filter:\n    metrcs: {}\n", None)
    with pytest.raises(pytest.fail.Exception, match=r"processors::filter::metrcs: unknown key"):
        check(bad, tmp_path)
    body = Block("x.md", 1, "collection_intervall: 10s\n", "config: receivers::cgroup")
    with pytest.raises(pytest.fail.Exception, match=r"receivers::cgroup::collection_intervall: unknown key"):
        check(body, tmp_path)
    stale = Block("x.md", 1, "receivers:\n  nvml:\n    # library: /lib/libnvidia-ml.so.1\n", None)
    [variant] = uncommented(stale)
    with pytest.raises(pytest.fail.Exception, match=r"receivers::nvml::library: unknown key"):
        check(variant, tmp_path)
    unknown = Block("x.md", 1, "foo: 1\n", None)
    with pytest.raises(pytest.fail.Exception, match="not-a-config"):
        check(unknown, tmp_path)
