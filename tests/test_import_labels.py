"""The authors' pseudo-label pickle → pseudo_labels.npy: columns in pseudo.ks order, read without running code."""
import hashlib
import json
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
from unsafe_files import Payload

from advcl_dist.cluster import PSEUDO_LABELS
from advcl_dist.cluster.import_labels import IMPORTED, import_pseudo_labels
from advcl_dist.config import ConfigError, load_config
from advcl_dist.data import safe_pickle
from advcl_dist.methods.advcl import load_pseudo_labels

ROOT = Path(__file__).resolve().parents[1]
N = 1437  # data.name=digits, split train
AUTHORS_KS = (2, 10, 50, 100, 500)  # num_classes_list of the authors' pretraining_advCL.py


def authors_table(n: int = N, seed: int = 0) -> dict:
    """What the authors' code reads: {'pseudo_train_<K>': one cluster id per training image}, plus a key it
    ignores (their dict is named feat_label_dict)."""
    rng = np.random.default_rng(seed)
    table = {f"pseudo_train_{k}": rng.integers(0, k, n) for k in AUTHORS_KS}
    table["pseudo_test_10"] = rng.integers(0, 10, 100)
    return table


def dump(table, path: Path, protocol=None) -> Path:
    with open(path, "wb") as f:  # as the authors' script would save it: pickle.dump of the dict
        pickle.dump(table, f, protocol=protocol)
    return path


def config(out: Path, *overrides):
    return load_config(None, [f"out_dir={out}", "data.name=digits", "train.device=cpu", *overrides])


def plain_load(path: Path) -> dict:
    """The reference: the authors' own loading (a full pickle.load), for files known to be harmless."""
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("protocol", [2, None, 5])  # None: pickle's default (4), the authors' likely one
def test_authors_pickle_becomes_pseudo_labels_in_pseudo_ks_order(tmp_path, protocol):
    source = dump(authors_table(), tmp_path / "imagenet_clPretrain_pseudo_labels.pkl", protocol)
    written = import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[100,2,10]"), source)

    assert written == tmp_path / "out" / PSEUDO_LABELS
    labels = np.load(written, allow_pickle=False)
    reference = plain_load(source)
    assert labels.dtype == np.int32 and labels.shape == (N, 3)
    for col, k in enumerate((100, 2, 10)):
        np.testing.assert_array_equal(labels[:, col], reference[f"pseudo_train_{k}"])
    np.testing.assert_array_equal(load_pseudo_labels(written, N, [100, 2, 10]), labels)  # what pretraining reads
    facts = json.loads((tmp_path / "out" / IMPORTED).read_text())
    assert facts["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert facts["keys"] == ["pseudo_train_100", "pseudo_train_2", "pseudo_train_10"]
    assert (facts["dataset"], facts["split"], facts["n"]) == ("digits", "train", N)
    assert facts["clusters"]["2"] == {"used": 2, "unlabelled": 0}
    assert not (tmp_path / "out" / "clusters.json").exists()  # not a finished k-means stage


@pytest.mark.parametrize("form", ["list of ints", "list of numpy ints", "whole floats", "column", "int32 with -1"])
def test_other_plain_forms_of_a_label_column_are_read(tmp_path, form):
    ids = np.random.default_rng(1).integers(0, 10, N)
    value = {"list of ints": ids.tolist(), "list of numpy ints": list(ids), "whole floats": ids.astype(np.float32),
             "column": ids[:, None], "int32 with -1": np.where(ids == 3, -1, ids).astype(np.int32)}[form]
    source = dump({"pseudo_train_10": value}, tmp_path / "labels.pkl")
    labels = np.load(import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[10]"), source))
    np.testing.assert_array_equal(labels[:, 0], np.asarray(value).reshape(-1))


def test_a_pickle_for_another_dataset_size_names_the_file_the_lengths_and_the_fix(tmp_path):
    source = dump(authors_table(n=50_000), tmp_path / "cifar10.pkl")
    with pytest.raises(ConfigError, match=r"cifar10\.pkl: 'pseudo_train_2' has 50000 labels but digits/train .* "
                                          r"has 1437 images.*set data\.name"):
        import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[2]"), source)
    assert not (tmp_path / "out" / PSEUDO_LABELS).exists()


def test_a_k_missing_from_the_pickle_is_named_with_the_ks_it_holds(tmp_path):
    source = dump(authors_table(), tmp_path / "labels.pkl")
    with pytest.raises(ConfigError, match=r"labels\.pkl has no labels for K=7 \(key 'pseudo_train_7'\) of "
                                          r"pseudo\.ks=\[2, 7\].*Ks \[2, 10, 50, 100, 500\]"):
        import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[2,7]"), source)
    other = dump({"labels": np.zeros(N, int)}, tmp_path / "other.pkl")
    with pytest.raises(ConfigError, match=r"no pseudo_train_<K> keys \(keys: \['labels'\]\)"):
        import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[2]"), other)


def test_a_malicious_pickle_is_refused_before_its_payload_runs(tmp_path):
    marker = tmp_path / "ran"
    table = authors_table()
    table["pseudo_train_10"] = Payload(marker)
    source = dump(table, tmp_path / "evil.pkl")
    with pytest.raises(ConfigError, match=r"evil\.pkl was refused: it asks to load pathlib\.Path\.touch, which "
                                          "could run code"):
        import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[2]"), source)  # even a K it would not use
    assert not marker.exists() and not (tmp_path / "out").exists()
    plain_load(source)  # the payload is live: the authors' plain pickle.load runs it
    assert marker.exists()


def test_protocol_2_bytes_decode_only_as_latin1(tmp_path):
    """`_codecs.encode` is allowed for protocol-2 bytes; any other codec name (which picks a module) is not."""
    good = tmp_path / "bytes.pkl"
    good.write_bytes(pickle.dumps({"b": b"\x00\xff"}, protocol=2))
    assert b"_codecs" in good.read_bytes()
    assert safe_pickle.load_plain(good, "labels", "fix it") == {"b": b"\x00\xff"}
    bad = tmp_path / "rot13.pkl"
    bad.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ConfigError, match=r"rot13\.pkl is not a readable pickle .*rot13.*fix it"):
        safe_pickle.load_plain(bad, "labels", "fix it")


@pytest.mark.parametrize("case", ["not a pickle", "not a dict", "fractional", "label >= K", "2-d", "strings"])
def test_bad_content_gives_one_clear_line(tmp_path, case):
    source = tmp_path / "labels.pkl"
    ids = np.random.default_rng(2).integers(0, 10, N)
    content, why = {
        "not a pickle": (None, r"is not a readable pickle"),
        "not a dict": ([ids], r"holds a list, not a dict of label arrays"),
        "fractional": ({"pseudo_train_10": ids + 0.5}, r"holds float64 values, not integer cluster ids"),
        "label >= K": ({"pseudo_train_10": np.where(ids == 0, 10, ids)}, r"outside \[-1, 9\] for K=10"),
        "2-d": ({"pseudo_train_10": np.stack([ids, ids], 1)}, r"shape \(1437, 2\), expected one label per image"),
        "strings": ({"pseudo_train_10": ids.astype(str)}, r"holds <U\d+ values"),
    }[case]
    if content is None:
        source.write_text("pseudo_train_10: [1, 2, 3]\n")
    else:
        dump(content, source)
    with pytest.raises(ConfigError, match=why) as error:
        import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[10]"), source)
    assert "\n" not in str(error.value) and str(source) in str(error.value)


def test_an_out_dir_of_a_clustering_stage_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "clusters.json").write_text("{}")
    source = dump(authors_table(), tmp_path / "labels.pkl")
    with pytest.raises(ConfigError, match=r"holds a finished clustering stage"):
        import_pseudo_labels(config(tmp_path / "out", "pseudo.ks=[2]"), source)
    assert not (tmp_path / "out" / PSEUDO_LABELS).exists()


def test_cli_writes_the_file_and_reports_errors_in_one_line(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "tools" / "import_pseudo_labels.py"), run_name="tool")["main"]
    source = dump(authors_table(), tmp_path / "labels.pkl")
    out = tmp_path / "out"
    assert main([str(source), f"out_dir={out}", "data.name=digits", "pseudo.ks=[10,50]"]) == 0
    assert capsys.readouterr().out.strip() == str(out / PSEUDO_LABELS)
    assert np.load(out / PSEUDO_LABELS).shape == (N, 2)
    assert main([str(source), f"out_dir={tmp_path / 'o2'}", "data.name=digits", "pseudo.ks=[3]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "K=3" in err and err.count("\n") == 1
    assert main([str(tmp_path / "missing.pkl"), f"out_dir={tmp_path / 'o3'}", "data.name=digits"]) == 2
    assert "missing.pkl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an override where the pickle belongs
        main([f"out_dir={out}", str(source)])
    assert "must be the pickle's path" in capsys.readouterr().err
