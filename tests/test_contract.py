"""kvc.contract is the only module that spells the KV/artifact contract: cache I/O names, metadata keys,
entry-point names, KV dtype lists and the contract's enums. Every other module of the package imports
them. This test reads the package's source (code only: docstrings and comments may name them) and
fails with file:line for each spelling found elsewhere."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("compiler", "passes", "runtime", "models", "kvc", "tools")
CONTRACT = REPO / "kvc" / "contract.py"

CACHE_NAME = re.compile(r"past_key_values\.|^present\.")  # a cache input, or an output's prefix
METADATA_KEYS = ("kvc.model_config", "kvc.kv_layout", "kvc.generation", "kvc.exporter")
SCALE_SUFFIX = "_scale"
ENTRY_NAMES = {"prefill", "decode", "decode_b1"}
KV_DTYPE_NAMES = {"fp32", "fp16", "bf16", "int8", "fp8"}
CONTRACT_TYPES = {"KvDtype", "ScaleKind", "CacheLayoutKind", "EngineKind", "Entry"}


def spelling_problem(text: str) -> str | None:
    """Why a string constant (or a constant piece of an f-string) spells the contract, or None."""
    if CACHE_NAME.search(text):
        return f"cache name {text!r}: use kvc.contract's past_name/present_name/PAST_PREFIX/..."
    if any(key in text for key in METADATA_KEYS):
        return f"metadata key {text!r}: use kvc.contract's MODEL_CONFIG_KEY/LAYOUT_KEY/GENERATION_KEY"
    if text == SCALE_SUFFIX:
        return "'_scale': use kvc.contract.SCALE_SUFFIX or past_scale_name/present_scale_name"
    if text in ENTRY_NAMES:
        return f"entry name {text!r}: use kvc.contract.Entry"
    return None


def docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def problems_in(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = docstring_nodes(tree)
    where = path.relative_to(REPO)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            problem = spelling_problem(node.value)
            if problem:
                found.append(f"{where}:{line}: {problem}")
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            names = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(names & KV_DTYPE_NAMES) >= 3:
                found.append(f"{where}:{line}: a list of KV dtypes: use kvc.contract.KvDtype / KV_DTYPE_NAMES")
        elif isinstance(node, ast.ClassDef) and node.name in CONTRACT_TYPES:
            found.append(f"{where}:{line}: class {node.name} is kvc.contract's: import it")
    return found


def package_sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if p != CONTRACT)


def test_the_checker_finds_each_kind_of_spelling(tmp_path):
    sample = REPO / "kvc" / "_contract_probe.py"
    code = ('"""Docstrings may say past_key_values.0.key."""\n'
            'A = "past_key_values.0.key"\nB = f"present.{1}.key"\nC = "kvc.model_config"\n'
            'D = f"x{2}_scale"\nE = "decode_b1"\nF = ("fp32", "fp16", "int8")\nclass EngineKind: pass\n')
    try:
        sample.write_text(code)
        found = problems_in(sample)
    finally:
        sample.unlink()
    assert sorted(int(f.split(":")[1]) for f in found) == [2, 3, 4, 5, 6, 7, 8], found


@pytest.mark.parametrize("folder", FOLDERS)
def test_only_the_contract_spells_the_contract(folder):
    found = [p for path in package_sources(folder) for p in problems_in(path)]
    assert not found, "\n".join(found)
