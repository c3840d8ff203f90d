"""CiliumNetworkPolicy YAML -> ``model`` dataclasses.

Every problem is collected (not just the first) and names the file, the 1-based document index
within the file and the field path, and says what is allowed::

    policies/web.yaml: document 2: spec.egress[1].toFQDNs[0].matchPattern: "*.ex ample.com"
    contains " "; only letters, digits and - _ . * are allowed

Unsupported features are rejected by name: silently ignoring a rule of a firewall widens it.
Ingress sections load with a warning, because fqdnproxy enforces egress only. Paths that load no
policy at all are an error too: an empty set would stop enforcement for every endpoint. This module reads
files and drives ``document.Document``, which turns one YAML document into ``model`` objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.policy import document, model
from fqdnproxy.policy.document import Problem

POLICY_SUFFIXES = (".yaml", ".yml")

class PolicyError(FqdnproxyError):
    """A policy document is invalid."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What loading found: the valid policies, every error and every warning."""

    policies: tuple[model.Policy, ...] = ()
    errors: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()
    files: tuple[str, ...] = ()

    def policy_set(self) -> model.PolicySet:
        """The loaded set. Raises: PolicyError if anything was invalid."""
        if self.errors:
            raise PolicyError(self.errors)
        return model.PolicySet(self.policies, tuple(str(w) for w in self.warnings), self.files)


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by ``paths``; a directory contributes its ``*.yaml``/``*.yml``, sorted."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.iterdir()
                       if p.suffix in POLICY_SUFFIXES and p.is_file() and not p.name.startswith("."))
            )
        else:
            files.append(path)
    return files


def check_paths(paths: Iterable[str | Path]) -> LoadReport:
    """Load every policy file under ``paths``, collecting (never raising) problems."""
    paths = list(paths)
    texts: list[tuple[str, str | None, str]] = []
    for path in policy_files(paths):
        try:
            texts.append((str(path), path.read_text(encoding="utf-8"), ""))
        except (OSError, UnicodeDecodeError) as error:
            texts.append((str(path), None, f"cannot read: {error}"))
    return check_texts(texts, where=", ".join(str(p) for p in paths))


def check_texts(texts: Sequence[tuple[str, str | None, str]], where: str) -> LoadReport:
    """Like ``check_paths`` over (file label, text or None, read error) triples already read.

    ``where`` names the policy paths in the problem reported when nothing at all loads: an empty
    policy set would leave every endpoint unenforced (say, a ``rm *; cp new/* .`` caught halfway).
    """
    policies: list[model.Policy] = []
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for label, text, read_error in texts:
        if text is None:
            errors.append(Problem(label, None, "", read_error))
            continue
        report = parse_text(label, text)
        policies.extend(report.policies)
        errors.extend(report.errors)
        warnings.extend(report.warnings)
    seen: dict[tuple[str, str | None, str], model.Policy] = {}
    for policy in policies:
        key = (policy.kind, policy.namespace, policy.name)
        if key in seen:
            first = seen[key]
            errors.append(Problem(policy.file, policy.document, "metadata.name",
                                  f"{policy.kind} {policy.label} is already defined in "
                                  f"{first.file}: document {first.document}; names are unique"))
        seen[key] = policy
    if not policies and not errors:
        errors.append(Problem(where, None, "", _nothing_found(len(texts))))
    return LoadReport(tuple(policies), tuple(errors), tuple(warnings), tuple(t[0] for t in texts))


def _nothing_found(files: int) -> str:
    if not files:
        found = f"no policy files ({', '.join('*' + s for s in POLICY_SUFFIXES)})"
    else:
        found = "1 file holds no policy document" if files == 1 else f"{files} files hold no policy document"
    return (f"no policies found: {found}; an empty policy set would stop enforcement for every "
            "endpoint")


def load_paths(paths: Iterable[str | Path]) -> model.PolicySet:
    """Load policies from files and directories. Raises: PolicyError listing every problem."""
    return check_paths(paths).policy_set()


def parse_text(label: str, text: str) -> LoadReport:
    """Parse every document of one file; ``label`` names the file in messages."""
    policies: list[model.Policy] = []
    errors: list[Problem] = []
    warnings: list[Problem] = []
    number = 0
    documents = yaml.load_all(text, Loader=_StrictLoader)
    while True:
        number += 1
        try:
            raw = next(documents)
        except StopIteration:
            break
        except yaml.YAMLError as error:
            errors.append(Problem(label, number, "", f"invalid YAML: {_yaml_problem(error)}"))
            break
        if raw is None:
            continue
        if not policies and not errors and isinstance(raw, dict) and set(raw) == {"endpoints"}:
            return _inventory_report(label, text)
        doc = document.Document(label, number, errors, warnings)
        policies.extend(doc.parse(raw))
    return LoadReport(tuple(policies), tuple(errors), tuple(warnings), (label,))


def _inventory_report(label: str, text: str) -> LoadReport:
    """An endpoint inventory kept beside the policies (policies/endpoints.demo.yaml) is checked
    as one, so a directory of policies and their inventory loads without noise."""
    from fqdnproxy import endpoints  # here: endpoints imports policy.model

    try:
        endpoints.parse_inventory(label, text)
    except endpoints.EndpointsError as error:
        return LoadReport(errors=tuple(Problem(label, None, "", p.removeprefix(f"{label}: "))
                                       for p in error.problems), files=(label,))
    note = Problem(label, None, "", "an endpoint inventory, not policies: checked as one, loads no policy")
    return LoadReport(warnings=(note,), files=(label,))


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader (libyaml's when present) refusing duplicate keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {json.dumps(str(key))}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    return problem


__all__ = ["Problem", "PolicyError", "LoadReport", "check_paths", "check_texts", "load_paths",
           "parse_text", "policy_files"]
