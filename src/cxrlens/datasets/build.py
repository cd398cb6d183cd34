"""From a reader's :class:`Table` to a :class:`cxrlens.data.Manifest`, the same way for every format.

:func:`finish` keeps the chosen views, refuses paths outside the data folder, encodes the data set's
finding tokens into the taxonomy (targets, and which targets are known), and sets aside rows whose image
file is missing. Every step is vectorised or runs once per distinct label combination, so a manifest of
hundreds of thousands of rows is read in seconds (bench/manifest_scale.py).

Also here: the helpers readers share (CSV reading with one-line errors, path joining, the checks of label
values, the stable validation split carved out of an official training split).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlens.datasets.registry import ReadOptions, Table
from cxrlens.errors import CxrlensError
from cxrlens.taxonomy import Taxonomy, split_finding

SHOWN = 3  # problems named in an error line; the rest are counted
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP SUPINE", "AP ERECT", "AP SEMI ERECT", "FRONTAL"})
LATERAL_VIEWS = frozenset({"L", "LAT", "LATERAL", "LL", "RL", "LEFT LATERAL", "RIGHT LATERAL", "XTABLE LATERAL"})
NO_VIEW = frozenset({"", "UNKNOWN", "NAN", "NONE", "N/A"})
VAL_EVERY = 8  # a validation split carved from an official training split takes 1 patient in 8


class DataError(CxrlensError):
    """Several problems of one data set, one line each; the CLI prints every line after ``error: ``."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("\nerror: ".join(self.lines))


def problem_line(where: Path | str, what: str, items: Sequence[str], fix: str, count: int | None = None) -> str:
    """``where: N what (item; item; item; ...); fix`` -- one line however many items (``count``: the
    number of problems when ``items`` holds only the first few)."""
    count = len(items) if count is None else count
    shown = "; ".join(items[:SHOWN]) + ("; ..." if count > SHOWN else "")
    return f"{where}: {count} {what} ({shown}); {fix}"


# --- reading tables -----------------------------------------------------------------------------------


def read_csv(path: Path, columns: Iterable[str] | None = None, what: str = "table", **kwargs) -> pd.DataFrame:
    """A CSV (or .csv.gz) as strings, blanks as ''; an error line names the file and the columns it lacks."""
    try:
        frame = pd.read_csv(path, dtype=object, keep_default_na=False, **kwargs)  # object: faster than "str"
    except Exception as exc:
        raise CxrlensError(f"cannot read {what} {path}: {str(exc).splitlines()[0][:160]}") from None
    lacking = [c for c in (columns or ()) if c not in frame.columns]
    if lacking:
        raise CxrlensError(
            f"{path}: not the expected {what}: no column {', '.join(repr(c) for c in lacking)} "
            f"(the columns are: {', '.join(map(str, frame.columns[:12]))})"
        )
    return frame


def first_file(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (glob patterns allowed) that exists in ``folder``."""
    for name in names:
        hits = sorted(folder.glob(name)) if any(ch in name for ch in "*?[") else [folder / name]
        for hit in hits:
            if hit.is_file():
                return hit
    return None


def join_paths(root: Path, relative: Iterable[str]) -> list[str]:
    """Absolute, normalised paths of ``relative`` names below ``root`` (``..`` collapsed, links kept).
    Each distinct folder part is normalised once (a data set has few folders and many files)."""
    base = os.path.normpath(str(root))
    parts = [r.rpartition(os.sep) for r in relative]
    codes, folders = pd.factorize(np.array([p[0] + p[1] for p in parts], dtype=object))
    prefixes = []
    for folder in folders:
        joined = os.path.normpath(os.path.join(base, folder)) if folder else base
        prefixes.append(joined if joined.endswith(os.sep) else joined + os.sep)
    return [os.path.normpath(os.path.join(base, p[0] + p[1] + p[2])) if p[2] in ("", ".", "..")
            else prefixes[k] + p[2] for p, k in zip(parts, codes.tolist(), strict=True)]


def outside_root(paths: pd.Series, root: Path) -> np.ndarray:
    prefix = str(root).rstrip(os.sep) + os.sep
    return ~paths.str.startswith(prefix).to_numpy(dtype=bool)


def files_exist(paths: Sequence[str]) -> np.ndarray:
    """Whether each path is a file; a folder holding many of the paths is listed once instead of
    asking for each file (NIH's 112,120 images sit in one folder)."""
    parts = [p.rpartition(os.sep) for p in paths]
    codes, folders = pd.factorize(np.array([p[0] for p in parts], dtype=object))
    counts = np.bincount(codes, minlength=len(folders)) if len(parts) else np.zeros(0, dtype=int)
    listed: dict[int, set[str]] = {}
    for k in np.flatnonzero(counts >= 64):
        try:
            with os.scandir(folders[k] or os.sep) as entries:
                listed[k] = {e.name for e in entries if e.is_file()}
        except OSError:
            listed[k] = set()
    return np.fromiter(
        (part[2] in listed[k] if k in listed else os.path.isfile(path)
         for path, part, k in zip(paths, parts, codes.tolist(), strict=True)),
        dtype=bool, count=len(parts),
    )


def check_values(path: Path, frame: pd.DataFrame, columns: Sequence[str], allowed: Iterable[str],
                 lines: np.ndarray | None = None) -> str | None:
    """The problem line for values of ``columns`` outside the documented set ``allowed`` (None if none)."""
    allowed = set(allowed)
    lines = np.arange(len(frame)) + 2 if lines is None else lines
    items, count = [], 0
    for column in columns:
        wrong = np.flatnonzero(~frame[column].isin(allowed).to_numpy())
        count += len(wrong)
        items += [f"row {lines[i]}, column '{column}': '{frame[column].iat[i]}'" for i in wrong[:SHOWN]]
    if not count:
        return None
    documented = ", ".join(repr(v) for v in sorted(allowed)[:16]) + (", ..." if len(allowed) > 16 else "")
    return problem_line(path, "label values outside the documented set", items,
                        f"the documented values are {documented}; fix those rows", count)


def join_flags(names: Sequence[str], flags: np.ndarray) -> np.ndarray:
    """Per row the names whose flag is set, joined by ``|``; built once per distinct pattern."""
    if len(flags) == 0:
        return np.zeros(0, dtype=object)
    patterns, inverse = np.unique(np.packbits(flags.astype(bool), axis=1), axis=0, return_inverse=True)
    names = np.asarray(names, dtype=object)
    bits = np.unpackbits(patterns, axis=1)[:, : len(names)].astype(bool)
    strings = np.array(["|".join(names[b]) for b in bits], dtype=object)
    return strings[inverse.ravel()]


def carve_val(split: pd.Series, groups: pd.Series, source: str = "train", every: int = VAL_EVERY) -> pd.Series:
    """A validation split out of ``source``: the patients whose stable hash falls in one bucket of
    ``every`` (the same patients on every machine and every run; no patient in two splits)."""
    mask = (split == source).to_numpy()
    hashes = pd.util.hash_pandas_object(groups[mask], index=False).to_numpy()
    out = split.to_numpy(dtype=object).copy()
    out[mask] = np.where(hashes % every == 0, "val", source)
    return pd.Series(out, index=split.index)


# --- views -------------------------------------------------------------------------------------------


def normalise_views(views: pd.Series) -> pd.Series:
    """Upper case, single spaces, '' for none; computed once per distinct value."""
    codes, uniques = pd.factorize(views.astype(str))
    normal = np.array([" ".join(str(v).upper().replace("_", " ").split()) for v in uniques] + [""], dtype=object)
    normal[np.isin(normal, list(NO_VIEW))] = ""
    return pd.Series(normal[codes], index=views.index)  # code -1 (missing) -> the trailing ''


def view_filter(option: str) -> set[str] | None:
    """The view codes ``--views`` keeps (None: all). ``frontal`` also keeps images whose view is not
    recorded: the collections that record none (RSNA, COVIDx, class folders) hold frontal films."""
    chosen: set[str] = set()
    for word in (w.strip().upper().replace("_", " ") for w in option.split(",") if w.strip()):
        if word == "ALL":
            return None
        if word == "FRONTAL":
            chosen |= FRONTAL_VIEWS | {""}
        elif word == "LATERAL":
            chosen |= LATERAL_VIEWS
        else:
            chosen.add(word)
    return chosen


# --- labels ------------------------------------------------------------------------------------------


def _tokens(text: str, sep: str | None) -> list[str]:
    if sep is None:
        return split_finding(text)
    return [t for t in text.split(sep) if t.strip()]


def vocabulary_known(taxonomy: Taxonomy, vocabulary: Sequence[str] | None) -> np.ndarray:
    """The classes a data set's label set speaks about: those its labels name (not a broader class: a
    COVID-19-negative image may still have pneumonia), with their descendants."""
    if vocabulary is None:
        return np.ones(taxonomy.num_classes, dtype=bool)
    named: set[str] = set()
    for token in vocabulary:
        cls = taxonomy.resolve(token, broader=False)
        if cls is not None:
            named |= {cls} | taxonomy.descendants(cls)
    return np.array([c in named for c in taxonomy.classes], dtype=bool)


def encode_labels(frame: pd.DataFrame, taxonomy: Taxonomy, table: Table
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(targets [n, C] float32, known [n, C] bool, usable [n] bool, named [n] bool: some token names a
    class). Computed once per distinct (finding, uncertain) pair."""
    keys = frame["finding"].astype(str) + "\x1f" + frame["uncertain"].astype(str)
    codes, uniques = pd.factorize(keys)
    base = vocabulary_known(taxonomy, table.vocabulary)
    n, c = len(uniques), taxonomy.num_classes
    targets, known = np.zeros((n, c), dtype=np.float32), np.ones((n, c), dtype=bool)
    usable, named = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for i, key in enumerate(uniques):
        finding, uncertain = key.split("\x1f")
        positive, named[i] = taxonomy.encode_tokens(_tokens(finding, table.label_sep))
        unsure, _ = taxonomy.encode_tokens(_tokens(uncertain, table.label_sep))
        pos = positive > 0
        known[i] = (base | pos) & ~((unsure > 0) & ~pos)
        targets[i] = positive
        usable[i] = named[i] or (table.keep_negatives and bool(known[i].any()))
    return targets[codes], known[codes], usable[codes], named[codes]


# --- the manifest ------------------------------------------------------------------------------------


def _defaults(frame: pd.DataFrame) -> pd.DataFrame:
    for column, default in (("split", ""), ("source", "unknown"), ("view", ""), ("uncertain", ""), ("_line", 0)):
        if column not in frame:
            frame[column] = default
    if "patient_group" not in frame:
        frame["patient_group"] = frame["patient_id"] if "patient_id" in frame else frame["path"]
    group = frame["patient_group"].astype(str)
    frame["patient_group"] = group.where(group != "", frame["path"])
    frame["split"] = frame["split"].astype(str).str.strip().str.lower()
    return frame


def _unknown_label_line(table: Table, taxonomy: Taxonomy, rows: pd.DataFrame) -> str:
    if table.label_file.is_dir():  # class folders: the folder name is the label
        folders = sorted({os.path.dirname(p) for p in rows["path"]})
        more = f" (and {len(folders) - 1} more such folders)" if len(folders) > 1 else ""
        return (f"{folders[0]}: folder name is not a class of taxonomy '{taxonomy.name}' "
                f"({', '.join(taxonomy.classes)}){more}; rename the folder or use --taxonomy")
    fix = f"taxonomy '{taxonomy.name}' knows {', '.join(taxonomy.classes)} (use --taxonomy or fix the row)"
    if len(rows) == 1:
        return f"{table.label_file}, row {rows['_line'].iat[0]}: unknown label '{rows['finding'].iat[0]}'; {fix}"
    items = [f"row {line}: '{finding}'" for line, finding in zip(rows["_line"], rows["finding"], strict=True)]
    return problem_line(table.label_file, "rows with an unknown label", items, fix + "s")


def finish(table: Table, taxonomy: Taxonomy, options: ReadOptions, fmt: str):
    """The :class:`~cxrlens.data.Manifest` of a reader's table (see the module docstring)."""
    from cxrlens.data import Manifest

    if table.encoded is not None and tuple(table.encoded[0]) == taxonomy.classes:  # saved targets, exactly
        names, positive, unknown = table.encoded
        table.frame["finding"], table.frame["uncertain"] = positive, unknown
        table.label_sep, table.strict, table.vocabulary = "|", False, tuple(names)
    frame = _defaults(table.frame)
    problems, dropped = list(table.problems), dict(table.dropped)
    frame["view"] = normalise_views(frame["view"])
    kept_views = view_filter(options.views)
    if kept_views is not None:
        keep = frame["view"].isin(kept_views).to_numpy()
        if not keep.all():
            dropped[f"view not {options.views}"] = int((~keep).sum())
            frame = frame[keep]
    if table.root is not None:
        outside = outside_root(frame["path"], table.root)
        if outside.any():
            items = [f"row {line}: {path}" if line else path
                     for line, path in zip(frame["_line"][outside], frame["path"][outside], strict=True)]
            problems.append(problem_line(table.label_file, "image paths outside the data folder", items,
                                         f"every image must lie below {table.root}; fix or remove those rows"))
    targets, known, usable, named = encode_labels(frame, taxonomy, table)
    if table.strict and not named.all():
        problems.append(_unknown_label_line(table, taxonomy, frame[~named]))
    if problems:
        raise DataError(problems)
    if not usable.all():
        dropped[f"no label of taxonomy {taxonomy.name}"] = int((~usable).sum())
        frame, targets, known = frame[usable], targets[usable], known[usable]
    if frame.empty:
        left_out = "; ".join(f"{n} rows: {why}" for why, n in dropped.items()) or "the table has no rows"
        raise CxrlensError(f"{table.label_file}: no image left to use ({left_out}); check --views and --taxonomy")
    present = files_exist(frame["path"].tolist())
    lines = frame["_line"].astype(int).to_numpy()
    missing = [(int(line), path) for line, path in zip(lines[~present], frame["path"][~present], strict=True)]
    frame = frame[present].drop(columns=["_line", "uncertain"]).copy()
    frame["_row"] = lines[present]
    known = known[present]
    boxes = table.boxes
    if boxes is not None:
        boxes = boxes[boxes["path"].isin(set(frame["path"]))].reset_index(drop=True)
    return Manifest(frame.reset_index(drop=True), targets[present], taxonomy, table.origin, missing,
                    known=None if known.all() else known, boxes=boxes, dropped=dropped, format=fmt)


def read_data(source: Path, taxonomy: Taxonomy, options: ReadOptions):
    """The manifest of ``source`` in the format ``options.format`` names, or the one detected."""
    from cxrlens.datasets.registry import detect_format, get_format

    fmt = detect_format(source) if options.format == "auto" else get_format(options.format)
    return finish(fmt.read(source, options), taxonomy, options, fmt.name)
