"""The import direction of shared/DESIGN.md, checked two ways: what a fresh interpreter
loads, and what every module's source imports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "engram_ray"
HEAVY = ("torch", "ray", "grpc", "google.protobuf", "tokenizers", "transformers", "sympy")


def _loaded_after(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_importing_core_loads_only_numpy_and_stdlib():
    core = sorted(f"engram_ray.core.{p.stem}" for p in (PKG / "core").glob("*.py") if p.stem != "__init__")
    loaded = _loaded_after(["engram_ray.config", *core])
    bad = sorted(m for m in loaded if m.split(".")[0] in {h.split(".")[0] for h in HEAVY})
    assert not bad, f"core pulled in {bad}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
            elif node.level:
                # resolve relative imports against the package path
                parts = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                names.add(".".join(parts + ((node.module,) if node.module else ())))
    return names


# package -> top-level modules it must not import (shared/DESIGN.md, "Layers")
_FORBIDDEN = {
    "engram_ray.config": {"numpy", "torch", "ray", "grpc", "engram_ray.core", "engram_ray.model"},
    "engram_ray.core": {"torch", "ray", "grpc", "google", "engram_ray.store", "engram_ray.rpc",
                        "engram_ray.client", "engram_ray.model", "engram_ray.runtime", "engram_ray.cli"},
    "engram_ray.store": {"torch", "ray", "grpc", "engram_ray.rpc", "engram_ray.client",
                         "engram_ray.model", "engram_ray.runtime"},
    "engram_ray.rpc": {"torch", "ray", "engram_ray.client", "engram_ray.model", "engram_ray.runtime"},
    "engram_ray.client": {"torch", "ray", "engram_ray.model", "engram_ray.runtime"},
    "engram_ray.model": {"ray", "grpc", "google", "engram_ray.store", "engram_ray.rpc",
                         "engram_ray.client", "engram_ray.runtime"},
    # the lookup agent: a client-side process and its worker side; no torch, never Ray or server code
    "engram_ray.agent": {"torch", "ray", "engram_ray.model", "engram_ray.runtime", "engram_ray.store",
                         "engram_ray.rpc.servicer", "engram_ray.rpc.server", "engram_ray.bench"},
    # the paper's experiments: plain torch on a LocalMemory; Ray fans them out from runtime/
    "engram_ray.experiments": {"ray", "grpc", "engram_ray.runtime", "engram_ray.rpc", "engram_ray.store",
                               "engram_ray.client", "engram_ray.agent", "engram_ray.cli", "engram_ray.bench"},
    # the model's remote memory: torch + client/agent, runs where there is no cluster
    "engram_ray.remote_memory": {"ray", "engram_ray.runtime", "engram_ray.store", "engram_ray.cli"},
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_downward(path):
    mod = _module_name(path)
    imported = _imports(path)
    for pkg, forbidden in _FORBIDDEN.items():
        if mod == pkg or mod.startswith(pkg + "."):
            hits = sorted(i for i in imported for f in forbidden if i == f or i.startswith(f + "."))
            assert not hits, f"{mod} imports {hits}, against the layering"
    if not mod.startswith("engram_ray.runtime"):
        assert not any(i == "ray" or i.startswith("ray.") for i in imported), f"{mod} imports ray"


def test_a_shard_process_does_not_load_torch():
    loaded = _loaded_after(["engram_ray.runtime.shard_server", "engram_ray.runtime"])
    assert "torch" not in loaded and "ray" in loaded


def test_remote_memory_and_the_agent_import_without_ray():
    """A worker without a cluster (no Ray installed) reads rows through RemoteMemory and the
    lookup agent: importing them must not need ray."""
    code = ("import sys\nsys.modules['ray'] = None\n"  # any 'import ray' now raises ImportError
            "from engram_ray.remote_memory import RemoteMemory\n"
            "from engram_ray.agent import AgentClient, LookupAgent\n"
            "import engram_ray.agent.process, engram_ray.cli\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_agent_process_does_not_load_torch():
    loaded = _loaded_after(["engram_ray.agent", "engram_ray.agent.process", "engram_ray.cli.agent"])
    assert "torch" not in loaded and "ray" not in loaded
