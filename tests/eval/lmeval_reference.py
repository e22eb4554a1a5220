"""Run lm-evaluation-harness's own `kmmlu` task config (HFLM, loglikelihood) on a local KMMLU-layout
folder and dump per-question contexts and log-likelihoods as JSON. Run in a subprocess by
test_kmmlu_lmeval.py, so lm-eval's logging and `datasets` cache stay out of the test process.

    python tests/eval/lmeval_reference.py MODEL_DIR TOKENIZER_DIR DATA_DIR OUT.json SUBJECT...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager


def main(model_dir: str, tok_dir: str, data_dir: str, out: str, *subjects: str) -> None:
    task_dir = Path(out).parent / "lm_eval_tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    # lm-eval's shipped KMMLU task file; only the data source is swapped for the local CSVs, listed in
    # the hub config's split order (train, dev, test) so column types are fixed the same way.
    base = Path(lm_eval.__file__).parent / "tasks" / "kmmlu" / "default" / "_default_kmmlu_yaml"
    names = {}
    for subject in subjects:
        name = "kfix_" + subject.lower().replace("-", "_")
        files = "".join(
            f"    {split}: {data_dir}/{subject}-{split}.csv\n"
            for split in ("train", "dev", "test")
            if (Path(data_dir) / f"{subject}-{split}.csv").exists()
        )
        (task_dir / f"{name}.yaml").write_text(
            f"include: {base}\ntask: {name}\ndataset_path: csv\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{files}",
            encoding="utf-8",
        )
        names[subject] = name
    lm = HFLM(pretrained=model_dir, tokenizer=tok_dir, batch_size=4, device="cpu", dtype="float32")
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(names.values()),
        num_fewshot=5,
        # the base file is included by path, so lm-eval's 15k-task index is not needed (~25 s saved)
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )
    dump = {}
    for subject, name in names.items():
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        dump[subject] = {
            "acc": res["results"][name]["acc,none"],
            "contexts": [s["arguments"][0][0] for s in samples],
            "continuations": [[a[1] for a in s["arguments"]] for s in samples],
            "lls": [[r[0] for r in s["filtered_resps"]] for s in samples],
        }
    Path(out).write_text(json.dumps(dump, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
