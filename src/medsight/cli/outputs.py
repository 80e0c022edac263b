"""Where the segmenting commands write: one output per input, all named and checked before any work."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from medsight.errors import MedsightError


def output_paths(
    inputs: list[Path], out: Path, name_of: Callable[[Path], str], overwrite: bool
) -> list[Path]:
    """``out / name_of(input)`` for each input, refused up front if any exists (without
    ``overwrite``) rather than after the first inputs were segmented.

    Inputs that share a name, as in BraTS-style datasets (one folder per case, each holding
    ``flair.nii.gz``), are told apart by their folder's name; should that collide too, the second
    input is refused instead of silently replacing the first one's output.
    """
    from medsight.io import check_writable

    names = [name_of(p) for p in inputs]
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{p.parent.name}_{n}" if n in repeated else n for p, n in zip(inputs, names, strict=True)]
    first: dict[str, Path] = {}
    for path, name in zip(inputs, names, strict=True):
        if name in first:
            raise MedsightError(f"its output {name} would replace that of {first[name]}", path)
        first[name] = path
    return [check_writable(out / name, overwrite) for name in names]


# -- a prediction run's folder: one writer at a time, and a record of what wrote the masks ----------------
LOCK_NAME = ".medsight-predict.lock"
PROVENANCE_NAME = "medsight-provenance.json"


@contextlib.contextmanager
def locked_folder(out: Path) -> Iterator[Path]:
    """Hold ``out/.medsight-predict.lock`` (it holds our pid) while predicting into ``out``.

    A second run into the same folder is refused while the first one's process lives; a lock left
    by a killed run (its pid is gone) is taken over. Created with O_EXCL, so two runs starting at
    once cannot both take it.
    """
    from medsight.io.atomic import pid_alive, write_error

    lock = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and pid_alive(owner):
                    raise MedsightError(
                        f"another medsight predict (pid {owner}) is writing into this folder; wait for it "
                        "to finish or choose another --out",
                        out,
                    ) from None
                lock.unlink(missing_ok=True)  # its run was killed: take the folder over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            break
    except OSError as exc:
        raise write_error(lock, exc) from exc
    try:
        yield out
    finally:
        with contextlib.suppress(OSError, ValueError):
            if int(lock.read_text().strip()) == os.getpid():
                lock.unlink()


def check_provenance(out: Path, model: Path, overwrite: bool) -> dict:
    """The provenance record this run will write; refuses a folder whose masks came from another
    checkpoint (by content hash) unless ``overwrite``, so two models' masks never mix unrecorded."""
    import json

    from medsight import __version__
    from medsight.engine.checkpoint import sha256_of

    record = {
        "model": str(Path(model).resolve()),
        "checkpoint_sha256": sha256_of(Path(model)),
        "medsight_version": __version__,
    }
    previous = out / PROVENANCE_NAME
    if previous.is_file() and not overwrite:
        try:
            earlier = json.loads(previous.read_text())
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("checkpoint_sha256") not in (None, record["checkpoint_sha256"]):
            raise MedsightError(
                f"holds masks from another checkpoint ({earlier.get('model')}, per {PROVENANCE_NAME}); "
                "choose another --out, or pass --overwrite to replace them",
                out,
            )
    return record


def write_provenance(out: Path, record: dict, options: dict, outputs: list[Path], finished: bool) -> Path:
    """``medsight-provenance.json``: model, checkpoint hash, version, options, time and masks."""
    import json
    from datetime import UTC, datetime

    from medsight.io import write_text

    previous = out / PROVENANCE_NAME
    earlier: list[str] = []
    if previous.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            saved = json.loads(previous.read_text())
            if saved.get("checkpoint_sha256") == record["checkpoint_sha256"]:  # else --overwrite replaced it
                earlier = list(saved.get("outputs", []))
    names = sorted(set(earlier) | {p.name for p in outputs})
    body = {
        **record,
        "command": "medsight predict",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "finished": finished,
        "outputs": names,
    }
    return write_text(previous, json.dumps(body, indent=2) + "\n", overwrite=True)


@contextlib.contextmanager
def predict_outputs(
    scans: list[Path], out: Path, model: Path, overwrite: bool, skip_existing: bool, probabilities: bool,
    options: dict,
) -> Iterator[list[tuple[Path, Path, Path | None]]]:  # fmt: skip
    """``(input, mask, probability map or None)`` for each scan still to segment, inside the locked
    ``out``; the provenance record is written before the first mask and completed after the last."""
    created = not out.exists()
    try:
        with locked_folder(out):
            yield from _predict_jobs(scans, out, model, overwrite, skip_existing, probabilities, options)
    except BaseException:
        # a run that failed before its first mask leaves no folder behind that it created
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {PROVENANCE_NAME}:
            with contextlib.suppress(OSError):
                (out / PROVENANCE_NAME).unlink(missing_ok=True)
                out.rmdir()
        raise


def _predict_jobs(scans, out, model, overwrite, skip_existing, probabilities, options):
    """The body of :func:`predict_outputs`, run while ``out`` is locked."""
    from medsight import io

    def case(path: Path) -> str:
        return io.case_name(path) if path.is_file() else path.name

    record = check_provenance(out, model, overwrite)
    io.remove_stale_temporaries(out)
    keep = overwrite or skip_existing

    def mask_name(path: Path) -> str:  # a picture gets a picture of its own size
        if options.get("format") == "dicom-seg":
            return f"{case(path)}.dcm"
        picture = path.is_file() and io.suffix_of(path) in io.FORMATS["image"].suffixes
        return f"{case(path)}.png" if picture else f"{case(path)}.nii.gz"

    targets = output_paths(scans, out, mask_name, keep)
    prob_targets = (
        output_paths(scans, out, lambda p: f"{case(p)}_prob.nii.gz", keep)
        if probabilities
        else [None] * len(scans)
    )
    jobs = [
        (scan, target, prob)
        for scan, target, prob in zip(scans, targets, prob_targets, strict=True)
        if not (skip_existing and target.exists() and (prob is None or prob.exists()))
    ]
    if len(jobs) < len(scans):
        print(f"skipping {len(scans) - len(jobs)} scan(s) whose masks exist in {out}")
    write_provenance(out, record, options, [], finished=False)
    yield jobs
    written = [p for job in jobs for p in job[1:] if p is not None]
    write_provenance(out, record, options, written, finished=True)
