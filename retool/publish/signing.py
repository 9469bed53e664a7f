"""Signed model repositories with OpenSSF model-signing (``pip install 'retool[sign]'``).

Two signatures per model, both Sigstore bundles written by model-signing's own API:

- ``<name>/<N>/model.sig`` signs the version folder: the model, its external data, ``samples.npz`` and
  ``manifest.json`` (exactly the manifest's ``files`` plus the manifest). Made once, at publish, before the
  version becomes visible; a version is immutable, so it never changes.
- ``<name>/config.sig`` signs the model folder without its version folders: ``config.pbtxt``,
  ``aliases.json``, ``serving.json`` and ``history.json``. The index (history.json) records the sha256 of
  every version's manifest, so this signature also binds each version number to its contents. Every
  writer (publish, promote, rollback, configure) re-signs it, under the model's lock, after the index.

Both are plain model-signing signatures of a folder, with the ignored paths recorded in the signed
payload, so ``model_signing verify key <folder> --signature <sig> --public_key PUB`` checks them too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator

from retool.errors import MissingDependency, PublishError, UsageError
from retool.procs import temp_dir

if TYPE_CHECKING:  # pragma: no cover
    from retool.publish.finding import Finding
    from retool.publish.repository import Repository
    from retool.publish.storage import Staged, Storage

SIGNATURE = "model.sig"
CONFIG_SIGNATURE = "config.sig"
#: what config.sig covers (those present)
MODEL_FILES = ("config.pbtxt", "aliases.json", "serving.json", "history.json")


def _lib():
    try:
        import model_signing
    except ImportError as exc:
        raise MissingDependency(getattr(exc, "name", None) or "model_signing", "sign",
                                "sign or verify a model repository") from None
    return model_signing


def _hashing(ignore, known: dict | None = None) -> object:
    """model-signing's file serialization (sha256 per file). ``known``: {relative name: sha256 hex} retool
    computed from the same bytes (verify's pass, or publish's manifest); those files are not read again."""
    ms = _lib()
    cls = _known_digests(known) if known else ms.hashing.Config
    return cls().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False) \
        .set_ignored_paths(paths=sorted(set(ignore)), ignore_git_paths=False)


def _known_digests(known: dict):
    """A hashing configuration whose manifest takes the digests in ``known`` and has model-signing hash every
    other file of the folder (its walk, ignore rules and symlink refusal decide which). The manifest is the
    same either way: model-signing's file serialization is each file's plain sha256, as retool's manifests."""
    ms = _lib()
    from model_signing._hashing.hashing import Digest  # model-signing 1.1.x (pinned <1.2 in pyproject)

    class Known(ms.hashing.Config):
        def hash(self, model_path, *, files_to_hash=None):
            root = Path(model_path)
            ignored = {Path(p).as_posix() for p in getattr(self, "_ignored_paths", ())}
            mine = {rel: d for rel, d in known.items() if not any(rel == i or rel.startswith(i.rstrip("/") + "/")
                                                                  for i in ignored)}
            rest = []
            for p in (files_to_hash if files_to_hash is not None else [root, *root.glob("**/*")]):
                rel = Path(p).relative_to(root).as_posix()
                if rel in mine and Path(p).is_symlink():  # model-signing refuses it, as without ``known``
                    del mine[rel]
                if rel not in mine:
                    rest.append(Path(p))
            theirs = super().hash(root, files_to_hash=rest)
            items = [ms.manifest.FileManifestItem(path=PurePosixPath(rel), digest=Digest("sha256", bytes.fromhex(d)))
                     for rel, d in mine.items()]
            items += [ms.manifest.FileManifestItem(path=PurePosixPath(rd.identifier), digest=rd.digest)
                      for rd in theirs.resource_descriptors()]
            return ms.manifest.Manifest(theirs.model_name, items,
                                        ms.manifest.SerializationType.from_args(theirs.serialization_type))

    return Known


def _pem(path, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag} {p}: no such file; give a PEM file")
    return p


@dataclass(frozen=True)
class Signer:
    """A private key (EC P-256/384/521, PEM), optionally with its signing certificate and chain."""

    key: Path
    cert: Path | None = None
    chain: tuple[Path, ...] = ()

    def config(self):
        """model-signing's signing configuration; UsageError for a key or certificate it cannot use."""
        ms = _lib()
        cfg = ms.signing.Config()
        password = os.environ.get("RETOOL_SIGN_KEY_PASSWORD")
        try:
            if self.cert:  # model-signing 1.1 refuses an empty chain: the certificate file itself is one
                cfg.use_certificate_signer(private_key=self.key, signing_certificate=self.cert,
                                           certificate_chain=self.chain or (self.cert,))
            else:
                cfg.use_elliptic_key_signer(private_key=self.key, password=password)
        except (ValueError, TypeError) as exc:  # not a PEM key, encrypted, an unsupported curve
            raise UsageError(f"--sign-key {self.key}: cannot sign with it ({exc}); give an unencrypted EC P-256/"
                             f"384/521 private key in PEM (or set RETOOL_SIGN_KEY_PASSWORD), and with --sign-cert "
                             f"its certificate") from None
        return cfg

    def sign(self, folder: Path, out: Path, ignore, known: dict | None = None) -> bytes:
        self.config().set_hashing_config(_hashing(ignore, known)).sign(folder, out)
        return out.read_bytes()


def signer(key=None, cert=None, chain=()) -> Signer | None:
    """From the --sign-key / --sign-cert flags (or the pipeline's signing block); None when no key."""
    if not key:
        if cert:
            raise UsageError("--sign-cert needs --sign-key (the certificate's private key)")
        return None
    out = Signer(_pem(key, "--sign-key"), _pem(cert, "--sign-cert") if cert else None,
                 tuple(_pem(c, "--sign-cert") for c in chain))
    out.config()  # a bad key is refused before anything is staged
    return out


# ---- views: a local folder model-signing can read ------------------------------------------------------
def _fill(store: "Storage", key: str, dest: Path, skip=(), known=()) -> None:
    for rel in store.files(key):
        if rel.split("/", 1)[0] in skip or rel in known:
            continue
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(store.read_bytes(f"{key}/{rel}"))


@contextlib.contextmanager
def _view(store: "Storage", key: str, skip=(), known=()) -> Iterator[Path]:
    """The folder itself when local; else a temporary copy of its files (those under ``skip`` left out, and
    those in ``known``: their digests are already known, so their bytes need not travel)."""
    from retool.publish.storage import LocalStorage

    if isinstance(store, LocalStorage):
        yield store._p(key)
        return
    tmp = Path(tempfile.mkdtemp(prefix="retool-sign-"))
    try:
        view = tmp / key.rsplit("/", 1)[-1]
        view.mkdir()
        _fill(store, key, view, skip, known)
        yield view
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _transient(entry: str) -> bool:
    from retool.publish.storage import LOCK_FILE, STAGING_PREFIX

    return entry in (LOCK_FILE, ".staging", ".versions") or entry.startswith(STAGING_PREFIX) \
        or (entry.startswith(".") and entry.endswith(".tmp"))


# ---- signing ---------------------------------------------------------------------------------------
def sign_version(store: "Storage", staged: "Staged", files: dict, mbytes: bytes, key: Signer,
                 digests: dict | None = None) -> "Staged":
    """Sign a staged version (its files and manifest) before it is committed; the signature travels with it.
    ``digests``: the files' sha256s as the manifest records them (publish computed them), signed as they are."""
    from retool.publish.storage import MANIFEST, LocalStorage

    if isinstance(store, LocalStorage):  # the staging folder becomes the version: sign it in place
        folder = Path(staged.key)
        (folder / MANIFEST).write_bytes(mbytes)  # commit writes the same bytes again
        key.sign(folder, folder / SIGNATURE, [SIGNATURE], digests)
        return staged
    with temp_dir("sign") as tmp:
        view = Path(tmp) / "version"
        for rel, src in files.items():
            dst = view / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)  # no copy of a large model when on one file system
            except OSError:
                shutil.copyfile(src, dst)
        (view / MANIFEST).write_bytes(mbytes)
        data = key.sign(view, Path(tmp) / SIGNATURE, [SIGNATURE], digests)
    store.write_bytes(f"{staged.key}/{SIGNATURE}", data)
    return replace(staged, files=(SIGNATURE, *(f for f in staged.files if f != SIGNATURE)))


def sign_model(repo: "Repository", name: str) -> None:
    """(Re)sign config.sig: everything in the model folder but its versions and retool's temporaries."""
    store = repo.storage
    skip = {k for k in store.listdir(name) if k not in MODEL_FILES and (k.isascii() and k.isdigit() or _transient(k))}
    skip.add(CONFIG_SIGNATURE)
    with _view(store, name, skip) as folder, temp_dir("sign") as tmp:
        data = repo.signer.sign(folder, Path(tmp) / CONFIG_SIGNATURE, skip)
    store.write_bytes(f"{name}/{CONFIG_SIGNATURE}", data)


def check_writer(repo: "Repository", name: str) -> None:
    """A signed model takes no unsigned write: its signature would go stale."""
    if getattr(repo, "signer", None) is None and repo.storage.exists(f"{name}/{CONFIG_SIGNATURE}"):
        raise PublishError(f"{repo.storage.location(f'{name}/{CONFIG_SIGNATURE}')}: {name} is signed; pass "
                           f"--sign-key KEY.pem (pipeline: publish.signing.key) to change it, or its signature "
                           f"would no longer match")


# ---- verifying -------------------------------------------------------------------------------------
_HASH = re.compile(r"Hash mismatch for '([^']+)'")
_LIST = re.compile(r"(Extra|Missing) files (?:found )?in model '[^']*': (.+?)[\"'](?:, |\])")


def _problems(message: str) -> list[tuple[str, str]]:
    """model-signing's mismatch message (a list's repr) -> (relative file, what)."""
    message = message.replace("\\'", "'")
    out = [(f, "changed since it was signed") for f in _HASH.findall(message)]
    for kind, names in _LIST.findall(message):
        what = "not signed (added after signing)" if kind == "Extra" else "signed, but missing"
        out += [(n.strip(), what) for n in names.split(",") if n.strip()]
    return out


def _verify_folder(store: "Storage", model: str, version, key: str, sig: str, trust: Path,
                   skip=(), known: dict | None = None) -> list["Finding"]:
    from retool.publish.finding import Finding

    loc = store.location
    if not store.exists(f"{key}/{sig}"):
        return [Finding(model, version, loc(f"{key}/{sig}"), "unsigned",
                        "no signature; publish it again with --sign-key")]
    with _view(store, key, skip, known or ()) as folder:
        extra = [k for k in (os.listdir(folder) if folder.is_dir() else ()) if _transient(k)]
        cfg = _verifier(trust)
        sig_path = folder / sig
        try:
            cfg.set_hashing_config(_hashing([*extra, sig], known)).verify(folder, sig_path)
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError and friends for a bad bundle
            text = str(exc)
            found = _problems(text)
            if found:
                return [Finding(model, version, loc(f"{key}/{rel}"), "bad-signature", what) for rel, what in found]
            if "mismatch" in text.lower() or "verif" in text.lower() or "signature" in text.lower():
                what = f"not signed by the trusted key {fingerprint(trust)[:16]}…"
            else:  # a symbolic link, a damaged bundle ...
                what = "model-signing cannot check it"
            return [Finding(model, version, loc(f"{key}/{sig}"), "bad-signature", f"{what} ({text.strip()[:200]})")]
    return []


def _verifier(trust: Path):
    """model-signing's verifying configuration for a public key, or a CA certificate (chain) PEM."""
    ms = _lib()
    cfg = ms.verifying.Config()
    try:
        if b"CERTIFICATE" in trust.read_bytes():
            return cfg.use_certificate_verifier(certificate_chain=[trust])
        return cfg.use_elliptic_key_verifier(public_key=trust)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--trust-key {trust}: not a public key or CA certificate model-signing can use ({exc}); "
                         f"give the publisher's EC public key PEM (openssl ec -in KEY.pem -pubout)") from None


def verify(repo: "Repository", name: str, trust_key, digests: dict | None = None) -> list["Finding"]:
    """Every version folder and config.sig of ``name`` against ``trust_key`` (public key or CA PEM).
    ``digests``: what ``repo.verify(..., digests=)`` computed, so no file is hashed twice."""
    trust = _pem(trust_key, "--trust-key")
    _verifier(trust)  # a bad trust key is a usage error, before any download
    store = repo.storage
    out = []
    for k, kind in sorted(repo._version_folders(name).items()):
        if kind == "ok":
            out += _verify_folder(store, name, int(k), f"{name}/{k}", SIGNATURE, trust,
                                  known=(digests or {}).get(f"{name}/{k}"))
    known = repo.indexed_versions(name)
    skip = {k for k in store.listdir(name) if k in known or _transient(k)}
    return out + _verify_folder(store, name, None, name, CONFIG_SIGNATURE, trust, skip)


def verify_repository(repo: "Repository", name: str | None, trust_key=None) -> tuple[list["Finding"], int]:
    """``repo verify``: the manifests and the index, and with ``trust_key`` the signatures, each file's bytes
    read once. The imports needed after the hashing (Triton's config schema; with a trust key model-signing,
    about 1.3 s: sigstore, tuf) run in a thread while retool hashes; the signatures are then checked against
    the digests that pass computed. Returns (findings, files checked)."""
    import sys
    import threading

    trust = _pem(trust_key, "--trust-key") if trust_key else None
    loading = threading.Thread(target=_preload, args=(trust is not None,), daemon=True)
    # the import holds the GIL; a short switch interval lets the hashing thread back in between its reads
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        loading.start()
        digests: dict | None = {} if trust else None
        findings, checked = repo.verify(name, digests=digests)
        loading.join()
    finally:
        sys.setswitchinterval(interval)
    if trust:
        for n in [repo.require_model(name)] if name else repo.models():
            findings += verify(repo, n, trust, digests)
    return findings, checked


def _preload(signed: bool) -> None:
    """The imports verify needs later: Triton's schema for config.pbtxt, and model-signing when ``signed``."""
    with contextlib.suppress(Exception):  # a missing extra is reported where it is used, as one line
        if signed:
            _lib()
    with contextlib.suppress(Exception):
        from retool.publish.config import parse_with_triton_schema

        parse_with_triton_schema("")


def require_signed(repo_url, names, trust_key, require: bool = True, storage_options=None) -> None:
    """Refuse (exit 7, naming the first bad file) unless every model in ``names`` (default: all) verifies
    and is signed by ``trust_key``. Called before any server starts."""
    if not require and not trust_key:
        return
    if not trust_key:
        raise UsageError("--require-signature needs --trust-key PUB.pem (the publisher's public key)")
    from retool.publish import open_repo

    repo = open_repo(repo_url, storage_options)
    findings = []
    for n in (list(names) if names else repo.models()):
        findings += verify_repository(repo, repo.require_model(n), trust_key)[0]
    if findings:
        f = findings[0]
        more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
        raise PublishError(f"{f.path}: {f.problem} ({f.detail}){more}; refusing an unverified repository "
                           f"(retool repo verify --require-signature for all)")


# ---- state ------------------------------------------------------------------------------------------
def fingerprint(pem: Path) -> str:
    """sha256 of the public key's PEM, as model-signing records it in the bundle (publicKey.hint)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization as ser

    data = Path(pem).read_bytes()
    if b"CERTIFICATE" in data:
        return hashlib.sha256(x509.load_pem_x509_certificate(data).public_bytes(ser.Encoding.DER)).hexdigest()
    try:
        pub = ser.load_pem_public_key(data)
    except ValueError:
        pub = ser.load_pem_private_key(data, None).public_key()
    return hashlib.sha256(pub.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def state(store: "Storage", key: str, sig: str = SIGNATURE) -> dict:
    """What a signature claims, unverified: {'signed': bool, 'key': fingerprint or None, 'kind': ...}."""
    try:
        bundle = json.loads(store.read_bytes(f"{key}/{sig}"))
    except FileNotFoundError:
        return {"signed": False, "key": None, "kind": None}
    except ValueError:
        return {"signed": True, "key": None, "kind": "damaged"}
    vm = bundle.get("verificationMaterial") or {}
    if (vm.get("publicKey") or {}).get("hint"):
        return {"signed": True, "key": vm["publicKey"]["hint"], "kind": "key"}
    cert = (vm.get("certificate") or {}).get("rawBytes") or \
        ((vm.get("x509CertificateChain") or {}).get("certificates") or [{}])[0].get("rawBytes")
    if cert:
        import base64

        return {"signed": True, "key": hashlib.sha256(base64.b64decode(cert)).hexdigest(), "kind": "certificate"}
    return {"signed": True, "key": None, "kind": "unknown"}


def label(st: dict) -> str:
    if not st["signed"]:
        return "unsigned"
    return f"signed ({st['kind']} {st['key'][:16]})" if st.get("key") else f"signed ({st['kind']})"


# ---- click flags shared by the commands ---------------------------------------------------------------
def trust_options(f):
    """--require-signature / --trust-key: verify the repository (hashes, index, signatures) first."""
    import click

    f = click.option("--trust-key", type=click.Path(dir_okay=False),
                     help="Public key (or CA certificate) PEM the repository must be signed with; implies "
                          "--require-signature.")(f)
    return click.option("--require-signature", is_flag=True,
                        help="Refuse (exit 7) a repository whose versions or config are unsigned, signed by "
                             "another key, or changed since signing.")(f)


def sign_options(f):
    """--sign-key / --sign-cert: sign what the command writes."""
    import click

    f = click.option("--sign-cert", type=click.Path(dir_okay=False),
                     help="Signing certificate PEM for --sign-key (verified against a CA with --trust-key CA.pem).")(f)
    return click.option("--sign-key", type=click.Path(dir_okay=False),
                        help="EC private key PEM: sign with OpenSSF model-signing (version -> N/model.sig, "
                             "config, aliases and history -> config.sig).")(f)


def signed_by(repo_url, model: str, version, trust_key=None) -> str | None:
    """The key fingerprint a version is signed with, for deploy's annotations: the trust key's (verified
    before), else what a local repository's signature names (unverified); None when unsigned or unread."""
    if trust_key:
        return fingerprint(_pem(trust_key, "--trust-key"))
    from retool.deploy.common import is_remote
    from retool.publish.storage import open_storage

    if is_remote(str(repo_url)):
        return None
    st = state(open_storage(str(repo_url)), f"{model}/{version}")
    return st["key"] if st["signed"] else None


def describe(repo_url, model: str, version, verified: bool = False) -> str:
    """One line for reports: 'signed (key 0123…)', with ', verified' after --trust-key passed, or 'unsigned'."""
    from retool.publish.storage import open_storage

    st = state(open_storage(str(repo_url)), f"{model}/{version}")
    return label(st) + (", verified" if verified and st["signed"] else "" if not st["signed"] else ", unverified")


def sign_published(repo: "Repository", name: str) -> list[int]:
    """Sign a model published without signatures: each unsigned version, then config.sig. Refused unless
    plain verify finds nothing (it would sign a tampered file). Returns the versions signed."""
    name = repo.require_model(name)
    store = repo.storage
    with store.lock(name):
        findings, _ = repo.verify(name)
        if findings:
            f = findings[0]
            raise PublishError(f"{f.path}: {f.problem} ({f.detail}); refusing to sign a model that does not verify "
                               f"(retool repo verify {repo.url} {name})")
        done = []
        for v in repo.versions(name):
            if store.exists(f"{name}/{v}/{SIGNATURE}"):
                continue
            with _view(store, f"{name}/{v}") as folder, temp_dir("sign") as tmp:
                data = repo.signer.sign(folder, Path(tmp) / SIGNATURE, [SIGNATURE])
            store.write_bytes(f"{name}/{v}/{SIGNATURE}", data)
            done.append(v)
        repo.record(name, "sign", versions=done)  # and config.sig
    return done
