"""Download and verify against a local stand-in for the hub (ktutorial.hubserver), with the real
huggingface_hub client. The served repo is the tiny model's HF folder (fixture `tiny_model`):
FP8 experts with 128x128 block scales in two safetensors shards, as the real checkpoint."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest

# huggingface_hub reads these once, at import: set them before anything imports it. download()
# passes the endpoint and a commit explicitly, so nothing depends on them having taken effect.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from ktutorial import download as dl  # noqa: E402
from ktutorial.cli import main as cli_main  # noqa: E402
from ktutorial.errors import UserError  # noqa: E402
from ktutorial.hubserver import LocalHub  # noqa: E402
from ktutorial.spec import ModelSpec  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_CHUNK = 16 * 1024  # huggingface_hub writes in 10 MiB chunks; small ones make resume visible


# --- the served repo -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def served_dir(tiny_model) -> Path:
    return Path(tiny_model.hf_dir)


@pytest.fixture
def hub(served_dir):
    repo_id = f"ktutorial-test/tiny-{uuid.uuid4().hex[:8]}"  # unique: nothing cached can match
    with LocalHub.serving(repo_id, served_dir) as h:
        h.repo_id = repo_id
        yield h


@pytest.fixture
def small_chunks(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", SMALL_CHUNK)


def _served_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _largest_shard(root: Path) -> str:
    return max((p for p in root.glob("*.safetensors")), key=lambda p: p.stat().st_size).name


def _assert_same_tree(src: Path, dst: Path) -> None:
    files = _served_files(src)
    assert files, "the served repo is empty"
    for rel in files:
        assert filecmp.cmp(src / rel, dst / rel, shallow=False), f"{rel} differs from the hub's copy"


def _gets(hub: LocalHub, since: int = 0) -> list:
    return [r for r in hub.requests[since:] if r.method == "GET" and "/resolve/" in r.path]


def _cli(argv: list[str]) -> int:
    """Exit code of `ktutorial ARGV` run in this process (typer exits even on success)."""
    try:
        return cli_main(argv)
    except SystemExit as exc:
        return exc.code or 0


def _quiet() -> dict:
    return {"progress": False, "say": lambda message: None}


# --- the local hub -------------------------------------------------------------------------------


def test_local_hub_answers_like_the_hub(hub, served_dir, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    api = HfApi(endpoint=hub.endpoint, token=False)
    top = {e.path for e in api.list_repo_tree(hub.repo_id)}
    assert top == {p.name for p in served_dir.iterdir() if not p.name.startswith(".")}
    dry = snapshot_download(hub.repo_id, endpoint=hub.endpoint, dry_run=True, local_dir=tmp_path / "dry",
                            token=False)
    assert {d.filename: d.file_size for d in dry} == {
        f: (served_dir / f).stat().st_size for f in _served_files(served_dir)}
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(hub.repo_id, "no-such-file.json", endpoint=hub.endpoint, local_dir=tmp_path,
                        token=False)
    head = next(r for r in hub.requests if r.method == "HEAD")
    assert head.status == 200 and hub.endpoint.startswith("http://127.0.0.1:")
    with pytest.raises(ValueError, match="loopback only"):
        LocalHub(host="0.0.0.0")


# --- download --------------------------------------------------------------------------------------


def test_full_download_is_byte_for_byte_and_verifies(hub, served_dir, tmp_path):
    out = tmp_path / "model"
    result = dl.download(hub.repo_id, out, endpoint=hub.endpoint, max_workers=4, **_quiet())

    _assert_same_tree(served_dir, out)
    files = _served_files(served_dir)
    assert result.files == result.files_fetched == len(files)
    assert result.bytes_fetched == sum((served_dir / f).stat().st_size for f in files) > 0
    assert result.commit == hub.repos[hub.repo_id].commit
    # Every file was fetched at the resolved commit, not at the branch name.
    assert {r.path.split("/resolve/")[1].split("/")[0] for r in _gets(hub)} == {result.commit}

    manifest = json.loads((out / dl.MANIFEST_NAME).read_text())
    assert manifest["commit"] == result.commit and sorted(manifest["requested"]) == files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and all(len(manifest["files"][s]["sha256"]) == 64 for s in shards)

    report = dl.verify(out, check_sha256=True)
    assert report.ok, report.problems
    spec = ModelSpec.from_dir(served_dir)
    assert report.expert_tensors_expected == spec.num_layers * spec.num_experts * 6
    assert report.sha256_checked == len(files) and report.shards_checked == len(shards)

    # A second call finds everything in place and fetches nothing.
    before = len(hub.requests)
    again = dl.download(hub.repo_id, out, endpoint=hub.endpoint, **_quiet())
    assert again.files_fetched == 0 and again.bytes_fetched == 0 and not _gets(hub, before)

    # Passing the commit keeps huggingface_hub from writing a ref under HF_HOME.
    from huggingface_hub import constants

    assert not list(Path(constants.HF_HUB_CACHE).glob(f"models--{hub.repo_id.replace('/', '--')}*"))


def test_allow_patterns_fetch_only_matching_files(hub, tmp_path):
    out = tmp_path / "model"
    result = dl.download(hub.repo_id, out, allow_patterns=["*.json"], endpoint=hub.endpoint, **_quiet())
    got = _served_files(out)
    assert got and all(f.endswith(".json") for f in got) and result.files == len(got)
    assert {r.path.rsplit("/", 1)[1] for r in _gets(hub)} == set(got)
    with pytest.raises(UserError, match="no file of .* matches --include"):
        dl.download(hub.repo_id, out, allow_patterns=["*.nothing"], endpoint=hub.endpoint, **_quiet())


def test_dropped_connection_resumes_with_range(hub, served_dir, tmp_path, small_chunks):
    shard = _largest_shard(served_dir)
    size = (served_dir / shard).stat().st_size
    assert size > 4 * SMALL_CHUNK, "the shard should span several chunks"
    hub.drop_after(hub.repo_id, shard, size // 2)

    out = tmp_path / "model"
    result = dl.download(hub.repo_id, out, endpoint=hub.endpoint, max_workers=2, **_quiet())

    assert hub.fault_hits(hub.repo_id, shard) == 1
    shard_gets = [r for r in _gets(hub) if r.path.endswith(shard)]
    assert [r.status for r in shard_gets] == [200, 206]
    offset = int(shard_gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= size // 2 and offset % SMALL_CHUNK == 0
    assert result.attempts == 1
    _assert_same_tree(served_dir, out)


def test_snapshot_retried_when_client_gives_up(hub, served_dir, tmp_path, small_chunks, monkeypatch):
    """huggingface_hub gives up after 5 resumes without progress; download() retries the snapshot."""
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda s: None))
    shard = _largest_shard(served_dir)
    size = (served_dir / shard).stat().st_size
    # Cut short of the first chunk boundary after the resume point: no chunk ever completes.
    hub.drop_after(hub.repo_id, shard, SMALL_CHUNK // 2, times=7)
    notes = []
    result = dl.download(hub.repo_id, tmp_path / "m", endpoint=hub.endpoint, max_workers=2,
                         progress=False, say=notes.append, retry_wait_s=0)
    assert result.attempts == 2, notes
    assert any("attempt 1 of 3 failed" in n and "finished files are kept" in n for n in notes)
    # The other files finished in the first attempt and were not fetched again.
    others = [r for r in _gets(hub) if not r.path.endswith(shard)]
    assert len(others) == len(_served_files(served_dir)) - 1
    assert size > SMALL_CHUNK
    _assert_same_tree(served_dir, tmp_path / "m")


def test_killed_download_restarts_partial_file_and_cleans_it(hub, served_dir, tmp_path):
    shard = _largest_shard(served_dir)
    size = (served_dir / shard).stat().st_size
    hub.stall_after(hub.repo_id, shard, size // 2)
    out = tmp_path / "model"
    script = (
        "import sys\n"
        "from huggingface_hub import constants\n"
        f"constants.DOWNLOAD_CHUNK_SIZE = {SMALL_CHUNK}\n"
        "from ktutorial.download import download\n"
        "download(sys.argv[1], sys.argv[2], endpoint=sys.argv[3], progress=False, max_workers=4)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, hub.repo_id, str(out), hub.endpoint],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    others = [f for f in _served_files(served_dir) if f != shard]

    def finished() -> list[str]:
        # huggingface_hub writes a file's .metadata after moving it in place: only then is it kept.
        meta = out / dl.HF_DOWNLOAD_DIR
        return [f for f in others if (out / f).is_file() and (meta / f"{f}.metadata").is_file()]

    def partial() -> list[Path]:
        try:
            return [p for p in dl.stale_incomplete_files(out) if p.stat().st_size >= SMALL_CHUNK]
        except FileNotFoundError:  # a file renamed while we looked
            return []

    try:
        # Kill it once the shard is half fetched (stalled) and every other file is done.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if partial() and len(finished()) == len(others):
                time.sleep(0.2)  # let the last .metadata write finish
                break
            time.sleep(0.05)
        child_err = proc.stderr.read() if proc.poll() is not None else ""
        assert partial() and len(finished()) == len(others), f"child: {child_err}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stderr.close()
        hub.release()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    assert not (out / shard).exists()
    stale = dl.stale_incomplete_files(out)
    assert len(stale) == 1

    before = len(hub.requests)
    notes = []
    dl.download(hub.repo_id, out, endpoint=hub.endpoint, progress=False, say=notes.append)
    assert any(n.startswith("removed 1 partial file(s)") for n in notes), notes
    assert dl.stale_incomplete_files(out) == []
    fetched = {r.path.rsplit("/", 1)[1]: r for r in _gets(hub, before)}
    # A new process cannot resume: the shard starts over from byte 0; finished files are kept.
    assert shard in fetched and fetched[shard].range is None and fetched[shard].status == 200
    assert set(fetched) == {shard}
    _assert_same_tree(served_dir, out)
    assert dl.verify(out, check_sha256=True).ok


def test_too_little_disk_is_refused_before_writing(hub, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "not-yet" / "model"
    with pytest.raises(dl.NotEnoughDisk, match=r"needs \d+\.\d [kM]B, 1\.0 kB free at .*free space or pick"):
        dl.download(hub.repo_id, out, endpoint=hub.endpoint, **_quiet())
    assert not (tmp_path / "not-yet").exists()
    assert not _gets(hub) and not [r for r in hub.requests if r.method == "HEAD"]
    plan = dl.plan_download(hub.repo_id, out, endpoint=hub.endpoint)
    assert not plan.fits and plan.summary()["fits"] is False


def test_hub_errors_are_clear(hub, tmp_path):
    with pytest.raises(UserError, match=r"repo 'ktutorial-test/no-such-repo' not found at http://127\.0"):
        dl.download("ktutorial-test/no-such-repo", tmp_path / "a", endpoint=hub.endpoint, **_quiet())
    with pytest.raises(UserError, match="revision 'no-such-branch' not found"):
        dl.download(hub.repo_id, tmp_path / "b", revision="no-such-branch", endpoint=hub.endpoint, **_quiet())
    with pytest.raises(UserError, match="unknown model 'gpt-17'; known models: .*minimax-m2.1"):
        dl.repo_for_model("gpt-17")
    assert dl.repo_for_model("minimax-m2.1") == ("MiniMaxAI/MiniMax-M2.1", "main")
    with pytest.raises(UserError, match="--workers must be at least 1"):
        dl.download(hub.repo_id, tmp_path / "c", max_workers=0, endpoint=hub.endpoint, **_quiet())
    with LocalHub() as closed:
        dead = closed.endpoint
    with pytest.raises(UserError, match="cannot reach http://127.0.0.1"):
        dl.download(hub.repo_id, tmp_path / "d", endpoint=dead, **_quiet())
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_partial_files_of_a_live_download_are_left_alone(hub, served_dir, tmp_path):
    import fcntl

    out = tmp_path / "model"
    hf_dir = out / dl.HF_DOWNLOAD_DIR
    hf_dir.mkdir(parents=True)
    partial = hf_dir / "abc.def.0123abcd.incomplete"
    partial.write_bytes(b"x" * 100)
    # Another program (huggingface_hub in some other process) holds a per-file lock here.
    with (hf_dir / "other.safetensors.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        notes = []
        dl.download(hub.repo_id, out, endpoint=hub.endpoint, progress=False, say=notes.append)
        assert partial.exists() and any(n.startswith("kept 1 partial file(s)") for n in notes), notes
    # A second ktutorial download into the same folder is refused while one runs.
    with (out / dl.LOCK_NAME).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another ktutorial download is writing into"):
            dl.download(hub.repo_id, out, endpoint=hub.endpoint, **_quiet())


def test_token_comes_from_env_and_is_never_printed(hub, served_dir, tmp_path, monkeypatch):
    secret = "hf_" + uuid.uuid4().hex
    hub.add_repo("ktutorial-test/gated", served_dir, token=secret)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match="gated or private .* set HF_TOKEN .*HF_TOKEN is missing"):
        dl.download("ktutorial-test/gated", tmp_path / "a", endpoint=hub.endpoint, **_quiet())
    monkeypatch.setenv("HF_TOKEN", secret)
    notes = []
    result = dl.download("ktutorial-test/gated", tmp_path / "b", endpoint=hub.endpoint, progress=False,
                         say=notes.append)
    assert result.files_fetched > 0
    assert {r.bearer for r in hub.requests if "gated" in r.path and r.status == 200} == {secret}
    blob = json.dumps(result.summary()) + "".join(notes) + (tmp_path / "b" / dl.MANIFEST_NAME).read_text()
    assert secret not in blob


# --- verify ----------------------------------------------------------------------------------------


@pytest.fixture
def downloaded(hub, tmp_path) -> Path:
    out = tmp_path / "model"
    dl.download(hub.repo_id, out, endpoint=hub.endpoint, **_quiet())
    assert dl.verify(out).ok
    return out


def test_truncated_shard_is_caught_and_refetched(hub, downloaded, served_dir):
    shard = _largest_shard(served_dir)
    path = downloaded / shard
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    report = dl.verify(downloaded)
    assert report.bad_files == [shard] and report.problems[0].kind == "size"
    # Without the manifest the safetensors header still gives it away.
    manifest = (downloaded / dl.MANIFEST_NAME).read_bytes()
    (downloaded / dl.MANIFEST_NAME).unlink()
    report = dl.verify(downloaded)
    assert report.bad_files == [shard] and "truncated" in report.problems[0].detail
    (downloaded / dl.MANIFEST_NAME).write_bytes(manifest)
    # A new download notices the wrong size and fetches that file again.
    notes = []
    again = dl.download(hub.repo_id, downloaded, endpoint=hub.endpoint, progress=False, say=notes.append)
    assert again.files_fetched == 1 and any(f"removed {shard}" in n for n in notes)
    assert dl.verify(downloaded, check_sha256=True).ok


def test_same_size_corruption_needs_sha256(hub, downloaded, served_dir):
    shard = _largest_shard(served_dir)
    path = downloaded / shard
    with path.open("r+b") as f:
        f.seek(path.stat().st_size - 100)
        tail = f.read(50)
        f.seek(path.stat().st_size - 100)
        f.write(bytes(b ^ 0xFF for b in tail))
    assert dl.verify(downloaded).ok  # sizes and headers cannot see it (nor can huggingface_hub)
    report = dl.verify(downloaded, check_sha256=True)
    assert report.bad_files == [shard] and report.problems[0].kind == "sha256"
    # The fix verify prints: delete the file, download again.
    path.unlink()
    assert dl.download(hub.repo_id, downloaded, endpoint=hub.endpoint, **_quiet()).files_fetched == 1
    assert dl.verify(downloaded, check_sha256=True).ok
    # A small git-stored file is checked by its git blob id.
    (downloaded / "config.json").write_text((downloaded / "config.json").read_text().replace(" ", "\t", 1))
    assert "config.json" in dl.verify(downloaded, check_sha256=True).bad_files


def test_missing_shard_and_missing_expert_tensors(downloaded, served_dir):
    spec = ModelSpec.from_dir(served_dir)
    shard = _largest_shard(served_dir)
    (downloaded / shard).unlink()
    report = dl.verify(downloaded)
    assert report.bad_files == [shard] and report.problems[0].kind == "missing"

    shutil.copyfile(served_dir / shard, downloaded / shard)
    index = json.loads((downloaded / dl.INDEX_NAME).read_text())
    gone = f"model.layers.{spec.num_layers - 1}.block_sparse_moe.experts.0.w2.weight_scale_inv"
    del index["weight_map"][gone]
    (downloaded / dl.INDEX_NAME).write_text(json.dumps(index))
    report = dl.verify(downloaded)
    tensor = [p for p in report.problems if p.kind == "tensor"]
    assert len(tensor) == 1 and f"layer {spec.num_layers - 1}: 1 of" in tensor[0].detail
    assert gone in tensor[0].detail and tensor[0].path == dl.INDEX_NAME


def test_verify_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        dl.verify(tmp_path / "nowhere")
    report = dl.verify(tmp_path)
    assert not report.ok and {"config.json", dl.INDEX_NAME} <= set(report.bad_files)


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_download_then_verify(hub, served_dir, tmp_path, capsys):
    out = tmp_path / "model"
    secret = "hf_" + uuid.uuid4().hex
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": secret}
    env.pop("HF_ENDPOINT", None)
    cmd = [sys.executable, "-m", "ktutorial.cli", "download", "--repo", hub.repo_id, "--local-dir", str(out),
           "--endpoint", hub.endpoint, "--include", "*.json", "--include", "*.safetensors", "--workers", "2",
           "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"] == summary["files_fetched"] > 0
    assert summary["commit"] == hub.repos[hub.repo_id].commit
    assert secret not in proc.stdout + proc.stderr
    assert {r.bearer for r in hub.requests} == {secret}
    assert not (tmp_path / "hf-home").exists()  # nothing under HF_HOME for a local_dir download

    assert _cli(["verify", str(out), "--sha256"]) == 0
    assert capsys.readouterr().out.startswith("ok ")
    shard = _largest_shard(served_dir)
    with (out / shard).open("r+b") as f:
        f.truncate(10)
    assert _cli(["verify", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["bad_files"] == [shard]
    assert _cli(["verify", str(out)]) == 1
    assert shard in capsys.readouterr().out

    assert _cli(["download", "--model", "gpt-17", "--local-dir", str(tmp_path / "x")]) == 2
    assert "known models: minimax-m2.1" in capsys.readouterr().err.replace("\n", "")
