"""The few BIDS rules nidask needs to read raw datasets and write derivatives.

No pybids: file names are parsed here (``key-value`` entities joined by ``_``, then
a suffix and an extension), sidecars are found by the BIDS *inheritance principle*
and outputs are named as BIDS derivatives.

- :func:`find_series` lists the DWI and PET (or BOLD) series of a dataset (``derivatives/``,
  ``sourcedata/`` and anything outside ``sub-*`` folders are skipped).
- :func:`find_sidecars` finds a series' ``.bval``/``.bvec``/``.json`` and a brain
  mask among the derivatives, as keyword arguments of :func:`nidask.load`.
- :func:`sidecar_metadata` merges the JSON sidecars that apply to a series.
- :func:`derivative_paths` names the outputs of one series under an output folder;
  :func:`write_dataset_description` writes that folder's
  ``dataset_description.json``.

The inheritance principle, as applied here: a sidecar applies to a data file when
it has the same suffix (``dwi``, ``pet``, ``bold``), the wanted extension and entities that
are a subset of the data file's; it is looked for in the data file's folder, then
in each parent folder up to the dataset root (the folder holding
``dataset_description.json``).  The nearest folder with an applicable file wins;
within a folder the file with the most entities wins.  JSON files are the
exception: all applicable ones are merged, nearer keys overriding farther ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nidask.errors import InputError, OutputError
from nidask.geometry import PHASE_ENCODINGS
from nidask.io.cache import atomic_output
from nidask.io.files import read_json_object

#: BIDS version the derivative ``dataset_description.json`` declares.
BIDS_VERSION = "1.10.0"
#: Extensions of data files, longest first.
DATA_EXTENSIONS = (".nii.gz", ".nii")
#: Suffixes of the series :func:`find_series` looks for by default.
MODALITIES = ("dwi", "pet")
#: Datatype folder of each suffix nidask reads.
DATATYPES = {"dwi": "dwi", "pet": "pet", "bold": "func"}
#: The sidecar key that marks the JSON file loaded with a series, per suffix.
TIMING_KEYS = {
    "pet": ("temporal_file", "FrameTimesStart"),
    "bold": ("json_file", "RepetitionTime"),
}
#: ``space-`` labels under which a derivative mask is taken to be on the series' grid.
NATIVE_SPACES = (None, "orig", "dwi", "pet", "bold")
#: Folders of a dataset's root that hold no raw data.
SKIPPED_FOLDERS = ("derivatives", "sourcedata", "code", "stimuli")
#: Order of entities in derivative names (BIDS' entity table; unknown keys go last).
ENTITY_ORDER = (
    "sub",
    "ses",
    "sample",
    "task",
    "tracksys",
    "acq",
    "nuc",
    "voi",
    "ce",
    "trc",
    "stain",
    "rec",
    "dir",
    "run",
    "mod",
    "echo",
    "flip",
    "inv",
    "mt",
    "part",
    "proc",
    "hemi",
    "space",
    "split",
    "recording",
    "chunk",
    "seg",
    "res",
    "den",
    "label",
    "from",
    "to",
    "mode",
    "desc",
)


def parse_name(path) -> tuple[dict[str, str], str | None, str]:
    """Split a BIDS file name into entities, suffix and extension.

    Parameters
    ----------
    path : path-like
        A file path; only its name is read.

    Returns
    -------
    entities : dict
        ``{key: label}`` in file order.
    suffix : str or None
        The part after the last ``_`` (``None`` when that part is an entity).
    extension : str
        Everything from the first ``.`` of the name (``""`` without one).

    Examples
    --------
    >>> parse_name("sub-01/dwi/sub-01_ses-1_acq-x_dwi.nii.gz")
    ({'sub': '01', 'ses': '1', 'acq': 'x'}, 'dwi', '.nii.gz')
    >>> parse_name("dwi.bval")
    ({}, 'dwi', '.bval')
    """
    name = os.path.basename(os.fspath(path))
    stem, dot, rest = name.partition(".")
    extension = dot + rest
    parts = stem.split("_")
    suffix = None if "-" in parts[-1] else parts.pop()
    entities = {}
    for part in parts:
        key, sep, label = part.partition("-")
        if not sep or not key or not label:
            return {}, None, extension  # not a BIDS name
        entities[key] = label
    return entities, suffix, extension


def build_name(entities: dict, suffix: str, extension: str) -> str:
    """Join entities (in BIDS order), a suffix and an extension into a file name.

    >>> build_name({"desc": "hmc", "acq": "x", "sub": "01"}, "dwi", ".nii.gz")
    'sub-01_acq-x_desc-hmc_dwi.nii.gz'
    """
    known = {key: i for i, key in enumerate(ENTITY_ORDER)}
    keys = sorted(entities, key=lambda k: (known.get(k, len(known)), k))
    parts = [f"{key}-{entities[key]}" for key in keys if entities[key] is not None]
    return "_".join([*parts, suffix]) + extension


def dataset_root(path) -> Path:
    """The nearest folder at or above ``path`` holding ``dataset_description.json``.

    Raises
    ------
    InputError
        When no folder above ``path`` is a BIDS dataset.
    """
    start = Path(os.path.abspath(os.fspath(path)))
    for folder in (start, *start.parents):
        if (folder / "dataset_description.json").is_file():
            return folder
    raise InputError("not inside a BIDS dataset (no dataset_description.json above it)", path)


def _data_extension(path) -> str:
    name = os.path.basename(os.fspath(path))
    for extension in DATA_EXTENSIONS:
        if name.endswith(extension):
            return extension
    raise InputError(f"not a NIfTI data file (expected {' or '.join(DATA_EXTENSIONS)})", path)


def _applicable(path, extension: str, root: Path | None = None) -> list[Path]:
    """Sidecars with ``extension`` that apply to data file ``path``, nearest first."""
    entities, suffix, _ = parse_name(path)
    if suffix is None or "sub" not in entities:
        raise InputError("not a BIDS data file name (sub-<label>_..._<suffix>)", path)
    folder = Path(os.path.abspath(os.fspath(path))).parent
    root = dataset_root(folder) if root is None else root
    found = []
    for level in (folder, *folder.parents):
        candidates = []
        for candidate in sorted(level.glob(f"*{suffix}{extension}")):
            keys, their_suffix, their_extension = parse_name(candidate)
            if (
                their_suffix == suffix
                and their_extension == extension
                and candidate.is_file()
                and all(entities.get(k) == v for k, v in keys.items())
            ):
                candidates.append((len(keys), candidate))
        if candidates:
            best = max(n for n, _ in candidates)
            winners = [c for n, c in candidates if n == best]
            if len(winners) > 1:
                raise InputError(
                    f"several {extension} files apply equally: "
                    + ", ".join(w.name for w in winners),
                    level,
                )
            found.append(winners[0])
        if level == root:
            break
    return found


def sidecar_metadata(path) -> dict:
    """The JSON metadata of a data file: every applicable sidecar, nearer keys winning.

    Parameters
    ----------
    path : path-like
        A data file inside a BIDS dataset.

    Returns
    -------
    dict
        Empty when no JSON sidecar applies.
    """
    metadata = {}
    for sidecar in reversed(_applicable(path, ".json")):
        metadata.update(read_json_object(sidecar))
    return metadata


def find_mask(path, derivatives=None) -> Path | None:
    """A brain mask of data file ``path`` among BIDS derivatives, or ``None``.

    Looks in ``<pipeline>/sub-<label>/[ses-<label>/]<datatype>/`` of every pipeline
    folder under ``derivatives`` (default: the dataset's ``derivatives/``) for
    ``*_desc-brain_mask.nii[.gz]`` whose other entities the data file has (``space``
    aside, which must be absent or one of :data:`NATIVE_SPACES`).  The most specific
    mask wins; ties go to the first pipeline in alphabetical order.
    """
    entities, _, _ = parse_name(path)
    folder = Path(os.path.abspath(os.fspath(path))).parent
    if derivatives is None:
        top = dataset_root(folder) / "derivatives"
        pipelines = sorted(p for p in top.glob("*") if p.is_dir())
    else:
        pipelines = [Path(p) for p in derivatives]
    relative = [f"sub-{entities['sub']}"]
    if "ses" in entities:
        relative.append(f"ses-{entities['ses']}")
    relative.append(folder.name)
    best = None
    for pipeline in pipelines:
        for mask in sorted(pipeline.joinpath(*relative).glob("*_desc-brain_mask.nii*")):
            keys, suffix, extension = parse_name(mask)
            if suffix != "mask" or extension not in DATA_EXTENSIONS or not mask.is_file():
                continue
            space = keys.pop("space", None)
            keys.pop("desc", None)
            if space not in NATIVE_SPACES:
                continue
            if all(entities.get(k) == v for k, v in keys.items()):
                if best is None or len(keys) > best[0]:
                    best = (len(keys), mask)
    return None if best is None else best[1]


def find_sidecars(path, derivatives=None) -> dict:
    """Companion files of a BIDS data file, as keyword arguments of :func:`nidask.load`.

    Parameters
    ----------
    path : path-like
        A ``dwi``, ``pet`` or ``bold`` series inside a BIDS dataset, e.g.
        ``sub-01/ses-1/dwi/sub-01_ses-1_acq-x_dwi.nii.gz``.
    derivatives : list of path-like, optional
        Pipeline folders to look for a brain mask in (default: every folder of the
        dataset's ``derivatives/``); see :func:`find_mask`.

    Returns
    -------
    dict
        DWI: ``bvec_file``, ``bval_file`` (and ``phase_encoding``, the JSON metadata's
        ``PhaseEncodingDirection``, when it holds one); PET: ``temporal_file`` (the nearest
        applicable JSON sidecar holding ``FrameTimesStart``); BOLD: ``json_file``
        (the nearest one holding ``RepetitionTime``); all: ``brainmask_file`` when a
        mask was found.  ``nidask.load(path, **find_sidecars(path))`` opens the
        series.  (Keys of farther JSON files are not merged into the one file
        :func:`nidask.load` reads; :func:`sidecar_metadata` merges them all.)

    Raises
    ------
    InputError
        When the file is not a BIDS ``dwi``/``pet`` series or a required sidecar
        is missing.
    """
    _data_extension(path)
    _, suffix, _ = parse_name(path)
    root = dataset_root(path)
    found: dict = {}
    if suffix == "dwi":
        for key, extension in (("bval_file", ".bval"), ("bvec_file", ".bvec")):
            files = _applicable(path, extension, root)
            if not files:
                raise InputError(f"no {extension} file applies to this series", path)
            found[key] = os.fspath(files[0])
        direction = sidecar_metadata(path).get("PhaseEncodingDirection")
        if isinstance(direction, str) and direction.strip().lower() in PHASE_ENCODINGS:
            found["phase_encoding"] = direction.strip().lower()
    elif suffix in TIMING_KEYS:
        keyword, required = TIMING_KEYS[suffix]
        for sidecar in _applicable(path, ".json", root):
            if required in read_json_object(sidecar):
                found[keyword] = os.fspath(sidecar)
                break
        else:
            raise InputError(f"no JSON sidecar with {required} applies to this series", path)
    else:
        raise InputError(f"not a dwi, pet or bold series (suffix {suffix!r})", path)
    mask = find_mask(path, derivatives)
    if mask is not None:
        found["brainmask_file"] = os.fspath(mask)
    return found


def _label(label: str) -> str:
    """``"sub-01"`` or ``"01"`` -> ``"01"``.

    >>> _label("sub-01"), _label("01")
    ('01', '01')
    """
    label = str(label)
    return label[4:] if label.startswith("sub-") else label


def find_series(bids_dir, participant_labels=None, modalities=MODALITIES) -> list[str]:
    """The ``dwi``/``pet`` series of a BIDS dataset, sorted.

    Parameters
    ----------
    bids_dir : path-like
        The dataset root (holding ``dataset_description.json``).
    participant_labels : list of str, optional
        Labels with or without ``sub-`` (default: every participant).
    modalities : tuple of str
        Suffixes of the series (``dwi``, ``pet``, ``bold``), looked for in their
        datatype folders (:data:`DATATYPES`: ``bold`` lives in ``func/``).

    Returns
    -------
    list of str
        Paths of ``sub-*/[ses-*/]<datatype>/*_<modality>.nii[.gz]``; ``derivatives/``
        and ``sourcedata/`` are never searched.

    Raises
    ------
    InputError
        When ``bids_dir`` is not a dataset, a label matches no participant or no
        series, or nothing at all is found.
    """
    root = Path(os.fspath(bids_dir))
    if not root.is_dir():
        raise InputError("BIDS directory does not exist", root)
    if not (root / "dataset_description.json").is_file():
        raise InputError("not a BIDS dataset (no dataset_description.json)", root)
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if participant_labels is not None:
        labels = [_label(label) for label in participant_labels]
        available = {p.name[4:] for p in subjects}
        missing = [label for label in labels if label not in available]
        if missing:
            raise InputError(
                "no participant "
                + ", ".join(f"sub-{label}" for label in missing)
                + f" (the dataset has {len(available)})",
                root,
            )
        subjects = [root / f"sub-{label}" for label in dict.fromkeys(labels)]
    series = []
    for subject in subjects:
        mine = []
        for folder in (subject, *sorted(p for p in subject.glob("ses-*") if p.is_dir())):
            for modality in modalities:
                for extension in DATA_EXTENSIONS:
                    datatype = folder / DATATYPES.get(modality, modality)
                    for path in sorted(datatype.glob(f"sub-*_{modality}{extension}")):
                        entities, suffix, ext = parse_name(path)
                        if suffix == modality and ext == extension and path.is_file():
                            mine.append(os.fspath(path))
        if not mine and participant_labels is not None:
            raise InputError(f"{subject.name} has no {' or '.join(modalities)} series", root)
        series.extend(sorted(mine))
    if not series:
        raise InputError(f"no {' or '.join(modalities)} series in this dataset", root)
    return series


def derivative_paths(source, out_dir, desc: str = "hmc") -> dict[str, str]:
    """BIDS-derivative names of the outputs of one series, under ``out_dir``.

    Parameters
    ----------
    source : path-like
        The raw series (``sub-<label>[_ses-<label>]_..._<suffix>.nii[.gz]``).
    out_dir : path-like
        The derivative dataset's root.
    desc : str
        ``desc-`` label of the corrected series and its transforms.

    Returns
    -------
    dict
        ``dir`` (``out_dir/sub-<label>/[ses-<label>/]<datatype>``), ``series``
        (``..._desc-<desc>_<suffix>.nii.gz``), ``bval``, ``bvec`` (DWI only),
        ``json``, ``motion`` (``..._desc-motion_timeseries.tsv``), ``xfm``
        (``..._desc-<desc>_xfm.x5``, one transform per volume of the series) and
        ``source_uri`` (``bids:raw:<path in the raw dataset>``, for the sidecar's
        ``Sources``; see :func:`write_dataset_description`'s ``source_dir``).
        Nothing is created.

    Examples
    --------
    >>> paths = derivative_paths("/raw/sub-01/ses-1/dwi/sub-01_ses-1_acq-x_dwi.nii.gz", "/out")
    >>> paths["series"]
    '/out/sub-01/ses-1/dwi/sub-01_ses-1_acq-x_desc-hmc_dwi.nii.gz'
    >>> paths["motion"]
    '/out/sub-01/ses-1/dwi/sub-01_ses-1_acq-x_desc-motion_timeseries.tsv'
    >>> paths["xfm"]
    '/out/sub-01/ses-1/dwi/sub-01_ses-1_acq-x_desc-hmc_xfm.x5'
    """
    _data_extension(source)
    entities, suffix, _ = parse_name(source)
    if suffix is None or "sub" not in entities:
        raise InputError("not a BIDS data file name (sub-<label>_..._<suffix>)", source)
    folder = Path(os.path.abspath(os.fspath(source))).parent
    known = (*DATATYPES.values(), "anat", "fmap", "perf")
    datatype = folder.name if folder.name in known else DATATYPES.get(suffix, suffix)
    relative = [f"sub-{entities['sub']}"]
    if "ses" in entities:
        relative.append(f"ses-{entities['ses']}")
    relative.append(datatype)
    target = Path(os.fspath(out_dir)).joinpath(*relative)

    def name(desc_label, suffix_, extension):
        return os.fspath(target / build_name({**entities, "desc": desc_label}, suffix_, extension))

    paths = {
        "dir": os.fspath(target),
        "series": name(desc, suffix, ".nii.gz"),
        "json": name(desc, suffix, ".json"),
        "motion": name("motion", "timeseries", ".tsv"),
        "xfm": name(desc, "xfm", ".x5"),
    }
    if suffix == "dwi":
        paths["bval"] = name(desc, suffix, ".bval")
        paths["bvec"] = name(desc, suffix, ".bvec")
    # posix separators whatever the platform, as BIDS URIs use them; outside a dataset,
    # the path a BIDS layout would give it
    try:
        inside = Path(os.path.abspath(os.fspath(source))).relative_to(dataset_root(source))
    except InputError:
        inside = Path(*relative, Path(source).name)
    paths["source_uri"] = "bids:raw:" + inside.as_posix()
    return paths


def dataset_description(settings: dict | None = None, source_dir=None) -> dict:
    """The ``dataset_description.json`` content of a nidask derivative dataset.

    >>> d = dataset_description({"model": "average", "passes": 2})
    >>> d["DatasetType"], d["GeneratedBy"][0]["Name"]
    ('derivative', 'nidask')
    >>> d["GeneratedBy"][0]["Description"]
    'Head-motion estimation with leave-one-volume-out models; settings: model=average, passes=2'
    """
    from nidask import __version__

    settings = dict(settings or {})
    described = ", ".join(f"{key}={settings[key]}" for key in sorted(settings))
    generated = {
        "Name": "nidask",
        "Version": __version__,
        "Description": "Head-motion estimation with leave-one-volume-out models"
        + (f"; settings: {described}" if described else ""),
        "CodeURL": "https://pypi.org/project/nidask/",
    }
    description = {
        "Name": "nidask head-motion correction",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    if source_dir is not None:
        uri = Path(os.path.abspath(os.fspath(source_dir))).as_uri()
        description["SourceDatasets"] = [{"URL": uri}]
        description["DatasetLinks"] = {"raw": uri}
    return description


def write_dataset_description(out_dir, settings: dict | None = None, source_dir=None) -> str:
    """Write ``out_dir/dataset_description.json`` of a nidask derivative (idempotent).

    Parameters
    ----------
    out_dir : path-like
        The derivative dataset's root (created if missing).
    settings : dict, optional
        Estimation settings, summarised in ``GeneratedBy[0].Description`` (values
        are shown with ``str``).
    source_dir : path-like, optional
        The raw dataset: recorded as ``SourceDatasets`` and as ``DatasetLinks.raw``
        (which the ``bids:raw:`` URIs of :func:`derivative_paths` refer to).

    Returns
    -------
    str
        The file's path.  An identical file is left untouched (no rewrite, so
        concurrent participant-level runs do not race); another nidask description
        is replaced atomically.

    Raises
    ------
    OutputError
        When ``out_dir`` holds the description of another pipeline's dataset (or an
        unreadable one), or cannot be written.
    """
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, "dataset_description.json")
    content = dataset_description(settings, source_dir)
    text = json.dumps(content, indent=2) + "\n"
    if os.path.exists(path):
        try:
            with open(path) as f:
                existing = json.load(f)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read the existing description ({exc})", path) from exc
        if existing == content:
            return path
        generated = existing.get("GeneratedBy") if isinstance(existing, dict) else None
        names = [g.get("Name") for g in generated or [] if isinstance(g, dict)]
        if "nidask" not in names:
            raise OutputError(
                "the output folder is another dataset (its description is not nidask's); "
                "choose an empty or nidask output folder",
                path,
            )
    try:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_output(path) as temporary, open(temporary, "w") as f:
            f.write(text)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(
            f"cannot write the dataset description ({exc.strerror or exc})", path
        ) from exc
    return path


#: Files of a nidask derivative that BIDS does not name yet, for ``.bidsignore``: the
#: per-volume transforms (X5), the motion tables, the rotated gradient tables of the
#: corrected series and the QC pages.
BIDSIGNORE = ("*_xfm.x5", "*_timeseries.tsv", "*_dwi.bval", "*_dwi.bvec", "*.html")


def write_bidsignore(out_dir) -> str:
    """Write ``out_dir/.bidsignore`` listing :data:`BIDSIGNORE` (idempotent).

    Lines already in the file are kept, so a user's own patterns survive.  Returns the
    file's path.
    """
    path = os.path.join(os.fspath(out_dir), ".bidsignore")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as exc:
        raise OutputError(f"cannot read .bidsignore ({exc.strerror or exc})", path) from exc
    missing = [p for p in BIDSIGNORE if p not in lines]
    if not missing:
        return path
    try:
        os.makedirs(os.fspath(out_dir), exist_ok=True)
        with atomic_output(path) as temporary, open(temporary, "w") as f:
            f.write("\n".join([*lines, *missing]) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write .bidsignore ({exc.strerror or exc})", path) from exc
    return path
