"""The shipped tasks' datasets, read from the jsonl files beside this module: the YAMLs name these
functions as their `custom_dataset`, so lm-evaluation-harness's own CLI runs them from any working
directory (`lm_eval ... --include_path <this folder>`; `relaxrec eval tasks --print-include-path`)."""

from pathlib import Path


def _jsonl(name: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).resolve().parent / name)})


def lastword(**_):
    return _jsonl("pydoc_lastword.jsonl")


def continuation(**_):
    return _jsonl("pydoc_continuation.jsonl")
