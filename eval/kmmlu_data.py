"""KMMLU data and prompts, exactly as lm-evaluation-harness's `kmmlu` task builds them.

Layout (HAERAE-HUB/KMMLU): per subject `{Subject}-train.csv`, `-dev.csv`, `-test.csv` with columns
`question, answer, A, B, C, D, Category, Human Accuracy`; `answer` is 1-4. Read from a local folder,
or (online) downloaded from the hub dataset's `data/` folder.

What lm-eval's task does (lm_eval/tasks/kmmlu/default/_default_kmmlu_yaml, version 2.0), mirrored here:
- prompt `{{question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n정답：` (U+FF1A colon);
- few-shot examples from the `dev` split, each `prompt + " " + letter`, joined with "\\n\\n", then the
  test prompt; drawn per subject by `random.Random(1234).sample(dev, k)` once per test question in
  file order (lm-eval's default sampler, `fewshot_random_seed=1234`);
- groups STEM / Applied Science / HUMSS / Other by the task tags (`SUBJECT_CATEGORY`).
The hub's CSVs reach lm-eval through `datasets`: pandas infers each column's type per 10,000-row chunk
(whole numbers -> int `7`, decimals -> float `2.50` -> `2.5`, empty -> None, printed "None"), and the
first chunk of the first split (train, dev, test) fixes the type every later chunk and split is cast to
(an int column under a float schema prints `7.0`; a number under a string schema prints as Arrow
formats it, `3.0` -> `3`). `read_csv`/`load_subject` reproduce this, so numeric options render alike.
"""

from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT = "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n정답："
CHOICES = ("A", "B", "C", "D")
TARGET_DELIMITER = " "  # between a prompt and its answer letter (lm-eval's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # after each few-shot example (lm-eval's fewshot_delimiter)
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
CATEGORIES = ("STEM", "Applied Science", "HUMSS", "Other")
HUB_REPO = "HAERAE-HUB/KMMLU"

# dataset_name -> group, from the `tag:` of each lm_eval/tasks/kmmlu/default/kmmlu_*.yaml (45 subjects).
_GROUPS = {
    "STEM": "Biology Chemical-Engineering Chemistry Civil-Engineering Computer-Science Ecology "
    "Electrical-Engineering Information-Technology Materials-Engineering Math Mechanical-Engineering",
    "Applied Science": "Aviation-Engineering-and-Maintenance Electronics-Engineering Energy-Management "
    "Environmental-Science Gas-Technology-and-Engineering Geomatics Industrial-Engineer "
    "Machine-Design-and-Manufacturing Maritime-Engineering Nondestructive-Testing "
    "Railway-and-Automotive-Engineering Telecommunications-and-Wireless-Technology",
    "HUMSS": "Accounting Criminal-Law Economics Education Korean-History Law Management "
    "Political-Science-and-Sociology Psychology Social-Welfare Taxation",
    "Other": "Agricultural-Sciences Construction Fashion Food-Processing Health "
    "Interior-Architecture-and-Design Marketing Patent Public-Safety Real-Estate Refrigerating-Machinery",
}
SUBJECT_CATEGORY: dict[str, str] = {s: g for g, names in _GROUPS.items() for s in names.split()}
COLUMNS = ("question", "answer", "A", "B", "C", "D")

# pandas.read_csv's default NA strings (keep_default_na=True), as the hub loader sees them.
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
       "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # fmt: skip
_BOOL = {"True": True, "TRUE": True, "true": True, "False": False, "FALSE": False, "false": False}
_INT = re.compile(r"^\s*[+-]?\d+\s*$")
_FLOAT = re.compile(
    r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$|^\s*[+-]?(?:inf|Inf|INF|infinity|Infinity)\s*$"
)
SPLITS = ("train", "dev", "test")  # the order the hub config lists them: the first one fixes column types
CHUNK = 10_000  # rows per pandas chunk in `datasets`' CSV reader (its types are inferred per chunk)


@dataclass(frozen=True)
class Question:
    """One KMMLU row. Options are kept as the hub loader types them (str, int, float, bool or None)."""

    question: str
    options: tuple[object, object, object, object]
    answer: int  # 0..3 (the CSV's 1..4 minus one)
    line: int  # CSV line number, for error messages

    def prompt(self) -> str:
        A, B, C, D = (_render(v) for v in self.options)
        return PROMPT.format(question=self.question.strip(), A=A, B=B, C=C, D=D)


def _render(v: object) -> str:
    """What Jinja's `{{x}}` prints: str(x) (None prints "None", floats as Python repr)."""
    return str(v)


def _kind(values: list[str]) -> str:
    """The dtype pandas infers for a column chunk: bool, int, float (numbers with NA or decimals), str."""
    present = [v for v in values if v not in _NA]
    if not present:
        return "float"  # an all-NA column is float64 NaN
    if all(v in _BOOL for v in present):
        return "bool" if len(present) == len(values) else "str"  # bool with NA stays object
    if all(_INT.match(v) for v in present):
        return "int" if len(present) == len(values) else "float"
    if all(_INT.match(v) or _FLOAT.match(v) for v in present):
        return "float"
    return "str"


def _parse(v: str, kind: str) -> object:
    if v in _NA:
        return None  # NaN / NA become null in Arrow, which Jinja prints as "None"
    if kind == "bool":
        return _BOOL[v]
    if kind == "int":
        return int(v)
    if kind == "float":
        x = float(v)
        return None if math.isnan(x) else x
    return v


def _arrow_str(x: object) -> str:
    """Arrow's cast of a number or bool to string: 3.0 -> "3", 2.50 -> "2.5", 1e-07 -> "1e-7"."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        r = repr(x)
        r = r[:-2] if r.endswith(".0") else r
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", r)
    return str(x)


def _cast(x: object, kind: str, where: str) -> object:
    """A value read with one chunk's type, cast to the type the first chunk of the first split fixed."""
    if x is None or (kind == "str" and isinstance(x, str)):
        return x
    try:
        if kind == "str":
            return _arrow_str(x)
        if kind == "float":
            return float(x)  # int -> float: 7 -> 7.0, printed "7.0"
        if kind == "int" and (isinstance(x, int) or float(x).is_integer()):
            return int(x)
        if kind == "bool" and isinstance(x, bool):
            return x
    except ValueError:
        pass
    raise ValueError(f"{where}: value {x!r} cannot take the column type {kind} (the hub loader fails too)")


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        return [(reader.line_num, r) for r in reader]


def read_csv(path: str | Path, schema: dict[str, str] | None = None) -> list[Question]:
    """Rows of one KMMLU CSV, options typed as `datasets` types them (`schema`: column -> kind, from
    `option_schema`; None: this file's own first chunk). A bad row raises ValueError naming file:line."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    schema = schema or option_schema(path)
    options: dict[str, list[object]] = {c: [] for c in "ABCD"}
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        for c in "ABCD":
            kind = _kind([r[c] for _, r in chunk])
            options[c] += [
                _cast(_parse(r[c], kind), schema[c], f"{path}:{line} column {c}") for line, r in chunk
            ]
    out = []
    for i, (line, r) in enumerate(rows):
        try:
            answer = int(float(r["answer"]))
        except ValueError:
            raise ValueError(f"{path}:{line}: answer {r['answer']!r} is not a number 1-4") from None
        if not 1 <= answer <= 4:
            raise ValueError(f"{path}:{line}: answer {answer} is outside 1-4")
        out.append(Question(r["question"], tuple(options[c][i] for c in "ABCD"), answer - 1, line))
    return out


def option_schema(first_split_file: str | Path) -> dict[str, str]:
    """Column kinds of A-D as `datasets` fixes them: from the first chunk of the first split's file."""
    rows = _rows(Path(first_split_file))[:CHUNK]
    return {c: _kind([r[c] for _, r in rows]) for c in "ABCD"}


def subjects_in(data_dir: str | Path) -> list[str]:
    """Subjects with a test file in a local KMMLU folder, sorted."""
    return sorted(p.name[: -len("-test.csv")] for p in Path(data_dir).glob("*-test.csv"))


def category_of(subject: str) -> str:
    """lm-eval's group of a subject; subjects outside the 45 (custom sets) go to "Other"."""
    return SUBJECT_CATEGORY.get(subject, "Other")


def subject_file(
    subject: str,
    split: str,
    data_dir: str | Path | None,
    hub_repo: str = HUB_REPO,
    revision: str | None = None,
    required: bool = True,
) -> Path | None:
    """Path of `{subject}-{split}.csv`: in data_dir, or downloaded from the hub dataset when None.
    A missing file raises FileNotFoundError, or gives None when not `required`."""
    name = f"{subject}-{split}.csv"
    if data_dir is not None:
        path = Path(data_dir) / name
        if not path.is_file():
            if not required:
                return None
            raise FileNotFoundError(f"KMMLU file {path} not found (expected {{Subject}}-{split}.csv)")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub_repo, f"data/{name}", repo_type="dataset", revision=revision))
    except Exception as e:  # offline, unknown subject, no access: one line that says which file
        if not required:
            return None
        raise FileNotFoundError(f"could not fetch {hub_repo}/data/{name} from the hub: {e}") from e


def load_subject(
    subject: str,
    data_dir: str | Path | None,
    hub_repo: str = HUB_REPO,
    revision: str | None = None,
    with_dev: bool = True,
) -> tuple[list[Question], list[Question]]:
    """(test, dev) questions of one subject; option types fixed by the first split present (train,
    dev, test), as loading the whole hub config with `datasets` (what lm-eval does) fixes them."""
    test_path = subject_file(subject, "test", data_dir, hub_repo, revision)
    dev_path = subject_file(subject, "dev", data_dir, hub_repo, revision, required=with_dev)
    train_path = subject_file(subject, "train", data_dir, hub_repo, revision, required=False)
    schema = option_schema(next(p for p in (train_path, dev_path, test_path) if p is not None))
    return read_csv(test_path, schema), (read_csv(dev_path, schema) if with_dev and dev_path else [])


def fewshot_contexts(
    test: list[Question], dev: list[Question], k: int, seed: int = FEWSHOT_SEED
) -> list[str]:
    """The full context of every test question, with lm-eval's few-shot draws (one RNG per subject)."""
    if k > len(dev):
        raise ValueError(f"num_fewshot={k} but the dev split has only {len(dev)} questions")
    rnd = random.Random(seed)
    shots_text = {id(q): q.prompt() + TARGET_DELIMITER + CHOICES[q.answer] + FEWSHOT_DELIMITER for q in dev}
    contexts = []
    for q in test:
        shots = rnd.sample(dev, k) if k > 0 else []  # lm-eval draws nothing (and keeps its RNG) at k=0
        contexts.append("".join(shots_text[id(s)] for s in shots) + q.prompt())
    return contexts
