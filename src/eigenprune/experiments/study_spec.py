"""A study spec (TOML or JSON): read it, check every entry, and plan its cells — before any work.

    [study]
    models  = ["smollm2-135m"]            # alias, model folder or .gguf (relative to this file), cached hub id
    tasks   = ["int-mult", "cb", "my.jsonl"]  # built-in names or task files (relative to this file)
    targets = ["key"]                     # presets or regexes (default ["key"])
    methods = ["eigenprune", "random"]    # registry names, STAGE+METHOD composites (default: compare's)

    [settings]            # shared by every cell: any `RunConfig` (or `CompareConfig`) setting
    limit = 120           #   but task, model, targets (the grid) and seeds, sweep_test (compare uses neither)

    [task_settings.cb]    # per-task overrides of [settings]
    limit = 56

    [method_args.lora]    # one method's settings, as `compare --set lora.steps=60`
    steps = 60

    [executor]            # where cells run (`study_executor.ExecutorConfig`); not part of any cell's settings
    name = "slurm"
    partition = "gpu"

A cell is one model x task x target: one `compare` of every method with the cell's settings. A bad
entry is one line naming the file, the line and the entry. tomllib and json give no positions for
valid documents, so the line is found by searching the raw text for the entry after its section
header: good enough for hand-written specs (a key written twice in different styles may point at the
first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.core import settings as settings_module
from eigenprune.core.errors import UsageError
from eigenprune.experiments.compare import CompareConfig, _plain
from eigenprune.experiments.study_executor import ExecutorConfig
from eigenprune.methods import registry
from eigenprune.protocol.config import COMPARE_EXCLUDES as _NOT_COMPARE
from eigenprune.protocol.config import LEGACY, RunConfig, compare_settings

SECTIONS = ("study", "settings", "task_settings", "method_args", "executor")
STUDY_KEYS = ("models", "tasks", "targets", "methods")
GRID_FIELDS = ("task", "model", "targets")  # set by [study], one value per cell
_COMPARE_OWN = ("methods", "method_args")  # set by [study].methods and [method_args]
# run settings added after studies were first written, at the default that reproduces what ran before them: left
# out of a cell's identity there, so a study written before they existed resumes instead of seeing every cell changed
LATER_SETTINGS = {"calibrate": False}


@dataclass
class Cell:
    """One model x task x target of the grid, and everything that determines its result."""

    key: str  # its folder name under OUT/cells/
    model: str  # as written in the spec
    task: str
    targets: str
    run: RunConfig  # paths resolved
    opts: CompareConfig
    task_sha256: str | None  # a task file's content (None for built-in tasks)

    def config(self) -> dict:
        """What `compare` writes as this cell's config.json."""
        run = compare_settings(self.run)
        return _json({"run": run, "compare": _plain(dataclasses.asdict(self.opts))})

    def identity(self) -> dict:
        """What decides the cell's numbers: its settings with the spec's (location-free) model and task
        entries, plus the task file's content."""
        config = self.config()
        config["run"] = {k: v for k, v in config["run"].items() if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]}
        config["run"] |= {"model": self.model, "task": self.task}
        return {"config": config, "task_sha256": self.task_sha256}

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Study:
    """A checked spec: its file, its normalised content, its cells in grid order and its `[executor]` table (where
    the cells run, which changes none of their numbers: kept out of `spec`)."""

    path: Path
    text: str
    spec: dict
    cells: list[Cell]
    executor: dict = field(default_factory=dict)


def _json(value):
    return json.loads(json.dumps(value))


class _Where:
    """'FILE: line N: ' for an entry, found by searching the raw text (see the module docstring)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def _find(self, pattern: str, start: int) -> int | None:
        found = re.compile(pattern, re.MULTILINE).search(self.text, start)
        return found.start() if found else None

    def line(self, section: tuple[str, ...] = (), key: str | None = None, value: str | None = None) -> int | None:
        pos = 0
        for name in section:  # `[method_args."lora+eigenprune"]`, `"method_args": {"lora": {`, ...
            found = self._find(rf"""(?<![\w+\-]){re.escape(name)}(?![\w+\-])""", pos)
            pos = found if found is not None else pos
        if key is not None:
            name = re.escape(key)
            found = self._find(rf"""(^|[\s{{,.\[])["']?{name}["']?\s*([=:\].])""", pos)
            if found is None and pos:
                found = self._find(rf"""(^|[\s{{,.\[])["']?{name}["']?\s*([=:\].])""", 0)
            if found is None:
                return None
            pos = found + (self.text[found] in "\n\t {,.[")
        if value is not None:
            found = self._find(rf"""["']{re.escape(value)}["']""", pos)
            if found is None:
                return None
            pos = found
        return self.text.count("\n", 0, pos) + 1 if (section or key or value) else None

    def error(self, message: str, section: tuple[str, ...] = (), key: str | None = None,
              value: str | None = None) -> UsageError:
        line = self.line(section, key, value)
        return UsageError(f"{self.path}: {f'line {line}: ' if line else ''}{message}")


def _table(section: tuple[str, ...]) -> str:
    return "[" + ".".join(p if re.fullmatch(r"[\w-]+", p) else f'"{p}"' for p in section) + "]"


def _read(path: Path) -> tuple[str, dict]:
    if not path.is_file():
        raise UsageError(f"study spec not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise UsageError(f"{path}: line {line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the "
                         "spec as UTF-8") from None
    except OSError as err:
        raise UsageError(f"cannot read study spec {path} ({err.strerror})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise UsageError(f"{path}: TOML specs need Python 3.11 or `pip install tomli`; "
                                 "or write the spec as JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            found = re.search(r"\s*\(at line (\d+), column \d+\)$", str(err))
            at = f"line {found[1]}: " if found else ""
            raise UsageError(f"{path}: {at}not valid TOML ({str(err)[:found.start()] if found else err})") from None
    else:
        raise UsageError(f"{path}: a study spec is a .toml or .json file")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a study spec is a table (object) of sections: {', '.join(SECTIONS)}")
    return text, data


def _names(where: _Where, study: dict, key: str, default: list[str] | None) -> list[str]:
    if key not in study:
        if default is None:
            raise where.error(f"[study] needs '{key}', a list of names", ("study",))
        return default
    values = study[key]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        got = json.dumps(values, default=str)
        raise where.error(f"'{key}' in [study] must be a non-empty list of names, got {got}", ("study",), key)
    for v in values:
        if values.count(v) > 1:
            raise where.error(f"'{v}' appears twice in '{key}' in [study]", ("study",), key, v)
    return [v.strip() for v in values]


def _model(where: _Where, entry: str, base: Path) -> str:
    """The model entry as `load_model` takes it: paths are relative to the spec's folder."""
    from eigenprune.core.models import SMOLLM2_ALIAS, resolve

    if entry == SMOLLM2_ALIAS:
        spec = entry
    else:
        local = base / Path(entry).expanduser()
        looks_like_path = entry.startswith((".", "/", "~")) or entry.endswith(".gguf") or entry.count("/") > 1
        spec = str(local) if local.exists() or looks_like_path else entry
    try:
        source = resolve(spec)
    except UsageError as err:
        raise where.error(f"model '{entry}': {err}", ("study",), "models", entry) from None
    if source.location == spec and spec == entry and not Path(spec).exists():  # a hub id: must be cached
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(entry, "config.json"), str):
            raise where.error(f"unknown model '{entry}': not '{SMOLLM2_ALIAS}', a model folder or .gguf file "
                              f"(relative to {where.path.parent}), or a hub id in the local cache",
                              ("study",), "models", entry)
    return spec


def _task(where: _Where, entry: str, base: Path) -> tuple[str, str | None]:
    """(the task as `load_task` takes it, the task file's sha256 or None)."""
    from eigenprune.evaluation.tasks import BUILTIN_TASKS

    if entry in BUILTIN_TASKS:
        return entry, None
    path = base / Path(entry).expanduser()
    if not path.exists():
        raise where.error(f"unknown task '{entry}': not a built-in task ({', '.join(BUILTIN_TASKS)}) and no "
                          f"file {path}", ("study",), "tasks", entry)
    files = sorted(p for p in path.rglob("*.jsonl")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + file.read_bytes())
    return str(path), digest.hexdigest()


def _target(where: _Where, entry: str) -> None:
    from eigenprune.edits.targets import PRESETS

    if entry in PRESETS:
        return
    try:
        re.compile(entry)
    except re.error as err:
        raise where.error(f"target '{entry}' is neither a preset ({', '.join(PRESETS)}) nor a valid regular "
                          f"expression ({err})", ("study",), "targets", entry) from None


def _settings(where: _Where, values, section: tuple[str, ...]) -> dict:
    """[settings] or one [task_settings.T]: every key a known run or compare setting, every value typed."""
    label = _table(section)
    if not isinstance(values, dict):
        raise where.error(f"{label} must be a table of settings", section)
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} | set(LEGACY)  # flat names, as the flags spell them
    compare_fields = {f.name for f in dataclasses.fields(CompareConfig)} - set(_COMPARE_OWN)
    for key, value in values.items():
        if key in GRID_FIELDS:
            raise where.error(f"'{key}' in {label}: set it in [study] ({key}s = [...]), one value per cell",
                              section, key)
        if key in _COMPARE_OWN or key in _NOT_COMPARE:
            why = ("methods go in [study], their settings in [method_args.NAME]" if key in _COMPARE_OWN
                   else "compare uses one split seed and evaluates test once")
            raise where.error(f"'{key}' in {label} is not a study setting ({why})", section, key)
        if key not in run_fields | compare_fields:
            known = sorted((run_fields | compare_fields) - set(GRID_FIELDS) - set(_NOT_COMPARE))
            raise where.error(f"unknown key '{key}' in {label}; known: {', '.join(known)}", section, key)
        cls = RunConfig if key in run_fields else CompareConfig
        try:
            if key in LEGACY:  # e.g. score_seed is score.seed
                outer, inner = LEGACY[key].split(".")
                settings_module.coerce(type(getattr(RunConfig(task="-"), outer)), inner, value)
            else:
                settings_module.coerce(cls, key, value)
        except ValueError as err:
            raise where.error(f"{label}: {err}", section, key) from None
    return dict(values)


def _blame(where: _Where, err: Exception, values: dict, sections: list[tuple[str, ...]]) -> UsageError:
    """A cell's settings failed together (e.g. `limit = 1`): point at the key the message names."""
    message = str(err)
    for section in sections:
        for key in values.get(section, {}):
            if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", message):
                return where.error(f"{_table(section)}: {message}", section, key)
    return where.error(message, sections[-1] if sections else ())


def load_spec(path: str | Path) -> Study:
    """Read and check a spec and plan its cells; a UsageError (one line) for the first bad entry."""
    path = Path(path)
    text, data = _read(path)
    where, base = _Where(path, text), path.parent
    for key in data:
        if key not in SECTIONS:
            raise where.error(f"unknown section '{key}'; a study spec has {', '.join(SECTIONS)}", (), key)
    study = data.get("study")
    if not isinstance(study, dict):
        raise where.error("a study spec needs a [study] table with models, tasks, targets and methods")
    for key in study:
        if key not in STUDY_KEYS:
            raise where.error(f"unknown key '{key}' in [study]; known: {', '.join(STUDY_KEYS)}", ("study",), key)
    from eigenprune.experiments.compare import default_methods

    models = _names(where, study, "models", None)
    tasks = _names(where, study, "tasks", None)
    targets = _names(where, study, "targets", ["key"])
    methods = _names(where, study, "methods", list(default_methods()))
    model_specs = {m: _model(where, m, base) for m in models}
    task_specs = {t: _task(where, t, base) for t in tasks}
    for t in targets:
        _target(where, t)
    for m in methods:
        try:
            registry.resolve(m)
        except UsageError as err:
            raise where.error(str(err), ("study",), "methods", m) from None

    shared = _settings(where, data.get("settings", {}), ("settings",))
    per_task = data.get("task_settings", {})
    if not isinstance(per_task, dict):
        raise where.error("[task_settings] must hold one table per task, e.g. [task_settings.cb]", ("task_settings",))
    for task, values in per_task.items():
        if task not in tasks:
            raise where.error(f"[task_settings] names task '{task}', which is not in [study] tasks",
                              ("task_settings",), task)
        _settings(where, values, ("task_settings", task))

    method_args = data.get("method_args", {})
    if not isinstance(method_args, dict) or not all(isinstance(v, dict) for v in method_args.values()):
        raise where.error("[method_args] must hold one table per method, e.g. [method_args.lora]", ("method_args",))
    specs, _, _ = CompareConfig(methods=tuple(methods)).plan()
    running = {s.name for s in specs} | {m.name for s in specs for m in s.parts}
    for name, values in method_args.items():
        if name not in running:
            raise where.error(f"[method_args] names '{name}', which is not among the methods that run "
                              f"({', '.join(s.name for s in specs)})", ("method_args",), name)
        try:
            registry.configure(next(s for s in specs if name in {s.name, *(m.name for m in s.parts)}),
                               {name: values})
        except UsageError as err:
            key = next((k for k in values if re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", str(err))), None)
            raise where.error(f"[method_args.{name}]: {err}", ("method_args", name), key) from None

    executor = data.get("executor", {})
    if not isinstance(executor, dict):
        raise where.error("[executor] must be a table, e.g. name = \"slurm\"", ("executor",))
    try:
        settings_module.from_dict(ExecutorConfig, executor)
    except ValueError as err:
        key = next((k for k in executor if re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", str(err))), None)
        raise where.error(f"[executor]: {err}", ("executor",), key) from None

    spec = {"study": {"models": models, "tasks": tasks, "targets": targets, "methods": methods},
            "settings": shared, "task_settings": per_task, "method_args": method_args}
    return Study(path, text, _json(spec), _plan(where, spec, model_specs, task_specs), dict(executor))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _cell_key(model: str, task: str, targets: str) -> str:
    """`model__task__targets`, readable; a short hash of the raw names when that had to shorten them."""
    shown = [Path(model).name.removesuffix(".gguf") if "/" in model else model,
             Path(task).stem if task.endswith(".jsonl") else Path(task).name, targets]
    key = "__".join(_slug(s)[:40] for s in shown)
    if key != "__".join((model, task, targets)):
        key += "-" + hashlib.sha256("\x00".join((model, task, targets)).encode()).hexdigest()[:6]
    return key


def _check_targets(where: _Where, model: str, target: str, run: RunConfig, skeletons: dict) -> None:
    """The target selects at least one weight matrix of the model (with the cell's layers and per_head): checked
    on the model's skeleton (its config on the meta device, no weights), so a typo costs milliseconds."""
    from eigenprune.core.models import load_skeleton
    from eigenprune.edits.targets import find_targets

    if run.model not in skeletons:
        try:
            skeletons[run.model] = load_skeleton(run.model)
        except UsageError as err:
            raise where.error(f"model '{model}': {err}", ("study",), "models", model) from None
    try:
        find_targets(skeletons[run.model], target, run.layers, run.per_head)
    except UsageError as err:
        raise where.error(f"target '{target}' for model '{model}': {err}", ("study",), "targets", target) from None


def _plan(where: _Where, spec: dict, model_specs: dict, task_specs: dict) -> list[Cell]:
    """Every model x task x target, in that order, with its settings checked together."""
    from eigenprune.edits.targets import parse_layers
    from eigenprune.evaluation.tasks import load_task

    grid, loaded, skeletons = spec["study"], {}, {}
    cells = []
    for model in grid["models"]:
        for task in grid["tasks"]:
            task_path, digest = task_specs[task]
            merged = spec["settings"] | spec["task_settings"].get(task, {})
            sections = [("settings",), ("task_settings", task)]
            values = {("settings",): spec["settings"], ("task_settings", task): spec["task_settings"].get(task, {})}
            run_part = {k: v for k, v in merged.items()
                        if k in {f.name for f in dataclasses.fields(RunConfig)} | set(LEGACY)}
            compare_part = {k: v for k, v in merged.items() if k not in run_part}
            try:
                parse_layers(merged.get("layers"))
                opts = settings_module.from_dict(CompareConfig, {"methods": grid["methods"],
                                                                 "method_args": spec["method_args"], **compare_part})
                runs = [settings_module.from_dict(RunConfig, {"task": task_path, "model": model_specs[model],
                                                              "targets": t, **run_part}, legacy=LEGACY)
                        for t in grid["targets"]]
            except ValueError as err:
                raise _blame(where, err, values, sections) from None
            for t, run in zip(grid["targets"], runs, strict=True):
                _check_targets(where, model, t, run, skeletons)
            load_key = (task_path, str(merged.get("template")), str(merged.get("answers")))
            if load_key not in loaded:
                try:
                    loaded[load_key] = load_task(task_path, merged.get("template"), merged.get("answers"))
                except UsageError as err:
                    raise where.error(f"task '{task}': {err}", ("study",), "tasks", task) from None
            cells += [Cell(_cell_key(model, task, t), model, task, t, run, opts, digest)
                      for t, run in zip(grid["targets"], runs, strict=True)]
    return cells
