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


def test_the_split_unit_is_named_as_the_labels_give_it(tmp_path):
    """Model cards and evaluations say 'lesions' only when the labels gave lesion ids."""
    _images(tmp_path, ["a", "b", "c"])
    for header, rows, plural, singular in (
            ("image,dx,lesion_id", "a.jpg,mel,L1\nb.jpg,mel,L1\nc.jpg,nv,L2\n", "lesions", "lesion"),
            ("image,dx,patient_id", "a.jpg,mel,P1\nb.jpg,nv,P1\nc.jpg,nv,P2\n", "patients", "patient"),
            ("image,dx", "a.jpg,mel\nb.jpg,nv\nc.jpg,nv\n", "images", "image"),
            ("image,dx,lesion_id", "a.jpg,mel,L1\nb.jpg,nv,\nc.jpg,nv,\n", "groups (", "lesion or patient")):
        (tmp_path / "labels.csv").write_text(f"{header}\n{rows}")
        data = load_labels(tmp_path / "labels.csv")
        assert data.group_kind().startswith(plural) and data.group_kind(plural=False) == singular
        assert data.summary()["grouped_by"] == data.group_kind()


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


def test_plain_files_that_would_share_an_image_id_are_refused_naming_both(tmp_path):
    # nv/0.jpg and mel/0.jpg (class folders), or a.jpg next to a.png, would both get one id: split.csv and
    # evaluation could then not tell a training image from a test image
    for folder in ("nv", "mel"):
        _images(tmp_path / folder, ["0"])
    (tmp_path / "cf.csv").write_text("image,dx\nnv/0.jpg,nv\nmel/0.jpg,mel\n")
    with pytest.raises(ManifestError, match=r"row 3: images 'nv/0.jpg' \(row 2\) and 'mel/0.jpg' would share "
                                            r"the image id '0'.*rename"):
        load_labels(tmp_path / "cf.csv")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "nv" / "0.png")
    (tmp_path / "stem.csv").write_text("image,dx\nnv/0.jpg,nv\nnv/0.png,mel\n")
    with pytest.raises(ManifestError, match="'nv/0.jpg' .* and 'nv/0.png' would share"):
        load_labels(tmp_path / "stem.csv")
    # distinct names still load, with the ids they always had
    (tmp_path / "ok.csv").write_text("image,dx\nnv/0.jpg,nv\nmel/0.jpg,mel\n".replace("mel/0", "mel/1"))
    _images(tmp_path / "mel", ["1"])
    assert [s.image_id for s in load_labels(tmp_path / "ok.csv").samples] == ["0", "1"]


def test_ham_ids_written_with_an_extension_match_the_runs_split_file(tmp_path):
    from dermscreen.splits import read_split_file

    _images(tmp_path / "images", ["ISIC_1", "ISIC_2"])
    (tmp_path / "meta.csv").write_text("lesion_id,image_id,dx\nL1,ISIC_1.jpg,mel\nL2,ISIC_2,nv\n")
    data = load_labels(tmp_path / "meta.csv")
    assert [s.image_id for s in data.samples] == ["ISIC_1", "ISIC_2"]
    from dermscreen.manifests import image_id_of
    # a split.csv holds the samples' ids; reading it back must give the same ids
    (tmp_path / "split.csv").write_text("image_id,split\n" + "".join(f"{s.image_id},test\n" for s in data.samples))
    assert set(read_split_file(tmp_path / "split.csv")) == {s.image_id for s in data.samples}
    # both sides use one rule: only known image extensions are dropped, other dots are part of the id
    assert image_id_of("a/b/ISIC_1.JPG") == "ISIC_1" and image_id_of("scan.v2") == "scan.v2"
    assert image_id_of("scan.v2.png") == "scan.v2" and image_id_of(".jpg") == ".jpg"
    # "ISIC_1" and "ISIC_1.jpg" in one manifest are one image listed twice
    (tmp_path / "twice.csv").write_text("lesion_id,image_id,dx\nL1,ISIC_1.jpg,mel\nL1,ISIC_1,mel\n")
    with pytest.raises(ManifestError, match="would share the image id 'ISIC_1'"):
        load_labels(tmp_path / "twice.csv")
