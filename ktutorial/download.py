"""Fetch a model from the Hugging Face hub with huggingface_hub's own `snapshot_download`, and
check what arrived.

`download()` adds what a 230 GB download needs around it:
- the repo's size is read first (`model_info(files_metadata=True)`) and compared with free disk
  before the first byte: "needs 230.1 GB, 12.0 GB free at DIR";
- the branch is resolved to one commit, and every file is fetched at that commit, so a branch
  that moves during a long download cannot mix two versions;
- a manifest (`.ktutorial-manifest.json`) keeps the hub's sizes and sha256 for `verify()`;
- resume: huggingface_hub resumes a dropped connection with `Range` only inside one call, and a
  killed process leaves `*.incomplete` files that later calls ignore and never delete (FACTS.md).
  So this call retries the whole snapshot a few times (finished files are kept, each retry
  fetches only what is missing), and a new call deletes the stale `*.incomplete` files of a
  killed run, and files of the wrong size, saying so;
- the endpoint is passed to every huggingface_hub call rather than read from HF_ENDPOINT:
  huggingface_hub reads its environment once, at import, and a notebook has often imported it
  already (transformers does). HF_ENDPOINT is still honoured: it is read here, at call time;
- the token comes from HF_TOKEN only and is never printed; without it no token is sent.

`verify()` needs no network: shards named by model.safetensors.index.json present, of the hub's
size (and sha256 on request), headers readable and consistent with the file length, and every
expert tensor of every layer present with the shape the spec says.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm  # not tqdm.auto: it warns at import in a kernel without ipywidgets

from ktutorial.errors import UserError
from ktutorial.spec import ModelSpec, SpecError, known_model, known_models, unknown_model_message
from ktutorial.tables import Markdown, ShowsItself, table

MANIFEST_NAME = ".ktutorial-manifest.json"
MANIFEST_SCHEMA = "ktutorial.manifest/1"
INDEX_NAME = "model.safetensors.index.json"
# Where huggingface_hub keeps a local_dir download's metadata, locks and partial files.
HF_DOWNLOAD_DIR = Path(".cache") / "huggingface" / "download"
LOCK_NAME = Path(".cache") / "ktutorial" / "download.lock"
EXPERT_PROJECTIONS = ("w1", "w2", "w3")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors refuses larger headers too


class NotEnoughDisk(UserError):
    """The download would not fit on the target disk."""


def format_bytes(n: float) -> str:
    """Sizes as disks count them (10**3 steps): 230.1 GB, 12.0 MB, 512 B."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def repo_for_model(name: str) -> tuple[str, str]:
    """(repo_id, revision) of a model that ships with the package; unknown names list the known."""
    try:
        meta = known_model(name)
    except SpecError:
        raise UserError(
            unknown_model_message(name, known_models(), " (or pass --repo ORG/NAME for any hub repo)")) from None
    return meta["repo_id"], meta.get("revision") or "main"


def is_pinned(revision: str) -> bool:
    """Whether `revision` names one commit (a full 40-hex sha) rather than a branch or tag that moves."""
    return bool(re.fullmatch(r"[0-9a-f]{40}", revision))


def unpinned_note(name: str, revision: str) -> str | None:
    """What a download of known model `name` at a moving `revision` should say (None when pinned)."""
    if is_pinned(revision):
        return None
    return (f"{name}'s revision is unpinned ({revision!r}, a branch that can move): the download records the "
            "commit it resolved to in its manifest; pass --revision SHA to fetch exactly one commit")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The hub to talk to: the argument, else HF_ENDPOINT now, else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def public_url(url: str) -> str:
    """The URL without any user:password part, for manifests and messages."""
    parts = urlsplit(url)
    if not parts.hostname or "@" not in parts.netloc:
        return url
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _token() -> str | bool:
    # False, not None: None would let huggingface_hub fall back to a stored login token.
    return os.environ.get("HF_TOKEN") or False


def token_status() -> str:
    """'set' or 'missing', for printing; the token itself is never shown."""
    return "set" if os.environ.get("HF_TOKEN") else "missing"


def _say_default(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- what the hub has --------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # the hub gives it for lfs files (the weights)
    blob_id: str | None = None


@dataclass
class RepoListing:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    files: list[RemoteFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _hub_error(exc: BaseException, repo_id: str, revision: str, endpoint: str) -> UserError | None:
    """A fixable hub error as a UserError naming the fix; None for errors worth a retry."""
    from huggingface_hub import errors as hf_errors

    endpoint = public_url(endpoint)
    if isinstance(exc, hf_errors.GatedRepoError):
        return UserError(
            f"{repo_id} is gated or private at {endpoint}: accept its license on {endpoint}/{repo_id} "
            f"and set HF_TOKEN to a token of that account (HF_TOKEN is {token_status()})"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return UserError(
            f"repo {repo_id!r} not found at {endpoint}: check the name (ORG/NAME); "
            f"if it is private, set HF_TOKEN (HF_TOKEN is {token_status()})"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return UserError(f"revision {revision!r} not found in {repo_id} at {endpoint}: pass an existing "
                         "branch, tag or commit with --revision")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return UserError(f"a file of {repo_id} vanished from {endpoint} during the download; run it again")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set, which blocks every request: unset it to download")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return UserError(f"{endpoint} refused access to {repo_id} (HTTP {status}): set HF_TOKEN to a "
                             f"token that may read it (HF_TOKEN is {token_status()})")
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            return UserError(f"{endpoint} answered HTTP {status} for {repo_id}: {str(exc).splitlines()[0]}")
        return None
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NotEnoughDisk(f"the disk filled up during the download ({exc}); free space and run it "
                             "again: finished files are kept")
    return None


def _unreachable(exc: BaseException, endpoint: str) -> UserError:
    return UserError(f"cannot reach {public_url(endpoint)} ({exc.__class__.__name__}: {exc}); check the network, "
                     "or --endpoint / HF_ENDPOINT for a mirror")


def list_repo(repo_id: str, revision: str = "main", endpoint: str | None = None) -> RepoListing:
    """Every file of the repo at `revision`, with sizes and sha256, and the commit it resolves to."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile

    endpoint = resolve_endpoint(endpoint)
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set, which blocks every request: unset it to download")
    api = HfApi(endpoint=endpoint, token=_token())
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        files = [
            RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
            for s in info.siblings or []
        ]
        if any(f.size is None for f in files):
            # Some mirrors leave sizes out of model_info: the tree listing always has them.
            files = [
                RemoteFile(t.path, t.size, t.lfs.sha256 if t.lfs else None, t.blob_id)
                for t in api.list_repo_tree(repo_id, revision=info.sha, recursive=True)
                if isinstance(t, RepoFile)
            ]
    except httpx2.TransportError as exc:
        raise _unreachable(exc, endpoint) from None
    except Exception as exc:
        err = _hub_error(exc, repo_id, revision, endpoint)
        if err is None:
            raise
        raise err from None
    if not info.sha:
        raise UserError(f"{endpoint} gave no commit for {repo_id}@{revision}; is it a hub endpoint?")
    return RepoListing(repo_id, revision, info.sha, endpoint, sorted(files, key=lambda f: f.path))


# --- the plan: what to fetch, and does it fit ------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def stale_incomplete_files(local_dir: Path) -> list[Path]:
    """Partial files a killed huggingface_hub download left in local_dir (never reused by it)."""
    root = Path(local_dir) / HF_DOWNLOAD_DIR
    return sorted(root.rglob("*.incomplete")) if root.is_dir() else []


def _hf_locks_busy(local_dir: Path) -> bool:
    """True when some process holds one of huggingface_hub's per-file locks in local_dir."""
    root = Path(local_dir) / HF_DOWNLOAD_DIR
    for lock in root.rglob("*.lock") if root.is_dir() else []:
        try:
            with lock.open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
        except BlockingIOError:
            return True
        except OSError:
            continue
    return False


@dataclass
class DownloadPlan(ShowsItself):
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    local_dir: Path
    allow_patterns: list[str] | None
    files: list[RemoteFile]  # the ones asked for
    present: list[str]  # already in local_dir with the hub's size
    wrong_size: list[str]  # in local_dir with another size: removed and fetched again
    stale_incomplete: list[Path]
    bytes_total: int
    bytes_to_fetch: int
    bytes_reclaimable: int  # freed by removing stale and wrong-size files first
    free_bytes: int
    disk_path: Path

    @property
    def fits(self) -> bool:
        return self.free_bytes + self.bytes_reclaimable >= self.bytes_to_fetch

    def refusal(self) -> str:
        free = self.free_bytes + self.bytes_reclaimable
        return (
            f"not enough disk for {self.repo_id}: needs {format_bytes(self.bytes_to_fetch)}, "
            f"{format_bytes(free)} free at {self.disk_path} "
            f"({len(self.files) - len(self.present)} of {len(self.files)} files still to fetch); "
            "free space or pick another --local-dir"
        )

    def markdown(self) -> Markdown:
        return table(self.summary())

    def summary(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": public_url(self.endpoint),
            "local_dir": str(self.local_dir),
            "allow_patterns": self.allow_patterns,
            "files": len(self.files),
            "files_present": len(self.present),
            "files_wrong_size": self.wrong_size,
            "stale_incomplete": len(self.stale_incomplete),
            "total_gb": round(self.bytes_total / 1e9, 3),
            "to_fetch_gb": round(self.bytes_to_fetch / 1e9, 3),
            "free_gb": round((self.free_bytes + self.bytes_reclaimable) / 1e9, 3),
            "fits": self.fits,
            "token": token_status(),
        }


def plan_download(
    repo_id: str,
    local_dir: str | Path,
    revision: str = "main",
    allow_patterns: list[str] | str | None = None,
    endpoint: str | None = None,
    listing: RepoListing | None = None,
) -> DownloadPlan:
    """What a download would fetch and whether it fits; touches nothing on disk."""
    from huggingface_hub.utils import filter_repo_objects

    local_dir = Path(local_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise UserError(f"{local_dir} exists and is not a folder: pick another --local-dir")
    listing = listing or list_repo(repo_id, revision, endpoint)
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
    wanted = list(filter_repo_objects(listing.files, allow_patterns=patterns, key=lambda f: f.path))
    if patterns and not wanted:
        raise UserError(
            f"no file of {repo_id} matches --include {' '.join(patterns)}; its files: "
            + ", ".join(f.path for f in listing.files[:12])
            + (" ..." if len(listing.files) > 12 else "")
        )
    present, wrong, reclaim, to_fetch = [], [], 0, 0
    for f in wanted:
        local = local_dir / f.path
        if local.is_file():
            size = local.stat().st_size
            if size == f.size:
                present.append(f.path)
                continue
            wrong.append(f.path)
            reclaim += size
        to_fetch += f.size
    stale = stale_incomplete_files(local_dir)
    reclaim += sum(p.stat().st_size for p in stale)
    disk_path = _existing_ancestor(local_dir)
    return DownloadPlan(
        repo_id=repo_id,
        revision=revision,
        commit=listing.commit,
        endpoint=listing.endpoint,
        local_dir=local_dir,
        allow_patterns=patterns,
        files=wanted,
        present=present,
        wrong_size=wrong,
        stale_incomplete=stale,
        bytes_total=sum(f.size for f in wanted),
        bytes_to_fetch=to_fetch,
        bytes_reclaimable=reclaim,
        free_bytes=shutil.disk_usage(disk_path).free,
        disk_path=disk_path,
    )


# --- the download ----------------------------------------------------------------------------


@dataclass
class DownloadResult(ShowsItself):
    repo_id: str
    revision: str
    commit: str
    local_dir: str
    files: int
    files_fetched: int
    bytes_total: int
    bytes_fetched: int
    attempts: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> Markdown:
        return table(self.summary())

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_gb"] = round(self.bytes_total / 1e9, 3)
        d["fetched_gb"] = round(self.bytes_fetched / 1e9, 3)
        d["fetched_mb_per_s"] = round(self.bytes_fetched / 1e6 / self.seconds, 1) if self.seconds else None
        return d


@contextmanager
def _exclusive(local_dir: Path) -> Iterator[None]:
    """One ktutorial download per folder: a second one would delete the first one's partial files."""
    lock_path = local_dir / LOCK_NAME
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another ktutorial download is writing into {local_dir}: wait for it to "
                            "finish or stop it, then run this again") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): delete it and run ktutorial download again") from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise UserError(f"{path} has schema {manifest.get('schema')!r}, expected {MANIFEST_SCHEMA!r}: "
                        "delete it and run ktutorial download again")
    return manifest


def _write_manifest(plan: DownloadPlan, listing: RepoListing, say: Callable[[str], None]) -> None:
    path = plan.local_dir / MANIFEST_NAME
    old = None
    try:
        old = read_manifest(plan.local_dir)
    except UserError:
        pass
    requested = {f.path for f in plan.files}
    if old and old.get("repo_id") == plan.repo_id and old.get("commit") == plan.commit:
        requested |= set(old.get("requested", []))
    elif old:
        say(f"{plan.local_dir} held {old.get('repo_id')}@{str(old.get('commit'))[:12]}; "
            f"updating it to {plan.repo_id}@{plan.commit[:12]}")
    _write_json_atomic(path, {
        "schema": MANIFEST_SCHEMA,
        "repo_id": plan.repo_id,
        "revision": plan.revision,
        "commit": plan.commit,
        "endpoint": public_url(plan.endpoint),
        "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requested": sorted(requested),
        "files": {f.path: {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id} for f in listing.files},
    })


def _tqdm_class(progress: bool):
    if progress:
        return None  # huggingface_hub's own bars (HF_HUB_DISABLE_PROGRESS_BARS=1 hides them)

    class _Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def download(
    repo_id: str,
    local_dir: str | Path,
    revision: str = "main",
    allow_patterns: list[str] | str | None = None,
    max_workers: int = 8,
    endpoint: str | None = None,
    *,
    attempts: int = 3,
    retry_wait_s: float = 1.0,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> DownloadResult:
    """Fetch `repo_id` at `revision` into `local_dir`, refusing before the first byte if it won't fit.

    `allow_patterns` are huggingface_hub's globs ("*.json", "model-0000[1-3]-*"). A dropped
    connection resumes inside the call (huggingface_hub's Range retries); a failed snapshot is
    retried `attempts` times, keeping finished files. Messages go to `say` (stderr by default).
    """
    import httpx2
    from huggingface_hub import snapshot_download

    say = say or _say_default
    if max_workers < 1:
        raise UserError(f"--workers must be at least 1, got {max_workers}")
    if attempts < 1:
        raise UserError(f"attempts must be at least 1, got {attempts}")
    local_dir = Path(local_dir)
    listing = list_repo(repo_id, revision, endpoint)
    plan = plan_download(repo_id, local_dir, revision, allow_patterns, listing=listing)
    if not plan.fits:
        raise NotEnoughDisk(plan.refusal())

    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        say(message)

    started = time.monotonic()
    local_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(local_dir):
        stale = stale_incomplete_files(local_dir)
        if stale and _hf_locks_busy(local_dir):
            note(f"kept {len(stale)} partial file(s): another program is downloading into {local_dir}")
        elif stale:
            size = sum(p.stat().st_size for p in stale)
            for p in stale:
                p.unlink(missing_ok=True)
            note(f"removed {len(stale)} partial file(s) ({format_bytes(size)}) left by an interrupted "
                 "download; huggingface_hub restarts those files from their first byte")
        for rel in plan.wrong_size:
            (local_dir / rel).unlink(missing_ok=True)
            note(f"removed {rel}: its size differs from the hub's; fetching it again")
        if plan.present:
            note(f"{len(plan.present)} of {len(plan.files)} files already here with the hub's size: kept")
        _write_manifest(plan, listing, say)

        attempt = 0
        while True:
            attempt += 1
            try:
                snapshot_download(
                    repo_id,
                    revision=plan.commit,  # every file from one commit, and no ref under HF_HOME
                    local_dir=str(local_dir),
                    allow_patterns=plan.allow_patterns,
                    max_workers=max_workers,
                    endpoint=plan.endpoint,
                    token=_token(),
                    tqdm_class=_tqdm_class(progress),
                )
                break
            except Exception as exc:
                err = _hub_error(exc, repo_id, revision, plan.endpoint)
                if err is not None:
                    raise err from None
                transient = isinstance(exc, (httpx2.TransportError, OSError))
                if not transient:
                    raise
                if attempt >= attempts:
                    if isinstance(exc, httpx2.ConnectError):
                        raise _unreachable(exc, plan.endpoint) from None
                    raise UserError(
                        f"download of {repo_id} failed {attempts} times ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); run the same command again: "
                        "finished files are kept"
                    ) from None
                note(f"attempt {attempt} of {attempts} failed ({exc.__class__.__name__}); finished files "
                     "are kept, trying again")
                time.sleep(retry_wait_s * attempt)

    wrong = [f.path for f in plan.files
             if not (local_dir / f.path).is_file() or (local_dir / f.path).stat().st_size != f.size]
    if wrong:
        raise UserError(f"after the download these files are missing or of the wrong size: "
                        f"{', '.join(wrong)}; run ktutorial download again")
    present = set(plan.present)
    fetched = [f for f in plan.files if f.path not in present]
    return DownloadResult(
        repo_id=repo_id,
        revision=revision,
        commit=plan.commit,
        local_dir=str(local_dir),
        files=len(plan.files),
        files_fetched=len(fetched),
        bytes_total=plan.bytes_total,
        bytes_fetched=sum(f.size for f in fetched),
        attempts=attempt,
        seconds=round(time.monotonic() - started, 3),
        notes=notes,
    )


# --- verify ----------------------------------------------------------------------------------

# Bytes per element of the safetensors dtypes a checkpoint may hold.
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass
class Problem:
    path: str  # the file at fault, relative to the model folder
    kind: str  # missing | size | sha256 | header | tensor | config | index | manifest
    detail: str


@dataclass
class VerifyReport(ShowsItself):
    model_dir: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commit: str | None = None
    manifest: bool = False
    files_checked: int = 0
    shards_checked: int = 0
    sha256_checked: int = 0
    tensors_checked: int = 0
    expert_tensors_expected: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_files(self) -> list[str]:
        return sorted({p.path for p in self.problems})

    def add(self, path: str, kind: str, detail: str) -> None:
        self.problems.append(Problem(path, kind, detail))

    def markdown(self) -> Markdown:
        return table(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["bad_files"] = self.bad_files
        return d


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def git_blob_id(path: Path) -> str:
    """The id git (and the hub's tree) gives a file: sha1 of "blob SIZE\\0" + its bytes."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file; raises ValueError naming what is wrong with it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"only {size} bytes: no safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_bytes = 0
    for name, t in tensors.items():
        try:
            begin, end = t["data_offsets"]
            shape, dtype = t["shape"], t["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed entry") from None
        item = SAFETENSORS_DTYPE_BYTES.get(dtype)
        if item is not None and (end - begin) != math.prod(shape) * item:
            raise ValueError(f"tensor {name!r} spans {end - begin} bytes, its shape {shape} {dtype} "
                             f"needs {math.prod(shape) * item}")
        data_bytes = max(data_bytes, end)
    if 8 + n + data_bytes != size:
        raise ValueError(f"{size} bytes, but its header describes {8 + n + data_bytes} "
                         f"({'truncated' if size < 8 + n + data_bytes else 'trailing bytes'})")
    return tensors


def expert_tensor_shapes(spec: ModelSpec, layer: int, expert: int) -> dict[str, list[int]]:
    """Checkpoint name -> shape of one expert's tensors (weight_scale_inv too for FP8)."""
    h, i = spec.hidden_size, spec.expert_intermediate_size
    shapes = {}
    for proj, (rows, cols) in {"w1": (i, h), "w2": (h, i), "w3": (i, h)}.items():
        base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}"
        shapes[f"{base}.weight"] = [rows, cols]
        if spec.fp8_block is not None:
            br, bc = spec.fp8_block
            shapes[f"{base}.weight_scale_inv"] = [-(-rows // br), -(-cols // bc)]
    return shapes


def _check_file(report: VerifyReport, root: Path, rel: str, expected: dict | None,
                check_sha256: bool) -> bool:
    """Presence, size and (on request) sha256 of one file; False when it is missing or wrong."""
    path = root / rel
    report.files_checked += 1
    if not path.is_file():
        report.add(rel, "missing", "not found")
        return False
    if expected is None:
        return True
    size = path.stat().st_size
    if expected.get("size") is not None and size != expected["size"]:
        report.add(rel, "size", f"{size} bytes, the hub has {expected['size']}")
        return False
    # Small files live in git, not lfs: the hub gives their git blob id instead of a sha256.
    key = "sha256" if expected.get("sha256") else "blob_id" if expected.get("blob_id") else None
    if check_sha256 and key:
        report.sha256_checked += 1
        got = (sha256_file if key == "sha256" else git_blob_id)(path)
        if got != expected[key]:
            name = "sha256" if key == "sha256" else "git blob id"
            report.add(rel, "sha256", f"{name} {got[:16]}..., the hub has {expected[key][:16]}...")
            return False
    return True


def verify(model_dir: str | Path, spec: ModelSpec | None = None, check_sha256: bool = False) -> VerifyReport:
    """Check a downloaded checkpoint without the network; every fault is a Problem naming its file."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the --local-dir of ktutorial download")
    report = VerifyReport(model_dir=str(root))
    try:
        manifest = read_manifest(root)
    except UserError as exc:
        report.add(MANIFEST_NAME, "manifest", str(exc))
        manifest = None
    hub_files: dict[str, dict] = (manifest or {}).get("files", {})
    if manifest:
        report.manifest = True
        report.commit = manifest.get("commit")
    else:
        report.notes.append(f"no {MANIFEST_NAME} (not fetched by ktutorial download): sizes are checked "
                            "against the safetensors headers only, sha256 not at all")
    if check_sha256 and manifest:
        no_sum = [p for p in manifest.get("requested", [])
                  if not (hub_files.get(p, {}).get("sha256") or hub_files.get(p, {}).get("blob_id"))]
        if no_sum:
            report.notes.append(f"the hub gave no checksum for {len(no_sum)} file(s) "
                                f"(e.g. {no_sum[0]}): only their size is checked")

    # The model's shape: the caller's spec, else config.json.
    checked: set[str] = set()
    if spec is None:
        checked.add("config.json")
        if _check_file(report, root, "config.json", hub_files.get("config.json"), check_sha256):
            try:
                spec = ModelSpec.from_dir(root)
            except SpecError as exc:
                report.add("config.json", "config", str(exc))

    # The shards the index names (or the one model.safetensors of a single-file checkpoint).
    weight_map: dict[str, str] = {}
    shards: list[str] = []
    if (root / INDEX_NAME).is_file() or INDEX_NAME in hub_files:
        checked.add(INDEX_NAME)
        _check_file(report, root, INDEX_NAME, hub_files.get(INDEX_NAME), check_sha256)
        if (root / INDEX_NAME).is_file():  # even when changed: its names are still worth checking
            try:
                weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                report.add(INDEX_NAME, "index", "not a safetensors index (no weight_map)")
                weight_map = {}
        shards = sorted(set(weight_map.values()))
    elif (root / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        report.add(INDEX_NAME, "missing", "not found, and no model.safetensors either")
    headers: dict[str, dict[str, dict]] = {}
    for shard in shards:
        checked.add(shard)
        report.shards_checked += 1
        if not _check_file(report, root, shard, hub_files.get(shard), check_sha256):
            continue
        try:
            headers[shard] = read_safetensors_header(root / shard)
        except ValueError as exc:
            report.add(shard, "header", str(exc))
    if shards == ["model.safetensors"] and not weight_map:
        weight_map = dict.fromkeys(headers.get("model.safetensors", {}), "model.safetensors")

    # Every tensor the index names is in its shard.
    missing_in_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if shard in headers:
            report.tensors_checked += 1
            if name not in headers[shard]:
                missing_in_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(missing_in_shard.items()):
        report.add(shard, "tensor", f"{len(names)} tensor(s) the index puts here are absent, e.g. {names[0]}")

    # Every expert tensor of every layer, with the spec's shape.
    if spec is not None and shards:
        index_file = INDEX_NAME if INDEX_NAME in checked else "model.safetensors"
        for layer in range(spec.num_layers):
            absent: list[str] = []
            misshaped: list[tuple[str, str]] = []  # (shard, what)
            for expert in range(spec.num_experts):
                for name, shape in expert_tensor_shapes(spec, layer, expert).items():
                    report.expert_tensors_expected += 1
                    shard = weight_map.get(name)
                    if shard is None:
                        absent.append(name)
                        continue
                    got = headers.get(shard, {}).get(name, {}).get("shape", shape)
                    if got != shape:
                        misshaped.append((shard, f"{name} {got} (expected {shape})"))
            per_layer = len(expert_tensor_shapes(spec, layer, 0)) * spec.num_experts
            if absent:
                report.add(index_file, "tensor", f"layer {layer}: {len(absent)} of {per_layer} expert "
                           f"tensors not in the checkpoint, e.g. {absent[0]}")
            if misshaped:
                report.add(misshaped[0][0], "tensor", f"layer {layer}: {len(misshaped)} expert tensors "
                           f"of the wrong shape, e.g. {misshaped[0][1]}")

    # Whatever else the download asked for (tokenizer, chat template...).
    for rel in (manifest or {}).get("requested", []):
        if rel not in checked:
            checked.add(rel)
            _check_file(report, root, rel, hub_files.get(rel), check_sha256)
    return report
