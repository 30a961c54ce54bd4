"""Rebuild the jsonl of the shipped offline tasks (relaxrec_megatron/evaluation/tasks/) from the
held-out pydoc topics of this Python, leaving out passages that the training topics repeat. Prints how many samples each task has."""

from __future__ import annotations

import json

from relaxrec_megatron.data.pydoc_text import pydoc_topics
from relaxrec_megatron.evaluation.local_tasks import TASKS_DIR, continuation_samples, lastword_samples


def main() -> None:
    texts, train = pydoc_topics("heldout"), "\n".join(pydoc_topics("train"))
    for name, rows in (("pydoc_lastword.jsonl", lastword_samples(texts, exclude=train)),
                       ("pydoc_continuation.jsonl", continuation_samples(texts, exclude=train))):
        (TASKS_DIR / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{name}: {len(rows)} samples")


if __name__ == "__main__":
    main()
