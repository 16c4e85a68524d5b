import numpy as np
import pytest

from dermscreen.errors import TaxonomyError
from dermscreen.taxonomy import HAM10000, Taxonomy, load_taxonomy


def test_ham10000_groups():
    assert HAM10000.codes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert HAM10000.malignant_codes == ["akiec", "bcc", "mel"]
    probs = np.array([[0.1, 0.2, 0.1, 0.1, 0.3, 0.1, 0.1]])
    assert HAM10000.p_malignant(probs)[0] == pytest.approx(0.6)


def test_index_is_case_insensitive_and_rejects_unknown():
    assert HAM10000.index("MEL") == 4
    with pytest.raises(TaxonomyError, match="Unknown diagnosis code 'scc'"):
        HAM10000.index("scc")


def test_yaml_roundtrip(tmp_path):
    path = tmp_path / "tax.yaml"
    path.write_text(
        "name: three\nclasses:\n"
        "  - {code: a, name: Alpha, group: malignant}\n"
        "  - {code: b, name: Beta, group: benign}\n"
        "  - {code: c, name: Gamma, group: benign}\n"
    )
    tax = load_taxonomy(path)
    assert tax.codes == ["a", "b", "c"] and tax.malignant_mask.tolist() == [True, False, False]
    tax.to_yaml(tmp_path / "copy.yaml")
    assert Taxonomy.from_yaml(tmp_path / "copy.yaml") == tax


@pytest.mark.parametrize(
    "body, message",
    [
        ("classes: [{code: a, name: A, group: malignant}]", "at least two"),
        ("classes: [{code: a, name: A, group: malignant}, {code: a, name: B, group: benign}]", "duplicate"),
        ("classes: [{code: a, name: A, group: weird}, {code: b, name: B, group: benign}]", "invalid"),
        ("just a string", "must be a mapping"),
        ("classes: [unclosed", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TaxonomyError, match=message) as err:
        Taxonomy.from_yaml(path)
    assert "bad.yaml" in str(err.value)
