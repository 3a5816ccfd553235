"""The selected rows as the review tools import them: Label Studio tasks with pre-annotations and the labeling
config that matches, COCO JSON, CVAT for images 1.1 XML. Each keeps the row's own uri, so answers come back to it:
Label Studio's `data.uri`, COCO's `file_name`, CVAT's `<image name>`. Boxes are in the image's original pixels
(as the rows hold them; Label Studio's in percent of that size)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from xml.etree import ElementTree as ET

FROM_NAME, TO_NAME = "label", "image"  # the labeling config's control and object names


@dataclass(frozen=True)
class Review:
    """What is exported: the rows (dicts of the output's columns), the viewable reference of each row's image
    (its URI, or a presigned URL), every label the run predicted, and whether the model is a detector."""
    rows: list[dict]
    references: list[str]
    labels: list[str]
    detector: bool
    presigned: bool = False

    def items(self):
        return zip(self.rows, self.references)


def model_version(row: dict) -> str:
    return f"{row['run_id']} {row['model']}"


# ---- Label Studio ------------------------------------------------------------------------------------------------
def label_studio_tasks(review: Review) -> list[dict]:
    """Tasks in Label Studio's import format: `data` (image, uri, run_id) and the model's output as `predictions`."""
    tasks = []
    for row, reference in review.items():
        data = {"image": reference, "uri": row["uri"], "run_id": row["run_id"]}
        if row.get("frame") is not None:
            data["frame"] = row["frame"]
        result, score = _ls_boxes(row) if review.detector else _ls_choice(row)
        tasks.append({"data": data, "predictions": [{"model_version": model_version(row), "score": score,
                                                      "result": result}]})
    return tasks


def _ls_choice(row: dict) -> tuple[list[dict], float]:
    if row.get("label") is None:
        return [], 0.0
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
             "value": {"choices": [row["label"]]}}], _round(row.get("score"))


def _ls_boxes(row: dict) -> tuple[list[dict], float]:
    width, height = row["image_width"], row["image_height"]
    result = []
    for i, box in enumerate(row.get("detections") or []):
        result.append({
            "id": f"{i}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "rectanglelabels",
            "original_width": width, "original_height": height, "image_rotation": 0, "score": _round(box["score"]),
            "value": {"x": 100 * box["x1"] / width, "y": 100 * box["y1"] / height,
                      "width": 100 * (box["x2"] - box["x1"]) / width, "height": 100 * (box["y2"] - box["y1"]) / height,
                      "rotation": 0, "rectanglelabels": [box["label"]]}})
    scores = [box["score"] for box in row.get("detections") or []]
    return result, _round(sum(scores) / len(scores)) if scores else 0.0


def labeling_config(review: Review) -> str:
    """The labeling config the tasks fit: the image, and single-choice classes or rectangle labels."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value=f"${TO_NAME}")
    if review.detector:
        control = ET.SubElement(view, "RectangleLabels", name=FROM_NAME, toName=TO_NAME)
        tag = "Label"
    else:
        control = ET.SubElement(view, "Choices", name=FROM_NAME, toName=TO_NAME, choice="single", showInLine="true")
        tag = "Choice"
    for label in review.labels:
        ET.SubElement(control, tag, value=label)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


# ---- COCO --------------------------------------------------------------------------------------------------------
def coco(review: Review, description: str) -> dict:
    """COCO JSON: `images` (file_name the uri), `categories`, and the predictions as `annotations` with a `score`
    (the results format pycocotools' loadRes reads, too). A classification is one whole-image box of its class,
    the convention COCO-based tools use for image-level labels, since COCO has no image-level field."""
    categories = {label: i + 1 for i, label in enumerate(review.labels)}
    images, annotations = [], []
    for image_id, (row, reference) in enumerate(review.items(), start=1):
        width, height = row["image_width"], row["image_height"]
        image = {"id": image_id, "file_name": row["uri"], "width": width, "height": height}
        if review.presigned:
            image["coco_url"] = reference
        images.append(image)
        boxes = (row.get("detections") or []) if review.detector else _whole_image(row)
        for box in boxes:
            x, y, w, h = box["x1"], box["y1"], box["x2"] - box["x1"], box["y2"] - box["y1"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": categories[box["label"]], "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0, "score": _round(box["score"])})
    return {"info": {"description": description, "version": "1.0"}, "licenses": [], "images": images,
            "categories": [{"id": i, "name": label, "supercategory": ""} for label, i in categories.items()],
            "annotations": annotations}


def _whole_image(row: dict) -> list[dict]:
    if row.get("label") is None:
        return []
    return [{"label": row["label"], "score": row.get("score") or 0.0, "x1": 0.0, "y1": 0.0,
             "x2": float(row["image_width"]), "y2": float(row["image_height"])}]


# ---- CVAT --------------------------------------------------------------------------------------------------------
def cvat(review: Review, name: str) -> str:
    """CVAT for images 1.1: the labels in `meta`, then one `<image>` per row with `<tag>`s (classification) or
    `<box>`es (detection) in original pixels, marked `source="auto"` as CVAT marks a model's annotations."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = name
    ET.SubElement(task, "size").text = str(len(review.rows))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for label in review.labels:
        element = ET.SubElement(labels, "label")
        ET.SubElement(element, "name").text = label
        ET.SubElement(element, "type").text = "rectangle" if review.detector else "tag"
        ET.SubElement(element, "attributes")
    for image_id, row in enumerate(review.rows):
        image = ET.SubElement(root, "image", id=str(image_id), name=row["uri"], width=str(row["image_width"]),
                              height=str(row["image_height"]))
        if not review.detector and row.get("label") is not None:
            ET.SubElement(image, "tag", label=row["label"], source="auto")
        for box in (row.get("detections") or []) if review.detector else []:
            ET.SubElement(image, "box", label=box["label"], source="auto", occluded="0", z_order="0",
                          xtl=f"{box['x1']:.2f}", ytl=f"{box['y1']:.2f}", xbr=f"{box['x2']:.2f}",
                          ybr=f"{box['y2']:.2f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def to_json(document) -> bytes:
    return json.dumps(document, indent=1, ensure_ascii=False).encode()


def _round(value) -> float:
    return round(float(value), 6) if value is not None else 0.0
