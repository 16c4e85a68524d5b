import numpy as np
import pytest
from PIL import Image

from dermscreen.errors import ManifestError
from dermscreen.manifests import load_labels
from dermscreen.taxonomy import HAM10000


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{n}.jpg")


def test_ham10000_format(tmp_path):
    _images(tmp_path / "images", ["I1", "I2", "I3"])
    (tmp_path / "meta.csv").write_text(
        "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
        "L1,I1,mel,histo,55.0,male,back\nL1,I2,mel,histo,55.0,male,back\nL2,I3,nv,follow_up,,unknown,unknown\n"
    )
    data = load_labels(tmp_path / "meta.csv")
    assert data.format == "ham10000" and len(data) == 3
    s = data.samples[0]
    assert (s.dx, s.lesion_id, s.age, s.sex, s.site, s.dx_type) == ("mel", "L1", 55.0, "male", "back", "histo")
    assert data.samples[2].age is None and data.samples[2].sex is None and data.samples[2].site is None
    assert data.samples[0].group_id == data.samples[1].group_id != data.samples[2].group_id
    assert data.labels == [4, 4, 5]
    assert data.class_counts()["mel"] == 2 and data.summary()["groups"] == 2
    assert len(data.sha256) == 64


def test_isic_onehot_format(tmp_path):
    _images(tmp_path / "imgs", ["A", "B"])
    (tmp_path / "gt.csv").write_text(
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nA,0.0,0.0,1.0,0.0,0.0,0.0,0.0\nB,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
    )
    data = load_labels(tmp_path / "gt.csv", images_dir=tmp_path / "imgs")
    assert data.format == "isic" and [s.dx for s in data.samples] == ["bcc", "mel"]


def test_plain_format_relative_paths(tmp_path):
    _images(tmp_path / "sub", ["x", "y"])
    (tmp_path / "labels.csv").write_text("image,dx,patient_id,age,sex,site\nsub/x.jpg,bkl,P1,40,F,face\nsub/y.jpg,vasc,P1,,,\n")
    data = load_labels(tmp_path / "labels.csv")
    assert data.format == "plain"
    assert data.samples[0].image_path == tmp_path / "sub" / "x.jpg"
    assert data.samples[0].sex == "female" and data.samples[0].group_id == "patient:P1"


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a.jpg,scc\n", r"row 2: unknown diagnosis code 'scc'"),
        ("a.jpg,mel\nmissing.jpg,nv\n", r"row 3: image file for 'missing.jpg' not found"),
        ("a.jpg,mel\na.jpg,nv\n", r"row 3: image 'a.jpg' is listed twice \(first at row 2\)"),
        ("a.jpg\n", r"row 2: wrong number of fields"),
        ("a.jpg,mel,extra\n", r"row 2: wrong number of fields"),
        ("a.jpg,\n", r"row 2: the diagnosis is empty"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    _images(tmp_path, ["a"])
    path = tmp_path / "labels.csv"
    path.write_text("image,dx\n" + rows)
    with pytest.raises(ManifestError, match=message) as err:
        load_labels(path)
    assert str(path) in str(err.value)


def test_isic_row_with_two_classes(tmp_path):
    _images(tmp_path / "images", ["A"])
    (tmp_path / "gt.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nA,1,1,0,0,0,0,0\n")
    with pytest.raises(ManifestError, match="row 2: exactly one"):
        load_labels(tmp_path / "gt.csv")


def test_unrecognised_header_and_binary_file(tmp_path):
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ManifestError, match="Unrecognised manifest header"):
        load_labels(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ManifestError, match="not a UTF-8"):
        load_labels(tmp_path / "y.csv")
    with pytest.raises(ManifestError, match="not found"):
        load_labels(tmp_path / "nope.csv")


def test_bad_age(tmp_path):
    _images(tmp_path, ["a"])
    (tmp_path / "l.csv").write_text("image,dx,age\na.jpg,mel,old\n")
    with pytest.raises(ManifestError, match="row 2: age 'old' is not a number"):
        load_labels(tmp_path / "l.csv")


@pytest.mark.data
def test_real_ham10000_metadata(ham_dir):
    data = load_labels(ham_dir / "HAM10000_metadata.csv", taxonomy=HAM10000)
    assert len(data) == 10015
    assert data.class_counts() == {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
    assert data.summary()["groups"] == 7470
