"""Small offline few-shot tasks built from held-out real text, in lm-evaluation-harness's YAML format.

Two tasks, both from the held-out pydoc topics (`data.pydoc_text`, which the demo never trains on):
- `relaxrec_pydoc_lastword`: LAMBADA's form. A passage (paragraphs one per line) ends just before
  the last word of a sentence, a word that already occurs earlier in the passage; the model must
  predict it (loglikelihood; acc = the greedy continuation is the word).
- `relaxrec_pydoc_continuation`: HellaSwag's form. One or two sentences, and four candidate next
  sentences: the true one and three from other topics of similar length (multiple choice).

The topics repeat some passages of the training topics; samples from those are left out. The jsonl
files ship beside the YAMLs (`tasks/`); `tools/make_local_tasks.py` rebuilds them. The YAMLs load
them through `tasks/relaxrec_tasks.py` (their `custom_dataset`), relative to the file, not to the
working directory, so `lm_eval --include_path <tasks>` runs them from anywhere.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LASTWORD, CONTINUATION = "relaxrec_pydoc_lastword", "relaxrec_pydoc_continuation"
LOCAL_TASKS = (LASTWORD, CONTINUATION)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z“\"(])")
_WORD = re.compile(r"[A-Za-z]{4,}")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text (code blocks, headings, grammar and bullet lists left out), one line each."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith((" ", "*", "-", "=", "+")) or lines[-1].startswith(("*", "=", "-")):
            continue
        para = " ".join(line.strip() for line in lines)
        if len(para.split()) >= 12 and not re.search(r"::=|>>>", para):
            out.append(para)
    return out


def sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def _normal(text: str) -> str:
    return " ".join(text.split())


def lastword_samples(texts: list[str], max_context_words: int = 120, exclude: str = "") -> list[dict]:
    """{"context", "target"}: a topic's running text up to a sentence's last word, which occurs in the
    (at most `max_context_words`) words before it. Sentences that occur in `exclude` are left out."""
    exclude = _normal(exclude)
    out = []
    for text in texts:
        paras = [sentences(p) for p in prose_paragraphs(text)]
        for j, sents in enumerate(paras):
            for i, sent in enumerate(sents):
                words = sent.rstrip(".!?").split(" ")
                last = words[-1]
                if (j, i) == (0, 0) or len(words) < 4 or not _WORD.fullmatch(last) \
                        or (exclude and _normal(sent) in exclude):
                    continue
                text_before = "\n".join([" ".join(p) for p in paras[:j]] + [" ".join(sents[:i] + words[:-1])])
                pieces = re.split(r"(\s+)", text_before.strip())  # words and the spaces or newlines between them
                context = "".join(pieces[-(2 * max_context_words - 1):])
                if re.search(rf"\b{last}\b", context, re.IGNORECASE):
                    out.append({"context": context, "target": last})
    return out


def continuation_samples(texts: list[str], seed: int = 0, choices: int = 4, exclude: str = "") -> list[dict]:
    """{"context", "endings", "label"}: the true next sentence among distractors from other topics.
    Samples whose context or true sentence occurs in `exclude` are left out."""
    exclude = _normal(exclude)
    rng = random.Random(seed)
    pool = [(t, s) for t, text in enumerate(texts) for p in prose_paragraphs(text) for s in sentences(p)
            if 6 <= len(s.split()) <= 40]
    out = []
    for t, text in enumerate(texts):
        for para in prose_paragraphs(text):
            sents = sentences(para)
            for i in range(1, len(sents)):
                true = sents[i]
                if not 6 <= len(true.split()) <= 40:
                    continue
                context = " ".join(sents[max(0, i - 2) : i])
                if exclude and (_normal(true) in exclude or _normal(context) in exclude):
                    continue
                n = len(true.split())
                others = sorted((abs(len(s.split()) - n), s) for u, s in pool if u != t and s != true)
                nearest = list(dict.fromkeys(s for _, s in others))[:12]  # topics repeat some sentences
                if len(nearest) < choices - 1:
                    continue
                distractors = rng.sample(nearest, choices - 1)
                endings = distractors + [true]
                rng.shuffle(endings)
                out.append({"context": context, "endings": endings, "label": endings.index(true)})
    return out


def task_folder() -> Path:
    """The shipped tasks' folder: an include path for relaxrec and for lm-eval's own CLI alike (their
    YAMLs read the jsonl files beside them through relaxrec_tasks.py, from any working directory)."""
    return TASKS_DIR
