"""The AutoAttack images (aa_subset.py): a class-stratified seeded sample with per-class counts computed here by
hand, the same whatever the order the method or ranks ask in; index files (RobustBench's `<class>/<file>` lists
included) and their errors."""
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from advcl_dist.aa_subset import aa_selection, class_quotas, read_index_file, source_labels, stratified_indices
from advcl_dist.config_schema import ConfigError
from advcl_dist.data import get_dataset
from dataset_files import write_image_classes

SIZES = {"ant": 12, "bee": 8, "cow": 20}  # 40 test images, listed class by class (ImageFolder sorts them)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_classes(root / "test", {cls: [(4, 4)] * n for cls, n in SIZES.items()})
    return get_dataset("imagefolder", "test", root)


def per_class(labels, indices):
    return np.bincount(np.asarray(labels)[indices], minlength=len(SIZES)).tolist()


def config(**values):
    return SimpleNamespace(**{"aa_n": None, "aa_subset": "stratified", "aa_seed": 0, "aa_indices": None, **values})


@pytest.mark.parametrize("n, expected", [
    (10, [3, 2, 5]),   # 10·12/40 = 3, 10·8/40 = 2, 10·20/40 = 5: exact
    (7, [2, 1, 4]),    # 2.1, 1.4, 3.5 → 2, 1, 3 (6); the one left goes to the largest remainder, cow's .5
    (3, [1, 1, 1]),    # 0.9, 0.6, 1.5 → 0, 0, 1; remainders .9 and .6 take the two left
    (1, [0, 0, 1]),    # 0.3, 0.2, 0.5
    (40, [12, 8, 20]),
])
def test_class_quotas_are_the_largest_remainder_shares(n, expected):
    assert class_quotas(np.array(list(SIZES.values())), n).tolist() == expected


def test_ties_in_the_remainder_go_to_the_lower_class():
    assert class_quotas(np.array([5, 5, 5, 5]), 2).tolist() == [1, 1, 0, 0]


def test_an_imagefolder_listed_class_by_class_gets_every_class_in_proportion(folder):
    labels = source_labels(folder)
    assert labels.tolist() == [0] * 12 + [1] * 8 + [2] * 20  # the file order that biases "the first n"
    for n, expected in ((10, [3, 2, 5]), (7, [2, 1, 4])):
        chosen = stratified_indices(labels, n, seed=0)
        assert per_class(labels, chosen) == expected
        assert chosen.tolist() == sorted(set(chosen.tolist())) and len(chosen) == n
    first, record = aa_selection(config(aa_n=10, aa_subset="first"), folder)
    assert per_class(labels, first) == [10, 0, 0] and record["classes"] == 1
    chosen, record = aa_selection(config(aa_n=10), folder)
    assert record == {"n": 10, "rule": "stratified", "seed": 0, "file": None, "classes": 3,
                      "per_class": {"min": 2, "max": 5},
                      "sha256": hashlib.sha256(np.array(chosen, dtype="<i8").tobytes()).hexdigest()}


def test_the_sample_depends_on_the_labels_and_seed_only(folder):
    """Every method of a sweep and every rank computes it from the same three things: the same images."""
    labels = source_labels(folder)
    once = stratified_indices(labels, 10, seed=3)
    np.testing.assert_array_equal(stratified_indices(labels.copy(), 10, seed=3), once)
    np.testing.assert_array_equal(stratified_indices(list(labels), 10, 3), once)
    others = {tuple(stratified_indices(labels, 10, seed=s)) for s in range(6)}
    assert len(others) > 1  # the seed does pick other images
    # the per-class draw is uniform: over many seeds every image of a class is picked about as often
    picks = np.zeros(len(labels))
    for s in range(400):
        picks[stratified_indices(labels, 10, seed=s)] += 1
    for cls, (start, stop) in enumerate(((0, 12), (12, 20), (20, 40))):
        share = picks[start:stop] / 400
        expected = [3 / 12, 2 / 8, 5 / 20][cls]
        assert np.allclose(share, expected, atol=0.1), (cls, share)


def test_all_images_when_aa_n_is_null_or_larger(folder):
    for n in (None, 40, 99):
        indices, record = aa_selection(config(aa_n=n), folder)
        assert indices.tolist() == list(range(40)) and record["rule"] == "all" and record["seed"] is None


def test_index_files_as_text_npy_and_robustbench_paths(folder, tmp_path):
    text = tmp_path / "ids.txt"
    text.write_text("# the images to attack\n5\n\n3\n39  # last\n")
    assert read_index_file(text, folder, 40).tolist() == [3, 5, 39]
    array = tmp_path / "ids.npy"
    np.save(array, np.array([7, 1, 20]))
    assert read_index_file(array, folder, 40).tolist() == [1, 7, 20]
    paths = tmp_path / "imagenet_test_image_ids.txt"  # RobustBench's format: <class folder>/<file>
    paths.write_text("bee/3.png\nant/0.png\ncow/19.png\n")
    cow_19 = 20 + sorted(f"{i}.png" for i in range(20)).index("19.png")  # ImageFolder sorts file names as text
    assert read_index_file(paths, folder, 40).tolist() == [0, 12 + 3, cow_19]
    indices, record = aa_selection(config(aa_indices=str(paths)), folder)
    assert indices.tolist() == [0, 15, cow_19] and record["rule"] == "file" and record["file"] == str(paths)


@pytest.mark.parametrize("content, message", [
    ("1\n40\n", "index 40 is outside the test set (0 … 39)"),
    ("-1\n", "index -1 is outside the test set"),
    ("2\n2\n", "names image 2 more than once"),
    ("# nothing\n", "names no images"),
    ("ant/0.png\nelk/1.png\n", "line 2: 'elk/1.png' is not an image of the test folder"),
])
def test_bad_index_files_name_the_file_and_the_problem(folder, tmp_path, content, message):
    path = tmp_path / "ids.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match="eval.aa_indices file") as err:
        read_index_file(path, folder, 40)
    assert message in str(err.value)


def test_npy_index_files_are_read_without_pickle(folder, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="not a readable .npy of integers"):
        read_index_file(path, folder, 40)
    np.save(path, np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="not a 1-D integer array"):
        read_index_file(path, folder, 40)


def test_paths_need_file_names_and_aa_n_must_match_the_file(folder, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("ant/0.png\n")
    no_names = SimpleNamespace(labels=np.zeros(40, np.int64))
    with pytest.raises(ConfigError, match="this test set has no file names"):
        read_index_file(path, no_names, 40)
    path.write_text("0\n1\n")
    with pytest.raises(ConfigError, match="eval.aa_n=5 but eval.aa_indices .* names 2 images; set eval.aa_n=null"):
        aa_selection(config(aa_n=5, aa_indices=str(path)), folder)


def test_unlabelled_images_cannot_be_sampled():
    with pytest.raises(ConfigError, match="unlabelled images"):
        stratified_indices(np.array([0, 1, -1, 1]), 2, 0)
