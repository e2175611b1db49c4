"""The documentation's examples run and its tables hold.

- docs/sdk.md, docs/policy.md: every ```python block runs, in order, in one
  namespace per file (a ```python no-run block only has to compile).
- docs/policy.md: every ```toml block is a whole policy that parses; the
  Python after a TOML block finds it saved as policy.toml in the working
  directory, as the page says; the subject-glob and containment tables give
  the outcomes they state; the denial-reason table lists every reason.
- docs/sdk.md: the table of refusal codes lists every code, with the HTTP and
  gRPC answers the integrations give.
- docs/operations.md: every metric it names is one the daemon exports.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signer import Policy, contains
from signer._metrics import Metrics
from signer._policy import REASONS, SubjectPattern
from verifier_sdk import CODES, Capability
from verifier_sdk.integrations import BAD_REQUEST, KIND_OF, MISSING_CREDENTIALS

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    info: str  # what follows the opening fence: "python", "python no-run", "toml", ...
    code: str
    line: int  # of the block's first line of code, counted from 1

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info.split() else ""


def blocks(name: str) -> list[Block]:
    text = (DOCS / name).read_text(encoding="utf-8")
    return [Block(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start(2)) + 1)
            for m in FENCE.finditer(text)]


def run(block: Block, name: str, namespace: dict[str, Any]) -> None:
    """Execute a block so that a traceback points at its line in the page."""
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, f"docs/{name}", "exec"), namespace)  # noqa: S102 - our own docs


def table(name: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with ``header``."""
    lines = (DOCS / name).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, f"{name}: the table {header!r} is empty"
    return rows


def unquote(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"not a `quoted` cell: {cell!r}"
    return match.group(1)


# --- runnable examples ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdk.md", "policy.md"])
def test_python_blocks_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"docs_{name.removesuffix('.md')}"}
    ran = 0
    for block in blocks(name):
        if block.lang == "toml":
            (tmp_path / "policy.toml").write_text(block.code, encoding="utf-8")
        elif block.info == "python":
            run(block, name, namespace)
            ran += 1
        elif block.lang == "python":
            assert block.info == "python no-run", f"docs/{name}:{block.line}: {block.info!r}"
            compile(block.code, f"docs/{name}", "exec")
    assert ran >= 5, f"docs/{name} has only {ran} runnable blocks"


def policy_blocks() -> list[Block]:
    return [b for b in blocks("policy.md") if b.lang == "toml"]


@pytest.mark.parametrize("block", policy_blocks(), ids=lambda b: f"line-{b.line}")
def test_policy_toml_blocks_parse(block: Block) -> None:
    policy = Policy.from_toml(block.code, source=f"docs/policy.md:{block.line}")
    assert policy.grants or policy.admins


# --- tables that state outcomes -------------------------------------------------------


def test_subject_glob_table() -> None:
    rows = table("policy.md", "| subject pattern |")
    for pattern, subject, matches in rows:
        expected = {"yes": True, "no": False}[matches]
        got = SubjectPattern.parse(unquote(pattern)).matches(unquote(subject))
        assert got is expected, f"{pattern} against {subject}: {got}"


def _cap(cell: str) -> Capability:
    """A capability written as a TOML inline table, as in a policy file."""
    return Capability.parse(tomllib.loads("cap = " + unquote(cell))["cap"])


def test_containment_table() -> None:
    rows = table("policy.md", "| ceiling |")
    assert len(rows) >= 10
    for ceiling, requested, outcome in rows:
        result = contains(_cap(requested), _cap(ceiling))
        assert bool(result) is outcome.startswith("yes"), (ceiling, requested, result.reason)


def test_denial_reason_table_is_complete() -> None:
    listed = [unquote(row[0]) for row in table("policy.md", "| reason |")]
    # The policy's reasons, then the two the key ring adds after it.
    assert listed == [*REASONS, "key_unavailable", "key_expiring"]


def test_refusal_code_table_matches_the_integrations() -> None:
    http = {"unauthenticated": "401", "forbidden": "403", "unavailable": "503", "invalid": "400"}
    grpc_code = {"unauthenticated": "UNAUTHENTICATED", "forbidden": "PERMISSION_DENIED",
                 "unavailable": "UNAVAILABLE", "invalid": "INVALID_ARGUMENT"}
    rows = {unquote(row[0]): row for row in table("sdk.md", "| code | meaning |")}
    assert set(rows) == set(KIND_OF) == {*CODES, MISSING_CREDENTIALS, BAD_REQUEST,
                                         "body_too_large"}
    for code, (_, _, status, grpc_status) in rows.items():
        if code == "body_too_large":  # HTTP only, and 413 rather than its kind's 400
            assert (status, grpc_status) == ("413", "—")
            continue
        assert (status, grpc_status) == (http[KIND_OF[code]], grpc_code[KIND_OF[code]]), code


def test_operations_metric_names_exist() -> None:
    exported = {metric.name for metric in Metrics().registry.collect()}
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(mandate_[a-z_]+)`", text))
    assert named, "operations.md names no metric"
    # prometheus-client reports counters without their _total suffix.
    assert {name.removesuffix("_total") for name in named} <= exported
    assert exported <= {name.removesuffix("_total") for name in named}, "a metric is undocumented"
