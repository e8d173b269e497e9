"""What the deploy tests share: the files under deploy/, KubeRay CRD schemas as JSON Schema,
KubeRay's semantic rules, the serving commands inside manifests, and pool-fit checks."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVE_CONFIG = DEPLOY / "config" / "serve.yaml"
KUBERAY_DIR = DEPLOY / "kuberay"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
RAY_CLUSTER_YAMLS = sorted((DEPLOY / "ray").glob("*.yaml"))
DOCKERFILE = DEPLOY / "Dockerfile"
# CI clones the repository with shared/ beside it.
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


# libyaml's loader when PyYAML has it: the CRDs are 3 MB of YAML (~20x faster than pure Python).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_SAFE_LOADER) if doc]


def kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY_DIR.glob("*.yaml")) for doc in load_docs(path)]


def pinned_ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"ray(?:\[[^\]]*\])?==([0-9.]+)"', text)
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


def wait_for_pools_module():
    spec = importlib.util.spec_from_file_location("deploy_wait_for_pools", DEPLOY / "wait_for_pools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- KubeRay CRDs -> JSON Schema ---------------------------------------------------------

def crd_missing_message() -> str:
    return (f"KubeRay CRDs not found at {CRD_DIR}. tests/deploy validates deploy/kuberay against the "
            f"CRDs in the shared/ directory that sits beside the repository clone "
            f"(<parent>/shared/kuberay-crds/ray.io_rayclusters.yaml, ...); CI runs with it there.")


@cache
def crds_by_kind() -> dict[str, dict]:
    """{kind: CRD document} of every CRD in CRD_DIR (empty if the directory is missing)."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in load_docs(path):
            if doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


_SCHEMA_MAPS = ("properties", "patternProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not")


def structural_to_json_schema(node):
    """A Kubernetes structural schema (OpenAPI v3 subset + x-kubernetes-* extensions) as a JSON
    Schema (draft 4) that rejects what `kubectl apply --validate=strict` rejects:

    - unknown fields: every object schema with `properties` gets `additionalProperties: false`
      unless it carries `x-kubernetes-preserve-unknown-fields`;
    - `nullable: true` admits null;
    - `x-kubernetes-int-or-string` admits integers and strings (the pattern still applies to
      strings);
    - `x-kubernetes-list-type: set` means unique items; `map` lists are checked for duplicate
      keys by the validator (`x-kubernetes-list-map-keys`);
    - `x-kubernetes-embedded-resource` objects admit apiVersion/kind/metadata.
    CEL rules (`x-kubernetes-validations`) are not evaluated.
    """
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: structural_to_json_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [structural_to_json_schema(sub) for sub in value]
        elif key in _SCHEMA_ONE and isinstance(value, dict):
            out[key] = structural_to_json_schema(value)
        else:  # keywords whose values are data (enum, default, required, ...), kept as they are
            out[key] = copy.deepcopy(value)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    if out.get("x-kubernetes-embedded-resource") and "properties" in out:
        for name in ("apiVersion", "kind"):
            out["properties"].setdefault(name, {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {index} have the same key {dict(zip(keys, key, strict=True))} "
                f"(a list-map: keys must be unique)")
        seen[key] = index


_INT_RANGES = {"int32": (-(2 ** 31), 2 ** 31 - 1), "int64": (-(2 ** 63), 2 ** 63 - 1)}
FORMATS = jsonschema.FormatChecker(formats=())
for _name, (_lo, _hi) in _INT_RANGES.items():
    FORMATS.checks(_name)(lambda value, lo=_lo, hi=_hi: not isinstance(value, int) or lo <= value <= hi)

K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


def crd_schema(crd: dict, version: str = "v1") -> dict:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return structural_to_json_schema(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


@cache
def _validator_for(kind: str):
    schema = crd_schema(crds_by_kind()[kind])
    K8sValidator.check_schema(schema)
    return K8sValidator(schema, format_checker=FORMATS)


def crd_errors(doc: dict) -> list[str]:
    """Schema errors of a KubeRay document (its kind's CRD, version from apiVersion)."""
    group, _, version = doc["apiVersion"].partition("/")
    crd = crds_by_kind()[doc["kind"]]
    assert crd["spec"]["group"] == group, f"{doc['kind']} belongs to {crd['spec']['group']}, not {group}"
    assert version == "v1", f"only ray.io/v1 is checked, got {doc['apiVersion']}"
    validator = _validator_for(doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# --- KubeRay's semantic rules (ray-operator/controllers/ray/utils/validation.go) ---------

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYCLUSTER_NAME = 53
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_RAY_START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _label_value_ok(value: str) -> bool:
    return len(value) <= 63 and (value == "" or bool(_LABEL_NAME.match(value)))


def _group_problems(where: str, group: dict) -> list[str]:
    problems = []
    params = group.get("rayStartParams") or {}
    resources = group.get("resources") or {}
    if any(params.get(k) for k in _RAY_START_RESOURCE_PARAMS) and resources:
        problems.append(f"{where}: resources set both in rayStartParams and in the group's `resources`")
    if "labels" in params:
        problems.append(f"{where}: rayStartParams['labels'] is not supported; use the group's `labels`")
    for key, value in (group.get("labels") or {}).items():
        if not _label_key_ok(key) or not _label_value_ok(str(value)):
            problems.append(f"{where}: invalid Ray node label {key}={value}")
    if not group.get("template", {}).get("spec", {}).get("containers"):
        problems.append(f"{where}: needs at least one container")
    return problems


def raycluster_spec_problems(name: str, spec: dict) -> list[str]:
    problems = []
    if len(name) > MAX_RAYCLUSTER_NAME:
        problems.append(f"RayCluster name {name!r} is longer than {MAX_RAYCLUSTER_NAME}")
    if not DNS1035.match(name) or len(name) > 63:
        problems.append(f"RayCluster name {name!r} is not a DNS-1035 label")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    head = spec.get("headGroupSpec", {})
    problems += _group_problems("headGroupSpec", head)
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"worker group names repeat: {names}")
    for group in groups:
        where = f"worker group {group.get('groupName')!r}"
        problems += _group_problems(where, group)
        lo, hi, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{where}: minReplicas and maxReplicas are required without autoscaling")
        if lo is not None and lo < 0 or hi is not None and hi < 0:
            problems.append(f"{where}: negative minReplicas/maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
        if replicas is not None and lo is not None and hi is not None and not lo <= replicas <= hi:
            problems.append(f"{where}: replicas {replicas} outside [{lo}, {hi}]")
        if autoscaling and group.get("suspend"):
            problems.append(f"{where}: cannot be suspended with the autoscaler on")
        if v2 and group["template"]["spec"].get("restartPolicy") not in (None, "Never"):
            problems.append(f"{where}: restartPolicy must be Never or unset with autoscaler v2")
    if v2 and head.get("template", {}).get("spec", {}).get("restartPolicy") not in (None, "Never"):
        problems.append("headGroupSpec: restartPolicy must be Never or unset with autoscaler v2")
    return problems


def raycluster_problems(doc: dict) -> list[str]:
    return raycluster_spec_problems(doc["metadata"]["name"], doc["spec"])


# --- serving commands inside manifests ---------------------------------------------------

_PUNCT = ";&|()<>\n"


def shell_words(script: str) -> list[str]:
    """Words and operators of a shell script (a newline ends a command, like `;`)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=_PUNCT)
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    return list(lexer)


def _is_operator(word: str) -> bool:
    return bool(word) and all(c in _PUNCT for c in word)


def commands_of(script: str, program) -> list[list[str]]:
    """Every simple command in `script` whose word satisfies `program(word)`, as that word and
    its arguments up to the next operator. Quoted scripts (`bash -c '...'`) are searched too."""
    found = []
    words = shell_words(script)
    for i, word in enumerate(words):
        if program(word):
            argv = [word]
            for nxt in words[i + 1:]:
                if _is_operator(nxt):
                    break
                argv.append(nxt)
            found.append(argv)
        elif any(c in word for c in " \n") and not _is_operator(word):
            found += commands_of(word, program)
    return found


def is_disagg_serve(word: str) -> bool:
    return word == "disagg-serve" or word.endswith("/bin/disagg-serve")


def is_wait_for_pools(word: str) -> bool:
    return word.endswith("/wait_for_pools.py")


def serve_commands(script: str) -> list[list[str]]:
    return commands_of(script, is_disagg_serve)


def option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def replace_option(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == name:
            out[i + 1] = value
            return out
        if arg.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    raise KeyError(name)


def parse_serve_command(argv: list[str], local_config: Path):
    """(args, ServeConfig) of `disagg-serve up ...` (or `disagg-serve frontend ...`) with its
    --config read from `local_config`, through the project's own parser."""
    from cluster.entrypoints.cli import parse_args, serve_config_from_args

    assert is_disagg_serve(argv[0]) and argv[1] in ("up", "frontend"), argv
    rest = replace_option(argv[1:], "--config", str(local_config))
    args = parse_args(rest)
    return args, serve_config_from_args(args)


# --- pools against the nodes that serve them ---------------------------------------------

def pool_fit_problems(config, node_types: dict[str, dict], head_type: str | None) -> list[str]:
    """Ray autoscaler-style node types ({name: {resources, min_workers, max_workers}}) against
    the pools of a ServeConfig: enough nodes advertising each pool's resource start with the
    cluster, each can hold one instance (CPU/GPU), and the head advertises no pool."""
    problems = []
    for pool in config.pools:
        if not pool.resource:
            problems.append(f"{pool.role} pool has no Ray resource: its placement is not explicit")
            continue
        serving = {name: t for name, t in node_types.items()
                   if t.get("resources", {}).get(pool.resource, 0) > 0}
        if not serving:
            problems.append(f"no node type advertises {pool.resource} ({pool.role} pool)")
            continue
        if head_type in serving:
            problems.append(f"the head node advertises {pool.resource}")
        at_start = 0
        for name, t in serving.items():
            res = t["resources"]
            per_node = int(res[pool.resource])
            # An instance of TP degree t asks for t times the per-rank CPUs and GPUs.
            cpus, gpus = pool.cpus_per_instance, pool.gpus_per_instance
            if cpus:
                per_node = min(per_node, int(res.get("CPU", 0) // cpus))
            if gpus:
                per_node = min(per_node, int(res.get("GPU", 0) // gpus))
            if per_node < 1:
                problems.append(f"node type {name} advertises {pool.resource} but cannot hold one "
                                f"{pool.role} instance (TP{pool.tensor_parallel_size}: {cpus:g} CPU, {gpus:g} GPU): "
                                f"{res}")
            lo, hi = t.get("min_workers", 0), t.get("max_workers", 0)
            if hi < lo:
                problems.append(f"node type {name}: max_workers {hi} < min_workers {lo}")
            at_start += per_node * lo
        if at_start < pool.num_instances:
            problems.append(f"the {pool.role} pool needs {pool.num_instances} instance(s) but the node "
                            f"types advertising {pool.resource} start with room for {at_start}")
    return problems
