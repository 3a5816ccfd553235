"""COCO JSON: `images[].file_name` is the input's uri (as `pipeline export` writes it). An annotation with a
`bbox` ([x, y, width, height] in original pixels) is a box; one without is the image's category (classification).
In a file with boxes, an image without annotations was reviewed and holds nothing."""

from __future__ import annotations

from collections import defaultdict

from pipeline.job.errors import UserError
from pipeline.review.truth.answers import Answer, FileFacts, Parsed


def parse(data: object, facts: FileFacts) -> Parsed:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise UserError("not a COCO file (a JSON object with `images` and `annotations`)")
    images = {image["id"]: str(image["file_name"]) for image in data["images"]}
    names = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
    labels: dict[object, list[str]] = defaultdict(list)
    boxes: dict[object, list] = defaultdict(list)
    for annotation in data.get("annotations") or []:
        image, category = annotation["image_id"], annotation.get("category_id")
        if image not in images:
            raise UserError(f"COCO annotation {annotation.get('id')} names image_id {image}, which `images` lacks")
        if category not in names:
            raise UserError(f"COCO annotation {annotation.get('id')} names category_id {category}, which "
                            "`categories` lacks")
        bbox = annotation.get("bbox") or []
        if len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0:
            x, y, w, h = (float(v) for v in bbox)
            boxes[image].append((names[category], x, y, x + w, y + h))
        else:
            labels[image].append(names[category])
    detection = bool(boxes)
    parsed = Parsed()
    for image, uri in images.items():
        if not detection and not labels[image]:
            parsed.unanswered += 1
            continue
        parsed.answers.append(Answer(uri, labels[image][0] if labels[image] else None,
                                     tuple(boxes[image]) if detection else None, facts.reviewer, facts.file_time))
    return parsed
