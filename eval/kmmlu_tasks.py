"""Which lm-evaluation-harness tasks a KMMLU run asks for, and the checks made before a model loads.

lm-eval ships KMMLU as one task per subject (`lm_eval/tasks/kmmlu/default/kmmlu_korean_history.yaml`
for dataset_name `Korean-History`, tagged `kmmlu_humss_tasks`), a base file holding the prompt, shots
and metric (`_default_kmmlu_yaml`), and the same again for greedy generation in `direct/`. Subject
names, task names and categories are read from those files, never copied here.

- Local folder in the KMMLU layout (`{Subject}-train.csv` optional, `-dev.csv`, `-test.csv`): one task
  YAML per subject that `include:`s lm-eval's base file and swaps only the data source to the CSVs,
  listed in the hub config's split order (train, dev, test), because the first split fixes the column
  types (`7` vs `7.0` in a numeric option) as it does on the hub.
- Hub (`data_dir: null`): lm-eval's own tasks by name (`kmmlu_<subject>`, or the `kmmlu` group for
  every subject). A different `hub_repo` or a pinned `hub_revision` gets generated YAMLs as above with
  the hub source instead. The hub path cannot be exercised here (no network): written, never run.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from vlm.util.errors import UsageError

# lm-eval's tag suffixes -> our display names, in report order (membership comes from the task files).
CATEGORIES = {"stem": "STEM", "applied_science": "Applied Science", "humss": "HUMSS", "other": "Other"}
OTHER = "Other"  # a custom subject that lm-eval does not know
COLUMNS = ("question", "answer", "A", "B", "C", "D")  # what the prompt template and target read
SPLITS = ("train", "dev", "test")  # the hub config's order: the first split present fixes column types


@dataclass(frozen=True)
class Family:
    """One of lm-eval's KMMLU task families: its folder, base YAML and group (= task name prefix)."""

    folder: str
    base: str
    group: str
    metric: str


FAMILIES = {
    "loglik": Family("default", "_default_kmmlu_yaml", "kmmlu", "acc"),
    "generate": Family("direct", "_direct_kmmlu_yaml", "kmmlu_direct", "exact_match"),
}


def tasks_dir(mode: str) -> Path:
    import lm_eval  # pulls datasets and pandas: imported only once a run is under way

    return Path(lm_eval.__file__).parent / "tasks" / "kmmlu" / FAMILIES[mode].folder


@cache
def shipped_subjects(mode: str = "loglik") -> dict[str, tuple[str, str]]:
    """dataset_name -> (lm-eval task name, category) from lm-eval's per-subject task files."""
    group = FAMILIES[mode].group
    out = {}
    for path in sorted(tasks_dir(mode).glob(f"{group}_*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        key = spec["tag"].removeprefix(f"{group}_").removesuffix("_tasks")
        out[spec["dataset_name"]] = (spec["task"], CATEGORIES[key])
    return out


def shipped_hub_repo(mode: str) -> str:
    """The dataset repo lm-eval's own KMMLU tasks read (`dataset_path` of the base file)."""
    base = tasks_dir(mode) / FAMILIES[mode].base
    return yaml.safe_load(base.read_text(encoding="utf-8"))["dataset_path"]


def category_of(subject: str) -> str:
    return shipped_subjects()[subject][1] if subject in shipped_subjects() else OTHER


def _rows(path: Path) -> tuple[list[str], int]:
    """(header, number of data rows) of a CSV; quoted newlines are handled by the csv module."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        return header, sum(1 for _ in reader)


def check_subjects(
    data_dir: str | None, subjects: list[str] | None, num_fewshot: int, mode: str
) -> list[str]:
    """The subjects to run, or a UsageError naming the setting and the reason (no model is loaded)."""
    if mode not in FAMILIES:
        raise UsageError(f"mode={mode}: expected loglik or generate")
    if num_fewshot < 0:
        raise UsageError(f"num_fewshot={num_fewshot}: must be 0 or more")
    if data_dir is None:  # the hub: lm-eval's 45 subjects (dev split sizes are not known offline)
        known = list(shipped_subjects(mode))
        unknown = [s for s in subjects or [] if s not in known]
        if unknown:
            raise UsageError(f"subjects: {', '.join(unknown)} not among lm-eval's 45 KMMLU subjects")
        return list(subjects) if subjects else known
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"data_dir={data_dir}: no such folder")
    found = sorted(p.name.removesuffix("-test.csv") for p in root.glob("*-test.csv"))
    if not found:
        raise UsageError(f"data_dir={data_dir}: no {{Subject}}-test.csv files (KMMLU layout)")
    unknown = [s for s in subjects or [] if s not in found]
    if unknown:
        raise UsageError(f"subjects: no {', '.join(s + '-test.csv' for s in unknown)} in {data_dir}")
    chosen = list(subjects) if subjects else found
    for subject in chosen:
        for split in SPLITS:
            path = root / f"{subject}-{split}.csv"
            if split == "train" and not path.exists():
                continue
            if not path.exists():  # lm-eval draws shots from dev even to build its sampler
                raise UsageError(
                    f"data_dir={data_dir}: {path.name} missing (KMMLU layout needs dev and test)"
                )
            header, n = _rows(path)
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise UsageError(f"data_dir={data_dir}: {path.name} lacks column(s) {', '.join(missing)}")
            if split == "test" and n == 0:
                raise UsageError(f"data_dir={data_dir}: {path.name} has no questions")
            if split == "dev" and num_fewshot > n:
                raise UsageError(f"num_fewshot={num_fewshot}: {path.name} has only {n} examples")
    return chosen


def _slug(subject: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", subject.lower()).strip("_")


def write_task_yamls(
    folder: Path,
    subjects: list[str],
    mode: str,
    data_dir: str | None,
    hub_repo: str,
    hub_revision: str | None,
    cache_dir: Path,
) -> dict[str, str]:
    """subject -> task name of YAMLs written to `folder` (an include dir for lm-eval's TaskManager),
    each lm-eval's base task with only the data source swapped."""
    family = FAMILIES[mode]
    base = str(tasks_dir(mode) / family.base)
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for subject in subjects:
        name = f"kovicap_{family.group}_{_slug(subject)}"
        while name in names.values():  # "A-B" and "A_B" slug alike
            name += "_"
        source: dict[str, Any]
        if data_dir is not None:
            files = {s: str(Path(data_dir, f"{subject}-{s}.csv").resolve()) for s in SPLITS}
            files = {s: f for s, f in files.items() if Path(f).exists()}  # dict order: train, dev, test
            kwargs = {"data_files": files, "cache_dir": str(cache_dir)}  # no Arrow cache in ~/.cache
            source = {"dataset_path": "csv", "dataset_name": None, "dataset_kwargs": kwargs}
        else:
            kwargs = {"revision": hub_revision} if hub_revision else {}
            source = {"dataset_path": hub_repo, "dataset_name": subject, "dataset_kwargs": kwargs}
        spec = {"include": base, "task": name, **source}
        text = yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
        names[subject] = name
    return names


def lm_eval_tasks(
    folder: Path,
    subjects: list[str],
    mode: str,
    data_dir: str | None,
    hub_repo: str,
    hub_revision: str | None,
    cache_dir: Path,
) -> tuple[list[str], dict[str, str], str]:
    """(task names to request, task name -> subject, include path for the TaskManager)."""
    shipped = shipped_subjects(mode)
    if data_dir is None and hub_repo == shipped_hub_repo(mode) and hub_revision is None:
        by_task = {shipped[s][0]: s for s in subjects}
        request = [FAMILIES[mode].group] if len(subjects) == len(shipped) else list(by_task)
        return request, by_task, str(tasks_dir(mode))
    names = write_task_yamls(folder, subjects, mode, data_dir, hub_repo, hub_revision, cache_dir)
    return list(names.values()), {t: s for s, t in names.items()}, str(folder)
