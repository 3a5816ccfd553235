"""COCO JSON: `images[].file_name` is the input's uri (as `pipeline export` writes it). An annotation's `bbox` ([x,
y, width, height] in original pixels) is a box, unless the file is one of image-level labels: every annotation
without a box, or with a box covering its whole image (COCO has no image-level field, so `pipeline export` and
COCO-based tools write a class that way). In a file of boxes, an image without annotations holds nothing."""

from __future__ import annotations

from collections import defaultdict

from pipeline.job.errors import UserError
from pipeline.review.truth.answers import Answer, FileFacts, Parsed


def parse(data: object, facts: FileFacts) -> Parsed:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise UserError("not a COCO file (a JSON object with `images` and `annotations`)")
    images = {image["id"]: image for image in data["images"]}
    names = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
    annotations = data.get("annotations") or []
    for annotation in annotations:
        _check(annotation, images, names)
    detection = any(not _whole_image(a.get("bbox"), images[a["image_id"]]) for a in annotations)
    labels: dict[object, list[str]] = defaultdict(list)
    boxes: dict[object, list] = defaultdict(list)
    for annotation in annotations:
        label, image = names[annotation["category_id"]], annotation["image_id"]
        if detection and _area(annotation.get("bbox")):
            x, y, w, h = (float(v) for v in annotation["bbox"])
            boxes[image].append((label, x, y, x + w, y + h))
        elif not detection:
            labels[image].append(label)
    parsed = Parsed()
    for image_id, image in images.items():
        if not detection and not labels[image_id]:
            parsed.unanswered += 1
            continue
        parsed.answers.append(Answer(str(image["file_name"]), labels[image_id][0] if labels[image_id] else None,
                                     tuple(boxes[image_id]) if detection else None, facts.reviewer, facts.file_time))
    return parsed


def _check(annotation: dict, images: dict, names: dict) -> None:
    if annotation.get("image_id") not in images:
        raise UserError(f"COCO annotation {annotation.get('id')} names image_id {annotation.get('image_id')}, which "
                        "`images` lacks")
    if annotation.get("category_id") not in names:
        raise UserError(f"COCO annotation {annotation.get('id')} names category_id {annotation.get('category_id')}, "
                        "which `categories` lacks")


def _area(bbox) -> float:
    return float(bbox[2]) * float(bbox[3]) if bbox and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0 else 0.0


def _whole_image(bbox, image: dict) -> bool:
    """No box, or one within a pixel of the image's own size (`width`, `height`)."""
    if not _area(bbox):
        return True
    x, y, w, h = (float(v) for v in bbox)
    width, height = image.get("width"), image.get("height")
    return bool(width and height) and abs(x) <= 1 and abs(y) <= 1 and abs(x + w - width) <= 1 \
        and abs(y + h - height) <= 1
