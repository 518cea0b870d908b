"""Check the files in deploy/ without helm, kubectl or a cluster.

    python3 deploy/check.py          # needs PyYAML (Debian's python3-yaml, or `pip install pyyaml`)

- every YAML, TOML and JSON file parses;
- deploy/systemd/config.toml loads with p2pcache's own `load_settings` (so its keys are real settings);
- the Helm chart renders with a small Go-template interpreter that covers the subset the chart uses (with the
  default values and a few variants), and the output is YAML of the expected kinds;
- the container args in the plain DaemonSet and in each rendered chart are parsed by p2pcache's own `node` flag
  parser and settings loader, so a misspelt flag or a bad value fails here rather than in a crash-looping pod.

Helm itself is not packaged for Debian and is not downloaded here; where helm is installed, `helm lint
deploy/helm/p2pcache` and `helm template` are the authority. This script only reads files.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import string
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import p2pcache.config  # noqa: E402
from p2pcache.config import add_node_flags, settings_from_args  # noqa: E402

# The cluster secret these files name exists only on a node (a mounted Secret, a systemd credential): the loader
# reads it at start-up, and here there is none. Every other setting is loaded and checked as a node would.
p2pcache.config.load_secret = lambda path: b"a secret only a node has"

# ------------------------------------------------------------------------------------------- Go templates


class TemplateError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(\.(?:[A-Za-z0-9_]+'
                    r'(?:\.[A-Za-z0-9_]+)*)?)|(\|)|(\()|(\))|(-?\d+)|([A-Za-z_][A-Za-z0-9_]*)|(:=|=))')


def _lex(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot lex {text[pos:]!r}")
        kinds = ("str", "var", "field", "pipe", "lp", "rp", "num", "ident", "assign")
        for kind, g in zip(kinds, m.groups(), strict=True):
            if g is not None:
                out.append((kind, g))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _parse_pipeline(tokens: list[tuple[str, str]]) -> list:
    """-> list of commands; a command is a list of operands; an operand is a token or a nested pipeline."""
    pos = 0

    def pipeline() -> list:
        nonlocal pos
        cmds: list = [[]]
        while pos < len(tokens):
            kind, val = tokens[pos]
            if kind == "rp":
                break
            pos += 1
            if kind == "pipe":
                cmds.append([])
            elif kind == "lp":
                cmds[-1].append(("sub", pipeline()))
                if pos >= len(tokens) or tokens[pos][0] != "rp":
                    raise TemplateError("unbalanced (")
                pos += 1
            else:
                cmds[-1].append((kind, val))
        return cmds

    result = pipeline()
    if pos != len(tokens):
        raise TemplateError("unbalanced )")
    return result


def _split_decl(expr: str) -> tuple[list[str], str]:
    """'$a, $b := pipeline' -> (['$a', '$b'], 'pipeline'); no declaration -> ([], expr)."""
    m = re.match(r"\s*(\$[A-Za-z0-9_]*(?:\s*,\s*\$[A-Za-z0-9_]*)?)\s*:=\s*(.*)$", expr, re.S)
    if not m:
        return [], expr
    return [v.strip() for v in m.group(1).split(",")], m.group(2)


def _parse(src: str) -> list:
    """Template source -> node list. Nodes: ('text', s) ('out', expr) ('set', vars, expr)
    ('if', [(expr|None, body)]) ('with', expr, body, else) ('range', vars, expr, body, else) ('define', name, body)."""
    parts: list = []
    pos = 0
    for m in _ACTION.finditer(src):
        parts.append(["text", src[pos:m.start()]])
        parts.append(["act", m.group(2).strip(), bool(m.group(1)), bool(m.group(3))])
        pos = m.end()
    parts.append(["text", src[pos:]])
    for i, p in enumerate(parts):  # whitespace trimming
        if p[0] == "act":
            if p[2] and parts[i - 1][0] == "text":
                parts[i - 1][1] = parts[i - 1][1].rstrip()
            if p[3] and parts[i + 1][0] == "text":
                parts[i + 1][1] = parts[i + 1][1].lstrip()
    items = iter(parts)

    def block(stop: tuple[str, ...]) -> tuple[list, str | None, str]:
        nodes: list = []
        for p in items:
            if p[0] == "text":
                if p[1]:
                    nodes.append(("text", p[1]))
                continue
            act: str = p[1]
            word = act.split(None, 1)[0] if act else ""
            rest = act[len(word):].strip()
            if act.startswith("/*"):
                continue
            if word in stop:
                return nodes, word, rest
            if word == "if":
                branches = []
                cond = rest
                while True:
                    body, end, erest = block(("else", "end"))
                    branches.append((cond, body))
                    if end == "end":
                        break
                    cond = erest[2:].strip() if erest.startswith("if") else None
                    if cond is None:
                        body, end, _ = block(("end",))
                        branches.append((None, body))
                        break
                nodes.append(("if", branches))
            elif word in ("with", "range"):
                body, end, _ = block(("else", "end"))
                other: list = []
                if end == "else":
                    other, _, _ = block(("end",))
                if word == "with":
                    nodes.append(("with", rest, body, other))
                else:
                    names, expr = _split_decl(rest)
                    nodes.append(("range", names, expr, body, other))
            elif word == "define":
                body, _, _ = block(("end",))
                nodes.append(("define", json.loads(rest), body))
            elif word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{ {word} }}}}")
            else:
                names, expr = _split_decl(act)
                nodes.append(("set", names, expr) if names else ("out", act))
        if stop:
            raise TemplateError(f"missing {{{{ end }}}} (wanted one of {stop})")
        return nodes, None, ""

    nodes, _, _ = block(())
    return nodes


def _truthy(v: Any) -> bool:
    return bool(v) if v is not None else False


def _to_str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _to_yaml(v: Any) -> str:
    return "" if v is None else yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


class Renderer:
    def __init__(self, defines: dict[str, list]):
        self.defines = defines
        self.funcs = {
            "include": lambda name, ctx: self.render(self.defines[name], ctx, {"$": ctx}),
            "default": lambda d, v=None: v if _truthy(v) else d,
            "trunc": lambda n, s: _to_str(s)[:n],
            "trimSuffix": lambda suf, s: _to_str(s)[: -len(suf)] if suf and _to_str(s).endswith(suf)
            else _to_str(s),
            "contains": lambda sub, s: sub in _to_str(s),
            "printf": lambda fmt, *a: fmt.replace("%v", "%s") % tuple(_to_str(x) for x in a),
            "toYaml": _to_yaml,
            "nindent": lambda n, s: "\n" + "\n".join((" " * n + ln) if ln else ln for ln in _to_str(s).split("\n")),
            "indent": lambda n, s: "\n".join((" " * n + ln) if ln else ln for ln in _to_str(s).split("\n")),
            "quote": lambda s: json.dumps(_to_str(s)),
            "replace": lambda old, new, s: _to_str(s).replace(old, new),
            "lookup": lambda *a: {},  # like `helm template`: no cluster, nothing found
            "randAlphaNum": lambda n: "".join(random.choice(string.ascii_letters + string.digits)
                                              for _ in range(n)),
            "b64enc": lambda s: base64.b64encode(_to_str(s).encode()).decode(),
            "index": self._index,
            "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
            "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
            "not": lambda x: not _truthy(x),
            "eq": lambda a, *b: any(a == x for x in b),
            "empty": lambda x: not _truthy(x),
        }

    @staticmethod
    def _index(m: Any, *keys: Any) -> Any:
        for k in keys:
            m = None if m is None else m.get(k) if isinstance(m, dict) else m[k]
        return m

    @staticmethod
    def _field(base: Any, path: list[str], what: str) -> Any:
        for i, name in enumerate(path):
            if base is None:
                if i == 0:
                    return None
                raise TemplateError(f"nil pointer evaluating {what}")
            if not isinstance(base, dict):
                raise TemplateError(f"can't evaluate field {name} in {what}")
            base = base.get(name)
        return base

    def _operand(self, op: tuple, dot: Any, vars: dict) -> Any:
        kind, val = op
        if kind == "str":
            return json.loads(val)
        if kind == "num":
            return int(val)
        if kind == "sub":
            return self.eval(val, dot, vars)
        if kind == "field":
            return dot if val == "." else self._field(dot, val[1:].split("."), val)
        if kind == "var":
            name, *path = val.split(".")
            if name not in vars:
                raise TemplateError(f"undefined variable {name}")
            return self._field(vars[name], path, val) if path else vars[name]
        if kind == "ident":
            if val in ("true", "false"):
                return val == "true"
            if val == "nil":
                return None
            return self.call(val, [], dot)
        raise TemplateError(f"unexpected {val!r}")

    def call(self, name: str, args: list, dot: Any) -> Any:
        if name not in self.funcs:
            raise TemplateError(f"function {name!r} not defined (in this checker)")
        try:
            return self.funcs[name](*args)
        except TypeError as e:
            raise TemplateError(f"{name}: {e}") from None

    def eval(self, cmds: list | str, dot: Any, vars: dict) -> Any:
        if isinstance(cmds, str):
            cmds = _parse_pipeline(_lex(cmds))
        value: Any = None
        for i, cmd in enumerate(cmds):
            if not cmd:
                raise TemplateError("empty command in pipeline")
            piped = [value] if i > 0 else []
            if cmd[0][0] == "ident" and cmd[0][1] not in ("true", "false", "nil"):
                args = [self._operand(op, dot, vars) for op in cmd[1:]] + piped
                value = self.call(cmd[0][1], args, dot)
            else:
                if len(cmd) > 1 or piped:
                    raise TemplateError(f"can't give arguments to a non-function: {cmd}")
                value = self._operand(cmd[0], dot, vars)
        return value

    def render(self, nodes: list, dot: Any, vars: dict) -> str:
        out: list[str] = []
        vars = dict(vars)
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "out":
                out.append(_to_str(self.eval(node[1], dot, vars)))
            elif kind == "set":
                vars[node[1][0]] = self.eval(node[2], dot, vars)
            elif kind == "if":
                for cond, body in node[1]:
                    if cond is None or _truthy(self.eval(cond, dot, vars)):
                        out.append(self.render(body, dot, vars))
                        break
            elif kind == "with":
                v = self.eval(node[1], dot, vars)
                out.append(self.render(node[2], v, vars) if _truthy(v) else self.render(node[3], dot, vars))
            elif kind == "range":
                names, expr, body, other = node[1:]
                v = self.eval(expr, dot, vars)
                pairs = sorted(v.items()) if isinstance(v, dict) else list(enumerate(v or []))
                if not pairs:
                    out.append(self.render(other, dot, vars))
                for k, item in pairs:
                    inner = dict(vars)
                    if len(names) == 2:
                        inner[names[0]], inner[names[1]] = k, item
                    elif len(names) == 1:
                        inner[names[0]] = item
                    out.append(self.render(body, item, inner))
            elif kind == "define":
                pass
        return "".join(out)


def render_chart(chart_dir: Path, overrides: dict | None = None, release: str = "p2pcache",
                 namespace: str = "p2pcache") -> dict[str, str]:
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    _merge(values, overrides or {})
    defines: dict[str, list] = {}
    parsed = {}
    for path in sorted((chart_dir / "templates").iterdir()):
        nodes = _parse(path.read_text())
        for n in nodes:
            if n[0] == "define":
                defines[n[1]] = n[2]
        parsed[path.name] = nodes
    ctx = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion")},
    }
    r = Renderer(defines)
    return {name: r.render(nodes, ctx, {"$": ctx}) for name, nodes in parsed.items()
            if not name.startswith("_") and name.endswith((".yaml", ".yml"))}


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


# ------------------------------------------------------------------------------------------- checks


def check_args(daemonset: dict, where: str) -> None:
    """The node container's args must parse as `p2pcache node` flags and load as Settings."""
    spec = daemonset["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "p2pcache")
    args = [a.replace("$(POD_IP)", "10.0.0.1") for a in container.get("args", [])]
    parser = argparse.ArgumentParser(prog="p2pcache node", exit_on_error=False)
    add_node_flags(parser)
    try:
        ns, extra = parser.parse_known_args(args)
    except argparse.ArgumentError as e:
        raise SystemExit(f"{where}: bad node args: {e}") from None
    if extra:
        raise SystemExit(f"{where}: unknown node args {extra}")
    settings = settings_from_args(ns, env={})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if settings.listen.rsplit(":", 1)[1] != str(ports["registry"]):
        raise SystemExit(f"{where}: --listen {settings.listen} is not the registry port {ports['registry']}")
    if settings.peer_listen and settings.peer_listen.rsplit(":", 1)[1] != str(ports.get("peer")):
        raise SystemExit(f"{where}: --peer-listen {settings.peer_listen} is not the peer port")
    probe = container["livenessProbe"]["httpGet"]
    if probe["path"] != "/healthz" or probe["port"] not in ports:
        raise SystemExit(f"{where}: liveness probe must GET /healthz on a named container port")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    if str(settings.data) not in mounts:
        raise SystemExit(f"{where}: --data {settings.data} is not a mounted volume")
    if settings.cluster_secret_file and str(settings.cluster_secret_file.parent) not in mounts:
        raise SystemExit(f"{where}: --cluster-secret-file is not in a mounted volume")
    print(f"ok  {where}: node args load: listen={settings.listen} peer={settings.peer_listen} "
          f"join-dns={settings.join_dns} upstreams={settings.upstreams}")


def kinds_of(docs: list) -> list[str]:
    return [d["kind"] for d in docs if d]


def main() -> int:
    for path in sorted(HERE.rglob("*")):
        rel = path.relative_to(HERE)
        if "templates" in rel.parts or not path.is_file():
            continue
        if path.suffix in (".yaml", ".yml"):
            list(yaml.safe_load_all(path.read_text()))
        elif path.suffix in (".toml", ".conf"):
            tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            continue
        print(f"ok  {rel} parses")

    from p2pcache.config import load_settings

    s = load_settings(env={}, config_file=HERE / "systemd/config.toml")
    print(f"ok  systemd/config.toml loads: listen={s.listen} data={s.data} max-disk={s.max_disk} "
          f"upstreams={s.upstreams}")
    for name in ("docker.io", "ghcr.io"):
        hosts = tomllib.loads((HERE / f"clients/containerd/certs.d/{name}/hosts.toml").read_text())
        assert any(h.startswith("http://127.0.0.1:5000") for h in hosts["host"]), name

    docs = list(yaml.safe_load_all((HERE / "kubernetes/daemonset.yaml").read_text()))
    assert kinds_of(docs) == ["Namespace", "Service", "DaemonSet"], kinds_of(docs)
    svc = docs[1]
    assert svc["spec"]["clusterIP"] == "None", "the peers service must be headless"
    check_args(docs[2], "kubernetes/daemonset.yaml")

    chart = HERE / "helm/p2pcache"
    variants: list[tuple[str, dict, list[str]]] = [
        ("defaults", {}, ["Secret", "Service", "DaemonSet"]),
        ("existing secret + credentials + extraArgs",
         {"clusterSecret": {"existingSecret": "mine"}, "credentials": {"existingSecret": "regcreds"},
          "extraArgs": ["--piece-size=4MiB"], "node": {"zone": "a", "uploadLimit": "100MB/s",
                                                       "upstreams": {"ghcr.io": "https://ghcr.io"}}},
         ["Service", "DaemonSet"]),
        ("no swarm, no hostNetwork", {"peerPort": 0, "hostNetwork": False, "node": {"maxDisk": ""}},
         ["DaemonSet"]),
    ]
    for label, over, want in variants:
        try:
            out = render_chart(chart, over)
        except TemplateError as e:
            print(f"FAIL helm ({label}): {e}")
            return 1
        docs = [d for text in out.values() for d in yaml.safe_load_all(text) if d]
        got = sorted(kinds_of(docs))
        if got != sorted(want):
            print(f"FAIL helm ({label}): kinds {got}, wanted {sorted(want)}")
            return 1
        ds = next(d for d in docs if d["kind"] == "DaemonSet")
        check_args(ds, f"helm ({label})")
    print("all deploy files check out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
