"""Readers for the standard annotation files of the real benchmarks, into plain records.

* VQAv2 (Goyal et al., 2017): ``v2_OpenEnded_mscoco_*_questions.json`` + ``v2_mscoco_*_annotations.json``.
* RefCOCO / RefCOCO+ / RefCOCOg (Yu et al., 2016) as one JSON: ``images`` (id, width, height, file_name),
  ``annotations`` (id, image_id, bbox = [x, y, w, h] pixels) and ``refs`` (ann_id, image_id, split, sentences
  [{sent}]) — the refs pickle and instances.json of the refer toolkit, merged.
* NLVR² (Suhr et al., 2019): one JSON object a line (identifier, sentence, label "True"/"False"); the images of
  ``dev-850-0-0`` are ``dev-850-0-img0.png`` / ``-img1.png``.
* COCO captions (``captions_*.json``): images + annotations (image_id, caption).
* Karpathy splits (``dataset_coco.json``): images with split (train / restval / val / test), filepath, filename
  and sentences [{raw}]; restval is training data, as in every paper since.

Every reader raises ``ValueError`` naming the file and the field it could not read.
"""

from __future__ import annotations

import json
from pathlib import Path


def _load(path, kind: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{kind}: cannot read {path} as JSON ({e})") from None


def _field(record: dict, key: str, kind: str, path):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{kind}: {path}: expected a record with {key!r}, found {str(record)[:80]}")
    return record[key]


def read_vqav2(questions_path, annotations_path=None) -> list[dict]:
    """[{question_id, image_id, question, answers (10 strings, [] without annotations), answer}]."""
    kind = "VQAv2"
    questions = _field(_load(questions_path, kind), "questions", kind, questions_path)
    by_id = {}
    if annotations_path is not None:
        for a in _field(_load(annotations_path, kind), "annotations", kind, annotations_path):
            by_id[_field(a, "question_id", kind, annotations_path)] = a
    out = []
    for q in questions:
        qid = _field(q, "question_id", kind, questions_path)
        ann = by_id.get(qid)
        if annotations_path is not None and ann is None:
            raise ValueError(f"{kind}: {annotations_path}: no annotation for question_id {qid}")
        answers = [_field(a, "answer", kind, annotations_path) for a in ann["answers"]] if ann else []
        out.append({"question_id": qid, "image_id": _field(q, "image_id", kind, questions_path),
                    "question": _field(q, "question", kind, questions_path), "answers": answers,
                    "answer": ann.get("multiple_choice_answer") if ann else None})
    return out


def read_refcoco(path, split: str | None = None) -> list[dict]:
    """[{ref_id, image_id, file_name, phrase, box (cx, cy, w, h) normalised, split}] — one per sentence."""
    kind = "RefCOCO"
    data = _load(path, kind)
    images = {_field(i, "id", kind, path): i for i in _field(data, "images", kind, path)}
    anns = {_field(a, "id", kind, path): a for a in _field(data, "annotations", kind, path)}
    out = []
    for ref in _field(data, "refs", kind, path):
        if split is not None and ref.get("split") != split:
            continue
        ann = anns.get(_field(ref, "ann_id", kind, path))
        image = images.get(_field(ref, "image_id", kind, path))
        if ann is None or image is None:
            raise ValueError(f"{kind}: {path}: ref {ref.get('ref_id')} names a missing annotation or image")
        x, y, w, h = (float(v) for v in _field(ann, "bbox", kind, path))
        iw, ih = float(_field(image, "width", kind, path)), float(_field(image, "height", kind, path))
        box = ((x + w / 2) / iw, (y + h / 2) / ih, w / iw, h / ih)
        for s in _field(ref, "sentences", kind, path):
            out.append({"ref_id": ref.get("ref_id"), "image_id": image["id"], "file_name": image.get("file_name"),
                        "phrase": _field(s, "sent", kind, path), "box": box, "split": ref.get("split")})
    return out


def read_nlvr2(path) -> list[dict]:
    """[{identifier, sentence, label (bool), left, right (image file names)}]."""
    kind = "NLVR2"
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{kind}: {path} line {n}: not JSON ({e})") from None
        ident = _field(r, "identifier", kind, path)
        label = str(_field(r, "label", kind, path))
        if label not in ("True", "False"):
            raise ValueError(f"{kind}: {path} line {n}: label must be 'True' or 'False', found {label!r}")
        stem = ident.rsplit("-", 1)[0]
        out.append({"identifier": ident, "sentence": _field(r, "sentence", kind, path), "label": label == "True",
                    "left": f"{stem}-img0.png", "right": f"{stem}-img1.png"})
    return out


def read_coco_captions(path) -> dict:
    """{file_name (or image id when absent): [captions]} in the file's order."""
    kind = "COCO captions"
    data = _load(path, kind)
    names = {_field(i, "id", kind, path): i.get("file_name", i["id"]) for i in _field(data, "images", kind, path)}
    out: dict = {}
    for a in _field(data, "annotations", kind, path):
        image_id = _field(a, "image_id", kind, path)
        if image_id not in names:
            raise ValueError(f"{kind}: {path}: caption of unknown image_id {image_id}")
        out.setdefault(names[image_id], []).append(_field(a, "caption", kind, path).strip())
    return out


def read_karpathy(path) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...], "test": [...]} of {file, captions}; restval joins train."""
    kind = "Karpathy split"
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for im in _field(_load(path, kind), "images", kind, path):
        split = _field(im, "split", kind, path)
        split = "train" if split == "restval" else split
        if split not in out:
            raise ValueError(f"{kind}: {path}: split must be train, restval, val or test, found {split!r}")
        name = _field(im, "filename", kind, path)
        file = f"{im['filepath']}/{name}" if im.get("filepath") else name
        out[split].append({"file": file, "captions": [_field(s, "raw", kind, path)
                                                      for s in _field(im, "sentences", kind, path)]})
    return out
